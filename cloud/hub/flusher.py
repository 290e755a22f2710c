"""The hub's watermark flusher: persists the watermarks of changed streams in batches.

Every ``interval_s`` the watermarks of the streams changed since the last round are written
(``cloud.hub.watermarks``), and once more on the way out. A failed write keeps the marks for the
next round (the newest value of a node wins), so nothing is lost while Kubernetes is
unreachable. Run as one of several replicas, only the marks of nodes this replica holds are
written (``holdings``), and an idle node's last one just before the node is released
(``before_release``, which the ownership calls).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import httpx2
import trio
from lightkube.core.exceptions import ApiError

from cloud.hub.metrics import HubMetrics
from cloud.hub.ownership import Holdings
from cloud.hub.source import Source
from cloud.hub.streams import NodeStreams, Positions, Watermark
from cloud.hub.watermarks import WatermarkStore

log = logging.getLogger("cloud.hub")


class WatermarkFlusher:
    def __init__(
        self,
        store: WatermarkStore,
        streams: NodeStreams,
        source: Source | None,
        sessions: Mapping[str, object],
        metrics: HubMetrics,
        *,
        interval_s: float,
        holdings: Holdings | None = None,
    ) -> None:
        self.store = store
        self.streams = streams
        self.source = source
        self.sessions = sessions
        self.metrics = metrics
        self.interval_s = interval_s
        self.holdings = holdings
        # One write at a time: a release's write must not be overtaken by an older one.
        self._write_lock = trio.Lock()

    def _positions(self) -> Positions:
        return self.source.positions if self.source else {}

    def collect(self) -> dict[str, Watermark]:
        """The watermarks changed since last collected."""
        changed = {}
        rv = self._positions()
        for name, stream in self.streams.items():
            if stream.dirty:
                stream.dirty = False
                changed[name] = stream.watermark(rv)
        return changed

    def _marks(self, nodes: Iterable[str]) -> dict[str, Watermark]:
        rv = self._positions()
        return {node: self.streams[node].watermark(rv) for node in nodes if node in self.streams}

    async def run(self) -> None:
        """Write changed watermarks every ``interval_s`` until cancelled, then once more."""
        unsent: dict[str, Watermark] = {}
        try:
            while True:
                await trio.sleep(self.interval_s)
                unsent.update(self.collect())
                if unsent and await self._write(unsent):
                    unsent = {}
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                unsent.update(self.collect())
                if self.holdings is not None:
                    unsent.update(self._marks(self.holdings.owned))
                if unsent:
                    await self._write(unsent, idle_too=True)

    async def before_release(self, nodes: list[str]) -> bool:
        """Persist the watermarks of nodes about to be released, so their next owner resumes
        from where this replica left them."""
        return await self._write(self._marks(nodes), idle_too=True)

    async def _write(self, marks: dict[str, Watermark], *, idle_too: bool = False) -> bool:
        """Write ``marks``; with holdings, only of nodes this replica holds, and (unless
        ``idle_too``) that have a session: an idle node's last watermark is written once, by
        ``before_release``, before it is released."""
        async with self._write_lock:
            if self.holdings is not None:
                holdings = self.holdings
                marks = {
                    node: mark
                    for node, mark in marks.items()
                    if holdings.owns(node) and (idle_too or node in self.sessions)
                }
            if not marks:
                return True
            before = self.store.writes
            try:
                await self.store.write(marks)
            except (ApiError, httpx2.TransportError) as exc:
                log.warning(
                    "cannot persist watermarks; will retry",
                    extra={"nodes": len(marks), "error": str(exc)},
                )
                return False
            finally:
                self.metrics.watermark_writes.inc(self.store.writes - before)
            return True
