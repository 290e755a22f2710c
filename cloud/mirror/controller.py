"""The edge controller: its parts, built in the order they need each other, and run together.

Downstream, ``edge_source.EdgeSource`` decides what each node holds and hands every change to
the hub's node streams. Upstream, ``kube_reports.KubeReports`` writes what the edges report;
``node_keeper.NodeKeeper`` keeps each connected node's Node and Lease.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
from lightkube import AsyncClient

from cloud import defaults
from cloud.devices import API_VERSION, crds
from cloud.devices.status import DeviceStatusWriter
from cloud.devices.telemetry import DropTelemetry, MqttTelemetry, TelemetrySink
from cloud.hub.source import Sink
from cloud.mirror.edge_index import DeviceEntry, EdgeIndex
from cloud.mirror.edge_source import EdgeSource
from cloud.mirror.kube_events import EventRecorder, PodEvent, now_rfc3339
from cloud.mirror.kube_reports import KubeReports
from cloud.mirror.node_keeper import NodeKeeper

log = logging.getLogger("cloud.mirror")


@dataclass
class ControllerSettings:
    lease_renew_interval_s: float = defaults.LEASE_RENEW_INTERVAL_S
    lease_duration_s: int = defaults.LEASE_DURATION_S
    event_qps: float = defaults.EVENT_QPS
    event_burst: int = defaults.EVENT_BURST
    device_status_interval_s: float = defaults.DEVICE_STATUS_INTERVAL_S
    device_status_qps: float = defaults.DEVICE_STATUS_QPS
    device_status_burst: int = defaults.DEVICE_STATUS_BURST
    # mqtt://host:port for device telemetry; None: counted and dropped.
    telemetry_mqtt: str | None = None
    # Create or upgrade the device CRDs before watching (``serve`` does it itself, first).
    install_crds: bool = True


class EdgeController:
    """``sink`` takes every change to what a node holds: the hub's node streams."""

    def __init__(
        self, kube: AsyncClient, sink: Sink, settings: ControllerSettings | None = None
    ) -> None:
        settings = settings or ControllerSettings()
        self.kube = kube
        self.settings = settings
        self.index = EdgeIndex(sink.publish)
        self.nodes = NodeKeeper(
            kube,
            renew_interval_s=settings.lease_renew_interval_s,
            lease_duration_s=settings.lease_duration_s,
        )
        self.events = EventRecorder(kube, qps=settings.event_qps, burst=settings.event_burst)
        self.device_status = DeviceStatusWriter(
            kube,
            interval_s=settings.device_status_interval_s,
            qps=settings.device_status_qps,
            burst=settings.device_status_burst,
            current=self.index.device_uid,
        )
        self.telemetry: TelemetrySink = (
            MqttTelemetry(settings.telemetry_mqtt) if settings.telemetry_mqtt else DropTelemetry()
        )
        self.source = EdgeSource(
            kube,
            self.index,
            # As a kubelet does: a Node deleted while its gateway is connected is made again.
            on_node_deleted=self.nodes.register,
            on_device_problem=self._device_problem,
            on_device_deleted=self.device_status.forget,
        )
        self.reports = KubeReports(
            kube,
            self.index,
            self.nodes,
            self.events,
            device_status=self.device_status,
            telemetry=self.telemetry,
        )

    def _device_problem(self, device: DeviceEntry, reason: str, message: str) -> None:
        self.events.record(
            PodEvent(
                node=device.node,
                namespace=device.namespace,
                pod=device.name,
                uid=device.uid,
                reason=reason,
                message=message,
                type="Warning",
                field_path="spec.deviceModelRef",
                time=now_rfc3339(),
                kind="Device",
                api_version=API_VERSION,
            )
        )

    async def run(self) -> None:
        if self.settings.install_crds:
            outcome = await crds.install(self.kube)
            log.info("device CRDs", extra=outcome)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.device_status.run)
            nursery.start_soon(self.telemetry.run)
            nursery.start_soon(self.source.run)
            nursery.start_soon(self.nodes.run)
            nursery.start_soon(self.events.run)
