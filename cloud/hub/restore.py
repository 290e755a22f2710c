"""Which stream a connecting node resumes: the one in memory, else one restored from its
persisted watermark (a cloud restart), else a new one.

An edge whose store is not the one the stream was with (a new epoch, or a store that has lost
acknowledged messages: wiped, re-flashed, restored from a backup) starts over: a full resync
downstream, numbering continued so that it cannot be taken for redelivery, and its reports
counted from 1 again.
"""

from __future__ import annotations

import logging

from cloud.hub.reports import ReportSink
from cloud.hub.source import Source
from cloud.hub.streams import NodeStream, NodeStreams, SourceObject
from cloud.hub.watermarks import WatermarkStore
from edge.wire.events import Hello

log = logging.getLogger("cloud.hub")


class StreamRestorer:
    def __init__(
        self,
        streams: NodeStreams,
        source: Source | None,
        sink: ReportSink,
        watermarks: WatermarkStore | None,
        *,
        capacity: int,
        window: int,
    ) -> None:
        self.streams = streams
        self.source = source
        self.sink = sink
        self.watermarks = watermarks
        self.capacity = capacity
        self.window = window
        self.resent = 0

    def _objects(self, node: str) -> list[SourceObject]:
        return self.source.objects(node) if self.source else []

    async def stream_for(self, node: str, hello: Hello) -> NodeStream:
        """The stream ``node`` resumes with the edge that sent ``hello``."""
        stream = self.streams.get(node)
        mark = None
        if stream is None and self.watermarks is not None:
            mark = self.watermarks.loaded.pop(node, None)
        known = stream or mark
        if known is not None:
            acked = stream.inflight.acked if stream else mark.acked  # type: ignore[union-attr]
            if known.epoch == hello.epoch and hello.received >= acked:
                if stream is not None:
                    return stream
                assert mark is not None
                stream = NodeStream.fresh(
                    node,
                    capacity=self.capacity,
                    window=self.window,
                    next_seq=max(mark.next_seq, hello.received + 1),
                    upstream=mark.upstream,
                    epoch=hello.epoch,
                )
                queued = stream.resync(self._objects(node), since_rv=mark.rv)
                self.resent += queued
                log.info(
                    "resuming node from its watermark",
                    extra={"node": node, "rv": mark.rv, "queued": queued},
                )
                self.streams[node] = stream
                return stream
            log.warning(
                "edge store replaced or lost acknowledged state, resyncing it in full",
                extra={
                    "node": node,
                    "epoch": hello.epoch,
                    "was": known.epoch,
                    "edge_received": hello.received,
                    "acked": acked,
                },
            )
            await self.sink.restart(node, hello.epoch)
        next_seq = stream.inflight.next_seq if stream else mark.next_seq if mark else 1
        stream = NodeStream.fresh(
            node,
            capacity=self.capacity,
            window=self.window,
            next_seq=max(next_seq, hello.received + 1),
            epoch=hello.epoch,
        )
        stream.resync(self._objects(node))
        self.streams[node] = stream
        return stream
