"""Property: whatever the link does — drop, duplicate or reorder frames, break and reconnect —
and however often the edge crashes, once the link heals both sides converge: the edge holds
exactly the cloud's final objects, every upstream report takes effect exactly once, in order,
and no downstream message is applied twice.

The two peers here are the real sans-IO ``Connection``s with their windows; only the socket,
the stores and the clock are simulated (a dict, a list, a counter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.wire.codec import ProtocolError
from edge.wire.connection import (
    Connection,
    HelloReceived,
    Received,
    Role,
    Settled,
)
from edge.wire.events import Message, Op
from edge.wire.window import CoalescingQueue, InFlight, Pending, ReceiveWindow

WINDOW = 4
OBJECTS = 5


@dataclass
class Cloud:
    queue: CoalescingQueue = field(default_factory=lambda: CoalescingQueue(capacity=100))
    inflight: InFlight = field(default_factory=lambda: InFlight(WINDOW))
    receiver: ReceiveWindow = field(default_factory=ReceiveWindow)
    truth: dict[str, tuple[str, int]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    uids: int = 0
    effects: list[str] = field(default_factory=list)

    def put(self, name: str) -> None:
        key = f"ns/ConfigMap/{name}"
        if key not in self.truth:
            self.uids += 1
            self.truth[key] = (f"uid{self.uids}", 0)
        uid, version = self.truth[key]
        self.truth[key] = (uid, version + 1)
        self.queue.offer(
            uid, Pending(f"{uid}-{version + 1}", Op.PUT, key, str(version + 1), [uid, version + 1])
        )

    def delete(self, name: str) -> None:
        key = f"ns/ConfigMap/{name}"
        if key in self.truth:
            uid, _ = self.truth.pop(key)
            self.queue.offer(uid, Pending(f"{uid}-del", Op.DELETE, key, "", uid))


@dataclass
class Edge:
    """Durable parts survive a crash; ``inflight`` and ``receiver`` are rebuilt from them."""

    store: dict[str, tuple[str, int]] = field(default_factory=dict)
    hwm: int = 0
    applied_seqs: list[int] = field(default_factory=list)
    outbox: list[Message] = field(default_factory=list)  # numbered, not yet acknowledged
    unnumbered: list[str] = field(default_factory=list)
    next_report_seq: int = 1
    reports: list[str] = field(default_factory=list)
    inflight: InFlight = field(default_factory=lambda: InFlight(WINDOW))
    receiver: ReceiveWindow = field(default_factory=ReceiveWindow)

    def crash(self) -> None:
        first = self.outbox[0].seq if self.outbox else self.next_report_seq
        self.inflight = InFlight(WINDOW, next_seq=first)
        for message in self.outbox:
            self.inflight.hold(message)
        self.receiver = ReceiveWindow(applied=self.hwm)

    def report(self) -> None:
        report_id = f"r{len(self.reports)}"
        self.reports.append(report_id)
        self.unnumbered.append(report_id)

    def number_reports(self) -> None:
        while self.unnumbered and self.inflight.has_room:
            message = Message(self.next_report_seq, self.unnumbered.pop(0), Op.STATUS, "ns/Pod/p")
            self.next_report_seq += 1
            self.outbox.append(message)
            self.inflight.hold(message)

    def apply(self, messages: tuple[Message, ...]) -> None:
        for message in messages:
            assert message.seq == self.hwm + 1, "applied out of order"
            if message.op is Op.PUT:
                uid, version = message.body
                self.store[message.key] = (uid, version)
            elif self.store.get(message.key, ("",))[0] == message.body:
                del self.store[message.key]
            self.hwm = message.seq
            self.applied_seqs.append(message.seq)


class World:
    def __init__(self) -> None:
        self.cloud = Cloud()
        self.edge = Edge()
        self.now = 0.0
        self.c2e: list[bytes] = []
        self.e2c: list[bytes] = []
        self.connected = False

    def connect(self) -> None:
        self.c2e.clear()
        self.e2c.clear()
        self.edge_conn = Connection(
            Role.EDGE, now=self.now, inflight=self.edge.inflight, receiver=self.edge.receiver
        )
        self.cloud_conn = Connection(Role.CLOUD, now=self.now)
        [event] = self.cloud_conn.receive(self.edge_conn.hello("edge-1"), self.now)
        assert isinstance(event, HelloReceived)
        welcome, _ = self.cloud_conn.accept(
            event.hello, inflight=self.cloud.inflight, receiver=self.cloud.receiver
        )
        self.edge_handle(self.edge_conn.receive(welcome, self.now))
        self.connected = True

    def disconnect(self) -> None:
        self.connected = False
        self.c2e.clear()
        self.e2c.clear()

    def edge_handle(self, events) -> None:
        for event in events:
            if isinstance(event, Received):
                self.edge.apply(event.messages)
                self.edge_conn.applied(event.messages[-1].seq)
            elif isinstance(event, Settled):
                done = {m.seq for m in event.messages}
                self.edge.outbox = [m for m in self.edge.outbox if m.seq not in done]

    def cloud_handle(self, events) -> None:
        for event in events:
            if isinstance(event, Received):
                self.cloud.effects.extend(m.id for m in event.messages)
                self.cloud_conn.applied(event.messages[-1].seq)

    def step(self, action: str, arg: int) -> None:
        self.now += 0.01
        name = f"c{arg % OBJECTS}"
        if action == "put":
            self.cloud.put(name)
        elif action == "delete":
            self.cloud.delete(name)
        elif action == "report":
            self.edge.report()
        elif action == "crash":
            self.disconnect()
            self.edge.crash()
        elif action == "reconnect":
            self.connect()
        elif self.connected:
            self.link_step(action)

    def link_step(self, action: str) -> None:
        if action == "pump_cloud":
            self.c2e.extend(self.cloud_conn.outgoing(self.now, self.cloud.queue))
        elif action == "pump_edge":
            self.edge.number_reports()
            self.e2c.extend(self.edge_conn.outgoing(self.now))
        elif action.endswith(("c2e", "e2c")):
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
                self.deliver(action.endswith("c2e"))

    def deliver(self, downstream: bool) -> None:
        try:
            if downstream:
                self.edge_handle(self.edge_conn.receive(self.c2e.pop(0), self.now))
            else:
                self.cloud_handle(self.cloud_conn.receive(self.e2c.pop(0), self.now))
        except ProtocolError:
            # The receiving side hangs up; the shells would reconnect.
            self.disconnect()

    def heal(self) -> None:
        """Reconnect over a perfect link and run until nothing is left to send."""
        self.connect()
        for _ in range(10_000):
            self.now += 0.01
            self.edge.number_reports()
            self.c2e.extend(self.cloud_conn.outgoing(self.now, self.cloud.queue))
            self.e2c.extend(self.edge_conn.outgoing(self.now))
            while self.c2e or self.e2c:
                if self.c2e:
                    self.deliver(downstream=True)
                if self.e2c:
                    self.deliver(downstream=False)
            if not (
                len(self.cloud.queue)
                or len(self.cloud.inflight)
                or len(self.edge.inflight)
                or self.edge.unnumbered
                or self.cloud_conn.wants_to_send
                or self.edge_conn.wants_to_send
            ):
                return
        raise AssertionError("did not converge over a perfect link")


ACTIONS = [
    "put", "put", "put", "delete", "report", "report", "pump_cloud", "pump_cloud", "pump_edge",
    "pump_edge", "deliver_c2e", "deliver_c2e", "deliver_c2e", "deliver_e2c", "deliver_e2c",
    "drop_c2e", "drop_e2c", "dup_c2e", "dup_e2c", "swap_c2e", "swap_e2c", "reconnect", "crash",
]  # fmt: skip
steps = st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 100)), max_size=300)


@settings(max_examples=400, deadline=None)
@given(steps)
def test_both_sides_converge_with_nothing_lost_or_applied_twice(script):
    world = World()
    world.connect()
    for action, arg in script:
        world.step(action, arg)
    world.heal()

    assert world.edge.store == world.cloud.truth
    assert world.cloud.effects == world.edge.reports
    assert len(world.edge.applied_seqs) == len(set(world.edge.applied_seqs))
    assert world.edge.outbox == []


def test_a_reordered_stream_is_a_protocol_error_not_silent_loss():
    world = World()
    world.connect()
    for name in ("a", "b"):
        world.cloud.put(name)
        world.step("pump_cloud", 0)
    world.c2e[0], world.c2e[1] = world.c2e[1], world.c2e[0]
    world.step("deliver_c2e", 0)
    assert not world.connected
    assert world.edge.store == {}
    world.heal()
    assert world.edge.store == world.cloud.truth
