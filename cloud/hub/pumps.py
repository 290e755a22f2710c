"""The two tasks of an open session: the read pump applies the edge's reports and settles what
it acknowledges; the write pump numbers queued changes into the window and sends them, with
heartbeats, until the edge falls silent."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from cloud.hub.metrics import HubMetrics
from cloud.hub.reports import ReportSink
from cloud.hub.source import Source
from cloud.hub.streams import NodeStream
from edge.websocket import NORMAL_CLOSURE, close_session, unwrap
from edge.wire.codec import ProtocolError
from edge.wire.connection import Connection, PeerClosed, Received, Settled
from edge.wire.events import Message

log = logging.getLogger("cloud.hub")


def binary(data: bytes | str) -> bytes:
    if isinstance(data, str):
        raise ProtocolError("text WebSocket message; the protocol is binary")
    return data


def settle(stream: NodeStream, messages: Iterable[Message], metrics: HubMetrics) -> None:
    for latency in stream.settle(messages, trio.current_time()):
        metrics.ack_latency.observe(latency)


class Pumps:
    def __init__(
        self, sink: ReportSink, source: Source | None, metrics: HubMetrics, *, heartbeat_s: float
    ) -> None:
        self.sink = sink
        self.source = source
        self.metrics = metrics
        self.heartbeat_s = heartbeat_s
        self.resent = 0

    async def run(
        self, ws: WebSocketConnection, conn: Connection, stream: NodeStream, node: str
    ) -> None:
        """Pump until the session ends; raises the ProtocolError or ConnectionClosed that
        ended it, if one did."""
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
            for event in conn.receive(binary(data), trio.current_time()):
                match event:
                    case Received(messages):
                        await self.sink.apply(node, messages)
                        conn.applied(messages[-1].seq)
                        self.metrics.received.inc(len(messages))
                        stream.dirty = True
                        stream.kick()
                    case Settled(messages):
                        settle(stream, messages, self.metrics)
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
                self.resent += stream.resync(self.source.objects(node) if self.source else [])
            now = trio.current_time()
            stream.number_queued(now)
            for frame in conn.outgoing(now):
                await ws.send_message(frame)
            if conn.expired(now):
                log.warning("edge silent, closing", extra={"node": node})
                await close_session(ws, conn, NORMAL_CLOSURE, "no heartbeat from the edge")
                return
            with trio.move_on_after(self.heartbeat_s):
                await stream.wake.wait()
