"""edge.wire.connection, case by case: the handshake (hello, accept, refuse), receiving in each
state, batches, acks and windows, heartbeats, resuming, protocol errors and closing.

Frames are made with the codec and read back with it, so every case is a sequence of bytes in
and bytes out, as the shells see it.
"""

from __future__ import annotations

import pytest

from edge.wire import codec
from edge.wire.codec import ProtocolError
from edge.wire.connection import (
    BATCH_LIMIT,
    MISSED_HEARTBEATS,
    Connection,
    HelloReceived,
    Opened,
    PeerClosed,
    Received,
    Refused,
    Role,
    Settled,
    State,
    choose_version,
)
from edge.wire.events import (
    Ack,
    Batch,
    Close,
    Hello,
    Message,
    Op,
    Ping,
    Pong,
    Refuse,
    Welcome,
)
from edge.wire.window import CoalescingQueue, InFlight, Pending, ReceiveWindow

VERSION = codec.SUPPORTED_VERSIONS[-1]


def edge_conn(
    window: int = 8, *, next_seq: int = 1, applied: int = 0, **kwargs: float
) -> Connection:
    return Connection(
        Role.EDGE,
        now=0,
        inflight=InFlight(window, next_seq=next_seq),
        receiver=ReceiveWindow(applied),
        **kwargs,  # type: ignore[arg-type]
    )


def report(seq: int, key: str = "ns/Pod/p") -> Message:
    return Message(seq, f"r{seq}", Op.STATUS, key)


def put(seq: int, name: str = "a") -> Message:
    return Message(seq, f"m{seq}", Op.PUT, f"ns/ConfigMap/{name}", str(seq), {"n": seq})


def frames(data: list[bytes]) -> list[object]:
    return [codec.decode(d) for d in data]


class Pair:
    """An edge and a cloud connection with their resume state, handshaken and open."""

    def __init__(self, window: int = 8, heartbeat_s: float = 10.0) -> None:
        self.edge = edge_conn(window)
        self.cloud = Connection(Role.CLOUD, now=0, heartbeat_s=heartbeat_s)
        self.cloud_inflight = InFlight(window)
        self.cloud_receiver = ReceiveWindow()
        [event] = self.cloud.receive(self.edge.hello("gw-1"), 0)
        assert isinstance(event, HelloReceived)
        welcome, _ = self.cloud.accept(
            event.hello, inflight=self.cloud_inflight, receiver=self.cloud_receiver
        )
        assert self.edge.receive(welcome, 0) == [Opened(VERSION)]

    def down(self, *messages: Message, now: float = 0) -> list[object]:
        """Cloud → edge: number ``messages`` and deliver what the cloud sends."""
        for message in messages:
            self.cloud_inflight.hold(message)
        events: list[object] = []
        for data in self.cloud.outgoing(now):
            events.extend(self.edge.receive(data, now))
        return events

    def up(self, *messages: Message, now: float = 0) -> list[object]:
        for message in messages:
            self.edge.inflight.hold(message)
        events: list[object] = []
        for data in self.edge.outgoing(now):
            events.extend(self.cloud.receive(data, now))
        return events


# -- construction ---------------------------------------------------------------------------


def test_a_new_connection_is_in_its_handshake() -> None:
    assert edge_conn().state is State.HANDSHAKE
    assert Connection(Role.CLOUD, now=0).state is State.HANDSHAKE


def test_the_edge_needs_its_resume_state_at_construction() -> None:
    with pytest.raises(ValueError, match="resume state"):
        Connection(Role.EDGE, now=0, inflight=InFlight(4))
    with pytest.raises(ValueError, match="resume state"):
        Connection(Role.EDGE, now=0, receiver=ReceiveWindow())


# -- versions --------------------------------------------------------------------------------


def test_the_highest_common_version_is_chosen() -> None:
    assert choose_version((VERSION, VERSION + 7)) == VERSION


def test_no_common_version_names_both_sides_versions() -> None:
    with pytest.raises(ProtocolError, match=rf"edge speaks \[99\], cloud speaks \[{VERSION}\]"):
        choose_version((99,))


# -- hello -----------------------------------------------------------------------------------


def test_hello_says_what_the_edge_has_and_where_it_sends_from() -> None:
    edge = edge_conn(next_seq=5, applied=12)
    edge.inflight.hold(report(5))
    hello = codec.decode(edge.hello("gw-1", "1.2.3", epoch="e-1"))
    assert hello == Hello(
        node="gw-1",
        versions=codec.SUPPORTED_VERSIONS,
        received=12,
        sending_from=5,
        agent_version="1.2.3",
        epoch="e-1",
    )
    assert edge.state is State.HANDSHAKE  # until the Welcome


def test_only_the_edge_says_hello_and_only_once_open() -> None:
    with pytest.raises(RuntimeError, match="cloud in state handshake"):
        Connection(Role.CLOUD, now=0).hello("gw-1")
    pair = Pair()
    with pytest.raises(RuntimeError, match="edge in state open"):
        pair.edge.hello("gw-1")


# -- accept ----------------------------------------------------------------------------------


def test_the_cloud_hears_a_hello_as_an_event_to_answer() -> None:
    cloud = Connection(Role.CLOUD, now=0)
    [event] = cloud.receive(edge_conn(applied=3).hello("gw-1"), 0)
    assert isinstance(event, HelloReceived)
    assert (event.hello.node, event.hello.received) == ("gw-1", 3)
    assert cloud.state is State.HANDSHAKE


def test_accept_welcomes_with_the_nodes_resume_state_and_settles_what_the_edge_has() -> None:
    cloud = Connection(Role.CLOUD, now=0, heartbeat_s=7, max_frame=50_000)
    inflight = InFlight(16, next_seq=10)
    for seq in (10, 11, 12):
        inflight.hold(put(seq))
    receiver = ReceiveWindow(applied=4)
    hello = Hello("gw-1", codec.SUPPORTED_VERSIONS, received=11, sending_from=9)
    welcome, settled = cloud.accept(hello, inflight=inflight, receiver=receiver)
    assert [m.seq for m in settled.messages] == [10, 11]
    # The edge sends from 9: what lies between 4 and 9 was acknowledged by an earlier cloud.
    assert codec.decode(welcome) == Welcome(
        version=VERSION, received=8, sending_from=12, heartbeat_s=7, max_frame=50_000, window=16
    )
    assert cloud.state is State.OPEN
    assert (cloud.inflight, cloud.receiver) == (inflight, receiver)


def test_accept_refuses_a_hello_without_a_common_version() -> None:
    cloud = Connection(Role.CLOUD, now=0)
    hello = Hello("gw-1", (99,), received=0, sending_from=1)
    with pytest.raises(ProtocolError, match="no common protocol version"):
        cloud.accept(hello, inflight=InFlight(4), receiver=ReceiveWindow())
    assert cloud.state is State.HANDSHAKE  # the shell refuses next


def test_only_the_cloud_accepts() -> None:
    hello = Hello("gw-1", codec.SUPPORTED_VERSIONS, received=0, sending_from=1)
    with pytest.raises(RuntimeError, match="edge in state handshake"):
        edge_conn().accept(hello, inflight=InFlight(4), receiver=ReceiveWindow())


# -- the edge's side of the handshake ----------------------------------------------------------


def test_a_welcome_opens_the_edge_and_sets_the_smaller_limits() -> None:
    edge = edge_conn(window=64, max_frame=100_000)
    welcome = Welcome(
        VERSION, received=0, sending_from=1, heartbeat_s=3, max_frame=80_000, window=8
    )
    assert edge.receive(codec.encode(welcome), 0) == [Opened(VERSION)]
    assert edge.state is State.OPEN
    assert (edge.version, edge.heartbeat_s, edge.max_frame) == (VERSION, 3, 80_000)
    assert edge.inflight.window == 8
    small = edge_conn(window=4, max_frame=10_000)
    small.receive(codec.encode(welcome), 0)
    assert (small.max_frame, small.inflight.window) == (10_000, 4)


def test_a_welcome_settles_what_the_cloud_has_and_skips_what_it_will_not_send() -> None:
    edge = edge_conn(applied=2)
    for seq in (1, 2, 3):
        edge.inflight.hold(report(seq))
    welcome = Welcome(
        VERSION, received=2, sending_from=6, heartbeat_s=10, max_frame=1 << 20, window=8
    )
    events = edge.receive(codec.encode(welcome), 0)
    assert events[0] == Opened(VERSION)
    assert isinstance(events[1], Settled)
    assert [m.seq for m in events[1].messages] == [1, 2]
    assert edge.receiver.applied_seq == 5  # the shell raises its store's mark to match
    assert [m.seq for m in edge.inflight.take_unsent(10, 1 << 20, codec.message_size)] == [3]


def test_a_welcome_in_a_version_the_edge_does_not_speak_is_a_protocol_error() -> None:
    edge = edge_conn()
    welcome = Welcome(99, received=0, sending_from=1, heartbeat_s=10, max_frame=1 << 20, window=8)
    with pytest.raises(ProtocolError, match="unsupported version 99"):
        edge.receive(codec.encode(welcome), 0)
    assert edge.state is State.CLOSED


# -- refuse ----------------------------------------------------------------------------------


def test_a_refusal_closes_both_sides_with_its_reason_and_hint() -> None:
    edge, cloud = edge_conn(), Connection(Role.CLOUD, now=0)
    cloud.receive(edge.hello("gw-1"), 0)
    refusal = cloud.refuse("too many handshakes", retry_after_s=4.5)
    assert cloud.state is State.CLOSED
    assert codec.decode(refusal) == Refuse("too many handshakes", 4.5)
    assert edge.receive(refusal, 0) == [Refused("too many handshakes", 4.5)]
    assert edge.state is State.CLOSED


def test_only_the_cloud_refuses_and_only_during_the_handshake() -> None:
    with pytest.raises(RuntimeError):
        edge_conn().refuse("no")
    with pytest.raises(RuntimeError, match="cloud in state open"):
        Pair().cloud.refuse("no")


# -- frames out of place ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "frame"),
    [
        (Role.CLOUD, Welcome(VERSION, 0, 1, 10, 1 << 20, 8)),
        (Role.CLOUD, Refuse("no")),
        (Role.EDGE, Hello("gw-1", codec.SUPPORTED_VERSIONS, 0, 1)),
        (Role.EDGE, Batch(0, (put(1),))),
        (Role.CLOUD, Ack(0)),
        (Role.EDGE, Ping(0)),
    ],
)
def test_a_frame_before_the_handshake_ends_is_a_protocol_error(role: Role, frame: object) -> None:
    conn = edge_conn() if role is Role.EDGE else Connection(Role.CLOUD, now=0)
    with pytest.raises(ProtocolError, match="before the handshake ends"):
        conn.receive(codec.encode(frame), 0)  # type: ignore[arg-type]
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    "frame",
    [
        Hello("gw-1", codec.SUPPORTED_VERSIONS, 0, 1),
        Welcome(VERSION, 0, 1, 10, 1 << 20, 8),
        Refuse("no"),
    ],
)
def test_a_handshake_frame_in_an_open_session_is_a_protocol_error(frame: object) -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="not allowed in an open session"):
        pair.edge.receive(codec.encode(frame), 0)  # type: ignore[arg-type]
    assert pair.edge.state is State.CLOSED


def test_undecodable_bytes_close_the_session() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError):
        pair.cloud.receive(b"\xff\x00garbage", 0)
    assert pair.cloud.state is State.CLOSED


def test_nothing_is_received_after_the_session_closed() -> None:
    pair = Pair()
    pair.edge.close("bye")
    with pytest.raises(ProtocolError, match="after the session closed"):
        pair.edge.receive(codec.encode(Ack(0)), 0)


# -- batches ---------------------------------------------------------------------------------


def test_a_batch_is_received_in_order_and_acknowledged_once_applied() -> None:
    pair = Pair()
    [received] = pair.down(put(1, "a"), put(2, "b"))
    assert received == Received((put(1, "a"), put(2, "b")))
    assert not pair.edge.wants_to_send  # nothing is acknowledged before it is applied
    assert pair.edge.outgoing(0) == []
    pair.edge.applied(2)
    assert pair.edge.wants_to_send
    assert frames(pair.edge.outgoing(0)) == [Ack(2)]
    assert not pair.edge.wants_to_send


def test_an_ack_settles_everything_up_to_it() -> None:
    pair = Pair()
    pair.down(put(1), put(2), put(3))
    pair.edge.applied(2)
    [settled] = [e for d in pair.edge.outgoing(0) for e in pair.cloud.receive(d, 0)]
    assert settled == Settled((put(1), put(2)))
    assert [m.seq for m in pair.cloud_inflight.take_unsent(10, 1 << 20, codec.message_size)] == []
    assert len(pair.cloud_inflight) == 1  # 3 stays held until its ack


def test_a_batch_carries_the_ack_of_the_other_direction() -> None:
    pair = Pair()
    pair.up(report(1))
    pair.cloud.applied(1)
    events = pair.down(put(1))
    assert events == [Settled((report(1),)), Received((put(1),))]
    assert len(pair.edge.inflight) == 0


def test_redelivered_messages_are_dropped_and_counted() -> None:
    pair = Pair()
    pair.down(put(1))
    again = codec.encode(Batch(0, (put(1), put(2))))
    assert pair.edge.receive(again, 0) == [Received((put(2),))]
    assert pair.edge.receiver.duplicates == 1
    assert pair.edge.receive(codec.encode(Batch(0, (put(2),))), 0) == []


def test_a_gap_in_the_sequence_is_a_protocol_error() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="out of order: expected 1"):
        pair.edge.receive(codec.encode(Batch(0, (put(2),))), 0)
    assert pair.edge.state is State.CLOSED


@pytest.mark.parametrize(
    ("side", "message", "reason"),
    [
        ("edge", report(1), "'status' may not be sent to the edge"),
        ("cloud", put(1), "'put' may not be sent to the cloud"),
    ],
)
def test_a_message_in_the_wrong_direction_is_a_protocol_error(
    side: str, message: Message, reason: str
) -> None:
    pair = Pair()
    conn = pair.edge if side == "edge" else pair.cloud
    with pytest.raises(ProtocolError, match=reason):
        conn.receive(codec.encode(Batch(0, (message,))), 0)


def test_an_ack_for_something_never_sent_is_a_protocol_error() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="never sent"):
        pair.cloud.receive(codec.encode(Ack(1)), 0)


def test_a_bad_frame_does_not_settle_the_ack_it_carries() -> None:
    pair = Pair()
    pair.edge.inflight.hold(report(1))
    pair.edge.outgoing(0)
    gap = codec.encode(Batch(1, (put(2),)))
    with pytest.raises(ProtocolError):
        pair.edge.receive(gap, 0)
    assert len(pair.edge.inflight) == 1  # still held: the shell never heard it was settled


# -- sending and windows -----------------------------------------------------------------------


def test_nothing_is_sent_before_the_session_opens_or_after_it_closes() -> None:
    edge = edge_conn()
    edge.inflight.hold(report(1))
    assert edge.outgoing(100) == []
    pair = Pair()
    pair.edge.inflight.hold(report(1))
    pair.edge.close("bye")
    assert pair.edge.outgoing(100) == []


def test_queued_messages_are_numbered_while_the_window_has_room() -> None:
    pair = Pair(window=2)
    queue = CoalescingQueue(capacity=10)
    for name in "abc":
        queue.offer(name, Pending(name, Op.PUT, f"ns/ConfigMap/{name}"))
    [batch] = frames(pair.cloud.outgoing(0, queue))
    assert isinstance(batch, Batch)
    assert [(m.seq, m.id) for m in batch.messages] == [(1, "a"), (2, "b")]
    assert len(queue) == 1  # waits for room
    assert pair.cloud.outgoing(0, queue) == []
    for data in pair.cloud.outgoing(0):
        pair.edge.receive(data, 0)
    pair.edge.receive(codec.encode(batch), 0)
    pair.edge.applied(2)
    for data in pair.edge.outgoing(0):
        pair.cloud.receive(data, 0)
    [batch] = frames(pair.cloud.outgoing(0, queue))
    assert [(m.seq, m.id) for m in batch.messages] == [(3, "c")]


def test_a_message_is_sent_once_per_connection() -> None:
    pair = Pair()
    pair.up(report(1))
    assert pair.edge.outgoing(0) == []


def test_batches_are_split_at_the_batch_limit() -> None:
    pair = Pair(window=BATCH_LIMIT + 10)
    for seq in range(1, BATCH_LIMIT + 11):
        pair.cloud_inflight.hold(Message(seq, f"m{seq}", Op.DELETE, f"ns/ConfigMap/c{seq}"))
    sizes = [len(f.messages) for f in frames(pair.cloud.outgoing(0))]  # type: ignore[attr-defined]
    assert sizes == [BATCH_LIMIT, 10]


def test_batches_are_split_to_stay_within_the_frame_limit() -> None:
    edge = edge_conn(max_frame=4096)
    cloud = Connection(Role.CLOUD, now=0, max_frame=4096)
    [hello] = cloud.receive(edge.hello("gw-1"), 0)
    inflight = InFlight(64)
    welcome, _ = cloud.accept(hello.hello, inflight=inflight, receiver=ReceiveWindow())
    edge.receive(welcome, 0)
    body = "x" * 1000
    for seq in range(1, 11):
        inflight.hold(Message(seq, f"m{seq}", Op.PUT, f"ns/ConfigMap/c{seq}", "1", body))
    sent = cloud.outgoing(0)
    assert len(sent) > 1
    assert all(len(data) <= 4096 for data in sent)
    seqs = [m.seq for data in sent for event in edge.receive(data, 0) for m in event.messages]
    assert seqs == list(range(1, 11))


# -- heartbeats ------------------------------------------------------------------------------


def test_a_quiet_line_gets_a_ping_each_heartbeat_interval() -> None:
    pair = Pair(heartbeat_s=5)
    assert pair.edge.outgoing(4.9) == []
    assert frames(pair.edge.outgoing(5)) == [Ping(0)]
    assert pair.edge.outgoing(9.9) == []
    assert frames(pair.edge.outgoing(10)) == [Ping(0)]


def test_other_traffic_stands_in_for_the_ping() -> None:
    pair = Pair(heartbeat_s=5)
    pair.edge.inflight.hold(report(1))
    [batch] = frames(pair.edge.outgoing(5))
    assert isinstance(batch, Batch)
    assert pair.edge.outgoing(9) == []


def test_a_ping_is_answered_with_a_pong_carrying_the_ack() -> None:
    pair = Pair()
    pair.down(put(1))
    pair.edge.applied(1)
    assert pair.edge.receive(codec.encode(Ping(0)), 1) == []
    assert pair.edge.wants_to_send
    assert frames(pair.edge.outgoing(1)) == [Pong(1)]
    assert not pair.edge.wants_to_send


def test_pings_and_pongs_settle_what_they_acknowledge() -> None:
    pair = Pair()
    pair.up(report(1), report(2))
    assert pair.edge.receive(codec.encode(Ping(1)), 0) == [Settled((report(1),))]
    assert pair.edge.receive(codec.encode(Pong(2)), 0) == [Settled((report(2),))]


def test_a_peer_silent_for_missed_heartbeats_is_expired() -> None:
    pair = Pair(heartbeat_s=5)  # the edge adopts the cloud's interval
    silent = MISSED_HEARTBEATS * 5
    assert not pair.edge.expired(silent)
    assert pair.edge.expired(silent + 0.1)
    pair.edge.receive(codec.encode(Ping(0)), silent)
    assert not pair.edge.expired(silent + 0.1)


# -- resuming --------------------------------------------------------------------------------


def test_a_new_connection_resends_what_was_not_acknowledged_with_the_same_numbers() -> None:
    inflight, receiver = InFlight(8), ReceiveWindow()
    first = Connection(Role.EDGE, now=0, inflight=inflight, receiver=receiver)
    cloud = Connection(Role.CLOUD, now=0)
    [hello] = cloud.receive(first.hello("gw-1"), 0)
    welcome, _ = cloud.accept(hello.hello, inflight=InFlight(8), receiver=ReceiveWindow())
    first.receive(welcome, 0)
    for seq in (1, 2, 3):
        inflight.hold(report(seq))
    first.outgoing(0)  # all three sent; the link breaks before any ack

    second = Connection(Role.EDGE, now=1, inflight=inflight, receiver=receiver)
    assert codec.decode(second.hello("gw-1")).sending_from == 1  # type: ignore[union-attr]
    welcome = Welcome(
        VERSION, received=1, sending_from=1, heartbeat_s=10, max_frame=1 << 20, window=8
    )
    events = second.receive(codec.encode(welcome), 1)
    assert Settled((report(1),)) in events
    [batch] = frames(second.outgoing(1))
    assert [m.seq for m in batch.messages] == [2, 3]  # type: ignore[attr-defined]


# -- closing ---------------------------------------------------------------------------------


def test_close_says_why_and_the_peer_hears_it() -> None:
    pair = Pair()
    data = pair.cloud.close("replaced by a newer connection")
    assert pair.cloud.state is State.CLOSED
    assert pair.edge.receive(data, 0) == [PeerClosed("replaced by a newer connection")]
    assert pair.edge.state is State.CLOSED


def test_a_close_during_the_handshake_is_heard_too() -> None:
    cloud = Connection(Role.CLOUD, now=0)
    assert cloud.receive(edge_conn().close("shutting down"), 0) == [PeerClosed("shutting down")]
    edge = edge_conn()
    assert edge.receive(Connection(Role.CLOUD, now=0).close("going away"), 0) == [
        PeerClosed("going away")
    ]
    assert edge.state is State.CLOSED


def test_a_close_reason_is_cut_to_a_thousand_characters() -> None:
    frame = codec.decode(Pair().edge.close("x" * 5000))
    assert frame == Close("x" * 1000)
