"""The channel end to end in one process: a real TLS WebSocket hub, edge hubs with real SQLite
stores, objects from a MemorySource (this file is about the channel, not Kubernetes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import tenacity
import trio
import trio_websocket

from cloud.hub.reports import ReportLog
from cloud.hub.server import Hub, HubSettings
from cloud.hub.source import MemorySource
from cloud.hub.streams import NodeStreams
from edge.hub.client import EdgeHub, HubConfig, LinkDown
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.wire import codec
from edge.wire.events import Batch, Close, Hello, Message, Op, Ping, Pong, Refuse, Welcome
from tests.hubkit import Pki
from tests.waiting import eventually


class Cloud:
    def __init__(self, hub: Hub, source: MemorySource, reports: ReportLog) -> None:
        self.hub, self.source, self.reports = hub, source, reports


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
async def cloud(pki: Pki, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Cloud]:
    streams = NodeStreams()
    source = MemorySource(streams)
    reports = ReportLog(tmp_path / "reports.jsonl")
    hub = Hub(
        HubSettings(host="127.0.0.1", port=0, heartbeat_s=2),
        pki.server_context(),
        streams=streams,
        source=source,
        sink=reports,
    )
    await nursery.start(hub.run)
    yield Cloud(hub, source, reports)
    reports.close()


@asynccontextmanager
async def running_edge(path: Path, config: HubConfig) -> AsyncIterator[tuple[Store, EdgeHub]]:
    """An edge hub on its own store, online; stopped before its store closes.

    Yields a second connection to the store for the test's reads: the hub's connection is busy
    in its worker thread, and SQLite connections are not shared between threads.
    """
    with Store(path) as store, Store(path) as reader:
        edge = EdgeHub(AsyncStore(store), config)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(edge.run)
            with trio.fail_after(10):
                await edge.link.wait_online()
            yield reader, edge
            nursery.cancel_scope.cancel()


def edge_state(store: Store) -> dict[str, tuple[str, object]]:
    return {key: (rv, body) for key, rv, body in store.list("ConfigMap")}


def cloud_state(source: MemorySource, node: str) -> dict[str, tuple[str, object]]:
    return {o.key: (o.rv, o.body) for o in source.objects(node)}


async def test_objects_before_and_after_connecting_reach_the_edge_store(
    cloud: Cloud, pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    cloud.source.put("gw-1", "ns/ConfigMap/early", {"v": 1})
    cloud.source.put("gw-2", "ns/ConfigMap/other-node", {"v": 1})
    async with running_edge(tmp_path / "edge.db", pki.edge_config("gw-1", cloud.hub.port)) as (
        store,
        _,
    ):
        for i in range(200):
            cloud.source.put("gw-1", f"ns/ConfigMap/obj-{i % 50}", {"i": i})
        cloud.source.delete("gw-1", "ns/ConfigMap/obj-7")
        await eventually(
            lambda: edge_state(store) == cloud_state(cloud.source, "gw-1"), "edge converges"
        )
        assert "ns/ConfigMap/other-node" not in edge_state(store)
        await eventually(lambda: cloud.hub.streams["gw-1"].depth == 0, "everything acknowledged")
        assert store.hwm == cloud.hub.streams["gw-1"].inflight.acked


async def test_reports_reach_the_cloud_once_and_leave_the_outbox(
    cloud: Cloud, pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    with Store(tmp_path / "edge.db") as store:
        for i in range(30):
            store.report(Op.EVENT, f"ns/Pod/p{i}", {"i": i}, coalesce_key=f"event-{i}")
    async with running_edge(tmp_path / "edge.db", pki.edge_config("gw-1", cloud.hub.port)) as (
        store,
        edge,
    ):
        for i in range(30, 60):
            await edge.store.report(Op.STATUS, f"ns/Pod/p{i}", {"i": i})
        await eventually(lambda: store.outbox_size()[1] == 0, "outbox drained")
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
        async with trio.open_nursery() as edges:
            edges.start_soon(edge.run)
            await eventually(
                lambda: any(
                    "belongs to node 'gw-1', not 'gw-2'" in str(getattr(r, "reason", ""))
                    for r in caplog.records
                ),
                "the edge logs the cloud's refusal",
            )
            edges.cancel_scope.cancel()
        assert "node certificate used to speak for another node" in caplog.text
        assert not edge.link.online
        assert "gw-2" not in cloud.hub.streams


async def test_a_second_connection_replaces_the_first(
    cloud: Cloud, pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = pki.edge_config("gw-1", cloud.hub.port)
    async with running_edge(tmp_path / "a.db", config) as (_, first):
        first.config.backoff_base_s = 30  # keep it away once replaced
        session = cloud.hub.sessions["gw-1"]
        async with running_edge(tmp_path / "a.db", config) as (_, second):
            await eventually(lambda: not first.link.online, "the first session is closed")
            assert session.done.is_set()
            assert cloud.hub.sessions["gw-1"] is not session
            assert second.link.online
            assert cloud.hub.metrics.replaced._value.get() == 1


async def raw_session(pki: Pki, port: int, node: str = "gw-raw"):
    """A WebSocket with a valid node certificate, for speaking bad protocol on purpose."""
    return trio_websocket.open_websocket_url(
        f"wss://127.0.0.1:{port}/v1/connect",
        ssl_context=pki.client_context(pki.node_pair(node)),
    )


def hello(node: str, versions: tuple[int, ...] = codec.SUPPORTED_VERSIONS) -> bytes:
    return codec.encode(Hello(node, versions, 0, 1, "test", "raw-epoch"))


async def closing_reason(ws: trio_websocket.WebSocketConnection) -> str:
    """Read until the hub closes; returns the reason of its Close frame."""
    reason = ""
    with trio.fail_after(10):
        try:
            while True:
                frame = codec.decode(await ws.get_message())
                if isinstance(frame, Close | Refuse):
                    reason = frame.reason
        except trio_websocket.ConnectionClosed:
            return reason


@pytest.mark.parametrize(
    ("after_hello", "expected"),
    [
        pytest.param([b"\xc1garbage"], "", id="malformed"),
        pytest.param(
            [codec.encode(Batch(0, (Message(5, "m", Op.STATUS, "ns/Pod/p", "", {}),)))],
            "out of order",
            id="out-of-order",
        ),
        pytest.param(
            [codec.encode(Batch(0, (Message(1, "m", Op.PUT, "ns/Pod/p", "", {}),)))],
            "may not be sent to the cloud",
            id="wrong-direction",
        ),
        pytest.param([hello("gw-raw")], "not allowed in an open session", id="second-hello"),
    ],
)
async def test_bad_frames_close_the_session_with_a_reason_and_the_hub_lives_on(
    cloud: Cloud,
    pki: Pki,
    tmp_path: Path,
    nursery: trio.Nursery,
    after_hello,
    expected,
) -> None:
    async with await raw_session(pki, cloud.hub.port) as ws:
        await ws.send_message(hello("gw-raw"))
        assert isinstance(codec.decode(await ws.get_message()), Welcome)
        for frame in after_hello:
            await ws.send_message(frame)
        reason = await closing_reason(ws)
    assert expected in reason
    if expected == "":
        assert reason  # the malformed frame is named too
    assert cloud.hub.metrics.rejected.labels("protocol")._value.get() == 1
    cloud.source.put("gw-1", "ns/ConfigMap/still-served", {})
    async with running_edge(tmp_path / "edge.db", pki.edge_config("gw-1", cloud.hub.port)) as (
        store,
        _,
    ):
        await eventually(lambda: store.get("ns/ConfigMap/still-served") is not None, "still served")


async def test_an_unknown_protocol_version_is_refused_with_the_versions_spoken(
    cloud: Cloud, pki: Pki
) -> None:
    async with await raw_session(pki, cloud.hub.port) as ws:
        await ws.send_message(hello("gw-raw", versions=(99,)))
        reason = await closing_reason(ws)
    assert "no common protocol version" in reason
    assert "[99]" in reason


async def test_an_oversized_frame_closes_the_connection(cloud: Cloud, pki: Pki) -> None:
    async with await raw_session(pki, cloud.hub.port) as ws:
        await ws.send_message(hello("gw-raw"))
        await ws.get_message()
        await ws.send_message(b"\x00" * (codec.DEFAULT_MAX_FRAME + 1))
        await closing_reason(ws)
        assert ws.closed.code == 1009


async def test_a_client_without_a_node_certificate_is_refused(cloud: Cloud, pki: Pki) -> None:
    config = HubConfig(
        cloud_url=f"https://127.0.0.1:{cloud.hub.port}",
        node="gw-1",
        ssl_context=pki.client_context(None),
    )
    with pytest.raises(LinkDown, match="HTTP 401"):
        await EdgeHub(AsyncStore(None), config)._session()  # type: ignore[arg-type]


async def test_a_cert_from_another_organization_is_not_a_node(cloud: Cloud, pki: Pki) -> None:
    config = pki.edge_config("gw-1", cloud.hub.port)
    config.ssl_context = pki.client_context(pki.node_pair("gw-1", organization="system:masters"))
    with pytest.raises(LinkDown, match="HTTP 401"):
        await EdgeHub(AsyncStore(None), config)._session()  # type: ignore[arg-type]


async def test_a_silent_edge_is_dropped_after_three_heartbeats(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    hub = Hub(HubSettings(host="127.0.0.1", port=0, heartbeat_s=0.3), pki.server_context())
    await nursery.start(hub.run)
    async with await raw_session(pki, hub.port) as ws:
        await ws.send_message(hello("gw-raw"))
        started = trio.current_time()
        reason = await closing_reason(ws)
    assert "no heartbeat" in reason
    assert 0.9 <= trio.current_time() - started < 5


async def test_a_busy_hub_turns_connections_away_with_retry_after(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    hub = Hub(
        HubSettings(host="127.0.0.1", port=0, max_handshakes=1, admission_wait_s=0.2),
        pki.server_context(),
    )
    await nursery.start(hub.run)
    # A connection that never starts TLS holds the only handshake slot.
    holder = await trio.open_tcp_stream("127.0.0.1", hub.port)
    try:
        with Store(tmp_path / "edge.db") as store:
            edge = EdgeHub(AsyncStore(store), pki.edge_config("gw-1", hub.port))
            with pytest.raises(LinkDown, match="HTTP 503") as caught:
                await edge._session()
        assert caught.value.retry_after_s is not None
        assert caught.value.retry_after_s >= 1
        assert hub.metrics.rejected.labels("busy")._value.get() == 1
    finally:
        await holder.aclose()


async def test_a_starting_hub_asks_edges_to_come_back_later(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    source = MemorySource(NodeStreams())
    source.ready = trio.Event()
    hub = Hub(HubSettings(host="127.0.0.1", port=0), pki.server_context(), source=source)
    await nursery.start(hub.run)
    with Store(tmp_path / "edge.db") as store:
        edge = EdgeHub(AsyncStore(store), pki.edge_config("gw-1", hub.port))
        with pytest.raises(LinkDown, match="HTTP 503") as caught:
            await edge._session()
        assert caught.value.retry_after_s == 2
        # The edge waits at least as long as asked.
        assert all(edge._wait(_failed_attempt(caught.value)) >= 2 for _ in range(20))


def _failed_attempt(exc: BaseException) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = 1
    state.set_exception((type(exc), exc, None))
    return state


async def test_a_hub_with_a_certificate_from_another_ca_is_refused_at_once(
    cloud: Cloud, pki: Pki, tmp_path: Path
) -> None:
    stranger = Pki.create(tmp_path / "stranger")
    config = stranger.edge_config("gw-1", cloud.hub.port)
    with trio.fail_after(5), pytest.raises(LinkDown, match=r"TLS with .* failed: .*verify failed"):
        await EdgeHub(AsyncStore(None), config)._session()  # type: ignore[arg-type]


async def test_an_edge_with_a_new_store_gets_everything_again_and_its_reports_count(
    cloud: Cloud, pki: Pki, tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        cloud.source.put("gw-1", f"ns/ConfigMap/{name}", {"name": name})
    config = pki.edge_config("gw-1", cloud.hub.port)
    async with running_edge(tmp_path / "old.db", config) as (store, edge):
        for i in range(5):
            await edge.store.report(Op.EVENT, "ns/Pod/p", {"old": i}, coalesce_key=f"old-{i}")
        await eventually(lambda: len(edge_state(store)) == 3, "the old store is synced")
        await eventually(lambda: store.outbox_size()[1] == 0, "the old reports are acknowledged")
    # The gateway is re-flashed: same identity, empty store, numbering from 1 again.
    async with running_edge(tmp_path / "new.db", config) as (store, edge):
        await eventually(
            lambda: edge_state(store) == cloud_state(cloud.source, "gw-1"), "a full resync"
        )
        for i in range(3):
            await edge.store.report(Op.EVENT, "ns/Pod/p", {"new": i}, coalesce_key=f"new-{i}")
        await eventually(lambda: store.outbox_size()[1] == 0, "the new reports are acknowledged")
    lines = [json.loads(line) for line in (tmp_path / "reports.jsonl").read_text().splitlines()]
    assert [r.get("body") for r in lines if "restart" not in r] == [
        *({"old": i} for i in range(5)),
        *({"new": i} for i in range(3)),
    ]
    assert cloud.reports.last["gw-1"] == 3


async def test_a_ping_is_answered_at_once(pki: Pki, nursery: trio.Nursery) -> None:
    slow = Hub(HubSettings(host="127.0.0.1", port=0, heartbeat_s=30), pki.server_context())
    await nursery.start(slow.run)
    async with await raw_session(pki, slow.port) as ws:
        await ws.send_message(hello("gw-raw"))
        assert isinstance(codec.decode(await ws.get_message()), Welcome)
        assert isinstance(codec.decode(await ws.get_message()), Batch)  # the inventory
        await ws.send_message(codec.encode(Ping(0)))
        with trio.fail_after(2):
            assert isinstance(codec.decode(await ws.get_message()), Pong)
