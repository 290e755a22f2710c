"""The cloud hub: a trio-websocket server holding one session per edge node.

Edges connect over TLS to ``/v1/connect`` with their node certificate; the node's identity is
the certificate's (``cloud.pki.node_name_from_cert``, issued by the cloud's CA at join).

``Hub`` is the glue: it builds its parts, each given what it needs when built, and runs them.

- ``admission``: admission slots against reconnect storms, TLS, routing by path;
- ``gate``: with several replicas, whether this one serves a connecting node (``ownership``);
- ``restore``: which stream a node resumes, from memory or its persisted watermark;
- ``session`` and ``pumps``: the session from Hello to close, and its read and write tasks;
- ``flusher``: the watermarks persisted in batches (``watermarks``).

Each node's downstream stream (``cloud.hub.streams.NodeStream``) outlives its sessions. The
streams (``NodeStreams``) are made before the source and the hub and given to both: the source
publishes into them, the hub drains them.
"""

from __future__ import annotations

import gc
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import trio
from trio_websocket import WebSocketRequest

from cloud import defaults, pki
from cloud.hub.admission import Admission, Route
from cloud.hub.flusher import WatermarkFlusher
from cloud.hub.gate import OwnershipGate
from cloud.hub.metrics import HubMetrics
from cloud.hub.ownership import Holdings, Ownership
from cloud.hub.pumps import Pumps
from cloud.hub.reports import LogOnly, ReportSink
from cloud.hub.restore import StreamRestorer
from cloud.hub.session import Lifecycle, Sessions
from cloud.hub.source import Source
from cloud.hub.streams import NodeStreams
from cloud.hub.watermarks import WatermarkStore
from edge.wire import codec

log = logging.getLogger("cloud.hub")

# Builds the hub's Ownership given what it calls back (``before_release``, ``on_lost``) and the
# ``holdings`` the flusher reads: ``functools.partial(Ownership, kube, replica_id, url)``.
OwnershipFactory = Callable[..., Ownership]


@dataclass
class HubSettings:
    host: str = defaults.LISTEN[0]
    port: int = defaults.LISTEN[1]
    heartbeat_s: float = defaults.HEARTBEAT_S
    window: int = 512
    queue_capacity: int = 10_000
    max_handshakes: int = defaults.MAX_HANDSHAKES
    admission_wait_s: float = 2.0
    handshake_timeout_s: float = 10.0
    flush_interval_s: float = 1.0
    max_frame: int = codec.DEFAULT_MAX_FRAME


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
        streams: NodeStreams | None = None,
        source: Source | None = None,
        sink: ReportSink | None = None,
        watermarks: WatermarkStore | None = None,
        metrics: HubMetrics | None = None,
        routes: dict[str, Route] | None = None,
        lifecycle: Lifecycle | None = None,
        ownership: OwnershipFactory | None = None,
    ) -> None:
        s = settings
        sink = sink or LogOnly()
        self.settings = settings
        self.source = source
        self.metrics = metrics or HubMetrics()
        self.streams = streams if streams is not None else NodeStreams()
        self.restorer = StreamRestorer(
            self.streams,
            source,
            sink,
            watermarks,
            capacity=s.queue_capacity,
            window=s.window,
        )
        self.pumps = Pumps(sink, source, self.metrics, heartbeat_s=s.heartbeat_s)
        self.sessions = Sessions(
            self.streams,
            self.restorer,
            self.pumps,
            self.metrics,
            lifecycle,
            heartbeat_s=s.heartbeat_s,
            max_frame=s.max_frame,
            handshake_timeout_s=s.handshake_timeout_s,
        )
        holdings = Holdings() if ownership is not None else None
        self.flusher = None
        if watermarks is not None:
            self.flusher = WatermarkFlusher(
                watermarks,
                self.streams,
                source,
                self.sessions,
                self.metrics,
                interval_s=s.flush_interval_s,
                holdings=holdings,
            )
        self.ownership: Ownership | None = None
        self.gate: OwnershipGate | None = None
        if ownership is not None:
            self.ownership = ownership(
                holdings=holdings,
                before_release=self.flusher.before_release if self.flusher else None,
                on_lost=self.sessions.lose,
            )
            self.gate = OwnershipGate(self.ownership, self.streams, watermarks, self.metrics)
        self.admission = Admission(
            ssl_context,
            self.metrics,
            self._connect,
            routes or {},
            max_handshakes=s.max_handshakes,
            admission_wait_s=s.admission_wait_s,
            handshake_timeout_s=s.handshake_timeout_s,
            max_frame=s.max_frame,
        )
        self.port: int | None = None
        self.metrics.track_depth(lambda: self.streams.depth)

    @property
    def resent(self) -> int:
        """Messages queued again by resyncs: resumed from a watermark, or after an overflow."""
        return self.restorer.resent + self.pumps.resent

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports the bound port."""
        listeners = await trio.open_tcp_listeners(
            self.settings.port, host=self.settings.host, backlog=4096
        )
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                if self.flusher is not None:
                    nursery.start_soon(self.flusher.run)
                await nursery.start(trio.serve_listeners, self.admission.handle, listeners)
                log.info("hub listening", extra={"host": self.settings.host, "port": self.port})
                task_status.started(self.port)
        finally:
            if self.ownership is not None:
                # After the last watermarks are written: the nodes may move at once.
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    await self.ownership.resign()

    async def _connect(
        self,
        stream: trio.SSLStream,
        request: WebSocketRequest,
        remote: str,
        release: Callable[[], None],
    ) -> None:
        node = _node_of(stream)
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
        if self.gate is None:
            await self.sessions.serve(request, remote, release, node)
            return
        if not await self.gate.claim(node, request, remote):
            return
        try:
            await self.sessions.serve(request, remote, release, node)
        finally:
            self.gate.unclaim(node)


def _node_of(stream: trio.SSLStream) -> str | None:
    """The node a connection's verified client certificate speaks for, if it has one."""
    cert = stream.getpeercert(binary_form=True)
    if not cert:
        return None
    try:
        return pki.node_name_from_cert(cert)
    except pki.NotANodeCertificate:
        return None
