"""Admission and routing: from TCP accept to a WebSocket request on its path.

Against reconnect storms, at most ``max_handshakes`` connections are between TCP accept and
Welcome at once. A connection that finds no slot within ``admission_wait_s`` is answered with
HTTP 503 and a ``Retry-After`` that grows with the backlog, which the edges honour. An admitted
connection does its TLS handshake (client certificates are accepted, not required: joining
nodes have none yet) and is routed by path: ``/v1/connect`` to the session (``connect``), other
paths (the join exchange) to the handlers in ``routes``.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from cloud.hub.metrics import HubMetrics
from edge.websocket import CONNECT_PATH

log = logging.getLogger("cloud.hub")

Route = Callable[[WebSocketConnection], Awaitable[None]]
# (TLS stream, request, remote address, release the admission slot)
Connect = Callable[[trio.SSLStream, WebSocketRequest, str, Callable[[], None]], Awaitable[None]]


class Admission:
    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        metrics: HubMetrics,
        connect: Connect,
        routes: dict[str, Route],
        *,
        max_handshakes: int,
        admission_wait_s: float,
        handshake_timeout_s: float,
        max_frame: int,
    ) -> None:
        self.ssl_context = ssl_context
        self.metrics = metrics
        self.connect = connect
        self.routes = routes
        self.max_handshakes = max_handshakes
        self.admission_wait_s = admission_wait_s
        self.handshake_timeout_s = handshake_timeout_s
        self.max_frame = max_frame
        self._slots = trio.Semaphore(max_handshakes)
        self._waiting = 0

    async def handle(self, tcp: trio.SocketStream) -> None:
        """Serve one TCP connection (the listener's handler)."""
        self._waiting += 1
        admitted = False
        try:
            with trio.move_on_after(self.admission_wait_s):
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
            await self._route(tcp, release)
        finally:
            release()

    async def _tls_request(
        self, tcp: trio.SocketStream, nursery: trio.Nursery
    ) -> tuple[trio.SSLStream, WebSocketRequest] | None:
        stream = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
        remote = remote_of(tcp)
        try:
            with trio.fail_after(self.handshake_timeout_s):
                await stream.do_handshake()
                request = await wrap_server_stream(
                    nursery,
                    stream,
                    max_message_size=self.max_frame,
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
        retry_after = min(60, max(1, math.ceil(self._waiting / self.max_handshakes)))
        self.metrics.rejected.labels("busy").inc()
        async with trio.open_nursery() as nursery:
            got = await self._tls_request(tcp, nursery)
            if got is not None:
                _, request = got
                with trio.move_on_after(self.handshake_timeout_s):
                    await request.reject(
                        503,
                        extra_headers=[(b"Retry-After", str(retry_after).encode())],
                        body=b"outpost-cloud is busy admitting other nodes\n",
                    )
            nursery.cancel_scope.cancel()

    async def _route(self, tcp: trio.SocketStream, release: Callable[[], None]) -> None:
        remote = remote_of(tcp)
        async with trio.open_nursery() as nursery:
            got = await self._tls_request(tcp, nursery)
            if got is None:
                return
            stream, request = got
            try:
                if request.path == CONNECT_PATH:
                    await self.connect(stream, request, remote, release)
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


def remote_of(tcp: trio.SocketStream) -> str:
    try:
        host, port, *_ = tcp.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"
