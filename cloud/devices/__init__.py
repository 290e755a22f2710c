"""Devices as Kubernetes objects: the CRDs (``crds``), the DeviceStatus writer (``status``) and
the telemetry sink (``telemetry``).

Devices and DeviceModels travel to their nodes through the edge controller
(``cloud.mirror.edge_index`` routes them by ``spec.nodeName``, like pods); what the edges report
comes back through ``cloud.mirror.kube_reports``, which hands twins to
``status.DeviceStatusWriter`` and readings to a ``telemetry`` sink. docs/devices.md maps
KubeEdge's objects onto these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightkube.generic_resource import create_namespaced_resource

GROUP = "devices.outpost.io"
VERSION = "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"

# lightkube generic resources: enough for the Informer (it needs URLs only) and for writes.
Device = create_namespaced_resource(GROUP, VERSION, "Device", "devices")
DeviceModel = create_namespaced_resource(GROUP, VERSION, "DeviceModel", "devicemodels")
DeviceStatus = create_namespaced_resource(GROUP, VERSION, "DeviceStatus", "devicestatuses")


# Metadata the edge uses; not the resourceVersion (it travels beside the body), so a change
# elsewhere in the object (its status) does not send it to its node again.
_METADATA = ("name", "namespace", "uid", "labels", "annotations")


def resource_body(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """A Device or DeviceModel as its node receives it: identity and spec (desired values
    included: the edge writes them to the device)."""
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {k: meta[k] for k in _METADATA if meta.get(k) is not None},
        "spec": obj.get("spec") or {},
    }
