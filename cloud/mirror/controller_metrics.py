"""The edge controller's Prometheus metrics, read from its counters when scraped (so the
controller itself knows nothing of Prometheus)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cloud.mirror.controller import EdgeController


class ControllerCollector(Collector):
    def __init__(self, controller: EdgeController) -> None:
        self.c = controller

    def collect(self) -> Iterator[Metric]:
        c = self.c
        counters = (
            ("outpost_edge_reports_refused", "Reports refused by node authorization.",
             c.reports.refused),
            ("outpost_edge_pod_status_writes", "Pod status writes to Kubernetes.",
             c.reports.pod_writes),
            ("outpost_edge_pods_deleted", "Pods deleted after their edge confirmed they stopped.",
             c.reports.deleted),
            ("outpost_edge_events_written", "Events created or counted up in Kubernetes.",
             c.events.written),
            ("outpost_edge_events_dropped", "Events dropped by the per-node rate limit.",
             c.events.dropped),
            ("outpost_edge_lease_renewals", "Node Lease renewals.", c.nodes.renewals),
            ("outpost_device_twin_reports", "Device twin reports accepted from edges.",
             c.reports.twins),
            ("outpost_device_status_writes", "DeviceStatus writes to Kubernetes.",
             c.device_status.writes),
            ("outpost_device_status_coalesced",
             "Twin reports replaced by a newer one before being written.",
             c.device_status.coalesced),
            ("outpost_device_status_failures", "DeviceStatus writes that failed.",
             c.device_status.failed),
            ("outpost_device_telemetry_published", "Telemetry readings published to MQTT.",
             c.telemetry.published),
            ("outpost_device_telemetry_dropped",
             "Telemetry readings dropped (no sink configured, or the MQTT queue full).",
             c.telemetry.dropped),
        )  # fmt: skip
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=value)
        relists = CounterMetricFamily(
            "outpost_edge_lists", "Full lists of a kind (the first, then after 410 Gone).",
            labels=["kind"],
        )  # fmt: skip
        for informer in (c.source.nodes_informer, *c.source.informers):
            relists.add_metric([informer.kind], informer.relists)
        yield relists
        yield GaugeMetricFamily(
            "outpost_edge_nodes_online",
            "Edge nodes with a session here.",
            value=len(c.nodes.online),
        )
        yield GaugeMetricFamily(
            "outpost_edge_pods", "Pods bound to nodes, as watched.", value=len(c.source.index.pods)
        )
        yield GaugeMetricFamily(
            "outpost_device_status_pending",
            "Devices whose latest twin waits for its turn to be written.",
            value=c.device_status.pending,
        )
        yield GaugeMetricFamily(
            "outpost_edge_devices", "Devices bound to nodes, as watched.",
            value=len(c.source.index.devices),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "outpost_edge_pods_awaiting_tokens",
            "Pods held back until their service-account tokens are issued.",
            value=len(c.source.waiting),
        )


def register(registry: CollectorRegistry, controller: EdgeController) -> None:
    registry.register(ControllerCollector(controller))
