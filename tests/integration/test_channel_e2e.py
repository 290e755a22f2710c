"""The channel with real processes: `outpost-cloud serve` against the real apiserver, and a
joined `outpost run` edge. ConfigMaps labelled for the node reach its store; reports the edge
queues reach the cloud; the cloud restarts from its persisted watermarks."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import trio
from lightkube import AsyncClient
from lightkube.resources.core_v1 import ConfigMap
from lightkube.types import PatchType

from edge.wire.events import Op
from edge.wire.keys import NODE_PREFIX
from tests.channelkit import Cloud, Edge, cloud_objects, configmap
from tests.cluster.controlplane import ControlPlane
from tests.waiting import eventually

pytestmark = pytest.mark.cluster


@pytest.fixture
async def cloud(control_plane: ControlPlane, tmp_path: Path):
    cloud = Cloud(control_plane, tmp_path)
    await cloud.start()
    yield cloud
    await cloud.stop()


@pytest.fixture
async def namespace(kube: AsyncClient, request: pytest.FixtureRequest):
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    name = f"e2e-{abs(hash(request.node.name)) % 10**8}"
    await kube.create(Namespace(metadata=ObjectMeta(name=name)))
    yield name
    await kube.delete(Namespace, name)


def reports(cloud: Cloud) -> list[dict]:
    """The reports the test queued: the agent's own node status reports are left out."""
    if not cloud.report_log.exists():
        return []
    logged = [json.loads(line) for line in cloud.report_log.read_text().splitlines()]
    return [r for r in logged if not r.get("key", "").startswith(NODE_PREFIX)]


async def test_a_joined_edge_gets_its_configmaps_and_its_reports_reach_the_cloud(
    cloud: Cloud, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    edge = Edge("e2e-basic", tmp_path)
    await edge.join(cloud)
    await kube.create(configmap("before", edge.node, {"a": "1"}, namespace))
    await kube.create(configmap("elsewhere", "another-node", {"a": "1"}, namespace))
    await edge.start()
    try:
        await edge.wait_online()
        await kube.create(configmap("after", edge.node, {"b": "2"}, namespace))
        await kube.patch(
            ConfigMap,
            "before",
            {"data": {"a": "changed"}},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )
        expected = await cloud_objects(kube, edge.node)
        await eventually(lambda: edge.objects() == expected, "the edge holds its ConfigMaps")
        assert set(expected) == {f"{namespace}/ConfigMap/before", f"{namespace}/ConfigMap/after"}

        # Moving a ConfigMap to another node deletes it here.
        await kube.patch(
            ConfigMap,
            "after",
            {"metadata": {"labels": {"outpost.io/node": "another-node"}}},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )
        await eventually(
            lambda: f"{namespace}/ConfigMap/after" not in edge.objects(), "the move deletes it"
        )

        with edge.store() as store:
            for i in range(20):
                store.report(Op.EVENT, f"{namespace}/Pod/p", {"i": i}, coalesce_key=f"e{i}")
        await eventually(lambda: len(reports(cloud)) == 20, "the reports reach the cloud")
        assert [r["body"]["i"] for r in reports(cloud)] == list(range(20))
        assert {r["node"] for r in reports(cloud)} == {edge.node}
        with edge.store() as store:
            await eventually(
                lambda: store.outbox_size()[1] == 0, "acknowledged reports are deleted"
            )
        status = await edge.status()
        assert status["node"] == edge.node
        assert status["cloud"] == cloud.url
        assert status["link"]["online"] is True
        assert status["objects"] == {"ConfigMap": 1}
        assert status["outbox"] == {"entries": 0, "bytes": 0}
    finally:
        await edge.stop()
    status = await edge.status()
    assert status["link"]["online"] is False
    assert status["link"]["reason"] == "agent stopped"


async def patch_data(kube: AsyncClient, name: str, namespace: str, data: dict[str, str]) -> None:
    await kube.patch(
        ConfigMap, name, {"data": data}, namespace=namespace, patch_type=PatchType.MERGE
    )


async def test_a_killed_cloud_resumes_from_its_watermarks_without_resending_everything(
    cloud: Cloud, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    edge = Edge("e2e-restart", tmp_path)
    await edge.join(cloud)
    await edge.start()
    try:
        await edge.wait_online()
        # 300 objects delivered and acknowledged, and the watermark persisted (1 s batches).
        async with trio.open_nursery() as nursery:
            limit = trio.Semaphore(8)
            for i in range(300):

                async def create(i: int = i) -> None:
                    async with limit:
                        await kube.create(configmap(f"cm-{i}", edge.node, {"v": "0"}, namespace))

                nursery.start_soon(create)
        expected = await cloud_objects(kube, edge.node)
        await eventually(lambda: edge.objects() == expected, "the first 300 are delivered")
        await trio.sleep(2.5)

        # Keep changing 20 of them, kill the cloud mid-stream, change more while it is gone.
        for round_ in range(1, 6):
            for i in range(20):
                await patch_data(kube, f"cm-{i}", namespace, {"v": str(round_)})
            with edge.store() as store:
                store.report(
                    Op.EVENT, f"{namespace}/Pod/p", {"round": round_}, coalesce_key=f"r{round_}"
                )
            if round_ == 3:
                await cloud.kill()
        await cloud.start()
        expected = await cloud_objects(kube, edge.node)
        await eventually(lambda: edge.objects() == expected, "the edge converges after the restart")
        await eventually(lambda: len(reports(cloud)) == 5, "every report arrives")
        assert sorted(r["body"]["round"] for r in reports(cloud)) == [1, 2, 3, 4, 5]

        match = await cloud.runs[-1].wait_for(r"msg=\"resuming node from its watermark\".*")
        resent = int(match.group(0).split("queued=")[1].split()[0])
        print(f"cloud restart: {resent} of 300 objects queued again")
        # The 20 changed objects (some changed after the kill) are due; everything else is not.
        assert 20 <= resent <= 40
        ranges = edge.applied_ranges()
        assert all(a[1] < b[0] for a, b in pairwise(ranges))
    finally:
        await edge.stop()
