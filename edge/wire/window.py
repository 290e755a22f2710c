"""Sequencing state for one direction of one node's stream: pure, no I/O, no clocks.

The sending side is two parts, because the edge and the cloud keep unsent data differently:

- ``CoalescingQueue`` holds what is waiting to be sent, at most one entry per coalescing key
  (an object's UID downstream): a newer version replaces a queued older one in place, and a
  delete replaces any queued version. It is bounded; a full queue refuses new keys, which is the
  caller's signal to apply backpressure. The cloud keeps this in memory; the edge keeps its
  upstream queue in SQLite (the outbox) instead.
- ``InFlight`` holds what was given a sequence number and sent but not yet acknowledged, at most
  ``window`` messages. Acknowledgements are cumulative: ``ack(n)`` settles every message up to
  ``n``. After a reconnect, ``resume(peer_received)`` settles what the peer already has and
  rewinds so that the rest is sent again, with the same sequence numbers.

The receiving side, ``ReceiveWindow``, accepts messages in sequence order, drops redelivered
ones, treats a gap as a protocol error, and tracks which acknowledgement to send once the
caller has durably applied what it received.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from edge.wire.codec import ProtocolError
from edge.wire.events import Message, Op


@dataclass(frozen=True, slots=True)
class Pending:
    """A queued, not yet numbered message."""

    id: str
    op: Op
    key: str
    rv: str = ""
    body: Any = None


class QueueFull(Exception):
    """The queue holds ``capacity`` distinct keys and the new one cannot be coalesced."""


class CoalescingQueue:
    """Unsent messages, one per coalescing key, oldest key first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[str, Pending] = OrderedDict()
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._entries)

    def offer(self, coalesce_key: str, pending: Pending, *, force: bool = False) -> None:
        """Queue ``pending``, replacing a queued entry with the same key in its place.

        Raises ``QueueFull`` when the key is new and the queue is at capacity, unless ``force``:
        a full resync is bounded by the objects that exist, not by the queue.
        """
        if coalesce_key in self._entries:
            self._entries[coalesce_key] = pending
            self.coalesced += 1
            return
        if len(self._entries) >= self.capacity and not force:
            raise QueueFull(f"send queue holds {self.capacity} distinct keys")
        self._entries[coalesce_key] = pending

    def pop(self) -> Pending:
        return self._entries.popitem(last=False)[1]


class InFlight:
    """Numbered messages sent and not yet acknowledged, with their resend position."""

    def __init__(self, window: int, next_seq: int = 1) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.next_seq = next_seq
        self.acked = next_seq - 1
        self._messages: deque[Message] = deque()
        self._unsent = 0  # index in _messages of the first one not sent on this connection

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def has_room(self) -> bool:
        return len(self._messages) < self.window

    @property
    def has_unsent(self) -> bool:
        return self._unsent < len(self._messages)

    def number(self, pending: Pending) -> Message:
        """Give ``pending`` the next sequence number and hold it until acknowledged."""
        if not self.has_room:
            raise ProtocolError("send window is full")  # a caller bug, not the peer's
        message = Message(
            self.next_seq, pending.id, pending.op, pending.key, pending.rv, pending.body
        )
        self.next_seq += 1
        self._messages.append(message)
        return message

    def hold(self, message: Message) -> None:
        """Hold a message numbered elsewhere (the edge's outbox numbers its own, durably)."""
        if message.seq != self.next_seq:
            raise ValueError(f"expected seq {self.next_seq}, got {message.seq}")
        self.next_seq += 1
        self._messages.append(message)

    def take_unsent(
        self, limit: int, max_bytes: int, size: Callable[[Message], int]
    ) -> list[Message]:
        """Up to ``limit`` held messages not yet sent on this connection, within ``max_bytes``.

        At least one message is returned when any is unsent, whatever its size: the codec
        refuses frames over the limit, and the caller refuses oversized messages when queueing.
        """
        taken: list[Message] = []
        total = 0
        while self._unsent < len(self._messages) and len(taken) < limit:
            message = self._messages[self._unsent]
            total += size(message)
            if taken and total > max_bytes:
                break
            taken.append(message)
            self._unsent += 1
        return taken

    def check_ack(self, n: int) -> None:
        """Raise ``ProtocolError`` if ``n`` acknowledges something never sent."""
        if n >= self.next_seq:
            raise ProtocolError(
                f"ack {n} is for a message never sent (last sent {self.next_seq - 1})"
            )

    def ack(self, n: int) -> list[Message]:
        """Settle every message up to ``n``; returns them. Stale acks settle nothing."""
        self.check_ack(n)
        settled = []
        while self._messages and self._messages[0].seq <= n:
            settled.append(self._messages.popleft())
            self._unsent = max(0, self._unsent - 1)
        self.acked = max(self.acked, n)
        return settled

    def resume(self, peer_received: int) -> list[Message]:
        """A new connection: settle what the peer has, and send the rest again."""
        settled = self.ack(peer_received) if peer_received > self.acked else []
        self._unsent = 0
        return settled

    @property
    def sending_from(self) -> int:
        """The first sequence number a new connection will carry."""
        return self._messages[0].seq if self._messages else self.next_seq


class ReceiveWindow:
    """What one side has received of the other's stream and what it may acknowledge.

    ``accept`` filters a batch for the caller, who applies the new messages durably and then
    calls ``applied``; only applied messages are acknowledged, so an ack is a promise that the
    data survives a crash.
    """

    def __init__(self, applied: int = 0) -> None:
        self.applied_seq = applied
        self.expected = applied + 1
        self.acked_seq = applied
        self.duplicates = 0

    def resume(self, peer_sending_from: int) -> None:
        """A new connection: expect the first message not yet durably applied.

        A peer that starts beyond it says that what lies between was acknowledged by an
        earlier incarnation of this side, so it was applied.
        """
        self.applied_seq = max(self.applied_seq, peer_sending_from - 1)
        self.expected = self.applied_seq + 1

    def accept(self, messages: Iterable[Message]) -> list[Message]:
        """The messages the caller must apply, in order; redeliveries are dropped.

        All or nothing: a batch with a gap raises ``ProtocolError`` and changes nothing.
        """
        fresh = []
        expected, duplicates = self.expected, 0
        for message in messages:
            if message.seq < expected:
                duplicates += 1
            elif message.seq == expected:
                fresh.append(message)
                expected += 1
            else:
                raise ProtocolError(
                    f"message seq {message.seq} arrived out of order: expected {expected}"
                )
        self.expected, self.duplicates = expected, self.duplicates + duplicates
        return fresh

    def applied(self, seq: int) -> None:
        """The caller has durably applied everything up to ``seq``."""
        if seq >= self.expected:
            raise ValueError(f"applied {seq} but only received up to {self.expected - 1}")
        self.applied_seq = max(self.applied_seq, seq)

    @property
    def ack_pending(self) -> int:
        """How many applied messages are not yet acknowledged."""
        return self.applied_seq - self.acked_seq

    def take_ack(self) -> int:
        """The cumulative ack to send now; marks it as sent."""
        self.acked_seq = self.applied_seq
        return self.acked_seq
