"""The edge controller: mirrors Kubernetes to the edge nodes and their reports back.

Downstream, ``edge_source.EdgeSource`` decides what each node holds (its pods, the ConfigMaps,
Secrets and service-account tokens they refer to, ConfigMaps labelled for it, its Devices and
their DeviceModels; ``edge_index`` is the sans-IO core, ``pod_refs`` reads a pod's needs) and
feeds the hub. Upstream, ``kube_reports.KubeReports`` writes pod status, node status and events
(``kube_events``), finishes pod deletions, and hands device twins to the DeviceStatus writer and
readings to the telemetry sink (``cloud.devices``); ``node_keeper.NodeKeeper`` keeps each
connected node's Node and Lease. ``controller.EdgeController`` builds and runs them all.

The keys and bodies exchanged with the edge are described in ``edge.wire.keys``.
"""
