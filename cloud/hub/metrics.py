"""The hub's Prometheus metrics, and an HTTP endpoint serving them in the text format."""

from __future__ import annotations

from collections.abc import Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connected = Gauge(
            "outpost_hub_connected_nodes", "Nodes with an open session.", registry=r
        )
        self.queue_depth = Gauge(
            "outpost_hub_queue_depth",
            "Downstream messages queued or unacknowledged, over all nodes.",
            registry=r,
        )
        self.ack_latency = Histogram(
            "outpost_hub_ack_latency_seconds",
            "Time from sending a downstream message to its acknowledgement.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.sessions = Counter(
            "outpost_hub_sessions_total",
            "Sessions opened (first connects and reconnects).",
            registry=r,
        )
        self.reconnects = Counter(
            "outpost_hub_reconnects_total",
            "Sessions opened by nodes that had one before in this process.",
            registry=r,
        )
        self.replaced = Counter(
            "outpost_hub_sessions_replaced_total",
            "Sessions closed because the same node connected again.",
            registry=r,
        )
        self.rejected = Counter(
            "outpost_hub_rejected_total",
            "Connections turned away, by reason.",
            ["reason"],
            registry=r,
        )
        self.sent = Counter(
            "outpost_hub_messages_sent_total",
            "Downstream messages sent (resends too).",
            registry=r,
        )
        self.received = Counter(
            "outpost_hub_reports_received_total", "Upstream reports applied.", registry=r
        )
        self.watermark_writes = Counter(
            "outpost_hub_watermark_writes_total",
            "Kubernetes writes made to persist watermarks.",
            registry=r,
        )

    def track_depth(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)


async def serve_metrics(
    metrics: HubMetrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` over plain HTTP until cancelled; reports the bound port."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    app = make_asgi_app(registry=metrics.registry)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
