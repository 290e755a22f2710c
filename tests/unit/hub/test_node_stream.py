"""The cloud's per-node stream bookkeeping: what it queues, and the watermark it persists."""

from __future__ import annotations

from cloud.hub.streams import NodeStream, SourceObject, Watermark
from edge.wire.events import Op


def obj(uid: str, rv: int, body: object = None) -> SourceObject:
    return SourceObject(uid, f"ns/ConfigMap/{uid}", str(rv), body)


def stream(capacity: int = 100, window: int = 10) -> NodeStream:
    return NodeStream.fresh("gw-1", capacity=capacity, window=window)


def test_the_watermark_stays_below_the_oldest_change_not_yet_acknowledged() -> None:
    s = stream()
    source = {"ConfigMap": 50, "Pod": 70}
    assert s.watermark(source).rv == source
    s.offer(obj("a", 10))
    s.offer(obj("a", 20))  # coalesced: still stands for the change at 10
    s.offer(obj("b", 15))
    # Only the kind with changes pending is held back.
    assert s.watermark(source).rv == {"ConfigMap": 9, "Pod": 70}
    s.number_queued(now=0)
    assert s.watermark(source).rv == {"ConfigMap": 9, "Pod": 70}
    sent = [s.inflight.take_unsent(10, 1 << 20, lambda m: 1)][0]
    s.settle(s.inflight.ack(sent[0].seq), now=1)  # "a" acknowledged
    assert s.watermark(source).rv == {"ConfigMap": 14, "Pod": 70}
    s.settle(s.inflight.ack(sent[1].seq), now=1)
    assert s.watermark(source) == Watermark(next_seq=3, acked=2, rv=source, upstream=0)


def test_a_kind_the_source_does_not_name_falls_back_to_its_any_kind_position() -> None:
    s = stream()
    s.offer(obj("a", 30))
    assert s.watermark({"*": 50}).rv == {"*": 50, "ConfigMap": 29}
    assert s.watermark({"*": 20}).rv == {"*": 20, "ConfigMap": 20}


def test_a_full_queue_overflows_into_a_resync_and_holds_the_watermark_back() -> None:
    s = stream(capacity=2)
    s.offer(obj("a", 10))
    s.offer(obj("b", 11))
    s.offer(obj("c", 12))  # no room: overflow
    assert s.overflowed
    assert len(s.queue) == 0
    s.offer(obj("d", 13))  # ignored until the resync
    assert s.watermark({"ConfigMap": 99}).rv == {"ConfigMap": 9, "*": 0}
    queued = s.resync([obj(u, rv) for u, rv in (("a", 10), ("b", 11), ("c", 12), ("d", 13))])
    assert queued == 4
    assert not s.overflowed
    # A resync is bounded by the objects that exist, not by the queue, and ends with the
    # inventory of every key.
    assert len(s.queue) == 5
    s.number_queued(now=0)  # window 10: everything numbered
    messages = s.inflight.take_unsent(10, 1 << 20, lambda m: 1)
    assert [m.op for m in messages] == [Op.PUT] * 4 + [Op.SYNC]
    assert messages[-1].body == [f"ns/ConfigMap/{u}" for u in "abcd"]


def test_a_resync_since_a_watermark_sends_only_newer_objects_and_the_inventory() -> None:
    s = stream()
    pods = SourceObject("p", "ns/Pod/p", "8", {})
    queued = s.resync(
        [obj("old", 5), obj("new", 12), obj("odd", 0), pods], since_rv={"ConfigMap": 10, "*": 7}
    )
    assert queued == 2
    s.number_queued(now=0)
    messages = s.inflight.take_unsent(10, 1 << 20, lambda m: 1)
    assert [(m.op, m.key) for m in messages] == [
        (Op.PUT, "ns/ConfigMap/new"),
        (Op.PUT, "ns/Pod/p"),
        (Op.SYNC, "/Inventory/gw-1"),
    ]


def test_a_non_numeric_resource_version_is_always_resent() -> None:
    s = stream()
    odd = SourceObject("x", "ns/ConfigMap/x", "not-a-number", {})
    assert s.resync([odd], since_rv={"*": 10**9}) == 1


def test_watermarks_round_trip_through_json() -> None:
    mark = Watermark(next_seq=7, acked=6, rv={"Pod": 123, "Secret": 99}, upstream=4)
    assert Watermark.from_json(mark.to_json()) == mark


def test_a_watermark_with_one_position_for_all_kinds_still_loads() -> None:
    legacy = {"next": 7, "acked": 6, "rv": 123, "up": 4, "epoch": "e"}
    assert Watermark.from_json(legacy).rv == {"*": 123}
