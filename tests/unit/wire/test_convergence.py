"""Property: whatever the link does — drop, duplicate or reorder frames, break and reconnect —
however often the edge or the cloud crashes, and whenever the cloud's watermarks were last
persisted, once the link heals both sides converge: the edge holds exactly the cloud's objects,
every upstream report takes effect, in order (more than once only across a cloud restart, which
resumes from a persisted watermark that may lag), no downstream message is applied twice, and
the edge's outbox drains.

The parts are the ones production runs: on the cloud, the source feeding ``NodeStreams``, each
``NodeStream``'s queue, numbering and watermark, the ``StreamRestorer`` choosing the stream a
node resumes, and the ``WatermarkFlusher`` and ``WatermarkStore`` persisting watermarks (to
ConfigMaps kept in a dict); on the edge, the SQLite ``Store`` (``apply_batch``, the outbox) and
the sans-IO ``Connection`` on both sides. What stands in for the trio shells follows them step by
step: ``Edge.connect``, ``Edge.deliver`` and ``Edge.pump`` do what ``EdgeHub._open``, ``_apply``
and ``_send`` do (edge/hub/client.py); ``Cloud.accept``, ``Cloud.deliver`` and ``Cloud.pump`` what
the hub's session and its pumps do (cloud/hub/server.py, cloud/hub/pumps.py). Only the sockets
and the clock are simulated.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap

from cloud.hub.flusher import WatermarkFlusher
from cloud.hub.metrics import HubMetrics
from cloud.hub.restore import StreamRestorer
from cloud.hub.source import MemorySource
from cloud.hub.streams import NodeStream, NodeStreams
from cloud.hub.watermarks import WatermarkStore
from edge.store import Store, StoreError
from edge.wire.codec import ProtocolError
from edge.wire.connection import Connection, HelloReceived, Received, Role, Settled
from edge.wire.events import Message, Op
from edge.wire.window import InFlight, ReceiveWindow

NODE = "gw-1"
WINDOW = 4
# Smaller than the objects there are: a burst of changes overflows the queue into a resync.
CAPACITY = 3
OBJECTS = 5


class ConfigMapsInMemory:
    """The calls ``WatermarkStore`` makes of Kubernetes, on ConfigMaps kept in a dict: what
    survives a cloud restart."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, str]] = {}

    async def get(self, kind: type, name: str, namespace: str | None = None) -> Any:
        return ConfigMap(metadata=ObjectMeta(name=name), data=dict(self.data.get(name, {})))

    async def patch(self, kind: type, name: str, patch: dict, **_: object) -> None:
        self.data.setdefault(name, {}).update(patch["data"])

    async def create(self, obj: ConfigMap) -> None:
        self.data[obj.metadata.name] = dict(obj.data or {})


class Effects:
    """The cloud's report sink: what took effect, per cloud incarnation."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = [[]]

    async def restart(self, node: str, epoch: str) -> None:
        raise AssertionError(f"the edge's store was never replaced, yet {node} restarted")

    async def apply(self, node: str, messages: Any) -> None:
        self.runs[-1].extend(m.body["n"] for m in messages)


class Cloud:
    """One incarnation of the cloud hub; Kubernetes (the objects, the watermark ConfigMaps and
    what reports did) outlives it."""

    def __init__(self, kube: ConfigMapsInMemory, objects: MemorySource | None, sink: Effects):
        self.streams = NodeStreams()
        self.source = MemorySource(self.streams)
        if objects is not None:  # a new replica lists what Kubernetes holds
            self.source.rv, self.source.by_node = objects.rv, objects.by_node
        self.sink = sink
        self.watermarks = WatermarkStore(kube)  # type: ignore[arg-type]
        self.flusher = WatermarkFlusher(
            self.watermarks, self.streams, self.source, {}, HubMetrics(), interval_s=1
        )
        self.restorer = StreamRestorer(
            self.streams, self.source, sink, self.watermarks, capacity=CAPACITY, window=WINDOW
        )
        self.conn: Connection | None = None
        self.stream: NodeStream | None = None

    async def start(self) -> None:
        await self.watermarks.load()

    async def flush(self) -> None:
        if marks := self.flusher.collect():
            await self.watermarks.write(marks)

    async def accept(self, hello_frame: bytes, now: float) -> bytes:
        self.conn = Connection(Role.CLOUD, now=now)
        [event] = self.conn.receive(hello_frame, now)
        assert isinstance(event, HelloReceived)
        self.stream = await self.restorer.stream_for(NODE, event.hello)
        welcome, settled = self.conn.accept(
            event.hello, inflight=self.stream.inflight, receiver=self.stream.receiver
        )
        self.stream.settle(settled.messages, now)
        return welcome

    async def deliver(self, data: bytes, now: float) -> None:
        assert self.conn is not None
        assert self.stream is not None
        for event in self.conn.receive(data, now):
            match event:
                case Received(messages):
                    await self.sink.apply(NODE, messages)
                    self.conn.applied(messages[-1].seq)
                    self.stream.dirty = True
                case Settled(messages):
                    self.stream.settle(messages, now)

    def pump(self, now: float) -> list[bytes]:
        assert self.conn is not None
        assert self.stream is not None
        if self.stream.overflowed and not len(self.stream.queue):
            self.stream.resync(self.source.objects(NODE))
        self.stream.number_queued(now)
        return self.conn.outgoing(now)

    @property
    def idle(self) -> bool:
        stream = self.streams.get(NODE)
        quiet = self.conn is None or not self.conn.wants_to_send
        return quiet and (stream is None or (stream.depth == 0 and not stream.overflowed))


class Edge:
    """The edge's store, which outlives crashes, and its current session."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "store.db"
        self.store = Store(self.path)
        self.conn: Connection | None = None
        self.reports = 0
        self.applied_seqs: list[int] = []

    def crash(self) -> None:
        self.conn = None
        self.store.close()
        self.store = Store(self.path)

    def report(self) -> None:
        self.store.report(
            Op.EVENT, "ns/Pod/p", {"n": self.reports}, coalesce_key=f"r{self.reports}"
        )
        self.reports += 1

    def hello(self, now: float) -> bytes:
        store = self.store
        sending_from = store.sending_from
        inflight = InFlight(WINDOW, next_seq=sending_from)
        for message in store.unacked(sending_from - 1):
            inflight.hold(message)
        self.conn = Connection(
            Role.EDGE, now=now, inflight=inflight, receiver=ReceiveWindow(store.hwm)
        )
        return self.conn.hello(NODE, epoch=store.epoch)

    def welcome(self, data: bytes, now: float) -> None:
        assert self.conn is not None
        hwm = self.store.hwm
        for event in self.conn.receive(data, now):
            if isinstance(event, Settled):
                self.store.acked(event.messages[-1].seq)
        if self.conn.receiver.applied_seq > hwm:
            self.store.skip_to(self.conn.receiver.applied_seq)

    def deliver(self, data: bytes, now: float) -> None:
        assert self.conn is not None
        received: list[Message] = []
        settled = 0
        for event in self.conn.receive(data, now):
            match event:
                case Received(messages):
                    received.extend(messages)
                case Settled(messages):
                    settled = messages[-1].seq
        if received:
            before = self.store.hwm
            result = self.store.apply_batch(received)
            self.applied_seqs.extend(range(before + 1, result.hwm + 1))
            self.conn.applied(result.hwm)
        if settled:
            self.store.acked(settled)

    def pump(self, now: float) -> list[bytes]:
        assert self.conn is not None
        room = self.conn.inflight.window - len(self.conn.inflight)
        if room > 0:
            for message in self.store.take_for_send(room):
                self.conn.inflight.hold(message)
        return self.conn.outgoing(now)

    def objects(self) -> dict[str, tuple[str, Any]]:
        return {key: (rv, body) for key, rv, body in self.store.list("ConfigMap")}


class World:
    def __init__(self, folder: Path) -> None:
        self.kube = ConfigMapsInMemory()
        self.effects = Effects()
        self.cloud = Cloud(self.kube, None, self.effects)
        self.edge = Edge(folder)
        self.now = 0.0
        self.c2e: list[bytes] = []
        self.e2c: list[bytes] = []
        self.connected = False
        self.cloud_restarts = 0

    def source_objects(self) -> dict[str, tuple[str, Any]]:
        return {o.key: (o.rv, o.body) for o in self.cloud.source.objects(NODE)}

    async def connect(self) -> None:
        self.disconnect()
        welcome = await self.cloud.accept(self.edge.hello(self.now), self.now)
        self.edge.welcome(welcome, self.now)
        self.connected = True

    def disconnect(self) -> None:
        self.connected = False
        self.c2e.clear()
        self.e2c.clear()

    async def restart_cloud(self) -> None:
        self.disconnect()
        self.cloud = Cloud(self.kube, self.cloud.source, self.effects)
        await self.cloud.start()
        self.effects.runs.append([])
        self.cloud_restarts += 1

    async def step(self, action: str, arg: int) -> None:
        self.now += 0.01
        name = f"ns/ConfigMap/c{arg % OBJECTS}"
        match action:
            case "put":
                self.cloud.source.put(NODE, name, {"v": arg})
            case "delete":
                self.cloud.source.delete(NODE, name)
            case "report":
                self.edge.report()
            case "flush":
                await self.cloud.flush()
            case "edge_crash":
                self.disconnect()
                self.edge.crash()
            case "cloud_crash":
                await self.restart_cloud()
            case "reconnect":
                await self.connect()
            case _ if self.connected:
                await self.link_step(action)

    async def link_step(self, action: str) -> None:
        if action == "pump_cloud":
            self.c2e.extend(self.cloud.pump(self.now))
        elif action == "pump_edge":
            self.e2c.extend(self.edge.pump(self.now))
        else:
            link = self.c2e if action.endswith("c2e") else self.e2c
            if not link:
                return
            if action.startswith("drop"):
                link.pop(0)
            elif action.startswith("dup"):
                link.insert(0, link[0])
            elif action.startswith("swap") and len(link) > 1:
                link[0], link[1] = link[1], link[0]
            elif action.startswith("deliver"):
                await self.deliver(downstream=action.endswith("c2e"))

    async def deliver(self, *, downstream: bool) -> None:
        try:
            if downstream:
                self.edge.deliver(self.c2e.pop(0), self.now)
            else:
                await self.cloud.deliver(self.e2c.pop(0), self.now)
        except (ProtocolError, StoreError):
            # Either side hangs up, as the shells do; the edge reconnects.
            self.disconnect()

    async def heal(self) -> None:
        """Reconnect over a perfect link and run until nothing is left to send."""
        await self.connect()
        for _ in range(10_000):
            self.now += 0.01
            self.c2e.extend(self.cloud.pump(self.now))
            self.e2c.extend(self.edge.pump(self.now))
            while self.c2e or self.e2c:
                if self.c2e:
                    await self.deliver(downstream=True)
                if self.e2c:
                    await self.deliver(downstream=False)
                assert self.connected, "a perfect link broke the protocol"
            assert self.edge.conn is not None
            if (
                self.cloud.idle
                and self.edge.store.outbox_size()[1] == 0
                and not self.edge.conn.wants_to_send
            ):
                return
        raise AssertionError("did not converge over a perfect link")


@contextmanager
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="outpost-convergence-") as folder:
        w = World(Path(folder))
        try:
            yield w
        finally:
            w.edge.store.close()


ACTIONS = [
    "put", "put", "put", "delete", "report", "report", "pump_cloud", "pump_cloud", "pump_edge",
    "pump_edge", "deliver_c2e", "deliver_c2e", "deliver_c2e", "deliver_e2c", "deliver_e2c",
    "drop_c2e", "drop_e2c", "dup_c2e", "dup_e2c", "swap_c2e", "swap_e2c", "reconnect",
    "edge_crash", "cloud_crash", "flush", "flush",
]  # fmt: skip
steps = st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 100)), max_size=300)


def assert_reports_took_effect(runs: list[list[int]], reports: int) -> None:
    """In order and gap-free within each cloud incarnation; all of them, first seen in order."""
    for run in runs:
        assert run == list(range(run[0], run[0] + len(run))) if run else True, run
    first_seen = list(dict.fromkeys(n for run in runs for n in run))
    assert first_seen == list(range(reports))


@settings(max_examples=400, deadline=None)
@given(steps)
async def test_both_sides_converge_with_nothing_lost_or_applied_twice(script):
    with world() as w:
        await w.connect()
        for action, arg in script:
            await w.step(action, arg)
        await w.heal()

        assert w.edge.objects() == w.source_objects()
        assert_reports_took_effect(w.effects.runs, w.edge.reports)
        if w.cloud_restarts == 0:
            assert w.effects.runs == [list(range(w.edge.reports))]
        assert len(w.edge.applied_seqs) == len(set(w.edge.applied_seqs))
        assert w.edge.store.outbox_size()[1] == 0


async def test_a_reordered_stream_is_a_protocol_error_not_silent_loss():
    with world() as w:
        await w.connect()
        for name in ("a", "b"):
            w.cloud.source.put(NODE, f"ns/ConfigMap/{name}", {})
            await w.step("pump_cloud", 0)
        w.c2e[0], w.c2e[1] = w.c2e[1], w.c2e[0]
        await w.step("deliver_c2e", 0)
        assert not w.connected
        assert w.edge.objects() == {}
        await w.heal()
        assert w.edge.objects() == w.source_objects()


async def test_a_cloud_restarted_from_a_persisted_watermark_resends_only_what_changed_since():
    with world() as w:
        await w.connect()
        for i in range(OBJECTS):
            w.cloud.source.put(NODE, f"ns/ConfigMap/c{i}", {"v": i})
        await w.heal()
        await w.cloud.flush()
        w.cloud.source.put(NODE, "ns/ConfigMap/c0", {"v": "new"})
        await w.restart_cloud()
        await w.heal()
        assert w.edge.objects() == w.source_objects()
        # The one change and the inventory, not every object again.
        assert w.cloud.restorer.resent == 1
