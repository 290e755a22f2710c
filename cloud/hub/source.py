"""Objects bound to nodes, watched in Kubernetes and handed to the hub.

A ConfigMap labelled ``outpost.io/node: NODE`` is synced to that node's store, under the key
``namespace/ConfigMap/name``; changing the label moves it from one node to another (a delete
for the old one). Pods, Secrets and devices join this as the edge controller grows; they all
go through the same ``Hub.publish``.

The source lists once, then watches from the list's resourceVersion; on 410 Gone it lists
again and hands the hub the difference. Until the first list has finished, ``ready`` is unset:
the hub must not open sessions before then, because a resync from an empty cache would tell
every edge to delete everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import httpx2
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.operators import exists
from lightkube.resources.core_v1 import ConfigMap

from cloud.hub.nodes import SourceObject, rv_number

log = logging.getLogger("cloud.hub.source")

NODE_LABEL = "outpost.io/node"


class Sink(Protocol):
    def publish(self, node: str, obj: SourceObject, deleted: bool) -> None: ...


class ConfigMapSource:
    def __init__(
        self, kube: AsyncClient, sink: Sink | None = None, *, retry_s: float = 1.0
    ) -> None:
        self.kube = kube
        self.sink = sink
        self.retry_s = retry_s
        self.ready = trio.Event()
        self.rv = 0
        self._rv_text: str | None = None
        # node -> uid -> object, and uid -> node, to route moves and deletions.
        self.by_node: dict[str, dict[str, SourceObject]] = {}
        self._owner: dict[str, str] = {}
        self.relists = 0

    def objects(self, node: str) -> list[SourceObject]:
        return list(self.by_node.get(node, {}).values())

    def _publish(self, node: str, obj: SourceObject, deleted: bool) -> None:
        # The hub is made after its source (it needs the source), and set as the sink then.
        if self.sink is not None:
            self.sink.publish(node, obj, deleted)

    @staticmethod
    def _convert(cm: ConfigMap) -> tuple[str, SourceObject]:
        meta = cm.metadata
        node = (meta.labels or {}).get(NODE_LABEL, "")
        body: dict[str, Any] = {
            "metadata": {
                "name": meta.name,
                "namespace": meta.namespace,
                "uid": meta.uid,
                "resourceVersion": meta.resourceVersion,
                "labels": meta.labels or {},
                "annotations": meta.annotations or {},
            },
            "data": cm.data or {},
            "binaryData": cm.binaryData or {},
        }
        key = f"{meta.namespace}/ConfigMap/{meta.name}"
        return node, SourceObject(meta.uid, key, meta.resourceVersion, body)

    def _upsert(self, node: str, obj: SourceObject) -> None:
        previous = self._owner.get(obj.uid)
        if previous is not None and previous != node:
            self._remove(obj.uid)
        self.by_node.setdefault(node, {})[obj.uid] = obj
        self._owner[obj.uid] = node
        self._publish(node, obj, False)

    def _remove(self, uid: str) -> None:
        node = self._owner.pop(uid, None)
        if node is None:
            return
        obj = self.by_node[node].pop(uid)
        if not self.by_node[node]:
            del self.by_node[node]
        self._publish(node, obj, True)

    def _advance(self, rv: str) -> None:
        self._rv_text = rv
        number = rv_number(rv)
        if number is not None:
            self.rv = max(self.rv, number)

    async def _list(self) -> None:
        listing = self.kube.list(ConfigMap, namespace="*", labels={NODE_LABEL: exists()})
        seen: dict[str, tuple[str, SourceObject]] = {}
        async for cm in listing:
            node, obj = self._convert(cm)
            seen[obj.uid] = (node, obj)
        for uid in set(self._owner) - set(seen):
            self._remove(uid)
        for node, obj in seen.values():
            current = self.by_node.get(node, {}).get(obj.uid)
            if current is None or current.rv != obj.rv:
                self._upsert(node, obj)
        self._advance(listing.resourceVersion)
        self.relists += 1

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """List, then watch forever; errors are logged and retried."""
        while True:
            try:
                if self._rv_text is None:
                    await self._list()
                    if not self.ready.is_set():
                        self.ready.set()
                        if on_ready:
                            on_ready()
                        log.info("source synced", extra={"objects": len(self._owner)})
                await self._watch()
            except ApiError as exc:
                if exc.status.code == 410:
                    log.info("watch expired, listing again", extra={"rv": self._rv_text})
                    self._rv_text = None
                    continue
                log.warning("watch failed", extra={"code": exc.status.code, "error": str(exc)})
                await trio.sleep(self.retry_s)
            except httpx2.TransportError as exc:
                log.warning("Kubernetes unreachable", extra={"error": str(exc)})
                await trio.sleep(self.retry_s)

    async def _watch(self) -> None:
        stream = self.kube.watch(
            ConfigMap,
            namespace="*",
            labels={NODE_LABEL: exists()},
            resource_version=self._rv_text,
        )
        async for kind, cm in stream:
            node, obj = self._convert(cm)
            if kind == "DELETED":
                self._remove(obj.uid)
            else:
                self._upsert(node, obj)
            self._advance(obj.rv)


class MemorySource:
    """Objects held in memory and changed by calls: for the hub benchmark and for driving a
    hub without Kubernetes. resourceVersions come from one counter, like etcd's revision."""

    def __init__(self, sink: Sink | None = None) -> None:
        self.sink = sink
        self.ready = trio.Event()
        self.ready.set()
        self.rv = 0
        self.by_node: dict[str, dict[str, SourceObject]] = {}

    def objects(self, node: str) -> list[SourceObject]:
        return list(self.by_node.get(node, {}).values())

    def _publish(self, node: str, obj: SourceObject, deleted: bool) -> None:
        # The hub is made after its source (it needs the source), and set as the sink then.
        if self.sink is not None:
            self.sink.publish(node, obj, deleted)

    def put(self, node: str, key: str, body: Any, uid: str | None = None) -> SourceObject:
        self.rv += 1
        objects = self.by_node.setdefault(node, {})
        uid = uid or next((o.uid for o in objects.values() if o.key == key), f"uid-{key}")
        obj = SourceObject(uid, key, str(self.rv), body)
        objects[uid] = obj
        self._publish(node, obj, False)
        return obj

    def delete(self, node: str, key: str) -> None:
        objects = self.by_node.get(node, {})
        for uid, obj in list(objects.items()):
            if obj.key == key:
                self.rv += 1
                del objects[uid]
                self._publish(node, SourceObject(uid, key, str(self.rv), None), True)
