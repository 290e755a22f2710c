"""Where the hub's objects come from, and where changes to them go.

The hub asks its source for a node's objects (``objects``) when it resyncs the node, and reads
``positions`` (how far it has got, per kind) for resume watermarks; the source calls
``publish`` on its sink for every change. The sink is the node streams
(``cloud.hub.streams.NodeStreams``), made first and given to both the source and the hub. In
the service the source is ``cloud.mirror.edge_source.EdgeSource`` (Kubernetes);
``MemorySource`` holds objects in memory for the hub benchmark and for tests about the channel.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from cloud.hub.streams import ANY_KIND, Positions, SourceObject


class Sink(Protocol):
    def publish(self, node: str, obj: SourceObject, deleted: bool) -> None: ...


class Source(Protocol):
    ready: trio.Event

    @property
    def positions(self) -> Positions:
        """How far the source has processed each kind (for resume watermarks)."""
        ...

    def objects(self, node: str) -> list[SourceObject]: ...


class MemorySource:
    """Objects held in memory and changed by calls: for the hub benchmark and for driving a
    hub without Kubernetes. resourceVersions come from one counter, like etcd's revision."""

    def __init__(self, sink: Sink) -> None:
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

    def put(self, node: str, key: str, body: Any, uid: str | None = None) -> SourceObject:
        self.rv += 1
        objects = self.by_node.setdefault(node, {})
        uid = uid or next((o.uid for o in objects.values() if o.key == key), f"uid-{key}")
        obj = SourceObject(uid, key, str(self.rv), body)
        objects[uid] = obj
        self.sink.publish(node, obj, False)
        return obj

    def delete(self, node: str, key: str) -> None:
        objects = self.by_node.get(node, {})
        for uid, obj in list(objects.items()):
            if obj.key == key:
                self.rv += 1
                del objects[uid]
                self.sink.publish(node, SourceObject(uid, key, str(self.rv), None), True)
