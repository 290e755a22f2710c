"""The edge controller: edge nodes in Kubernetes, in both directions.

Downstream, ``source.EdgeSource`` decides what each node holds (its pods, the ConfigMaps,
Secrets and service-account tokens they refer to, and ConfigMaps labelled for it) and feeds
the hub. Upstream, ``reports.KubeReports`` writes pod status, node status and events, and
finishes pod deletions; ``nodes.NodeKeeper`` keeps each connected node's Node and Lease.

The keys and bodies exchanged with the edge are described in ``edge.wire.keys``.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from lightkube import AsyncClient

from cloud.edge.events import EventRecorder
from cloud.edge.nodes import NodeKeeper
from cloud.edge.reports import KubeReports
from cloud.edge.source import EdgeSource


@dataclass
class ControllerSettings:
    lease_renew_interval_s: float = 10.0
    lease_duration_s: int = 40
    event_qps: float = 5.0
    event_burst: int = 25


class EdgeController:
    def __init__(self, kube: AsyncClient, settings: ControllerSettings | None = None) -> None:
        settings = settings or ControllerSettings()
        self.source = EdgeSource(kube)
        self.nodes = NodeKeeper(
            kube,
            renew_interval_s=settings.lease_renew_interval_s,
            lease_duration_s=settings.lease_duration_s,
        )
        self.events = EventRecorder(kube, qps=settings.event_qps, burst=settings.event_burst)
        self.reports = KubeReports(kube, self.source.index, self.nodes, self.events)
        # As a kubelet does: a Node deleted while its gateway is connected is made again.
        self.source.on_node_deleted = self.nodes.register

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.source.run)
            nursery.start_soon(self.nodes.run)
            nursery.start_soon(self.events.run)
