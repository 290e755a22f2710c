"""Zero loss: 10,000 object updates pushed to one edge while its link is cut and restored at
least 20 times, degraded for a while, and the edge is killed with -9 at least 5 times; the edge
queues reports all along. In the end the edge holds exactly the cloud's final state, every
report reached the cloud exactly once, and no downstream message was applied twice.

The edge runs in its own network namespace behind a veth pair (tests.netns); the cloud and the
apiserver run in the root namespace.
"""

from __future__ import annotations

import json
import random
from itertools import pairwise
from pathlib import Path

import pytest
import trio
from lightkube import AsyncClient
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Namespace
from lightkube.types import PatchType

from edge.wire.events import Op
from edge.wire.keys import NODE_PREFIX
from tests.channelkit import Cloud, Edge, cloud_objects, configmap
from tests.cluster.controlplane import ControlPlane
from tests.netns import EdgeLink, require_netns
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

UPDATES = 10_000
OBJECTS = 200
CUTS = 20
KILLS = 5
REPORTS = 300


async def test_zero_loss_through_link_cuts_and_edge_kills(
    control_plane: ControlPlane, kube: AsyncClient, tmp_path: Path
) -> None:
    require_netns()
    rng = random.Random(20261125)
    namespace = "chaos"
    await kube.create(Namespace(metadata=ObjectMeta(name=namespace)))
    with EdgeLink("outpost-chaos") as link:
        cloud = Cloud(control_plane, tmp_path, host=link.host_ip)
        await cloud.start()
        edge = Edge("chaos-edge", tmp_path, prefix=link.exec_prefix)
        try:
            await edge.join(cloud)
            await edge.start()
            await edge.wait_online()
            for i in range(OBJECTS):
                await kube.create(configmap(f"cm-{i}", edge.node, {"v": "0"}, namespace))

            counts = {"updates": 0, "cuts": 0, "kills": 0, "reports": 0}

            async def push_updates() -> None:
                limit = trio.Semaphore(8)
                async with trio.open_nursery() as nursery:
                    for n in range(UPDATES):
                        await limit.acquire()

                        async def update(n: int = n) -> None:
                            try:
                                await kube.patch(
                                    ConfigMap,
                                    f"cm-{n % OBJECTS}",
                                    {"data": {"v": str(n)}},
                                    namespace=namespace,
                                    patch_type=PatchType.MERGE,
                                )
                                counts["updates"] += 1
                            finally:
                                limit.release()

                        nursery.start_soon(update)

            async def cut_links() -> None:
                for n in range(CUTS):
                    await trio.sleep(rng.uniform(0.3, 1.5))
                    link.cut()
                    await trio.sleep(rng.uniform(0.2, 4.0))
                    link.restore()
                    counts["cuts"] += 1
                    if n == CUTS // 2:
                        link.degrade(loss_pct=5, delay_ms=40, jitter_ms=20)
                    if n == CUTS // 2 + 4:
                        link.clear()

            async def kill_edge() -> None:
                for _ in range(KILLS):
                    await trio.sleep(rng.uniform(2, 6))
                    await edge.kill()
                    await trio.sleep(rng.uniform(0.1, 1.0))
                    await edge.start()
                    counts["kills"] += 1

            async def queue_reports() -> None:
                for n in range(REPORTS):
                    with edge.store() as store:
                        store.report(Op.EVENT, f"{namespace}/Pod/p", {"n": n}, coalesce_key=f"r{n}")
                    counts["reports"] += 1
                    await trio.sleep(0.05)

            with trio.fail_after(300):
                async with trio.open_nursery() as nursery:
                    for task in (push_updates, cut_links, kill_edge, queue_reports):
                        nursery.start_soon(task)
            print(f"chaos: {counts}")
            assert counts == {"updates": UPDATES, "cuts": CUTS, "kills": KILLS, "reports": REPORTS}

            expected = await cloud_objects(kube, edge.node)
            assert len(expected) == OBJECTS
            await eventually(lambda: edge.objects() == expected, "the edge holds the final state")

            def logged() -> list[dict]:
                lines = (
                    cloud.report_log.read_text().splitlines() if cloud.report_log.exists() else []
                )
                # The test's reports, not the agent's own node status.
                records = [json.loads(line) for line in lines]
                return [r for r in records if not r["key"].startswith(NODE_PREFIX)]

            await eventually(lambda: len(logged()) >= REPORTS, "every report reaches the cloud")
            records = logged()
            assert sorted(r["body"]["n"] for r in records) == list(range(REPORTS))
            seqs = [r["seq"] for r in records]
            assert seqs == sorted(set(seqs)), "a report was applied twice"
            with edge.store() as store:
                assert store.dropped == {} or not any(store.dropped.values())

            ranges = edge.applied_ranges()
            assert ranges, "the edge logged no applied batch"
            overlaps = [(a, b) for a, b in pairwise(ranges) if b[0] <= a[1]]
            assert not overlaps, f"downstream messages applied twice: {overlaps[:5]}"
            with edge.store() as store:
                assert ranges[-1][1] <= store.hwm
            print(
                f"chaos: edge applied {sum(b - a + 1 for a, b in ranges)} messages in"
                f" {len(ranges)} batches over {len(edge.runs)} runs; hwm {ranges[-1][1]}"
            )
        finally:
            await edge.stop()
            await cloud.stop()
            await kube.delete(Namespace, namespace)
