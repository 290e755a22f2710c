"""The cloud hub: a trio-websocket server holding one session per edge node.

Edges connect over TLS to ``/v1/connect`` with their node certificate; the node's identity is
the certificate's CN (issued by the cloud's CA at join), and a Hello naming another node is
refused and logged. A second connection for a node replaces the first: the old session is
closed with a reason and has finished before the new one touches the node's stream.

Admission control against reconnect storms: at most ``max_handshakes`` connections are between
TCP accept and Welcome at once. A connection that finds no slot within ``admission_wait_s`` is
answered with HTTP 503 and a ``Retry-After`` that grows with the backlog, which the edges honour.

Each node's downstream stream (``cloud.hub.streams.NodeStream``) outlives its sessions;
watermarks are persisted in batches by ``cloud.hub.watermarks``. Other WebSocket paths (the
join exchange) are served by handlers passed in ``routes``.

Run as one of several replicas, the hub is given an ``Ownership`` (``cloud.hub.ownership``): a
node held by another live replica is redirected there (HTTP 307, ``Location`` and a
``Retry-After`` for when that replica's lease would run out), and a node this replica has not
served continuously starts from its watermark as read from Kubernetes, never from memory. Only
nodes this replica holds have their watermarks written.
"""

from __future__ import annotations

import gc
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import httpx2
import trio
from lightkube.core.exceptions import ApiError
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from cloud.hub.metrics import HubMetrics
from cloud.hub.ownership import Elsewhere, Ownership, OwnershipUnavailable
from cloud.hub.reports import LogOnly, ReportSink
from cloud.hub.streams import NodeStream, Positions, SourceObject, Watermark
from cloud.hub.watermarks import WatermarkStore
from edge.websocket import (
    CONNECT_PATH,
    NORMAL_CLOSURE,
    PROTOCOL_ERROR,
    close_session,
    unwrap,
    websocket_url,
)
from edge.wire import codec
from edge.wire.codec import ProtocolError
from edge.wire.connection import (
    Connection,
    HelloReceived,
    PeerClosed,
    Received,
    Role,
    Settled,
)
from edge.wire.events import Hello

log = logging.getLogger("cloud.hub")

NODE_ORGANIZATION = "outpost:nodes"
Route = Callable[[WebSocketConnection], Awaitable[None]]


class Source(Protocol):
    ready: trio.Event

    @property
    def positions(self) -> Positions:
        """How far the source has processed each kind (for resume watermarks)."""
        ...

    def objects(self, node: str) -> list[SourceObject]: ...


class Lifecycle(Protocol):
    """Told when a node's session opens and closes (the edge controller keeps its Node and
    Lease from these). Both are called from the session's task and must not block."""

    def connected(self, node: str, hello: Hello, remote: str) -> None: ...

    def disconnected(self, node: str) -> None: ...


@dataclass
class HubSettings:
    host: str = "0.0.0.0"
    port: int = 8443
    heartbeat_s: float = 15.0
    window: int = 512
    queue_capacity: int = 10_000
    max_handshakes: int = 64
    admission_wait_s: float = 2.0
    handshake_timeout_s: float = 10.0
    flush_interval_s: float = 1.0
    max_frame: int = codec.DEFAULT_MAX_FRAME


def node_from_peer(cert: dict | None) -> str | None:
    """The node a verified client certificate speaks for: its CN, if issued to a node."""
    if not cert:
        return None
    subject = {key: value for rdn in cert.get("subject", ()) for key, value in rdn}
    if subject.get("organizationName") != NODE_ORGANIZATION:
        return None
    return subject.get("commonName")


@dataclass
class Session:
    node: str
    remote: str
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    close_reason: str = "cloud hub stopping"

    async def replace(self, reason: str) -> None:
        self.close_reason = reason
        self.cancel_scope.cancel()
        await self.done.wait()


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process holding thousands of sessions.

    Each session is dozens of long-lived objects (tasks, cancel scopes, streams); with the
    default thresholds a full collection walks all of them every few hundred allocations and
    frees nothing (measured by bench/hub_scale.py: most of the hub's CPU during a fan-out).
    Objects from start-up are frozen out of collections altogether.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class Hub:
    def __init__(
        self,
        settings: HubSettings,
        ssl_context: ssl.SSLContext,
        *,
        source: Source | None = None,
        sink: ReportSink | None = None,
        watermarks: WatermarkStore | None = None,
        metrics: HubMetrics | None = None,
        routes: dict[str, Route] | None = None,
        lifecycle: Lifecycle | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        self.settings = settings
        self.ssl_context = ssl_context
        self.source = source
        self.sink = sink or LogOnly()
        self.watermarks = watermarks
        self.metrics = metrics or HubMetrics()
        self.routes = routes or {}
        self.lifecycle = lifecycle
        self.ownership = ownership
        if ownership is not None:
            ownership.before_release = self._flush_before_release
            ownership.on_lost = self._lost
        self.streams: dict[str, NodeStream] = {}
        self.sessions: dict[str, Session] = {}
        self.ever_connected: set[str] = set()
        self.resent = 0
        self._locks: dict[str, trio.Lock] = {}
        self._slots = trio.Semaphore(settings.max_handshakes)
        # One watermark write at a time: a release's write must not be overtaken by an older one.
        self._write_lock = trio.Lock()
        self._waiting = 0
        self.port: int | None = None
        self.metrics.track_depth(lambda: sum(s.depth for s in self.streams.values()))

    # -- the source's side --------------------------------------------------------------------

    def publish(self, node: str, obj: SourceObject, deleted: bool) -> None:
        """A change to one of ``node``'s objects. Nodes unknown since start are caught up from
        their watermark when they connect, so only known streams are queued to."""
        stream = self.streams.get(node)
        if stream is not None:
            stream.offer(obj, deleted)

    def _objects(self, node: str) -> list[SourceObject]:
        return self.source.objects(node) if self.source else []

    def _source_rv(self) -> Positions:
        return self.source.positions if self.source else {}

    def collect_watermarks(self) -> dict[str, Watermark]:
        """The watermarks changed since last collected (for the flusher)."""
        changed = {}
        rv = self._source_rv()
        for name, stream in self.streams.items():
            if stream.dirty:
                stream.dirty = False
                changed[name] = stream.watermark(rv)
        return changed

    # -- serving ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports the bound port."""
        listeners = await trio.open_tcp_listeners(
            self.settings.port, host=self.settings.host, backlog=4096
        )
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                if self.watermarks is not None:
                    nursery.start_soon(self._flush_watermarks)
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                log.info("hub listening", extra={"host": self.settings.host, "port": self.port})
                task_status.started(self.port)
        finally:
            if self.ownership is not None:
                # After the last watermarks are written: the nodes may move at once.
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    await self.ownership.resign()

    async def _flush_watermarks(self) -> None:
        """Persist changed watermarks every ``flush_interval_s``, and once more on the way out.

        A failed write keeps the marks for the next round (the newest value of a node wins),
        so nothing is lost while Kubernetes is unreachable.
        """
        unsent: dict[str, Watermark] = {}
        try:
            while True:
                await trio.sleep(self.settings.flush_interval_s)
                unsent.update(self.collect_watermarks())
                if unsent and await self._write_watermarks(unsent):
                    unsent = {}
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                unsent.update(self.collect_watermarks())
                if self.ownership is not None:
                    unsent.update(self._marks(self.ownership.owned))
                if unsent:
                    await self._write_watermarks(unsent, idle_too=True)

    def _marks(self, nodes: Iterable[str]) -> dict[str, Watermark]:
        rv = self._source_rv()
        return {node: self.streams[node].watermark(rv) for node in nodes if node in self.streams}

    async def _flush_before_release(self, nodes: list[str]) -> bool:
        """Persist the watermarks of nodes about to be released, so their next owner resumes
        from where this replica left them."""
        if self.watermarks is None:
            return True
        return await self._write_watermarks(self._marks(nodes), idle_too=True)

    def _lost(self, nodes: list[str]) -> None:
        """These nodes are no longer this replica's: end their sessions here, and forget their
        streams so that nothing stale is written or resumed from."""
        for node in nodes:
            self.streams.pop(node, None)
            session = self.sessions.get(node)
            if session is not None:
                session.close_reason = "this cloud replica no longer serves the node"
                session.cancel_scope.cancel()

    async def _write_watermarks(
        self, marks: dict[str, Watermark], *, idle_too: bool = False
    ) -> bool:
        """Write ``marks``; with an ownership, only of nodes this replica holds, and (unless
        ``idle_too``) that have a session: an idle node's last watermark is written once, by
        ``_flush_before_release``, before it is released."""
        assert self.watermarks is not None
        async with self._write_lock:
            if self.ownership is not None:
                ownership = self.ownership
                marks = {
                    node: mark
                    for node, mark in marks.items()
                    if ownership.owns(node) and (idle_too or node in self.sessions)
                }
            if not marks:
                return True
            before = self.watermarks.writes
            try:
                await self.watermarks.write(marks)
            except (ApiError, httpx2.TransportError) as exc:
                log.warning(
                    "cannot persist watermarks; will retry",
                    extra={"nodes": len(marks), "error": str(exc)},
                )
                return False
            finally:
                self.metrics.watermark_writes.inc(self.watermarks.writes - before)
            return True

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self._waiting += 1
        admitted = False
        try:
            with trio.move_on_after(self.settings.admission_wait_s):
                await self._slots.acquire()
                admitted = True
            if not admitted:
                await self._turn_away(tcp)
                return
        finally:
            self._waiting -= 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._slots.release()

        try:
            await self._serve_connection(tcp, release)
        finally:
            release()

    async def _tls_request(
        self, tcp: trio.SocketStream, nursery: trio.Nursery
    ) -> tuple[trio.SSLStream, WebSocketRequest] | None:
        stream = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
        remote = _remote(tcp)
        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                await stream.do_handshake()
                request = await wrap_server_stream(
                    nursery,
                    stream,
                    max_message_size=self.settings.max_frame,
                    message_queue_size=1,
                )
        except (
            trio.BrokenResourceError,
            trio.TooSlowError,
            ssl.SSLError,
            OSError,
            ConnectionClosed,
        ) as exc:
            self.metrics.rejected.labels("tls").inc()
            log.info("TLS handshake failed", extra={"remote": remote, "error": str(exc)})
            await trio.aclose_forcefully(stream)
            return None
        return stream, request

    async def _turn_away(self, tcp: trio.SocketStream) -> None:
        retry_after = min(60, max(1, math.ceil(self._waiting / self.settings.max_handshakes)))
        self.metrics.rejected.labels("busy").inc()
        async with trio.open_nursery() as nursery:
            got = await self._tls_request(tcp, nursery)
            if got is not None:
                _, request = got
                with trio.move_on_after(self.settings.handshake_timeout_s):
                    await request.reject(
                        503,
                        extra_headers=[(b"Retry-After", str(retry_after).encode())],
                        body=b"outpost-cloud is busy admitting other nodes\n",
                    )
            nursery.cancel_scope.cancel()

    async def _serve_connection(self, tcp: trio.SocketStream, release: Callable[[], None]) -> None:
        remote = _remote(tcp)
        async with trio.open_nursery() as nursery:
            got = await self._tls_request(tcp, nursery)
            if got is None:
                return
            stream, request = got
            try:
                if request.path == CONNECT_PATH:
                    await self._connect(stream, request, remote, release)
                elif request.path in self.routes:
                    ws = await request.accept()
                    release()
                    await self.routes[request.path](ws)
                else:
                    self.metrics.rejected.labels("path").inc()
                    await request.reject(404, body=b"unknown path\n")
            except ConnectionClosed:
                pass
            finally:
                nursery.cancel_scope.cancel()

    async def _connect(
        self,
        stream: trio.SSLStream,
        request: WebSocketRequest,
        remote: str,
        release: Callable[[], None],
    ) -> None:
        node = node_from_peer(stream.getpeercert())
        if node is None:
            self.metrics.rejected.labels("no-certificate").inc()
            log.warning("connection without a node certificate refused", extra={"remote": remote})
            await request.reject(401, body=b"a node client certificate is required\n")
            return
        if self.source is not None and not self.source.ready.is_set():
            self.metrics.rejected.labels("starting").inc()
            await request.reject(
                503, extra_headers=[(b"Retry-After", b"2")], body=b"outpost-cloud is starting\n"
            )
            return
        if self.ownership is None:
            await self._accept(request, remote, release, node)
            return
        if not await self._claim(node, request, remote):
            return
        try:
            await self._accept(request, remote, release, node)
        finally:
            self.ownership.unclaim(node)

    async def _claim(self, node: str, request: WebSocketRequest, remote: str) -> bool:
        """Whether this replica serves ``node`` now; if not, the edge has been told where to go
        or when to come back. On True the caller must ``unclaim`` when the connection ends."""
        assert self.ownership is not None
        try:
            verdict = await self.ownership.claim(node)
        except OwnershipUnavailable as exc:
            log.warning(
                "cannot settle who serves the node", extra={"node": node, "error": str(exc)}
            )
            await self._unavailable(request)
            return False
        if isinstance(verdict, Elsewhere):
            self.streams.pop(node, None)
            self.metrics.rejected.labels("elsewhere").inc()
            location = websocket_url(verdict.url)
            log.info(
                "node served by another replica, redirecting",
                extra={"node": node, "remote": remote, "replica": verdict.replica, "to": location},
            )
            await request.reject(
                307,
                extra_headers=[
                    (b"Location", location.encode()),
                    (b"Retry-After", str(verdict.retry_after_s).encode()),
                ],
                body=f"node {node} is served by {verdict.url}\n".encode(),
            )
            return False
        if verdict.continuous and node in self.streams:
            return True
        # Another replica may have served the node since this one did: its stream in memory
        # is stale, and its watermark in Kubernetes is the truth.
        self.streams.pop(node, None)
        if self.watermarks is not None:
            try:
                mark = await self.watermarks.load_node(node)
            except (ApiError, httpx2.TransportError) as exc:
                self.ownership.unclaim(node)
                log.warning(
                    "cannot read the node's watermark", extra={"node": node, "error": str(exc)}
                )
                await self._unavailable(request)
                return False
            log.info(
                "serving node from its persisted watermark",
                extra={"node": node, "acked": mark.acked if mark else None},
            )
        return True

    async def _unavailable(self, request: WebSocketRequest) -> None:
        self.metrics.rejected.labels("unavailable").inc()
        await request.reject(
            503,
            extra_headers=[(b"Retry-After", b"2")],
            body=b"outpost-cloud cannot reach Kubernetes\n",
        )

    async def _accept(
        self,
        request: WebSocketRequest,
        remote: str,
        release: Callable[[], None],
        node: str,
    ) -> None:
        ws = await request.accept()
        conn = Connection(
            Role.CLOUD,
            now=trio.current_time(),
            heartbeat_s=self.settings.heartbeat_s,
            max_frame=self.settings.max_frame,
        )
        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                data = await ws.get_message()
            events = conn.receive(_binary(data), trio.current_time())
        except trio.TooSlowError:
            log.info("no hello, closing", extra={"node": node, "remote": remote})
            return
        except ProtocolError as exc:
            await self._protocol_error(ws, conn, node, exc)
            return
        hello = events[0].hello if events and isinstance(events[0], HelloReceived) else None
        if hello is None:
            return
        if hello.node != node:
            self.metrics.rejected.labels("identity").inc()
            log.warning(
                "node certificate used to speak for another node",
                extra={"certificate": node, "hello": hello.node, "remote": remote},
            )
            await ws.send_message(
                conn.refuse(f"this certificate belongs to node {node!r}, not {hello.node!r}")
            )
            return
        lock = self._locks.setdefault(node, trio.Lock())
        async with lock:
            old = self.sessions.get(node)
            if old is not None:
                self.metrics.replaced.inc()
                log.info("replacing session", extra={"node": node, "old": old.remote})
                await old.replace(f"replaced by a newer connection from {remote}")
            stream_state = await self._stream_for(node, hello)
            try:
                welcome, settled = conn.accept(
                    hello, inflight=stream_state.inflight, receiver=stream_state.receiver
                )
            except ProtocolError as exc:
                self.metrics.rejected.labels("version").inc()
                log.warning("refusing session", extra={"node": node, "reason": exc.reason})
                await ws.send_message(conn.refuse(exc.reason))
                return
            self._settle(stream_state, settled.messages)
            session = Session(node, remote)
            self.sessions[node] = session
        if node in self.ever_connected:
            self.metrics.reconnects.inc()
        self.ever_connected.add(node)
        self.metrics.sessions.inc()
        self.metrics.connected.inc()
        release()
        if self.lifecycle is not None:
            self.lifecycle.connected(node, hello, remote)
        log.info(
            "session open",
            extra={
                "node": node,
                "remote": remote,
                "agent": hello.agent_version,
                "edge_received": hello.received,
                "sending_from": stream_state.inflight.sending_from,
            },
        )
        try:
            await ws.send_message(welcome)
            with session.cancel_scope:
                await self._run_session(ws, conn, stream_state, node)
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            await self._protocol_error(ws, conn, node, exc)
        finally:
            self.metrics.connected.dec()
            if self.sessions.get(node) is session:
                del self.sessions[node]
                if self.lifecycle is not None:
                    self.lifecycle.disconnected(node)
            if session.cancel_scope.cancelled_caught:
                await close_session(ws, conn, NORMAL_CLOSURE, session.close_reason)
            session.done.set()
            log.info("session closed", extra={"node": node, "remote": remote})

    async def _stream_for(self, node: str, hello: Hello) -> NodeStream:
        """The node's stream: the one in memory, else restored from its persisted watermark
        (a cloud restart), else new. An edge whose store is not the one the stream was with (a
        new epoch, or a store that has lost acknowledged messages: wiped, re-flashed, restored
        from a backup) starts over: a full resync downstream, numbering continued so that it
        cannot be taken for redelivery, and its reports counted from 1 again."""
        s = self.settings
        stream = self.streams.get(node)
        mark = None
        if stream is None and self.watermarks is not None:
            mark = self.watermarks.loaded.pop(node, None)
        known = stream or mark
        if known is not None:
            acked = stream.inflight.acked if stream else mark.acked  # type: ignore[union-attr]
            if known.epoch == hello.epoch and hello.received >= acked:
                if stream is not None:
                    return stream
                assert mark is not None
                stream = NodeStream.fresh(
                    node,
                    capacity=s.queue_capacity,
                    window=s.window,
                    next_seq=max(mark.next_seq, hello.received + 1),
                    upstream=mark.upstream,
                    epoch=hello.epoch,
                )
                queued = stream.resync(self._objects(node), since_rv=mark.rv)
                self.resent += queued
                log.info(
                    "resuming node from its watermark",
                    extra={"node": node, "rv": mark.rv, "queued": queued},
                )
                self.streams[node] = stream
                return stream
            log.warning(
                "edge store replaced or lost acknowledged state, resyncing it in full",
                extra={
                    "node": node,
                    "epoch": hello.epoch,
                    "was": known.epoch,
                    "edge_received": hello.received,
                    "acked": acked,
                },
            )
            await self.sink.restart(node, hello.epoch)
        next_seq = stream.inflight.next_seq if stream else mark.next_seq if mark else 1
        stream = NodeStream.fresh(
            node,
            capacity=s.queue_capacity,
            window=s.window,
            next_seq=max(next_seq, hello.received + 1),
            epoch=hello.epoch,
        )
        stream.resync(self._objects(node))
        self.streams[node] = stream
        return stream

    def _settle(self, stream: NodeStream, messages: tuple) -> None:
        for latency in stream.settle(messages, trio.current_time()):
            self.metrics.ack_latency.observe(latency)

    async def _run_session(
        self, ws: WebSocketConnection, conn: Connection, stream: NodeStream, node: str
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, ws, conn, stream, node, nursery.cancel_scope)
                nursery.start_soon(self._write, ws, conn, stream, node)
        except BaseExceptionGroup as group:
            raise unwrap(group, ProtocolError, ConnectionClosed) from None

    async def _read(
        self,
        ws: WebSocketConnection,
        conn: Connection,
        stream: NodeStream,
        node: str,
        scope: trio.CancelScope,
    ) -> None:
        while True:
            data = await ws.get_message()
            for event in conn.receive(_binary(data), trio.current_time()):
                match event:
                    case Received(messages):
                        await self.sink.apply(node, messages)
                        conn.applied(messages[-1].seq)
                        self.metrics.received.inc(len(messages))
                        stream.dirty = True
                        stream.kick()
                    case Settled(messages):
                        self._settle(stream, messages)
                        # Room in the window matters only when something waits for it.
                        if len(stream.queue):
                            stream.kick()
                    case PeerClosed(reason):
                        log.info("edge closed the session", extra={"node": node, "reason": reason})
                        scope.cancel()
                        return
            if conn.wants_to_send:
                stream.kick()

    async def _write(
        self, ws: WebSocketConnection, conn: Connection, stream: NodeStream, node: str
    ) -> None:
        while True:
            stream.wake = trio.Event()
            if stream.overflowed and not len(stream.queue):
                log.warning("queue overflowed, resyncing node", extra={"node": node})
                self.resent += stream.resync(self._objects(node))
            now = trio.current_time()
            stream.number_queued(now)
            for frame in conn.outgoing(now):
                await ws.send_message(frame)
            if conn.expired(now):
                log.warning("edge silent, closing", extra={"node": node})
                await close_session(ws, conn, NORMAL_CLOSURE, "no heartbeat from the edge")
                return
            with trio.move_on_after(self.settings.heartbeat_s):
                await stream.wake.wait()

    async def _protocol_error(
        self, ws: WebSocketConnection, conn: Connection, node: str, exc: ProtocolError
    ) -> None:
        self.metrics.rejected.labels("protocol").inc()
        log.warning("protocol violation, closing", extra={"node": node, "reason": exc.reason})
        await close_session(ws, conn, PROTOCOL_ERROR, exc.reason)


def _binary(data: bytes | str) -> bytes:
    if isinstance(data, str):
        raise ProtocolError("text WebSocket message; the protocol is binary")
    return data


def _remote(tcp: trio.SocketStream) -> str:
    try:
        host, port, *_ = tcp.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"
