"""`make demo`: a local control plane, outpost-cloud, and one edge gateway running a Deployment.

It starts the test control plane (apiserver, scheduler, controller-manager) and `outpost-cloud
serve`; makes a network namespace for a gateway (its only way out is a link to the host, as a
gateway on a site network would have); joins it (`outpost-cloud token create`, `outpost join`)
and runs `outpost run` in it; waits for its Node to be Ready; applies a sample Deployment whose
image comes from a local registry; and prints `kubectl get nodes,pods -o wide` once the pods
run. Then it stops everything. With --keep it stays up until Ctrl-C, so a person can explore
with kubectl. It needs root (network namespaces and runc).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

import trio

from tests.cluster import build
from tests.cluster.controlplane import ControlPlane, ControlPlaneError
from tests.edgekit import EdgeCluster, deployment, ready
from tests.processes import VENV_BIN

NODE = "demo-gateway"
APP = "hello"
REPLICAS = 2


def _say(*args: str | Path) -> None:
    print(f"\n$ {' '.join(str(a) for a in args)}", flush=True)


async def _kubectl(cluster: EdgeCluster, *args: str) -> None:
    _say("kubectl", *args)
    result = await cluster.kubectl(*args, check=False)
    print((result.stdout + result.stderr).decode(), end="", flush=True)


async def _show(plane: ControlPlane, keep: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="outpost-demo-") as folder:
        try:
            async with EdgeCluster(plane, Path(folder), [NODE]) as cluster:
                assert cluster.cloud is not None
                edge = cluster[NODE]
                print(
                    f"outpost-cloud listening on port {cluster.cloud.port}"
                    f" (log: {cluster.cloud.runs[-1].path})\n"
                    f"gateway {NODE} in network namespace {edge.link.netns},"
                    f" reaching the cloud at {edge.link.host_ip}\n"
                    f"  $ outpost-cloud token create {NODE}\n"
                    f"  $ outpost join --cloud https://{edge.link.host_ip}:{cluster.cloud.port}"
                    f" --token … --node-name {NODE}\n"
                    f"  $ outpost run --data-dir {edge.data_dir} (log: {edge.log})",
                    flush=True,
                )
                await cluster.node_ready(NODE, within=60)
                await _kubectl(cluster, "get", "nodes", "-o", "wide")

                app = deployment(
                    APP,
                    cluster.image,
                    replicas=REPLICAS,
                    command='echo "hello from $(hostname)"; while true; do sleep 5; done',
                )
                _say(
                    "kubectl",
                    "apply",
                    "-f",
                    f"{APP}.yaml",
                    f"# {cluster.image}, {REPLICAS} replicas",
                )
                await cluster.apply(app)

                async def running() -> bool:
                    pods = await cluster.pods("default", f"app={APP}")
                    return len(pods) == REPLICAS and all(ready(p) for p in pods)

                await cluster.until(running, f"the {APP} pods run on {NODE}", within=120)
                await _kubectl(cluster, "get", "nodes,pods", "-o", "wide")
                if keep:
                    print(
                        f"\nexport KUBECONFIG={plane.kubeconfig}\nexport PATH={plane.bin_dir}:$PATH"
                        f"\n`{VENV_BIN / 'outpost'} status --data-dir {edge.data_dir}` shows the"
                        f" gateway's side; its pods' output: `outpost logs POD --data-dir"
                        f" {edge.data_dir}`.\nCtrl-C stops everything.",
                        flush=True,
                    )
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for _ in signals:
                            break
        except (trio.TooSlowError, AssertionError) as exc:
            print(f"the demo failed: {exc}\n(the logs above say why)", file=sys.stderr)
            return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="stay up until Ctrl-C")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the demo needs root (network namespaces and runc)", file=sys.stderr)
        return 1
    print(
        f"starting Kubernetes {build.kubernetes_version()} (etcd {build.etcd_version()})"
        " on loopback",
        flush=True,
    )
    try:
        with ControlPlane() as plane:
            return trio.run(_show, plane, args.keep)
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
