"""What the cloud hub remembers about each node's stream, and what it persists of it.

Downstream, a node's queue coalesces pending changes by object UID; numbered messages wait in
the window until the edge acknowledges them. Both outlive a WebSocket, so a reconnect resumes
exactly where the edge's acknowledgements left off.

A cloud restart loses that memory. What survives is the node's ``Watermark``, persisted in
batches: the next sequence number, the last acknowledged one, the last upstream report applied,
and ``rv``: for each kind of object, a Kubernetes resourceVersion such that the edge has
acknowledged every change to its objects of that kind up to it. On restart the hub sends only
objects changed after it, plus one ``sync`` message listing every key the node should hold
(which covers deletions it missed), so a restart does not resend everything.

Positions are kept per kind because each kind is a separate watch: a watch of pods that has seen
nothing lately says nothing about how far the ConfigMaps have got, so one position for all would
stay where the quietest watch last spoke. ``"*"`` is the position of kinds not named.

resourceVersions are compared as integers. Kubernetes calls them opaque, but the apiserver backed
by etcd issues increasing integers; a version that is not one is always resent.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from edge.wire.events import Message, Op
from edge.wire.keys import inventory_key, split_key
from edge.wire.window import CoalescingQueue, InFlight, Pending, QueueFull, ReceiveWindow

# kind -> resourceVersion; ANY_KIND holds the position of kinds not listed.
Positions = dict[str, int]
ANY_KIND = "*"


def position(positions: Positions | None, kind: str) -> int:
    if not positions:
        return 0
    return positions.get(kind, positions.get(ANY_KIND, 0))


def rv_number(rv: str) -> int | None:
    try:
        return int(rv)
    except ValueError:
        return None


@dataclass(frozen=True)
class SourceObject:
    """One object as the source holds it for a node."""

    uid: str
    key: str
    rv: str
    body: Any

    @property
    def kind(self) -> str:
        return split_key(self.key)[1]


@dataclass(frozen=True)
class Watermark:
    next_seq: int
    acked: int
    rv: Positions
    upstream: int
    epoch: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "next": self.next_seq,
            "acked": self.acked,
            "rv": self.rv,
            "up": self.upstream,
            "epoch": self.epoch,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Watermark:
        return cls(
            int(data["next"]),
            int(data["acked"]),
            _positions(data["rv"]),
            int(data["up"]),
            str(data.get("epoch", "")),
        )


def _positions(data: Any) -> Positions:
    # A watermark written before positions were kept per kind holds one number for all.
    if isinstance(data, dict):
        return {str(kind): int(number) for kind, number in data.items()}
    return {ANY_KIND: int(data)}


@dataclass
class NodeStream:
    """One node's downstream and upstream sequencing state in the cloud."""

    name: str
    queue: CoalescingQueue
    inflight: InFlight
    receiver: ReceiveWindow
    # The edge store this stream is with (``Hello.epoch``).
    epoch: str = ""
    # The kind and oldest resourceVersion each pending change stands for: queued ones by UID,
    # numbered ones by seq. The watermark's position of each kind stays below all of them.
    queued_rv: dict[str, tuple[str, int]] = field(default_factory=dict)
    inflight_rv: dict[int, tuple[str, int]] = field(default_factory=dict)
    sent_at: dict[int, float] = field(default_factory=dict)
    # While an overflowed queue awaits its resync, the watermark may not pass where it was.
    floor_rv: Positions | None = None
    dirty: bool = True
    overflowed: bool = False
    wake: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def fresh(
        cls,
        name: str,
        *,
        capacity: int,
        window: int,
        next_seq: int = 1,
        upstream: int = 0,
        epoch: str = "",
    ) -> NodeStream:
        return cls(
            name,
            CoalescingQueue(capacity),
            InFlight(window, next_seq=next_seq),
            ReceiveWindow(upstream),
            epoch,
        )

    def kick(self) -> None:
        self.wake.set()

    def offer(self, obj: SourceObject, deleted: bool = False, *, force: bool = False) -> None:
        """Queue a change to one object; a full queue turns into a full resync later."""
        if self.overflowed:
            return
        op = Op.DELETE if deleted else Op.PUT
        pending = Pending(f"{obj.uid}@{obj.rv}", op, obj.key, obj.rv, None if deleted else obj.body)
        try:
            self.queue.offer(obj.uid, pending, force=force)
        except QueueFull:
            # Never block the source for one slow node, and never drop a change silently:
            # forget the queue and send the node everything once it catches up.
            # Changes of any kind are ignored from now until the resync.
            pending = [n for _, n in (*self.queued_rv.values(), *self.inflight_rv.values())]
            self.floor_rv = {ANY_KIND: min(pending) - 1 if pending else 0}
            self.overflowed = True
            self.queue = CoalescingQueue(self.queue.capacity)
            self.queued_rv.clear()
            return
        number = rv_number(obj.rv)
        self.queued_rv.setdefault(obj.uid, (obj.kind, 0 if number is None else number))
        self.kick()

    def resync(self, objects: Iterable[SourceObject], since_rv: Positions | None = None) -> int:
        """Queue every object changed after ``since_rv`` (all when None), then the inventory."""
        self.overflowed = False
        self.floor_rv = None
        keys = []
        queued = 0
        for obj in objects:
            keys.append(obj.key)
            number = rv_number(obj.rv)
            if since_rv is None or number is None or number > position(since_rv, obj.kind):
                self.offer(obj, force=True)
                queued += 1
        self.queue.offer(
            f"sync:{self.name}",
            Pending(f"sync@{time.time_ns()}", Op.SYNC, inventory_key(self.name), "", sorted(keys)),
            force=True,
        )
        self.kick()
        return queued

    def number_queued(self, now: float) -> None:
        """Move queued changes into the window while it has room."""
        while len(self.queue) and self.inflight.has_room:
            pending = self.queue.pop()
            message = self.inflight.number(pending)
            uid = pending.id.rpartition("@")[0]
            rv = self.queued_rv.pop(uid, None)
            if rv is not None:
                self.inflight_rv[message.seq] = rv
            self.sent_at[message.seq] = now

    def settle(self, messages: Iterable[Message], now: float) -> list[float]:
        """The edge acknowledged these; returns their ack latencies in seconds."""
        latencies = []
        for message in messages:
            self.inflight_rv.pop(message.seq, None)
            sent = self.sent_at.pop(message.seq, None)
            if sent is not None:
                latencies.append(now - sent)
        self.dirty = True
        return latencies

    def watermark(self, source_rv: Positions) -> Watermark:
        """What to persist; ``source_rv`` is how far the source has processed each kind."""
        marks = dict(source_rv)
        for kind, number in (*self.queued_rv.values(), *self.inflight_rv.values()):
            marks[kind] = min(position(marks, kind), number - 1)
        if self.floor_rv is not None:
            for kind in {*marks, *self.floor_rv}:
                marks[kind] = min(position(marks, kind), position(self.floor_rv, kind))
        return Watermark(
            self.inflight.next_seq,
            self.inflight.acked,
            {kind: max(number, 0) for kind, number in marks.items()},
            self.receiver.applied_seq,
            self.epoch,
        )

    @property
    def depth(self) -> int:
        return len(self.queue) + len(self.inflight)


class NodeStreams(dict[str, NodeStream]):
    """Every node's stream on this replica, by node name: where the source publishes each change
    and the hub opens, restores and drains the streams. Both are given it when they are built,
    so neither has to exist before the other."""

    def publish(self, node: str, obj: SourceObject, deleted: bool) -> None:
        """A change to one of ``node``'s objects. Nodes unknown since start are caught up from
        their watermark when they connect, so only known streams are queued to."""
        stream = self.get(node)
        if stream is not None:
            stream.offer(obj, deleted)

    @property
    def depth(self) -> int:
        return sum(stream.depth for stream in self.values())
