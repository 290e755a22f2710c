"""Per-node watermarks persisted to Kubernetes in batches, never one write per acknowledgement.

They live in ConfigMaps ``outpost-hub-watermarks-<shard>`` in the ``outpost-system`` namespace,
one JSON value per node, spread over ``SHARDS`` ConfigMaps by a stable hash of the node name so
that 10,000 nodes stay well under a ConfigMap's 1 MiB. The hub's flusher calls ``write`` with
the nodes whose watermark changed, every second or so: one merge patch per touched shard.

A watermark read back after a crash may lag what the edge had acknowledged by up to one
interval; the protocol tolerates that (``Hello.received`` and ``sending_from`` carry the truth
from the edge), and the lag only costs a few resent messages.
"""

from __future__ import annotations

import json
import logging
import zlib

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap
from lightkube.types import PatchType

from cloud.hub.streams import Watermark
from cloud.kube import ensure_namespace

log = logging.getLogger("cloud.hub.watermarks")

NAMESPACE = "outpost-system"
SHARDS = 16
PREFIX = "outpost-hub-watermarks"


def shard_of(node: str) -> int:
    return zlib.crc32(node.encode()) % SHARDS


def shard_name(shard: int) -> str:
    return f"{PREFIX}-{shard:02d}"


class WatermarkStore:
    def __init__(self, kube: AsyncClient, namespace: str = NAMESPACE) -> None:
        self.kube = kube
        self.namespace = namespace
        self.loaded: dict[str, Watermark] = {}
        self.writes = 0

    async def ensure_namespace(self) -> None:
        await ensure_namespace(self.kube, self.namespace)

    async def load(self) -> dict[str, Watermark]:
        """Read every shard; a missing shard is an empty one."""
        await self.ensure_namespace()
        for shard in range(SHARDS):
            try:
                cm = await self.kube.get(ConfigMap, shard_name(shard), namespace=self.namespace)
            except ApiError as exc:
                if exc.status.code == 404:
                    continue
                raise
            for node, text in (cm.data or {}).items():
                if (mark := _parse(node, text)) is not None:
                    self.loaded[node] = mark
        return self.loaded

    async def load_node(self, node: str) -> Watermark | None:
        """Read one node's watermark afresh into ``loaded`` (another replica may have moved it
        on since ``load``); None when it has none."""
        self.loaded.pop(node, None)
        try:
            cm = await self.kube.get(
                ConfigMap, shard_name(shard_of(node)), namespace=self.namespace
            )
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        text = (cm.data or {}).get(node)
        mark = None if text is None else _parse(node, text)
        if mark is not None:
            self.loaded[node] = mark
        return mark

    async def write(self, marks: dict[str, Watermark]) -> None:
        """Persist ``marks``: one write per shard touched."""
        by_shard: dict[int, dict[str, str]] = {}
        for node, mark in marks.items():
            by_shard.setdefault(shard_of(node), {})[node] = json.dumps(
                mark.to_json(), separators=(",", ":")
            )
        for shard, data in sorted(by_shard.items()):
            name = shard_name(shard)
            try:
                await self.kube.patch(
                    ConfigMap,
                    name,
                    {"data": data},
                    namespace=self.namespace,
                    patch_type=PatchType.MERGE,
                )
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
                await self.kube.create(
                    ConfigMap(metadata=ObjectMeta(name=name, namespace=self.namespace), data=data)
                )
            self.writes += 1


def _parse(node: str, text: str) -> Watermark | None:
    try:
        return Watermark.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable watermark", extra={"node": node})
        return None
