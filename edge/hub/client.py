"""The edge hub: keeps one mutually authenticated WebSocket to outpost-cloud open, forever.

Downstream, it applies what the cloud sends to the store and acknowledges only what is committed;
several frames that arrive together are applied in one transaction (one flash write). Upstream,
it drains the store's outbox through a window of unacknowledged reports, and deletes them once
the cloud acknowledges them. The protocol itself lives in ``edge.wire.connection``; this module
owns the socket, the clock, the store calls and the reconnect policy.

Reconnects use full-jitter exponential backoff (``edge.backoff``: a random wait between 0 and
``min(cap, base * 2**attempt)``), so a fleet that lost the cloud together does not return
together. A cloud that refuses a session for load says how long to stay away (``retry_after``),
which the edge honours, spread by up to half again. A session that stayed up for
``stable_after_s`` resets the backoff.

The edge may know several cloud replicas; ``edge.hub.targets`` decides which one to dial, and
follows a replica's redirect (HTTP 307 to the replica that serves the node). When the
redirect's target cannot be reached, its owner has probably died: the redirecting replica said
when that owner's lease runs out (``Retry-After``), and the edge comes back to it then, whatever
its backoff had grown to, so that a replica failure costs its nodes about one lease duration.
"""

from __future__ import annotations

import logging
import random
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import tenacity
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from edge.backoff import Backoff
from edge.hub.link import LinkState
from edge.hub.targets import MAX_REDIRECTS, Targets, cloud_url_of
from edge.store import StoreError
from edge.store.aio import AsyncStore
from edge.version import __version__
from edge.websocket import (
    PROTOCOL_ERROR,
    close_session,
    header,
    retry_after_header,
    unwrap,
    websocket_url,
)
from edge.wire import codec
from edge.wire.codec import ProtocolError
from edge.wire.connection import (
    Connection,
    Opened,
    PeerClosed,
    Received,
    Refused,
    Role,
    Settled,
)
from edge.wire.events import Message
from edge.wire.window import InFlight, ReceiveWindow

log = logging.getLogger("edge.hub")

# Frames waiting to be applied; the reader stops reading (TCP pushes back) when it is full.
FRAME_BUFFER = 64
# The most a retry-after hint may keep the edge away, whatever the cloud says.
MAX_RETRY_AFTER_S = 600.0
# Nodes whose replica died come back to another one spread over this many seconds after its
# lease has run out.
REDIRECT_SPREAD_S = 2.0


class LinkDown(Exception):
    """The session ended or could not start; ``retry_after_s`` is the cloud's hint, if any."""

    def __init__(
        self, reason: str, *, retry_after_s: float | None = None, stable: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.stable = stable
        # The attempt followed a redirect, and ``retry_after_s`` is when the node's owner
        # would lose it.
        self.redirected = False


class Redirected(LinkDown):
    """The replica dialled does not serve this node; ``url`` does."""

    def __init__(self, reason: str, url: str, retry_after_s: float | None) -> None:
        super().__init__(reason, retry_after_s=retry_after_s)
        self.url = url


@dataclass
class HubConfig:
    """How the edge reaches the cloud. ``cloud_url`` is what ``outpost join`` was given;
    ``fallback_urls`` are other replicas of the same cloud, tried in turn when it fails."""

    cloud_url: str
    node: str
    ssl_context: ssl.SSLContext
    window: int = 256
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 60.0
    stable_after_s: float = 30.0
    connect_timeout_s: float = 10.0
    max_frame: int = codec.DEFAULT_MAX_FRAME
    fallback_urls: tuple[str, ...] = ()

    @property
    def cloud_urls(self) -> list[str]:
        return [self.cloud_url, *self.fallback_urls]

    @property
    def backoff(self) -> Backoff:
        # Built on each use, so that a change to the fields takes effect at the next wait.
        return Backoff(self.backoff_base_s, self.backoff_cap_s, self.stable_after_s)


def _rejected(exc: ConnectionRejected, url: str) -> LinkDown:
    body = (exc.body or b"").decode(errors="replace").strip()[:200]
    location = header(exc, b"location")
    if exc.status_code in (307, 308) and location:
        target = cloud_url_of(location.decode(errors="replace"), url)
        return Redirected(
            f"cloud at {url} redirected to {target}: {body}", target, retry_after_header(exc)
        )
    return LinkDown(
        f"cloud at {url} rejected the connection with HTTP {exc.status_code}: {body}",
        retry_after_s=retry_after_header(exc),
    )


class EdgeHub:
    """Run with ``await hub.run()`` in a nursery.

    What the cloud sends is committed to the store, whose change feed tells the rest of the
    agent. Reports go the other way through the store too: whoever queues one in the outbox
    (``edge.upstream``) commits it, the hub sees the outbox change on the feed and sends it.
    The link's state is kept in the store (``edge.hub.link``) for the agent to follow.
    """

    def __init__(self, store: AsyncStore, config: HubConfig, link: LinkState | None = None):
        self.store = store
        self.config = config
        self.targets = Targets(config.cloud_urls)
        self.link = link or LinkState()
        self._wake = trio.Event()
        self._outbox_maybe = True
        # Whether the current attempt opened a session (then its URL is not to blame).
        self._opened = False
        self.applied_messages = 0
        self.applied_batches = 0

    # -- the rest of the agent ----------------------------------------------------------------

    def _outbox_changed(self) -> None:
        """New reports may be in the outbox: send them if the link is up."""
        self._outbox_maybe = True
        self._wake.set()

    async def _follow_outbox(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with self.store.feed.subscribe() as feed:
            task_status.started()
            async for changes in feed:
                if changes.outbox or changes.everything:
                    self._outbox_changed()

    # -- reconnecting -------------------------------------------------------------------------

    def _wait(self, state: tenacity.RetryCallState) -> float:
        wait = self.config.backoff.delay(state.attempt_number)
        exc = state.outcome.exception() if state.outcome else None
        hint = getattr(exc, "retry_after_s", None)
        if hint and getattr(exc, "redirected", False):
            # The owner is gone until its lease runs out; the attempts it took to learn that
            # must not add their backoff on top.
            hint = min(hint, MAX_RETRY_AFTER_S)
            return random.uniform(hint, hint + REDIRECT_SPREAD_S)
        if hint:
            hint = min(hint, MAX_RETRY_AFTER_S)
            wait = max(wait, random.uniform(hint, hint * 1.5))
        return wait

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "cloud link down",
            extra={
                "reason": getattr(exc, "reason", exc),
                "attempt": state.attempt_number,
                "retry_in_s": round(wait, 2),
            },
        )

    async def run(self) -> None:
        """Connect, serve, reconnect; returns only when cancelled."""
        while True:
            retrying = tenacity.AsyncRetrying(
                sleep=trio.sleep,
                wait=self._wait,
                retry=tenacity.retry_if_exception(
                    lambda exc: isinstance(exc, LinkDown) and not exc.stable
                ),
                before_sleep=self._before_sleep,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._session()
            except LinkDown as exc:
                # A long session ended: start over with a short, still jittered, wait.
                log.warning("cloud link down", extra={"reason": exc.reason, "was_up": "long"})
                await trio.sleep(self.config.backoff.delay(1))

    # -- one session --------------------------------------------------------------------------

    async def _session(self) -> None:
        """One attempt: dial, follow redirects, serve until the session ends."""
        started = trio.current_time()
        first = url = self.targets.first()
        hint: float | None = None
        hops = 0
        self._opened = False
        try:
            while True:
                try:
                    await self._session_at(url)
                except Redirected as exc:
                    log.info("redirected", extra={"from": url, "to": exc.url})
                    if hops == MAX_REDIRECTS:
                        raise LinkDown(
                            f"more than {MAX_REDIRECTS} redirects: {exc.reason}"
                        ) from exc
                    hops += 1
                    url, hint = exc.url, exc.retry_after_s
                else:
                    return
        except LinkDown as exc:
            if not self._opened:
                self.targets.failed(first, answered=hops > 0)
                if hops and hint:
                    exc.retry_after_s = max(exc.retry_after_s or 0, hint)
                    exc.redirected = True
            exc.stable = trio.current_time() - started >= self.config.stable_after_s
            raise

    async def _session_at(self, cloud_url: str) -> None:
        url = websocket_url(cloud_url)
        try:
            async with trio.open_nursery() as nursery:
                ws = await self._connect(nursery, url)
                try:
                    await self._serve(ws, cloud_url)
                finally:
                    self.link.set(False, "disconnected")
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The WebSocket's reader task reports a rejected upgrade from inside the nursery.
            found = unwrap(group, LinkDown, ConnectionRejected)
            if isinstance(found, ConnectionRejected):
                raise _rejected(found, url) from None
            raise found from None

    async def _connect(self, nursery: trio.Nursery, url: str) -> WebSocketConnection:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                tcp = await trio.open_tcp_stream(host, port)
                # The TLS handshake runs on its own first: trio-websocket would turn a refused
                # certificate into a bare timeout, and this error is what a person must see.
                stream = trio.SSLStream(
                    tcp, self.config.ssl_context, server_hostname=host, https_compatible=True
                )
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    raise LinkDown(f"TLS with {url} failed: {exc.__cause__ or exc}") from exc
                return await wrap_client_stream(
                    nursery,
                    stream,
                    host,
                    parts.path,
                    max_message_size=self.config.max_frame,
                    message_queue_size=1,
                )
        except ConnectionRejected as exc:
            raise _rejected(exc, url) from exc
        except trio.TooSlowError as exc:
            raise LinkDown(f"no answer from {url} in {self.config.connect_timeout_s} s") from exc
        except (OSError, HandshakeError, trio.BrokenResourceError) as exc:
            raise LinkDown(f"cannot connect to {url}: {exc}") from exc

    async def _serve(self, ws: WebSocketConnection, cloud_url: str) -> None:
        conn = await self._open(ws)
        self._opened = True
        self.targets.succeeded(cloud_url)
        self.link.set(True, "connected")
        log.info("cloud link up", extra={"url": cloud_url})
        frames_send, frames_recv = trio.open_memory_channel[bytes](FRAME_BUFFER)
        try:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._follow_outbox)
                    nursery.start_soon(self._read, ws, frames_send)
                    nursery.start_soon(self._apply, ws, conn, frames_recv)
                    nursery.start_soon(self._send, ws, conn)
            except BaseExceptionGroup as group:
                raise unwrap(group, ProtocolError, StoreError, LinkDown) from None
        except ProtocolError as exc:
            log.error("protocol violation, closing", extra={"reason": exc.reason})
            await close_session(ws, conn, PROTOCOL_ERROR, exc.reason)
            raise LinkDown(f"protocol violation: {exc.reason}") from exc
        except StoreError as exc:
            log.error("cannot apply what the cloud sent, closing", extra={"reason": str(exc)})
            await close_session(ws, conn, PROTOCOL_ERROR, f"edge store refused a batch: {exc}")
            raise LinkDown(f"store refused a batch: {exc}") from exc

    async def _open(self, ws: WebSocketConnection) -> Connection:
        """Handshake: say what we have, learn what the cloud has, settle and skip accordingly."""
        store = self.store.store
        sending_from = await self.store.run(lambda: store.sending_from)
        hwm = await self.store.run(lambda: store.hwm)
        epoch = await self.store.run(lambda: store.epoch)
        inflight = InFlight(self.config.window, next_seq=sending_from)
        for message in await self.store.run(store.unacked, sending_from - 1):
            inflight.hold(message)
        conn = Connection(
            Role.EDGE,
            now=trio.current_time(),
            inflight=inflight,
            receiver=ReceiveWindow(hwm),
            max_frame=self.config.max_frame,
        )
        await self._send_frames(ws, [conn.hello(self.config.node, __version__, epoch)])
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                data = await ws.get_message()
        except trio.TooSlowError as exc:
            raise LinkDown("the cloud did not answer the hello") from exc
        except ConnectionClosed as exc:
            raise LinkDown(f"the cloud closed the connection: {exc.reason}") from exc
        try:
            events = conn.receive(data, trio.current_time())
        except ProtocolError as exc:
            await close_session(ws, conn, PROTOCOL_ERROR, exc.reason)
            raise LinkDown(f"bad handshake from the cloud: {exc.reason}") from exc
        for event in events:
            match event:
                case Refused(reason, retry_after_s):
                    raise LinkDown(
                        f"cloud refused the session: {reason}", retry_after_s=retry_after_s
                    )
                case PeerClosed(reason):
                    raise LinkDown(f"cloud closed the session: {reason}")
                case Settled(messages):
                    await self.store.run(store.acked, messages[-1].seq)
                case Opened():
                    pass
        if conn.receiver.applied_seq > hwm:
            # The cloud numbers past our mark only when it will resync us in full.
            await self.store.run(store.skip_to, conn.receiver.applied_seq)
        return conn

    async def _read(self, ws: WebSocketConnection, frames: trio.MemorySendChannel[bytes]) -> None:
        async with frames:
            while True:
                try:
                    data = await ws.get_message()
                except ConnectionClosed as exc:
                    raise LinkDown(f"connection closed: {exc.reason}") from exc
                if isinstance(data, str):
                    raise ProtocolError("text WebSocket message; the protocol is binary")
                await frames.send(data)

    async def _apply(
        self, ws: WebSocketConnection, conn: Connection, frames: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        store = self.store.store
        async for data in frames:
            batch = [data]
            while len(batch) < FRAME_BUFFER:
                try:
                    batch.append(frames.receive_nowait())
                except trio.WouldBlock:
                    break
            received: list[Message] = []
            settled = 0
            for frame in batch:
                for event in conn.receive(frame, trio.current_time()):
                    match event:
                        case Received(messages):
                            received.extend(messages)
                        case Settled(messages):
                            settled = messages[-1].seq
                        case PeerClosed(reason):
                            raise LinkDown(f"cloud closed the session: {reason}")
            if received:
                result = await self.store.run(store.apply_batch, received)
                conn.applied(result.hwm)
                fresh = result.applied + result.unchanged
                log.debug(
                    "applied",
                    extra={
                        "first": result.hwm - fresh + 1,
                        "last": result.hwm,
                        "changed": result.applied,
                        "unchanged": result.unchanged,
                        "duplicates": result.duplicates,
                    },
                )
                self.applied_messages += len(received)
                self.applied_batches += 1
            if settled:
                await self.store.run(store.acked, settled)
                self._outbox_maybe = True
            self._wake.set()

    async def _send(self, ws: WebSocketConnection, conn: Connection) -> None:
        store = self.store.store
        version = await self.store.run(lambda: store.data_version)
        while True:
            # A fresh event before the work: a wake-up during an await below is not lost.
            self._wake = trio.Event()
            room = conn.inflight.window - len(conn.inflight)
            if room > 0 and self._outbox_maybe:
                self._outbox_maybe = False
                taken = await self.store.run(store.take_for_send, room)
                for message in taken:
                    conn.inflight.hold(message)
                # A full take may have left more behind.
                self._outbox_maybe = len(taken) == room
            now = trio.current_time()
            await self._send_frames(ws, conn.outgoing(now))
            if conn.expired(now):
                raise LinkDown(f"cloud silent for {3 * conn.heartbeat_s:.0f} s")
            if self._outbox_maybe and conn.inflight.has_room:
                continue
            with trio.move_on_after(conn.heartbeat_s / 2) as idle:
                await self._wake.wait()
            if idle.cancelled_caught:
                # The change feed sees this process's commits only. On the heartbeat timer that
                # runs anyway, a report another process queued is noticed too: SQLite's
                # data_version moves when another connection commits.
                now_version = await self.store.run(lambda: store.data_version)
                self._outbox_maybe |= now_version != version
                version = now_version

    async def _send_frames(self, ws: WebSocketConnection, frames: list[bytes]) -> None:
        try:
            for frame in frames:
                await ws.send_message(frame)
        except ConnectionClosed as exc:
            raise LinkDown(f"connection closed: {exc.reason}") from exc
