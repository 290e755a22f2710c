"""The frames that travel between an edge hub and the cloud hub, as plain data.

Every frame is one WebSocket binary message. Both directions use the same frames; which side may
send which is checked by ``edge.wire.connection``.

- ``Hello`` (edge → cloud) opens a session: the protocol versions the edge speaks, the last
  downstream sequence number it has applied (``received``), so the cloud resumes right after
  it, and the first upstream sequence number it will send (``sending_from``).
- ``Welcome`` (cloud → edge) accepts: the version chosen, the same two numbers for the other
  direction, and the limits both sides keep to.

``sending_from`` lets a receiver that lost some of its memory (a cloud restarted from a lagging
persisted watermark) skip numbers its previous incarnation already acknowledged, instead of
seeing a gap.
- ``Refuse`` (cloud → edge) declines, with an optional retry-after hint (reconnect storms).
- ``Batch`` carries sync messages in sequence order, and a cumulative acknowledgement of the
  other direction.
- ``Ack`` acknowledges without data; ``Ping``/``Pong`` are heartbeats, which carry acks too.
- ``Close`` ends a session with a reason a person can read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Op(StrEnum):
    """What a sync message does to the object or report it names."""

    # Downstream (cloud → edge): desired state.
    PUT = "put"
    DELETE = "delete"
    # The full list of keys the node should hold (body: list of keys); the edge deletes every
    # other object. Sent after the cloud lost track of what the edge has (a cloud restart, an
    # overflowed queue, an edge whose store was wiped), instead of a delete per missed removal.
    SYNC = "sync"
    # Upstream (edge → cloud): reports, in the outbox's drop order (first dropped first).
    TELEMETRY = "telemetry"
    STATUS = "status"
    EVENT = "event"
    TWIN = "twin"


DOWNSTREAM_OPS = frozenset({Op.PUT, Op.DELETE, Op.SYNC})
UPSTREAM_OPS = frozenset({Op.TELEMETRY, Op.STATUS, Op.EVENT, Op.TWIN})


@dataclass(frozen=True, slots=True)
class Message:
    """One sync message.

    ``key`` is ``namespace/kind/name`` (namespace empty for cluster-scoped objects); ``rv`` is
    the Kubernetes resourceVersion the body reflects ("" when it has none); ``body`` is any
    msgpack-able value. ``seq`` is assigned by the sender's window, starting at 1, and is
    contiguous within one direction of one node's stream.
    """

    seq: int
    id: str
    op: Op
    key: str
    rv: str = ""
    body: Any = None


@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    versions: tuple[int, ...]
    received: int
    sending_from: int
    agent_version: str = ""
    # Names the edge's store: a new one (a re-flashed gateway, a wiped or restored disk) numbers
    # its streams from scratch, and the cloud must not mistake that for redelivery.
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    received: int
    sending_from: int
    heartbeat_s: float
    max_frame: int
    window: int


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    ack: int
    messages: tuple[Message, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Ack:
    ack: int


@dataclass(frozen=True, slots=True)
class Ping:
    ack: int


@dataclass(frozen=True, slots=True)
class Pong:
    ack: int


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


Frame = Hello | Welcome | Refuse | Batch | Ack | Ping | Pong | Close
