"""The send queue coalesces and stays bounded; the window refuses acks for unsent data."""

from __future__ import annotations

import pytest

from edge.wire.codec import ProtocolError
from edge.wire.events import Op
from edge.wire.window import CoalescingQueue, InFlight, Pending, QueueFull, ReceiveWindow


def test_newer_version_replaces_queued_one_in_place_and_delete_supersedes():
    queue = CoalescingQueue(capacity=3)
    queue.offer("uid-a", Pending("a1", Op.PUT, "ns/Pod/a", "1"))
    queue.offer("uid-b", Pending("b1", Op.PUT, "ns/Pod/b", "1"))
    queue.offer("uid-a", Pending("a2", Op.PUT, "ns/Pod/a", "2"))
    queue.offer("uid-b", Pending("b-del", Op.DELETE, "ns/Pod/b"))
    assert [queue.pop().id for _ in range(len(queue))] == ["a2", "b-del"]
    assert queue.coalesced == 2


def test_a_full_queue_refuses_new_keys_but_still_coalesces():
    queue = CoalescingQueue(capacity=1)
    queue.offer("uid-a", Pending("a1", Op.PUT, "ns/Pod/a"))
    with pytest.raises(QueueFull):
        queue.offer("uid-b", Pending("b1", Op.PUT, "ns/Pod/b"))
    queue.offer("uid-a", Pending("a2", Op.PUT, "ns/Pod/a"))
    assert queue.pop().id == "a2"


def test_ack_beyond_what_was_sent_is_a_protocol_error():
    window = InFlight(window=2)
    window.number(Pending("a", Op.PUT, "ns/Pod/a"))
    with pytest.raises(ProtocolError, match="never sent"):
        window.ack(2)
    assert [m.seq for m in window.ack(1)] == [1]


def test_resume_resends_unacked_with_the_same_numbers():
    window = InFlight(window=3)
    for name in "abc":
        window.number(Pending(name, Op.PUT, f"ns/Pod/{name}"))
    assert len(window.take_unsent(10, 10_000, lambda m: 10)) == 3
    window.resume(peer_received=1)
    assert [m.seq for m in window.take_unsent(10, 10_000, lambda m: 10)] == [2, 3]


def test_receiver_drops_redeliveries_and_acks_only_applied_data():
    receiver = ReceiveWindow(applied=5)
    window = InFlight(window=2, next_seq=5)
    window.number(Pending("x", Op.PUT, "ns/Pod/x"))
    window.number(Pending("y", Op.PUT, "ns/Pod/y"))
    sent = window.take_unsent(10, 10_000, lambda m: 10)
    assert [m.seq for m in receiver.accept(sent)] == [6]
    assert receiver.duplicates == 1
    assert receiver.ack_pending == 0
    receiver.applied(6)
    assert receiver.take_ack() == 6


def test_a_batch_with_a_gap_changes_nothing() -> None:
    from edge.wire.events import Message

    receiver = ReceiveWindow()
    batch = [Message(1, "a", Op.PUT, "ns/Pod/a"), Message(3, "c", Op.PUT, "ns/Pod/c")]
    with pytest.raises(ProtocolError, match="out of order"):
        receiver.accept(batch)
    assert receiver.expected == 1
    assert [m.seq for m in receiver.accept(batch[:1])] == [1]
