"""One node's session, from its Hello to its close.

The node's identity is its certificate's; a Hello naming another node is refused and logged. A
second connection for a node replaces the first: the old session is closed with a reason and has
finished before the new one touches the node's stream. While open, the session is two tasks
(``cloud.hub.pumps``); the lifecycle (the edge controller's Node and Lease) hears of its start
and end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from cloud.hub.metrics import HubMetrics
from cloud.hub.pumps import Pumps, binary, settle
from cloud.hub.restore import StreamRestorer
from cloud.hub.streams import NodeStreams
from edge.websocket import NORMAL_CLOSURE, PROTOCOL_ERROR, close_session
from edge.wire.codec import ProtocolError
from edge.wire.connection import Connection, HelloReceived, Role
from edge.wire.events import Hello

log = logging.getLogger("cloud.hub")


class Lifecycle(Protocol):
    """Told when a node's session opens and closes (the edge controller keeps its Node and
    Lease from these). Both are called from the session's task and must not block."""

    def connected(self, node: str, hello: Hello, remote: str) -> None: ...

    def disconnected(self, node: str) -> None: ...


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


class Sessions(dict[str, Session]):
    """The open sessions by node, and how one is opened, run and closed."""

    def __init__(
        self,
        streams: NodeStreams,
        restorer: StreamRestorer,
        pumps: Pumps,
        metrics: HubMetrics,
        lifecycle: Lifecycle | None,
        *,
        heartbeat_s: float,
        max_frame: int,
        handshake_timeout_s: float,
    ) -> None:
        super().__init__()
        self.streams = streams
        self.restorer = restorer
        self.pumps = pumps
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.heartbeat_s = heartbeat_s
        self.max_frame = max_frame
        self.handshake_timeout_s = handshake_timeout_s
        self.ever_connected: set[str] = set()
        self._locks: dict[str, trio.Lock] = {}

    def lose(self, nodes: list[str]) -> None:
        """These nodes are no longer this replica's: end their sessions here, and forget their
        streams so that nothing stale is written or resumed from."""
        for node in nodes:
            self.streams.pop(node, None)
            session = self.get(node)
            if session is not None:
                session.close_reason = "this cloud replica no longer serves the node"
                session.cancel_scope.cancel()

    async def serve(
        self,
        request: WebSocketRequest,
        remote: str,
        release: Callable[[], None],
        node: str,
    ) -> None:
        """Accept the WebSocket of ``node`` (whose certificate it is), then serve its session
        until it ends; ``release`` frees the connection's admission slot once it is open."""
        ws = await request.accept()
        conn = Connection(
            Role.CLOUD,
            now=trio.current_time(),
            heartbeat_s=self.heartbeat_s,
            max_frame=self.max_frame,
        )
        try:
            with trio.fail_after(self.handshake_timeout_s):
                data = await ws.get_message()
            events = conn.receive(binary(data), trio.current_time())
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
            old = self.get(node)
            if old is not None:
                self.metrics.replaced.inc()
                log.info("replacing session", extra={"node": node, "old": old.remote})
                await old.replace(f"replaced by a newer connection from {remote}")
            stream = await self.restorer.stream_for(node, hello)
            try:
                welcome, settled = conn.accept(
                    hello, inflight=stream.inflight, receiver=stream.receiver
                )
            except ProtocolError as exc:
                self.metrics.rejected.labels("version").inc()
                log.warning("refusing session", extra={"node": node, "reason": exc.reason})
                await ws.send_message(conn.refuse(exc.reason))
                return
            settle(stream, settled.messages, self.metrics)
            session = Session(node, remote)
            self[node] = session
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
                "sending_from": stream.inflight.sending_from,
            },
        )
        try:
            await ws.send_message(welcome)
            with session.cancel_scope:
                await self.pumps.run(ws, conn, stream, node)
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            await self._protocol_error(ws, conn, node, exc)
        finally:
            self.metrics.connected.dec()
            if self.get(node) is session:
                del self[node]
                if self.lifecycle is not None:
                    self.lifecycle.disconnected(node)
            if session.cancel_scope.cancelled_caught:
                await close_session(ws, conn, NORMAL_CLOSURE, session.close_reason)
            session.done.set()
            log.info("session closed", extra={"node": node, "remote": remote})

    async def _protocol_error(
        self, ws: WebSocketConnection, conn: Connection, node: str, exc: ProtocolError
    ) -> None:
        self.metrics.rejected.labels("protocol").inc()
        log.warning("protocol violation, closing", extra={"node": node, "reason": exc.reason})
        await close_session(ws, conn, PROTOCOL_ERROR, exc.reason)
