"""The channel end to end in one process: a real TLS WebSocket hub, edge hubs with real SQLite
stores, objects from a MemorySource (this file is about the channel, not Kubernetes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cloud.hub.reports import ReportLog
from cloud.hub.server import Hub, HubSettings
from cloud.hub.source import MemorySource
from edge.hub.client import EdgeHub, HubConfig
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.wire.events import Op
from tests.hubkit import Pki


class Cloud:
    def __init__(self, hub: Hub, source: MemorySource, reports: ReportLog) -> None:
        self.hub, self.source, self.reports = hub, source, reports


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
async def cloud(pki: Pki, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Cloud]:
    source = MemorySource()
    reports = ReportLog(tmp_path / "reports.jsonl")
    hub = Hub(
        HubSettings(host="127.0.0.1", port=0, heartbeat_s=2),
        pki.server_context(),
        source=source,
        sink=reports,
    )
    source.sink = hub
    await nursery.start(hub.run)
    yield Cloud(hub, source, reports)
    reports.close()


async def start_edge(
    nursery: trio.Nursery, store: Store, config: HubConfig
) -> EdgeHub:
    edge = EdgeHub(AsyncStore(store), config)
    nursery.start_soon(edge.run)
    with trio.fail_after(10):
        await edge.link.wait_online()
    return edge


async def until(predicate, what: str, timeout: float = 10) -> None:  # noqa: ANN001
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def edge_state(store: Store) -> dict[str, tuple[str, object]]:
    return {key: (rv, body) for key, rv, body in store.list("ConfigMap")}


def cloud_state(source: MemorySource, node: str) -> dict[str, tuple[str, object]]:
    return {o.key: (o.rv, o.body) for o in source.objects(node)}


async def test_objects_before_and_after_connecting_reach_the_edge_store(
    cloud: Cloud, pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    cloud.source.put("gw-1", "ns/ConfigMap/early", {"v": 1})
    cloud.source.put("gw-2", "ns/ConfigMap/other-node", {"v": 1})
    with Store(tmp_path / "edge.db") as store:
        await start_edge(nursery, store, pki.edge_config("gw-1", cloud.hub.port))
        for i in range(200):
            cloud.source.put("gw-1", f"ns/ConfigMap/obj-{i % 50}", {"i": i})
        cloud.source.delete("gw-1", "ns/ConfigMap/obj-7")
        await until(
            lambda: edge_state(store) == cloud_state(cloud.source, "gw-1"), "edge converges"
        )
        assert "ns/ConfigMap/other-node" not in edge_state(store)
        await until(lambda: cloud.hub.streams["gw-1"].depth == 0, "everything acknowledged")
        assert store.hwm == cloud.hub.streams["gw-1"].inflight.acked


async def test_reports_reach_the_cloud_once_and_leave_the_outbox(
    cloud: Cloud, pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    with Store(tmp_path / "edge.db") as store:
        for i in range(30):
            store.report(Op.EVENT, f"ns/Pod/p{i}", {"i": i}, coalesce_key=f"event-{i}")
        edge = await start_edge(nursery, store, pki.edge_config("gw-1", cloud.hub.port))
        for i in range(30, 60):
            await edge.report(Op.STATUS, f"ns/Pod/p{i}", {"i": i})
        await until(lambda: store.outbox_size()[1] == 0, "outbox drained")
    lines = (tmp_path / "reports.jsonl").read_text().splitlines()
    assert len(lines) == 60
    assert cloud.reports.last["gw-1"] == 60


async def test_a_certificate_for_one_node_cannot_speak_for_another(
    cloud: Cloud, pki: Pki, tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    config = pki.edge_config("gw-1", cloud.hub.port)
    config.node = "gw-2"
    with Store(tmp_path / "edge.db") as store:
        edge = EdgeHub(AsyncStore(store), config)
        nursery.start_soon(edge.run)
        await until(
            lambda: any(
                "belongs to node 'gw-1', not 'gw-2'" in str(getattr(r, "reason", ""))
                for r in caplog.records
            ),
            "the edge logs the cloud's refusal",
        )
        assert "node certificate used to speak for another node" in caplog.text
        assert not edge.link.online
        assert "gw-2" not in cloud.hub.streams


async def test_a_second_connection_replaces_the_first(
    cloud: Cloud, pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    with Store(tmp_path / "a.db") as a, Store(tmp_path / "b.db") as b:
        first = await start_edge(nursery, a, pki.edge_config("gw-1", cloud.hub.port))
        await start_edge(nursery, b, pki.edge_config("gw-1", cloud.hub.port))
        await until(lambda: first.link.connects >= 1 and not first.link.online, "first closed")
        assert len(cloud.hub.sessions) in (1, 2)
        assert cloud.hub.metrics.replaced._value.get() >= 1
