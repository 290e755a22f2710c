"""End-to-end pod start latency on edge nodes: from a pod created in the apiserver to the pod
Running and Ready as the apiserver tells it.

Usage: .venv/bin/python bench/e2e_latency.py [--pods 100] [--nodes 10] [--rate 2]   (as root)

Everything is real and local: the test control plane (apiserver, scheduler, controller-manager;
``tests/cluster``), `outpost-cloud serve`, and ``--nodes`` `outpost run` agents, each in its own
network namespace with its own runc root, joined with tokens (``tests.edgekit.EdgeCluster``).
Images come from a loopback registry; a warm-up pod on every node pulls the busybox image
first, so no measured pod waits for a pull (``imagePullPolicy: IfNotPresent``).

Two cases, one after the other:

1. ``--pods`` pods on one edge node;
2. ``--pods`` pods spread evenly over ``--nodes`` edge nodes.

Each pod is a bridged (pod network) busybox looping on ``sleep``, with the default service
account token mounted, pinned to its node by a ``kubernetes.io/hostname`` nodeSelector, so the
scheduler places it. Pods are created at ``--rate`` per second, not all at once: the figure is
the latency one pod sees, not how long a burst of them queues on one gateway. The time starts
when the create request is sent and ends when a watch on the namespace, opened before the first
create, delivers the pod with phase Running and the Ready condition True. Where it went: the
watch says when the pod was first seen bound to its node and first seen Running, and the agent's
log when it took the pod up (``pod admitted``) and started its container; all are wall-clock
times of this machine. A case's pods are deleted, and gone, before the next case starts.
Percentiles are nearest rank. Each case also prints the load average: every process here
(control plane, cloud, agents, pods) shares this machine's CPUs, and so does anything else
running on it.

The last line is ``e2e_latency p50_ms=… p99_ms=…``, taken from the case with the higher p99 (the
line before it names that case). Target on the reference machine: p99 ≤ 2 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lightkube import AsyncClient  # noqa: E402
from lightkube.config.kubeconfig import KubeConfig  # noqa: E402
from lightkube.models.meta_v1 import ObjectMeta  # noqa: E402
from lightkube.resources.core_v1 import Namespace, Pod  # noqa: E402

from bench.pod_start import ms, parse_logfmt, parse_ts, pct  # noqa: E402
from tests.cluster.controlplane import ControlPlane  # noqa: E402
from tests.edgekit import EdgeCluster, EdgeNode, ready  # noqa: E402

COMMAND = "while true; do sleep 1; done"


def manifest(name: str, node: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "e2e"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            # busybox sh as PID 1 ignores SIGTERM: deleting waits for the grace period.
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", COMMAND],
                }
            ],
        },
    }


@dataclass
class Sample:
    """Wall-clock times (time.time()) of one pod's way to Ready."""

    node: str
    created: float = 0.0  # create request sent
    bound: float = 0.0  # first seen with spec.nodeName
    admitted: float = 0.0  # the agent's "pod admitted" log line
    started: float = 0.0  # the agent's "container started" log line
    running: float = 0.0  # first seen with phase Running
    ready: float = 0.0  # first seen Running and Ready


class Watcher:
    """One watch on the namespace, from before the first pod is created."""

    def __init__(self, client: AsyncClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.samples: dict[str, Sample] = {}
        self.changed = trio.Event()

    async def run(self) -> None:
        # Without a resourceVersion a watch first delivers every pod as it is, then every
        # change: a pod created before the watch is open is not missed.
        async for _, pod in self.client.watch(Pod, namespace=self.namespace):
            self.seen(pod.to_dict())

    def seen(self, pod: dict[str, Any]) -> None:
        now = time.time()
        sample = self.samples.get(pod["metadata"]["name"])
        if sample is None:
            return
        if pod["spec"].get("nodeName") and not sample.bound:
            sample.bound = now
        if pod.get("status", {}).get("phase") == "Running" and not sample.running:
            sample.running = now
        if ready(pod) and not sample.ready:
            sample.ready = now
            self.changed.set()
            self.changed = trio.Event()

    async def all_ready(self, names: list[str]) -> None:
        while not all(self.samples[n].ready for n in names):
            await self.changed.wait()


async def run_case(
    cluster: EdgeCluster,
    client: AsyncClient,
    title: str,
    nodes: list[str],
    pods: int,
    rate: float,
) -> list[float]:
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    await client.create(Namespace(metadata=ObjectMeta(name=namespace)))
    watcher = Watcher(client, namespace)
    names = [f"p{i:03d}" for i in range(pods)]
    load = os.getloadavg()[0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        started = time.time()
        for i, name in enumerate(names):
            # A fixed schedule: a slow create does not push the later ones back.
            await trio.sleep(max(0.0, started + i / rate - time.time()))
            node = nodes[i % len(nodes)]
            watcher.samples[name] = sample = Sample(node)
            sample.created = time.time()
            pod = Pod.from_dict(manifest(name, node, cluster.image))
            nursery.start_soon(partial(client.create, pod, namespace=namespace))
        try:
            with trio.fail_after(120 + pods / rate):
                await watcher.all_ready(names)
        except trio.TooSlowError:
            late = [n for n in names if not watcher.samples[n].ready]
            print(f"  {len(late)} pods not Ready 120 s after the last create: {late[:10]}…")
            print(await cluster.diagnostics())
            raise
        nursery.cancel_scope.cancel()
    samples = [watcher.samples[n] for n in names]
    for node in nodes:
        edge_times(cluster[node], namespace, watcher.samples)
    total = [s.ready - s.created for s in samples]
    print(f"{title}: {pods} pods, {rate:g}/s, on {len(nodes)} node(s)")
    steps = (
        ("created → Running and Ready", total),
        ("created → bound (scheduler)", [s.bound - s.created for s in samples]),
        ("bound → admitted on the edge (cloud down)", [s.admitted - s.bound for s in samples]),
        ("admitted → container started (edge)", [s.started - s.admitted for s in samples]),
        ("started → Running seen (status up)", [s.running - s.started for s in samples]),
        ("Running → Ready seen", [s.ready - s.running for s in samples]),
    )
    for what, values in steps:
        print(f"  {what:<42} {spread(values)}")
    print(
        f"  load average (1 min) {load:.1f} before, {os.getloadavg()[0]:.1f} after,"
        f" on {os.cpu_count()} CPUs"
    )
    # The next case starts on a quiet cluster: these pods are stopped and gone first.
    await client.delete(Namespace, namespace)
    with trio.move_on_after(120):
        while [p async for p in client.list(Pod, namespace=namespace)]:  # noqa: ASYNC110
            await trio.sleep(1)
    return total


def edge_times(node: EdgeNode, namespace: str, samples: dict[str, Sample]) -> None:
    """When the agent took each pod up and started its container, from its own log (the same
    wall clock as ours, millisecond resolution)."""
    assert node.log is not None
    for line in node.log.read_text(errors="replace").splitlines():
        fields = parse_logfmt(line)
        pod = fields.get("pod", "")
        if not pod.startswith(f"{namespace}/Pod/") or "ts" not in fields:
            continue
        sample = samples.get(pod.rsplit("/", 1)[1])
        if sample is None:
            continue
        if fields.get("msg") == "pod admitted" and not sample.admitted:
            sample.admitted = parse_ts(fields["ts"])
        elif fields.get("msg") == "container started" and not sample.started:
            sample.started = parse_ts(fields["ts"])


def spread(values: list[float]) -> str:
    return f"p50={ms(pct(values, 50))} p99={ms(pct(values, 99))} max={ms(max(values))} ms"


async def warm_up(cluster: EdgeCluster, client: AsyncClient, nodes: list[str]) -> None:
    """One pod per node, Ready, then deleted: the image is in every node's cache."""
    await run_case(cluster, client, "warm-up (pulls the image; not counted)", nodes, len(nodes), 20)


async def measure(folder: Path, pods: int, many: int, rate: float) -> None:
    names = [f"bench-gw-{i}" for i in range(many)]
    with ControlPlane() as plane:
        async with EdgeCluster(plane, folder, names) as cluster:
            client = AsyncClient(KubeConfig.from_file(plane.kubeconfig), trust_env=False)
            try:
                for name in names:
                    await cluster.node_ready(name, within=60)
                print(f"control plane, outpost-cloud and {many} edge nodes up")
                await warm_up(cluster, client, names)
                one = await run_case(cluster, client, "one node", names[:1], pods, rate)
                spread_over = await run_case(cluster, client, f"{many} nodes", names, pods, rate)
            finally:
                await client.close()
    cases = {"one node": one, f"{many} nodes": spread_over}
    worst = max(cases, key=lambda c: pct(cases[c], 99))
    print(f"summary from the case with the higher p99: {worst}")
    values = cases[worst]
    print(f"e2e_latency p50_ms={ms(pct(values, 50))} p99_ms={ms(pct(values, 99))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=100, help="pods in each case")
    parser.add_argument("--nodes", type=int, default=10, help="edge nodes in the second case")
    parser.add_argument("--rate", type=float, default=2, help="pods created per second")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("runc and network namespaces need root")
    with tempfile.TemporaryDirectory(prefix="outpost-e2e-bench-") as name:
        trio.run(measure, Path(name), args.pods, args.nodes, args.rate)


if __name__ == "__main__":
    main()
