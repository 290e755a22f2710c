"""Kubernetes Events from edge reports: rate-limited per node and aggregated.

A gateway in a crash loop must not flood the apiserver: each node has a token bucket
(``qps``, ``burst``); events over it are dropped and counted, as the kubelet's own recorder
does. An event like one written recently (same pod, reason, message and container) bumps that
Event's count instead of making a new object. Writes happen in the background: events are best
effort, and a report is acknowledged once its event is queued.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import httpx2
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Event
from lightkube.types import PatchType

from cloud import defaults

log = logging.getLogger("cloud.mirror.kube_events")

COMPONENT = "outpost"
# Recently written events remembered for aggregation.
REMEMBERED = 4096


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up (sans-IO: the caller gives the time)."""

    rate: float
    burst: float
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until a token is there, as of the last ``take``."""
        return max(0.0, (1 - self.tokens) / self.rate)


@dataclass(frozen=True)
class PodEvent:
    node: str
    namespace: str
    pod: str
    uid: str
    reason: str
    message: str
    type: str
    field_path: str
    time: str
    # The object the event is about: a pod unless said otherwise (a Device, say).
    kind: str = "Pod"
    api_version: str = "v1"

    @property
    def similar(self) -> tuple[str, ...]:
        return (self.uid, self.reason, self.message, self.field_path)


def event_from_report(node: str, namespace: str, pod: str, body: dict[str, Any]) -> PodEvent:
    kind = body.get("type") if body.get("type") in ("Normal", "Warning") else "Normal"
    return PodEvent(
        node=node,
        namespace=namespace,
        pod=pod,
        uid=str(body.get("uid", "")),
        reason=str(body.get("reason", ""))[:128],
        message=str(body.get("message", ""))[:1024],
        type=kind,
        field_path=str(body.get("fieldPath", "")),
        time=str(body.get("time") or now_rfc3339()),
    )


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class _Written:
    name: str
    count: int


@dataclass
class EventRecorder:
    kube: AsyncClient
    qps: float = defaults.EVENT_QPS
    burst: int = defaults.EVENT_BURST
    capacity: int = 1000
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    dropped: int = 0
    written: int = 0

    def __post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[PodEvent](self.capacity)
        self._recent: OrderedDict[tuple[str, ...], _Written] = OrderedDict()

    def record(self, event: PodEvent) -> bool:
        """Queue ``event`` unless its node is over its rate; True when queued."""
        bucket = self.buckets.setdefault(event.node, TokenBucket(self.qps, self.burst))
        if not bucket.take(trio.current_time()):
            self.dropped += 1
            return False
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        return True

    def forget(self, node: str) -> None:
        self.buckets.pop(node, None)

    async def run(self) -> None:
        last_dropped = 0
        async for event in self._receive:
            try:
                await self._write(event)
            except (ApiError, httpx2.TransportError) as exc:
                log.warning(
                    "cannot write event",
                    extra={"pod": f"{event.namespace}/{event.pod}", "error": str(exc)},
                )
            if self.dropped != last_dropped:
                log.warning("events over the rate limit dropped", extra={"dropped": self.dropped})
                last_dropped = self.dropped

    async def _write(self, event: PodEvent) -> None:
        written = self._recent.get(event.similar)
        if written is not None:
            written.count += 1
            self._recent.move_to_end(event.similar)
            try:
                await self.kube.patch(
                    Event,
                    written.name,
                    {"count": written.count, "lastTimestamp": event.time},
                    namespace=event.namespace,
                    patch_type=PatchType.MERGE,
                )
            except ApiError as exc:
                if exc.status.code != 404:  # the Event has expired: write a new one
                    raise
            else:
                self.written += 1
                return
        name = f"{event.pod}.{time.time_ns():x}"
        await self.kube.create(
            Event.from_dict(
                {
                    "metadata": {"name": name, "namespace": event.namespace},
                    "involvedObject": {
                        "kind": event.kind,
                        "apiVersion": event.api_version,
                        "namespace": event.namespace,
                        "name": event.pod,
                        "uid": event.uid,
                        "fieldPath": event.field_path or None,
                    },
                    "reason": event.reason,
                    "message": event.message,
                    "type": event.type,
                    "count": 1,
                    "firstTimestamp": event.time,
                    "lastTimestamp": event.time,
                    "source": {"component": COMPONENT, "host": event.node},
                    "reportingComponent": COMPONENT,
                    "reportingInstance": event.node,
                }
            )
        )
        self.written += 1
        self._recent[event.similar] = _Written(name, 1)
        if len(self._recent) > REMEMBERED:
            self._recent.popitem(last=False)
