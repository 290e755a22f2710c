"""Where the hub's objects come from, and where changes to them go.

The hub asks its source for a node's objects (``objects``) when it resyncs the node, and reads
``positions`` (how far it has got, per kind) for resume watermarks; the source calls
``publish`` on its sink (the hub) for every change. In the service the source is
``cloud.mirror.edge_source.EdgeSource`` (Kubernetes); ``MemorySource`` holds objects in memory for
the hub benchmark and for tests about the channel.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from cloud.hub.streams import ANY_KIND, Positions, SourceObject


class Sink(Protocol):
    def publish(self, node: str, obj: SourceObject, deleted: bool) -> None: ...


class MemorySource:
    """Objects held in memory and changed by calls: for the hub benchmark and for driving a
    hub without Kubernetes. resourceVersions come from one counter, like etcd's revision."""

    def __init__(self, sink: Sink | None = None) -> None:
        self.sink = sink
        self.ready = trio.Event()
        self.ready.set()
        self.rv = 0
        self.by_node: dict[str, dict[str, SourceObject]] = {}

    @property
    def positions(self) -> Positions:
        return {ANY_KIND: self.rv}

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
