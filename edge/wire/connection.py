"""One edge↔cloud session as a state machine: bytes in, events out; nothing here does I/O.

The trio shells (edge hub, cloud hub) own the socket, the clock and durability. They feed every
received WebSocket message to ``receive``, act on the events it returns, and send whatever
``outgoing`` produces whenever something may have changed: after applying received messages,
after queueing new ones, and on a timer of ``heartbeat_s``.

A session goes HANDSHAKE → OPEN → CLOSED. The edge starts with ``hello()``; the cloud answers a
``HelloReceived`` event with ``accept()`` or ``refuse()``. Any frame that breaks the protocol
(wrong state, wrong direction, gap in sequence numbers, an ack for something never sent) raises
``ProtocolError`` and closes the session; the shell sends ``close(reason)`` and hangs up.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from edge.wire import codec
from edge.wire.codec import ProtocolError
from edge.wire.events import (
    DOWNSTREAM_OPS,
    UPSTREAM_OPS,
    Ack,
    Batch,
    Close,
    Hello,
    Message,
    Ping,
    Pong,
    Refuse,
    Welcome,
)
from edge.wire.window import CoalescingQueue, InFlight, ReceiveWindow

DEFAULT_HEARTBEAT_S = 10.0
# A peer silent for this many heartbeat intervals is taken to be gone.
MISSED_HEARTBEATS = 3
BATCH_LIMIT = 512


class Role(Enum):
    EDGE = "edge"
    CLOUD = "cloud"


class State(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """(cloud) An edge asks to open a session; answer with ``accept`` or ``refuse``."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class Opened:
    version: int


@dataclass(frozen=True, slots=True)
class Refused:
    """(edge) The cloud declined; wait at least ``retry_after_s`` when it is given."""

    reason: str
    retry_after_s: float | None


@dataclass(frozen=True, slots=True)
class Received:
    """New messages, in order, to apply durably before calling ``applied``."""

    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Settled:
    """The peer acknowledged these messages: they may be forgotten."""

    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class PeerClosed:
    reason: str


Event = HelloReceived | Opened | Refused | Received | Settled | PeerClosed


def choose_version(offered: tuple[int, ...]) -> int:
    common = set(offered) & set(codec.SUPPORTED_VERSIONS)
    if not common:
        raise ProtocolError(
            f"no common protocol version: edge speaks {list(offered)},"
            f" cloud speaks {list(codec.SUPPORTED_VERSIONS)}"
        )
    return max(common)


class Connection:
    """The protocol state of one session.

    ``inflight`` and ``receiver`` outlive connections (they are the resume state); a new
    ``Connection`` is made for each WebSocket. The edge passes them at construction; the cloud
    learns which node it serves only from the Hello, and passes them to ``accept``.
    """

    def __init__(
        self,
        role: Role,
        *,
        now: float,
        inflight: InFlight | None = None,
        receiver: ReceiveWindow | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        max_frame: int = codec.DEFAULT_MAX_FRAME,
    ) -> None:
        self.role = role
        self.state = State.HANDSHAKE
        if role is Role.EDGE and (inflight is None or receiver is None):
            raise ValueError("the edge's connection needs its resume state at construction")
        # The cloud's placeholders are replaced in accept(); until then nothing is sent.
        self.inflight = InFlight(window=1) if inflight is None else inflight
        self.receiver = ReceiveWindow() if receiver is None else receiver
        self.heartbeat_s = heartbeat_s
        self.max_frame = max_frame
        self.version: int | None = None
        self._last_received = now
        self._last_sent = now
        self._pong_due = False
        self._accepts = DOWNSTREAM_OPS if role is Role.EDGE else UPSTREAM_OPS

    # -- handshake ------------------------------------------------------------------------

    def hello(self, node: str, agent_version: str = "", epoch: str = "") -> bytes:
        """(edge) The first frame of a session; ``epoch`` names the edge's store."""
        self._require(Role.EDGE, State.HANDSHAKE)
        return self._encode(
            Hello(
                node=node,
                versions=codec.SUPPORTED_VERSIONS,
                received=self.receiver.applied_seq,
                sending_from=self.inflight.sending_from,
                agent_version=agent_version,
                epoch=epoch,
            )
        )

    def accept(
        self, hello: Hello, *, inflight: InFlight, receiver: ReceiveWindow
    ) -> tuple[bytes, Settled]:
        """(cloud) Open the session that ``hello`` asked for, with that node's resume state.

        Returns the Welcome frame and what the edge's ``received`` settles. A cloud that has
        no state for the node (it restarted) should number its first message after
        ``max(persisted watermark, hello.received)``.
        """
        self._require(Role.CLOUD, State.HANDSHAKE)
        self.version = choose_version(hello.versions)
        self.inflight, self.receiver = inflight, receiver
        self.receiver.resume(hello.sending_from)
        settled = Settled(tuple(self.inflight.resume(hello.received)))
        self.state = State.OPEN
        welcome = Welcome(
            version=self.version,
            received=self.receiver.applied_seq,
            sending_from=self.inflight.sending_from,
            heartbeat_s=self.heartbeat_s,
            max_frame=self.max_frame,
            window=inflight.window,
        )
        return self._encode(welcome), settled

    def refuse(self, reason: str, retry_after_s: float | None = None) -> bytes:
        """(cloud) Decline the session; the edge backs off at least ``retry_after_s``."""
        self._require(Role.CLOUD, State.HANDSHAKE)
        self.state = State.CLOSED
        return self._encode(Refuse(reason, retry_after_s))

    def close(self, reason: str) -> bytes:
        self.state = State.CLOSED
        return self._encode(Close(reason[:1000]))

    # -- receiving ------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Event]:
        """Process one received WebSocket message."""
        if self.state is State.CLOSED:
            raise ProtocolError("frame received after the session closed")
        try:
            frame = codec.decode(data, self.max_frame)
            self._last_received = now
            return self._handle(frame)
        except ProtocolError:
            self.state = State.CLOSED
            raise

    def _handle(self, frame: object) -> list[Event]:
        if self.state is State.HANDSHAKE:
            return self._handshake(frame)
        match frame:
            case Batch(ack, messages):
                # Check everything before changing anything: a frame that breaks the protocol
                # must not settle half of what it carries (the shell would never hear of it).
                for message in messages:
                    if message.op not in self._accepts:
                        raise ProtocolError(
                            f"{message.op.value!r} may not be sent to the {self.role.value}"
                        )
                self.inflight.check_ack(ack)
                fresh = self.receiver.accept(messages)
                events = self._settle(ack)
                if fresh:
                    events.append(Received(tuple(fresh)))
                return events
            case Ack(ack) | Pong(ack):
                return self._settle(ack)
            case Ping(ack):
                self._pong_due = True
                return self._settle(ack)
            case Close(reason):
                self.state = State.CLOSED
                return [PeerClosed(reason)]
        raise ProtocolError(f"{type(frame).__name__} is not allowed in an open session")

    def _handshake(self, frame: object) -> list[Event]:
        match (self.role, frame):
            case (Role.CLOUD, Hello() as hello):
                return [HelloReceived(hello)]
            case (Role.EDGE, Welcome() as welcome):
                if welcome.version not in codec.SUPPORTED_VERSIONS:
                    raise ProtocolError(f"cloud chose unsupported version {welcome.version}")
                self.version = welcome.version
                self.heartbeat_s = welcome.heartbeat_s
                self.max_frame = min(self.max_frame, welcome.max_frame)
                self.inflight.window = min(self.inflight.window, welcome.window)
                self.receiver.resume(welcome.sending_from)
                settled = self.inflight.resume(welcome.received)
                self.state = State.OPEN
                events: list[Event] = [Opened(welcome.version)]
                if settled:
                    events.append(Settled(tuple(settled)))
                return events
            case (Role.EDGE, Refuse(reason, retry_after_s)):
                self.state = State.CLOSED
                return [Refused(reason, retry_after_s)]
            case (_, Close(reason)):
                self.state = State.CLOSED
                return [PeerClosed(reason)]
        raise ProtocolError(f"{type(frame).__name__} is not allowed before the handshake ends")

    def _settle(self, ack: int) -> list[Event]:
        settled = self.inflight.ack(ack)
        return [Settled(tuple(settled))] if settled else []

    # -- sending --------------------------------------------------------------------------

    def applied(self, seq: int) -> None:
        """Everything received up to ``seq`` is durably applied and may be acknowledged."""
        self.receiver.applied(seq)

    def outgoing(self, now: float, queue: CoalescingQueue | None = None) -> list[bytes]:
        """Frames to send now: data (numbering queued messages while the window has room),
        a bare ack if applied data is unacknowledged, a pong if one is owed, and a ping if the
        line has been quiet for a heartbeat interval."""
        if self.state is not State.OPEN:
            return []
        if queue is not None:
            while len(queue) and self.inflight.has_room:
                self.inflight.number(queue.pop())
        frames = []
        # Leave room for the frame header and the ack around the messages.
        budget = self.max_frame - 64
        while batch := self.inflight.take_unsent(BATCH_LIMIT, budget, codec.message_size):
            frames.append(self._encode(Batch(self.receiver.take_ack(), tuple(batch))))
        if self._pong_due:
            frames.append(self._encode(Pong(self.receiver.take_ack())))
            self._pong_due = False
        elif self.receiver.ack_pending:
            frames.append(self._encode(Ack(self.receiver.take_ack())))
        if not frames and now - self._last_sent >= self.heartbeat_s:
            frames.append(self._encode(Ping(self.receiver.take_ack())))
        if frames:
            self._last_sent = now
        return frames

    @property
    def wants_to_send(self) -> bool:
        """A pong is owed or applied data awaits its ack: call ``outgoing`` soon."""
        return self._pong_due or bool(self.receiver.ack_pending)

    def expired(self, now: float) -> bool:
        """True when the peer has been silent too long to be alive."""
        return now - self._last_received > MISSED_HEARTBEATS * self.heartbeat_s

    # -- helpers --------------------------------------------------------------------------

    def _require(self, role: Role, state: State) -> None:
        if self.role is not role or self.state is not state:
            raise RuntimeError(f"not allowed for the {self.role.value} in state {self.state.value}")

    def _encode(self, frame: object) -> bytes:
        return codec.encode(frame, self.max_frame)  # type: ignore[arg-type]
