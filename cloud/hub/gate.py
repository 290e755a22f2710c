"""Ownership gating: whether this replica serves a connecting node, for a hub run as one of
several replicas (``cloud.hub.ownership``).

A node held by another live replica is redirected there (HTTP 307, ``Location`` and a
``Retry-After`` for when that replica's lease would run out). A node this replica has not
served continuously starts from its watermark as read from Kubernetes, never from memory.
"""

from __future__ import annotations

import logging

import httpx2
from lightkube.core.exceptions import ApiError
from trio_websocket import WebSocketRequest

from cloud.hub.metrics import HubMetrics
from cloud.hub.ownership import Elsewhere, Ownership, OwnershipUnavailable
from cloud.hub.streams import NodeStreams
from cloud.hub.watermarks import WatermarkStore
from edge.websocket import websocket_url

log = logging.getLogger("cloud.hub")


class OwnershipGate:
    def __init__(
        self,
        ownership: Ownership,
        streams: NodeStreams,
        watermarks: WatermarkStore | None,
        metrics: HubMetrics,
    ) -> None:
        self.ownership = ownership
        self.streams = streams
        self.watermarks = watermarks
        self.metrics = metrics

    async def claim(self, node: str, request: WebSocketRequest, remote: str) -> bool:
        """Whether this replica serves ``node`` now; if not, the edge has been told where to go
        or when to come back. On True the caller must ``unclaim`` when the connection ends."""
        try:
            verdict = await self.ownership.claim(node)
        except OwnershipUnavailable as exc:
            log.warning(
                "cannot settle who serves the node", extra={"node": node, "error": str(exc)}
            )
            await self._unavailable(request)
            return False
        if isinstance(verdict, Elsewhere):
            self.streams.pop(node, None)
            self.metrics.rejected.labels("elsewhere").inc()
            location = websocket_url(verdict.url)
            log.info(
                "node served by another replica, redirecting",
                extra={"node": node, "remote": remote, "replica": verdict.replica, "to": location},
            )
            await request.reject(
                307,
                extra_headers=[
                    (b"Location", location.encode()),
                    (b"Retry-After", str(verdict.retry_after_s).encode()),
                ],
                body=f"node {node} is served by {verdict.url}\n".encode(),
            )
            return False
        if verdict.continuous and node in self.streams:
            return True
        # Another replica may have served the node since this one did: its stream in memory
        # is stale, and its watermark in Kubernetes is the truth.
        self.streams.pop(node, None)
        if self.watermarks is not None:
            try:
                mark = await self.watermarks.load_node(node)
            except (ApiError, httpx2.TransportError) as exc:
                self.ownership.unclaim(node)
                log.warning(
                    "cannot read the node's watermark", extra={"node": node, "error": str(exc)}
                )
                await self._unavailable(request)
                return False
            log.info(
                "serving node from its persisted watermark",
                extra={"node": node, "acked": mark.acked if mark else None},
            )
        return True

    def unclaim(self, node: str) -> None:
        self.ownership.unclaim(node)

    async def _unavailable(self, request: WebSocketRequest) -> None:
        self.metrics.rejected.labels("unavailable").inc()
        await request.reject(
            503,
            extra_headers=[(b"Retry-After", b"2")],
            body=b"outpost-cloud cannot reach Kubernetes\n",
        )
