"""DeviceStatus written from the edges' twin reports, coalesced and rate-limited.

KubeEdge users saw the apiserver at 1300 % CPU from 30 devices reporting three times a second:
every report was a write. Here a report only replaces the device's pending status (latest wins),
and a device's DeviceStatus is written at most once per ``interval_s``, with all writes together
held to ``qps`` (a token bucket with a small burst). So the apiserver sees at most
``min(devices / interval_s, qps)`` writes a second however fast devices report, and the last
status written is always the last one reported.

``StatusCoalescer`` is the rule, without I/O (the caller gives the time); ``DeviceStatusWriter``
is the trio shell that writes. A twin report is acknowledged to the edge once it is pending
here, not once written: waiting for the write would hold every other report of that node (pod
status, events) behind the interval, and behind the global rate when many devices report. What
a cloud crash can lose is each device's pending status of the last interval; the edge reports
every property again each report cycle (and after every reconnect), which brings it back. A
clean stop writes what is pending first.

A DeviceStatus is named after its Device and owned by it (ownerReference), so it goes when the
Device goes. The first write creates it; later ones patch its status subresource.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.types import PatchType

from cloud import defaults
from cloud.devices import API_VERSION, DeviceStatus
from cloud.mirror.kube_events import TokenBucket
from cloud.mirror.kube_retry import transient

log = logging.getLogger("cloud.devices.status")

STATES = ("online", "offline", "unknown")
# (namespace, name) of a device
DeviceId = tuple[str, str]


# As cloud.mirror.kube_retry's (not imported: cloud.mirror imports this module, and it must not
# need cloud.mirror to be imported first).
@dataclass(frozen=True)
class PendingStatus:
    node: str
    namespace: str
    name: str
    uid: str  # the Device's
    status: dict[str, Any]

    @property
    def id(self) -> DeviceId:
        return (self.namespace, self.name)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _twin_value(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        return None
    out: dict[str, Any] = {"value": _text(value.get("value"))}
    metadata = value.get("metadata")
    if isinstance(metadata, Mapping):
        out["metadata"] = {str(k): _text(v) for k, v in metadata.items()}
    return out


def status_from_report(body: Mapping[str, Any]) -> dict[str, Any]:
    """The DeviceStatus ``status`` for a twin report, in the CRD's shape whatever the edge sent:
    unknown fields left out, values and metadata as strings (twin values are strings, as in
    KubeEdge), an unknown state as ``unknown``. A report the apiserver would refuse would be
    refused on every retry, and the device's status would never move again."""
    state = body.get("state")
    status: dict[str, Any] = {"state": state if state in STATES else "unknown"}
    if body.get("lastOnlineTime"):
        status["lastOnlineTime"] = _text(body["lastOnlineTime"])
    twins = []
    for twin in body.get("twins") or ():
        if not isinstance(twin, Mapping) or not twin.get("propertyName"):
            continue
        out: dict[str, Any] = {"propertyName": _text(twin["propertyName"])}
        for part in ("reported", "observedDesired"):
            value = _twin_value(twin.get(part))
            if value is not None:
                out[part] = value
        twins.append(out)
    status["twins"] = twins
    reasons = []
    for reason in body.get("reasons") or ():
        if isinstance(reason, Mapping):
            reasons.append(
                {k: _text(reason.get(k))[:1024] for k in ("property", "reason", "message")}
            )
    status["reasons"] = reasons
    return status


@dataclass
class StatusCoalescer:
    """Which device's status to write next, and when (no I/O).

    ``offer`` replaces a device's pending status; ``take(now)`` hands out the pending status of
    a device whose interval since its last write has passed, earliest due first; ``done`` says
    that write ended (a device is never written twice at once, so writes cannot land out of
    order). A write that failed is offered again with ``retry``, unless a newer one came."""

    interval_s: float = 2.0
    pending: dict[DeviceId, PendingStatus] = field(default_factory=dict)
    offered: int = 0
    coalesced: int = 0

    def __post_init__(self) -> None:
        self._last_write: dict[DeviceId, float] = {}
        self._heap: list[tuple[float, int, DeviceId]] = []
        self._queued: dict[DeviceId, int] = {}  # device -> its live heap entry's number
        self._counter = 0
        self._writing: set[DeviceId] = set()

    def due_at(self, device: DeviceId) -> float:
        return self._last_write.get(device, -math.inf) + self.interval_s

    def offer(self, item: PendingStatus, now: float) -> None:
        self.offered += 1
        if item.id in self.pending:
            self.coalesced += 1
        self.pending[item.id] = item
        self._queue(item.id, now)

    def retry(self, item: PendingStatus, now: float) -> None:
        if item.id not in self.pending:
            self.pending[item.id] = item
            self._queue(item.id, now)

    def forget(self, device: DeviceId) -> None:
        """The device is gone: nothing more to write (its DeviceStatus goes with it)."""
        self.pending.pop(device, None)
        self._queued.pop(device, None)
        self._last_write.pop(device, None)

    def next_due(self) -> float | None:
        while self._heap:
            due, number, device = self._heap[0]
            if self._queued.get(device) == number:
                return due
            heapq.heappop(self._heap)  # stale: written, forgotten or queued again
        return None

    def take(self, now: float) -> PendingStatus | None:
        due = self.next_due()
        if due is None or due > now:
            return None
        _, _, device = heapq.heappop(self._heap)
        del self._queued[device]
        item = self.pending.pop(device)
        self._last_write[device] = now
        self._writing.add(device)
        return item

    def done(self, device: DeviceId, now: float) -> None:
        self._writing.discard(device)
        if device in self.pending:
            self._queue(device, now)

    def _queue(self, device: DeviceId, now: float) -> None:
        if device in self._queued or device in self._writing:
            return  # already waiting its turn; ``done`` queues it after the write in progress
        self._counter += 1
        self._queued[device] = self._counter
        heapq.heappush(self._heap, (max(self.due_at(device), now), self._counter, device))


class DeviceStatusWriter:
    """Writes DeviceStatus objects from twin reports, as ``StatusCoalescer`` allows.

    ``current(namespace, name)`` gives the uid of the Device as watched now (None when it is
    gone); a status whose device is gone or was made again is not written."""

    def __init__(
        self,
        kube: AsyncClient,
        *,
        interval_s: float = defaults.DEVICE_STATUS_INTERVAL_S,
        qps: float = defaults.DEVICE_STATUS_QPS,
        burst: int = defaults.DEVICE_STATUS_BURST,
        concurrency: int = 8,
        current: Callable[[str, str], str | None] | None = None,
    ) -> None:
        self.kube = kube
        self.core = StatusCoalescer(interval_s)
        self.bucket = TokenBucket(qps, burst)
        self.qps = qps
        self.current = current
        self.writes = 0  # requests that wrote a DeviceStatus (a creation counts once more)
        self.created = 0
        self.failed = 0
        self._concurrency = concurrency
        self._wake = trio.Event()

    @property
    def coalesced(self) -> int:
        return self.core.coalesced

    @property
    def pending(self) -> int:
        return len(self.core.pending)

    def offer(
        self, node: str, namespace: str, name: str, uid: str, body: Mapping[str, Any]
    ) -> None:
        status = status_from_report(body)
        self.core.offer(PendingStatus(node, namespace, name, uid, status), trio.current_time())
        self._wake.set()

    def forget(self, namespace: str, name: str) -> None:
        self.core.forget((namespace, name))

    async def run(self) -> None:
        slots = trio.Semaphore(self._concurrency)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    now = trio.current_time()
                    due = self.core.next_due()
                    if due is None or due > now:
                        self._wake = trio.Event()
                        with trio.move_on_at(math.inf if due is None else due):
                            await self._wake.wait()
                        continue
                    if not self.bucket.take(now):
                        await trio.sleep(self.bucket.wait())
                        continue
                    await slots.acquire()
                    item = self.core.take(trio.current_time())
                    if item is None:
                        slots.release()
                        continue
                    nursery.start_soon(self._write_and_release, item, slots)
        finally:
            await self._flush()

    async def _write_and_release(self, item: PendingStatus, slots: trio.Semaphore) -> None:
        try:
            await self._write_one(item)
        finally:
            slots.release()

    async def _flush(self) -> None:
        """On a clean stop: write what is pending now, interval or not, for a few seconds."""
        if not self.core.pending:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            items = list(self.core.pending.values())
            log.info("writing pending device statuses before stopping", extra={"count": len(items)})
            for item in items:
                self.core.forget(item.id)
                await self._write_one(item)

    async def _write_one(self, item: PendingStatus) -> None:
        now = trio.current_time()
        if self.current is not None and self.current(item.namespace, item.name) != item.uid:
            self.core.done(item.id, now)
            return  # the device is gone (or another one by now)
        try:
            await self._write(item)
        except trio.Cancelled:
            self.core.retry(item, now)  # stopping: the flush writes it
            raise
        except (ApiError, httpx2.TransportError) as exc:
            self.failed += 1
            if transient(exc):
                self.core.retry(item, trio.current_time())
                log.warning(
                    "device status not written, will retry",
                    extra={"device": f"{item.namespace}/{item.name}", "error": str(exc)},
                )
            else:
                log.error(
                    "device status refused",
                    extra={"device": f"{item.namespace}/{item.name}", "error": str(exc)},
                )
        finally:
            self.core.done(item.id, trio.current_time())
            self._wake.set()

    async def _write(self, item: PendingStatus) -> None:
        patch = {"status": item.status}
        try:
            await self.kube.patch(
                DeviceStatus.Status,
                item.name,
                patch,
                namespace=item.namespace,
                patch_type=PatchType.MERGE,
            )
        except ApiError as exc:
            if exc.status.code != 404:
                raise
        else:
            self.writes += 1
            return
        await self._create(item)
        await self.kube.patch(
            DeviceStatus.Status,
            item.name,
            patch,
            namespace=item.namespace,
            patch_type=PatchType.MERGE,
        )
        self.writes += 1

    async def _create(self, item: PendingStatus) -> None:
        body = {
            "apiVersion": API_VERSION,
            "kind": "DeviceStatus",
            "metadata": {
                "name": item.name,
                "namespace": item.namespace,
                "ownerReferences": [
                    {
                        "apiVersion": API_VERSION,
                        "kind": "Device",
                        "name": item.name,
                        "uid": item.uid,
                        "controller": True,
                    }
                ],
            },
            "spec": {},
        }
        try:
            await self.kube.create(DeviceStatus.from_dict(body), namespace=item.namespace)
        except ApiError as exc:
            if exc.status.code != 409:
                raise
            return
        self.writes += 1
        self.created += 1
