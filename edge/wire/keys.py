"""The keys and bodies of sync messages: the contract between the edge and the cloud.

A key names an object as ``namespace/Kind/name``; a key that starts with ``/`` names something
of the node itself. The edge owns this module and the cloud imports it.

Downstream (cloud → edge, ``put``/``delete``), what a node holds:

- ``ns/Pod/name``: each pod bound to the node, ``{"apiVersion", "kind", "metadata", "spec"}``.
  Metadata keeps name, namespace, uid, labels, annotations, ownerReferences, generateName,
  creationTimestamp, and, once deletion began, ``deletionTimestamp`` and
  ``deletionGracePeriodSeconds`` (which then beats ``spec.terminationGracePeriodSeconds``).
- ``ns/ConfigMap/name`` and ``ns/Secret/name``: the objects the node's pods name (volumes,
  projected sources, env, envFrom, imagePullSecrets), and ConfigMaps labelled
  ``outpost.io/node: NODE``. Never a Secret no pod on the node names.
- ``ns/ServiceAccountToken/<pod name>``: the tokens of the pod's projected
  ``serviceAccountToken`` sources, ``{"metadata": {name, namespace, uid: <pod uid>}, "tokens":
  [{"audience" ("" for the apiserver's own), "expirationSeconds" (default 3600), "token",
  "expirationTimestamp"}]}``, renewed at 80% of their lifetime.
- ``ns/Device/name``: each Device whose ``spec.nodeName`` is the node, and ``ns/DeviceModel/name``:
  the DeviceModels those Devices name (nothing else), ``{"apiVersion", "kind", "metadata":
  {name, namespace, uid, labels, annotations}, "spec"}`` (``devices.outpost.io/v1beta1``,
  field-compatible with KubeEdge's ``devices.kubeedge.io``). Desired property values travel in
  the Device's ``spec.properties[].desired``.
- ``/Inventory/<node>`` (``sync``): every key the node should hold.

Upstream (edge → cloud reports):

- ``status`` ``ns/Pod/name``: ``{"uid", "status": <PodStatus>, "stopped": true?}``, coalesced
  per pod. ``stopped`` is said once the pod's containers have stopped and it was torn down (or,
  for a pod deleted before it ever ran here, at once); for a pod being deleted, the cloud then
  deletes it with grace period 0. After every reconnect each pod reports again.
- ``status`` ``/Node/<node>``: ``{"labels", "capacity", "allocatable", "nodeInfo",
  "addresses", "conditions"}``, at start, on every reconnect and each minute it changed.
- ``event`` ``ns/Pod/name``: ``{"uid", "reason", "message", "type" (Normal|Warning),
  "fieldPath", "time"}``, one report per event (never coalesced).
- ``twin`` ``ns/Device/name``: ``{"uid", "state" (online|offline|unknown), "lastOnlineTime"
  (RFC 3339, "" before the device ever answered), "twins": [{"propertyName", "reported":
  {"value" (text), "metadata": {"timestamp" (unix ms, as text), "type"}}?, "observedDesired":
  {same}?}], "reasons": [{"property" ("" for the device), "reason", "message"}]}``, shaped like
  DeviceStatus ``status``; coalesced per device (latest wins), so the latest value of every
  property survives any outage. A Device the edge cannot run reports state ``unknown``, no
  twins, and why in ``reasons``.
- ``telemetry`` ``ns/Device/name``: ``{"uid", "property", "value" (typed: number, bool or
  string), "time" (unix ms)}``, one per reading that moved beyond the property's deadband; never
  coalesced (each has its own coalescing key), and the first reports the outbox drops when
  short of space: the bounded history.

A node may report only about itself, its own pods and its own devices; the cloud refuses and
logs anything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NODE_PREFIX = "/Node/"
INVENTORY_PREFIX = "/Inventory/"
TOKEN_KIND = "ServiceAccountToken"
DEVICE_KIND = "Device"
DEVICE_MODEL_KIND = "DeviceModel"


def object_key(namespace: str, kind: str, name: str) -> str:
    return f"{namespace}/{kind}/{name}"


def pod_key(pod: Mapping[str, Any]) -> str:
    """``namespace/Pod/name`` of a pod manifest: the key the node holds it under, and the key
    of its status reports and events."""
    meta = pod["metadata"]
    return object_key(meta.get("namespace", "default"), "Pod", meta["name"])


def split_key(key: str) -> tuple[str, str, str]:
    """``(namespace, kind, name)`` of an object key; empty strings where it has none."""
    namespace, _, rest = key.partition("/")
    kind, _, name = rest.partition("/")
    return namespace, kind, name


def node_key(node: str) -> str:
    return NODE_PREFIX + node


def inventory_key(node: str) -> str:
    return INVENTORY_PREFIX + node
