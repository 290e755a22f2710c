"""Reports from edge nodes written to Kubernetes, after checking the node may write them.

- ``/Node/<node>`` status: the Node's status (``cloud.mirror.node_keeper``).
- ``namespace/Pod/name`` status: the pod's status subresource, strategic-merge-patched (so
  conditions others own, such as a readiness gate's, stay). Of several reports for one pod in a
  batch only the last is written. A report saying the pod has ``stopped`` after its deletion
  began finishes the deletion: the pod is deleted with grace period 0, for that uid only.
- Events: handed to ``cloud.mirror.kube_events``.
- ``twin`` ``namespace/Device/name``: the device's reported state, handed to
  ``cloud.devices.status`` (coalesced and rate-limited there; the latest of a batch only).
- ``telemetry`` ``namespace/Device/name``: readings, handed to the telemetry sink
  (``cloud.devices.telemetry``: MQTT, or counted and dropped).

Node authorization: a node may write its own Node, the status and events of pods bound to
it, and the twins and telemetry of devices bound to it (``spec.nodeName``); anything else is
refused and logged, and acknowledged (sending it again would not make it allowed). A write the
apiserver refuses for a lasting reason is logged and dropped; a transient failure is retried
until it succeeds or the session ends, and the report stays unacknowledged meanwhile, so the
edge keeps it. Twins are the exception: they are acknowledged once pending in the DeviceStatus
writer (``cloud.devices.status`` says why).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import httpx2
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Pod, PodStatus
from lightkube.types import PatchType

from cloud.devices.status import DeviceStatusWriter
from cloud.devices.telemetry import DropTelemetry, Reading, TelemetrySink
from cloud.kube import delete_if
from cloud.mirror.edge_index import DEVICE, DeviceEntry, EdgeIndex, PodEntry
from cloud.mirror.kube_events import EventRecorder, event_from_report
from cloud.mirror.kube_retry import retrying
from cloud.mirror.node_keeper import NodeKeeper
from edge.wire.events import Message, Op
from edge.wire.keys import NODE_PREFIX, node_key, split_key

log = logging.getLogger("cloud.mirror.kube_reports")


class Refused(Exception):
    """A node asked to write what it may not."""


class KubeReports:
    def __init__(
        self,
        kube: AsyncClient,
        index: EdgeIndex,
        nodes: NodeKeeper,
        events: EventRecorder,
        *,
        device_status: DeviceStatusWriter | None = None,
        telemetry: TelemetrySink | None = None,
        concurrency: int = 32,
    ) -> None:
        self.kube = kube
        self.index = index
        self.nodes = nodes
        self.events = events
        self.device_status = device_status or DeviceStatusWriter(kube)
        self.telemetry: TelemetrySink = telemetry or DropTelemetry()
        self.twins = 0
        self.refused = 0
        self.pod_writes = 0
        self.deleted = 0
        self._limiter = trio.CapacityLimiter(concurrency)

    async def restart(self, node: str, epoch: str) -> None:
        log.info("edge store replaced", extra={"node": node, "epoch": epoch})

    async def apply(self, node: str, messages: Sequence[Message]) -> None:
        statuses: dict[str, Message] = {}
        twins: dict[str, Message] = {}
        readings: list[Reading] = []
        for message in messages:
            if message.op == Op.STATUS:
                statuses[message.key] = message
            elif message.op == Op.EVENT:
                self._event(node, message)
            elif message.op == Op.TWIN:
                twins[message.key] = message
            elif message.op == Op.TELEMETRY:
                reading = self._reading(node, message)
                if reading is not None:
                    readings.append(reading)
        for message in twins.values():
            self._twin(node, message)
        async with trio.open_nursery() as nursery:
            for message in statuses.values():
                nursery.start_soon(self._status, node, message)
            if readings:
                nursery.start_soon(self.telemetry.publish, readings)

    def _refuse(self, node: str, message: Message, why: str) -> None:
        self.refused += 1
        log.warning(
            "report refused",
            extra={"node": node, "op": str(message.op), "key": message.key, "reason": why},
        )

    def _own_pod(self, node: str, message: Message) -> PodEntry | None:
        """The pod a report is about, if it is this node's; None when the pod is gone or is
        another one by now (a stale report). Raises Refused for another node's pod."""
        namespace, kind, name = split_key(message.key)
        if kind != "Pod" or not namespace or not name:
            raise Refused("not a pod")
        entry = self.index.pod(namespace, name)
        if entry is None:
            return None
        if entry.node != node:
            raise Refused(f"pod is bound to node {entry.node!r}")
        body = message.body if isinstance(message.body, dict) else {}
        if body.get("uid") != entry.uid:
            return None
        return entry

    def _own_device(self, node: str, message: Message) -> DeviceEntry | None:
        """The device a report is about, if it is bound to this node; None when it is gone or
        is another one by now. Raises Refused for another node's device."""
        namespace, kind, name = split_key(message.key)
        if kind != DEVICE or not namespace or not name:
            raise Refused("not a device")
        entry = self.index.device(namespace, name)
        if entry is None:
            return None
        if entry.node != node:
            raise Refused(f"device is bound to node {entry.node!r}")
        body = message.body if isinstance(message.body, dict) else {}
        if body.get("uid") != entry.uid:
            return None
        return entry

    def _twin(self, node: str, message: Message) -> None:
        try:
            entry = self._own_device(node, message)
        except Refused as exc:
            self._refuse(node, message, str(exc))
            return
        if entry is not None:
            self.twins += 1
            self.device_status.offer(node, entry.namespace, entry.name, entry.uid, message.body)

    def _reading(self, node: str, message: Message) -> Reading | None:
        try:
            entry = self._own_device(node, message)
        except Refused as exc:
            self._refuse(node, message, str(exc))
            return None
        if entry is None:
            return None
        return Reading(node, entry.namespace, entry.name, message.body)

    def _event(self, node: str, message: Message) -> None:
        try:
            entry = self._own_pod(node, message)
        except Refused as exc:
            self._refuse(node, message, str(exc))
            return
        if entry is not None:
            self.events.record(event_from_report(node, entry.namespace, entry.name, message.body))

    async def _status(self, node: str, message: Message) -> None:
        body = message.body if isinstance(message.body, dict) else {}
        async with self._limiter:
            try:
                if message.key.startswith(NODE_PREFIX):
                    await self._node_status(node, message, body)
                    return
                entry = self._own_pod(node, message)
                if entry is not None:
                    await self._pod_status(entry, body)
            except Refused as exc:
                self._refuse(node, message, str(exc))
            except (ApiError, httpx2.TransportError) as exc:
                log.warning(
                    "report not written",
                    extra={"node": node, "key": message.key, "error": str(exc)},
                )

    async def _node_status(self, node: str, message: Message, body: dict[str, Any]) -> None:
        if message.key != node_key(node):
            raise Refused("a node may write only its own Node")
        async for attempt in retrying():
            with attempt:
                await self.nodes.report(node, body)

    async def _pod_status(self, entry: PodEntry, body: dict[str, Any]) -> None:
        status = body.get("status")
        if isinstance(status, dict):
            patch = {"metadata": {"uid": entry.uid}, "status": _complete_conditions(status)}
            try:
                async for attempt in retrying():
                    with attempt:
                        await self.kube.patch(
                            PodStatus,
                            entry.name,
                            patch,
                            namespace=entry.namespace,
                            patch_type=PatchType.STRATEGIC,
                        )
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
                return
            self.pod_writes += 1
        if body.get("stopped") and entry.deleting:
            try:
                async for attempt in retrying(conflicts=False):
                    with attempt:
                        await delete_if(
                            self.kube,
                            Pod,
                            entry.name,
                            namespace=entry.namespace,
                            uid=entry.uid,
                            grace_period=0,
                        )
            except ApiError as exc:
                if exc.status.code not in (404, 409):
                    raise
                return
            self.deleted += 1
            log.info("pod deleted after the edge stopped it", extra={"pod": entry.key})


def _complete_conditions(status: dict[str, Any]) -> dict[str, Any]:
    """Conditions merge by type: a field the edge leaves out would keep the value someone
    else wrote (the node lifecycle controller's reason on Ready, say), so it is cleared."""
    conditions = status.get("conditions")
    if not isinstance(conditions, list):
        return status
    cleared = [{"reason": None, "message": None, **c} for c in conditions if isinstance(c, dict)]
    return {**status, "conditions": cleared}
