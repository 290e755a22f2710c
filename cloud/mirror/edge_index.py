"""Which objects each edge node must hold, kept current as Kubernetes changes (no I/O).

A node holds:
- the pods bound to it (``spec.nodeName``);
- the ConfigMaps and Secrets those pods refer to, counted per node, so that an object goes to a
  node when its first pod there needs it and leaves when its last one stops needing it: a
  Secret no pod on the node names never reaches it;
- the service-account tokens of its pods;
- ConfigMaps labelled ``outpost.io/node: NODE`` (configuration for the gateway itself);
- the Devices bound to it (``spec.nodeName``, which unlike a pod's may change: a device moved
  leaves its old node) and the DeviceModels they refer to, counted per node like the objects
  pods use. A Device whose model does not exist still goes to its node, which reports why it
  cannot use it; ``missing_model`` says so for the cloud's own event.

Every change to what a node holds is handed to ``publish(node, object, deleted)``, objects a pod
needs before the pod itself. A change that leaves the body the edge holds as it was (a status
update bumps a pod's resourceVersion, for example) is not sent: the edge keeps the version it
has, and the resume watermark stays correct because it is taken from the source's position,
not from the objects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cloud.devices import resource_body
from cloud.hub.streams import SourceObject
from cloud.mirror.pod_refs import Ref, TokenSpec, object_body, pod_body, references, token_specs
from edge.wire.keys import DEVICE_KIND, DEVICE_MODEL_KIND, TOKEN_KIND, object_key, pod_key

NODE_LABEL = "outpost.io/node"

DEVICE = DEVICE_KIND
DEVICE_MODEL = DEVICE_MODEL_KIND

Publish = Callable[[str, SourceObject, bool], None]
# (kind, namespace, name)
ObjectId = tuple[str, str, str]


@dataclass(frozen=True)
class PodEntry:
    uid: str
    node: str
    namespace: str
    name: str
    obj: SourceObject
    refs: frozenset[Ref]
    tokens: frozenset[TokenSpec]
    service_account: str
    deleting: bool

    @property
    def key(self) -> str:
        return self.obj.key


@dataclass(frozen=True)
class DeviceEntry:
    uid: str
    node: str
    namespace: str
    name: str
    model: str  # the DeviceModel's name, in the device's namespace ("" when it names none)
    obj: SourceObject

    @property
    def key(self) -> str:
        return object_key(self.namespace, DEVICE, self.name)

    @property
    def model_id(self) -> ObjectId:
        return (DEVICE_MODEL, self.namespace, self.model)


@dataclass(frozen=True)
class ObjectEntry:
    obj: SourceObject
    labelled_for: str  # the node of an ``outpost.io/node`` label, or ""


class EdgeIndex:
    def __init__(self, publish: Publish | None = None) -> None:
        self.publish = publish
        self.pods: dict[str, PodEntry] = {}
        self.pod_keys: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid
        self.objects: dict[ObjectId, ObjectEntry] = {}
        self.tokens: dict[str, SourceObject] = {}  # pod uid -> token object
        self.needed: dict[str, Counter[ObjectId]] = {}  # node -> objects its pods refer to
        self.held: dict[str, dict[str, SourceObject]] = {}  # node -> uid -> what it holds
        self.devices: dict[str, DeviceEntry] = {}
        self.device_keys: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid

    # -- what the hub asks ------------------------------------------------------------------

    def objects_for(self, node: str) -> list[SourceObject]:
        return list(self.held.get(node, {}).values())

    def pod(self, namespace: str, name: str) -> PodEntry | None:
        uid = self.pod_keys.get((namespace, name))
        return self.pods.get(uid) if uid else None

    def pods_on(self, node: str) -> list[PodEntry]:
        return [p for p in self.pods.values() if p.node == node]

    # -- pods --------------------------------------------------------------------------------

    def put_pod(self, pod: Mapping[str, Any]) -> PodEntry | None:
        """A pod was added or changed; pods not bound to a node yet are not any node's."""
        meta = pod["metadata"]
        uid = meta["uid"]
        node = (pod.get("spec") or {}).get("nodeName") or ""
        if not node:
            self.remove_pod(uid)
            return None
        old = self.pods.get(uid)
        if old is not None and old.node != node:
            self.remove_pod(uid)  # cannot happen in Kubernetes (nodeName is immutable)
            old = None
        namespace = meta.get("namespace", "default")
        entry = PodEntry(
            uid=uid,
            node=node,
            namespace=namespace,
            name=meta["name"],
            obj=SourceObject(
                uid,
                pod_key(pod),
                meta["resourceVersion"],
                pod_body(pod),
            ),
            refs=references(pod),
            tokens=token_specs(pod),
            service_account=(pod.get("spec") or {}).get("serviceAccountName") or "default",
            deleting=bool(meta.get("deletionTimestamp")),
        )
        self.pods[uid] = entry
        self.pod_keys[(namespace, entry.name)] = uid
        old_ids = _ids(old.namespace, old.refs) if old else set()
        new_ids = _ids(namespace, entry.refs)
        for oid in new_ids - old_ids:
            self._need(node, oid)
        if uid in self.tokens:
            self._hold(node, self.tokens[uid])
        self._hold(node, entry.obj)
        for oid in old_ids - new_ids:
            self._release_ref(node, oid)
        return entry

    def remove_pod(self, uid: str) -> PodEntry | None:
        token = self.tokens.pop(uid, None)
        entry = self.pods.pop(uid, None)
        if entry is None:
            return None
        if self.pod_keys.get((entry.namespace, entry.name)) == uid:
            del self.pod_keys[(entry.namespace, entry.name)]
        self._drop(entry.node, uid)
        if token is not None:
            self._drop(entry.node, token.uid)
        for oid in _ids(entry.namespace, entry.refs):
            self._release_ref(entry.node, oid)
        return entry

    def put_token(
        self, pod_uid: str, namespace: str, name: str, tokens: list[dict[str, Any]], version: str
    ) -> None:
        """New tokens for a pod's projected volumes, kept until the pod goes. A pod not in the
        index yet (it waits for these) gets them just before itself. ``version`` is not a
        resourceVersion, so a restarted cloud always sends tokens again."""
        obj = SourceObject(
            f"token-{pod_uid}",
            object_key(namespace, TOKEN_KIND, name),
            version,
            {
                "metadata": {"name": name, "namespace": namespace, "uid": pod_uid},
                "tokens": tokens,
            },
        )
        self.tokens[pod_uid] = obj
        entry = self.pods.get(pod_uid)
        if entry is not None:
            self._hold(entry.node, obj)

    # -- devices -----------------------------------------------------------------------------

    def device(self, namespace: str, name: str) -> DeviceEntry | None:
        uid = self.device_keys.get((namespace, name))
        return self.devices.get(uid) if uid else None

    def device_uid(self, namespace: str, name: str) -> str | None:
        entry = self.device(namespace, name)
        return entry.uid if entry else None

    def devices_using(self, namespace: str, model: str) -> list[DeviceEntry]:
        return [d for d in self.devices.values() if d.model_id == (DEVICE_MODEL, namespace, model)]

    def missing_model(self, entry: DeviceEntry) -> bool:
        """The device names no DeviceModel, or one that does not exist (as watched)."""
        return not entry.model or entry.model_id not in self.objects

    def put_device(self, device: Mapping[str, Any]) -> DeviceEntry | None:
        """A Device was added or changed; one bound to no node is no node's."""
        meta = device["metadata"]
        uid = meta["uid"]
        spec = device.get("spec") or {}
        node = spec.get("nodeName") or ""
        old = self.devices.get(uid)
        if not node:
            self.remove_device(uid)
            return None
        if old is not None and old.node != node:
            self.remove_device(uid)  # moved: it leaves the old node, with its model if unused
            old = None
        namespace = meta.get("namespace", "default")
        entry = DeviceEntry(
            uid=uid,
            node=node,
            namespace=namespace,
            name=meta["name"],
            model=str((spec.get("deviceModelRef") or {}).get("name") or ""),
            obj=SourceObject(
                uid,
                object_key(namespace, DEVICE, meta["name"]),
                meta["resourceVersion"],
                resource_body(DEVICE, device),
            ),
        )
        self.devices[uid] = entry
        self.device_keys[(namespace, entry.name)] = uid
        if old is None or old.model_id != entry.model_id:
            if entry.model:
                self._need(node, entry.model_id)
            if old is not None and old.model:
                self._release_ref(node, old.model_id)
        self._hold(node, entry.obj)
        return entry

    def remove_device(self, uid: str) -> DeviceEntry | None:
        entry = self.devices.pop(uid, None)
        if entry is None:
            return None
        if self.device_keys.get((entry.namespace, entry.name)) == uid:
            del self.device_keys[(entry.namespace, entry.name)]
        self._drop(entry.node, uid)
        if entry.model:
            self._release_ref(entry.node, entry.model_id)
        return entry

    # -- ConfigMaps, Secrets and DeviceModels ----------------------------------------------------

    def put_object(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        oid = (kind, meta.get("namespace", "default"), meta["name"])
        labelled = (meta.get("labels") or {}).get(NODE_LABEL, "") if kind == "ConfigMap" else ""
        key = object_key(oid[1], kind, oid[2])
        body = resource_body(kind, obj) if kind == DEVICE_MODEL else object_body(kind, obj)
        entry = ObjectEntry(SourceObject(meta["uid"], key, meta["resourceVersion"], body), labelled)
        old = self.objects.get(oid)
        self.objects[oid] = entry
        if old is not None and old.obj.uid != entry.obj.uid:
            # Deleted and made again under the same name while we were not watching.
            for node in self._holders(oid, old):
                self._drop(node, old.obj.uid)
        before = self._holders(oid, old) if old else set()
        after = self._holders(oid, entry)
        for node in before - after:
            self._drop(node, old.obj.uid)  # type: ignore[union-attr]
        for node in after:
            self._hold(node, entry.obj)

    def remove_object(self, kind: str, namespace: str, name: str) -> None:
        oid = (kind, namespace, name)
        entry = self.objects.pop(oid, None)
        if entry is None:
            return
        for node in self._holders(oid, entry):
            self._drop(node, entry.obj.uid)

    def object_ids(self, kind: str) -> set[ObjectId]:
        return {oid for oid in self.objects if oid[0] == kind}

    # -- internals -----------------------------------------------------------------------------

    def _holders(self, oid: ObjectId, entry: ObjectEntry | None) -> set[str]:
        nodes = {node for node, needed in self.needed.items() if needed.get(oid)}
        if entry is not None and entry.labelled_for:
            nodes.add(entry.labelled_for)
        return nodes

    def _need(self, node: str, oid: ObjectId) -> None:
        needed = self.needed.setdefault(node, Counter())
        needed[oid] += 1
        if needed[oid] == 1 and oid in self.objects:
            self._hold(node, self.objects[oid].obj)

    def _release_ref(self, node: str, oid: ObjectId) -> None:
        needed = self.needed.get(node)
        if needed is None or not needed.get(oid):
            return
        needed[oid] -= 1
        if needed[oid]:
            return
        del needed[oid]
        if not needed:
            del self.needed[node]
        entry = self.objects.get(oid)
        if entry is not None and entry.labelled_for != node:
            self._drop(node, entry.obj.uid)

    def _hold(self, node: str, obj: SourceObject) -> None:
        held = self.held.setdefault(node, {})
        current = held.get(obj.uid)
        if current is not None and current.key == obj.key and current.body == obj.body:
            return
        held[obj.uid] = obj
        if self.publish is not None:
            self.publish(node, obj, False)

    def _drop(self, node: str, uid: str) -> None:
        held = self.held.get(node)
        if not held or uid not in held:
            return
        obj = held.pop(uid)
        if not held:
            del self.held[node]
        if self.publish is not None:
            self.publish(node, obj, True)


def _ids(namespace: str, refs: frozenset[Ref]) -> set[ObjectId]:
    return {(kind, namespace, name) for kind, name in refs}
