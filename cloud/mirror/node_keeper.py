"""Edge nodes as Kubernetes sees them: the Node object and its Lease.

When a node's session opens, its Node is created (or brought up to date) with the edge role
and its Ready condition set; while the session lasts, its Lease in ``kube-node-lease`` is renewed
every ``renew_interval_s``. When the session ends renewal stops, and the node lifecycle
controller notices in its own time (``--node-monitor-grace-period``) and marks the node
NotReady. That is the only signal of a lost node: Kubernetes's own controller decides, as for
any kubelet.

The edge's node report (capacity, nodeInfo, addresses, pressure conditions, labels) is written
to the Node's status when it arrives, before it is acknowledged.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import httpx2
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Node, NodeStatus
from lightkube.types import PatchType

from cloud import defaults
from cloud.mirror.edge_source import EDGE_LABEL
from cloud.mirror.kube_retry import transient
from edge.wire.events import Hello

log = logging.getLogger("cloud.mirror.node_keeper")

LEASE_NAMESPACE = "kube-node-lease"
EDGE_ROLE_LABEL = "node-role.kubernetes.io/edge"
# Labels the cloud owns on every edge node; the edge's report adds arch, os and hostname.
BASE_LABELS = {EDGE_LABEL: "true", EDGE_ROLE_LABEL: ""}
REPORT_LABELS = ("kubernetes.io/arch", "kubernetes.io/os", "kubernetes.io/hostname")
CONDITION_TYPES = ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_seconds() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_conditions(
    report: dict[str, Any] | None,
    previous: dict[str, tuple[str, str]],
    connected: bool,
    now: str,
) -> list[dict[str, Any]]:
    """The Node's conditions from the edge's report. ``previous`` maps a type to its current
    (status, lastTransitionTime) on the Node, so a transition time moves only on a change."""
    reported = {c["type"]: c for c in (report or {}).get("conditions", ()) if "type" in c}
    conditions = []
    for kind in CONDITION_TYPES:
        condition = reported.get(kind)
        if kind == "Ready" and condition is None:
            condition = {"status": "True", "reason": "OutpostReady", "message": ""}
        if kind == "Ready" and connected and condition["status"] == "True":
            condition = {**condition, "reason": condition.get("reason") or "OutpostReady"}
        if condition is None:
            continue
        status = condition.get("status", "Unknown")
        was = previous.get(kind)
        conditions.append(
            {
                "type": kind,
                "status": status,
                "reason": condition.get("reason", ""),
                "message": condition.get("message", ""),
                "lastHeartbeatTime": now,
                "lastTransitionTime": was[1] if was and was[0] == status else now,
            }
        )
    return conditions


class NodeKeeper:
    """Keeps the Node and Lease of every edge node with a session on this replica."""

    def __init__(
        self,
        kube: AsyncClient,
        *,
        renew_interval_s: float = defaults.LEASE_RENEW_INTERVAL_S,
        lease_duration_s: int = defaults.LEASE_DURATION_S,
        concurrency: int = 32,
    ) -> None:
        self.kube = kube
        self.renew_interval_s = renew_interval_s
        self.lease_duration_s = lease_duration_s
        self.online: dict[str, str] = {}  # node -> remote address
        self.reports: dict[str, dict[str, Any]] = {}
        self.node_uids: dict[str, str] = {}
        self._conditions: dict[str, dict[str, tuple[str, str]]] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._limiter = trio.CapacityLimiter(concurrency)
        self._send, self._receive = trio.open_memory_channel[str](100_000)
        self.renewals = 0

    # -- the hub's lifecycle hooks ------------------------------------------------------------

    def connected(self, node: str, hello: Hello, remote: str) -> None:
        self.online[node] = remote
        self.register(node)

    def register(self, node: str) -> None:
        """Create or update the Node of a connected node, in the background."""
        if node not in self.online:
            return
        try:
            self._send.send_nowait(node)
        except trio.WouldBlock:
            log.warning("node registration queue full", extra={"node": node})

    def disconnected(self, node: str) -> None:
        self.online.pop(node, None)

    # -- reports ------------------------------------------------------------------------------

    async def report(self, node: str, body: dict[str, Any]) -> None:
        """The edge's node report: written to the Node before this returns."""
        self.reports[node] = body
        await self.sync(node)

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._register)
            nursery.start_soon(self._renew_all)

    async def _register(self) -> None:
        async with trio.open_nursery() as nursery:
            async for node in self._receive:
                nursery.start_soon(self._register_one, node)

    async def _register_one(self, node: str) -> None:
        while node in self.online:
            try:
                async with self._limiter:
                    await self.sync(node)
                    await self.renew(node)
            except (ApiError, httpx2.TransportError) as exc:
                if not transient(exc):
                    log.error("cannot register node", extra={"node": node, "error": str(exc)})
                    return
                log.warning("cannot register node yet", extra={"node": node, "error": str(exc)})
                await trio.sleep(self.renew_interval_s)
            else:
                return

    async def _renew_all(self) -> None:
        while True:
            await trio.sleep(self.renew_interval_s)
            async with trio.open_nursery() as nursery:
                for node in list(self.online):
                    nursery.start_soon(self._renew_quietly, node)

    async def _renew_quietly(self, node: str) -> None:
        async with self._limiter:
            if node not in self.online:
                return
            try:
                await self.renew(node)
            except (ApiError, httpx2.TransportError) as exc:
                log.warning("cannot renew node lease", extra={"node": node, "error": str(exc)})

    # -- Kubernetes ---------------------------------------------------------------------------

    async def sync(self, node: str) -> None:
        """Create the Node if it is missing, then write its labels and status."""
        lock = self._locks.setdefault(node, trio.Lock())
        async with lock:
            report = self.reports.get(node)
            labels = {
                **BASE_LABELS,
                **{k: v for k, v in (report or {}).get("labels", {}).items() if k in REPORT_LABELS},
            }
            try:
                current = (await self.kube.get(Node, node)).to_dict()
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
                current = await self._create(node, labels)
            self.node_uids[node] = current["metadata"]["uid"]
            have = current["metadata"].get("labels") or {}
            if any(have.get(k) != v for k, v in labels.items()):
                await self.kube.patch(
                    Node, node, {"metadata": {"labels": labels}}, patch_type=PatchType.MERGE
                )
            if report is None:
                # Ready waits for the edge's first report (which follows its session's start at
                # once): a Node must not look schedulable before its capacity and labels are in.
                return
            previous = {
                c["type"]: (c.get("status", ""), c.get("lastTransitionTime", ""))
                for c in (current.get("status") or {}).get("conditions") or ()
            }
            status: dict[str, Any] = {
                "conditions": node_conditions(report, previous, node in self.online, now_seconds())
            }
            for field in ("capacity", "allocatable", "nodeInfo", "addresses"):
                if field in report:
                    status[field] = report[field]
            await self.kube.patch(NodeStatus, node, {"status": status}, patch_type=PatchType.MERGE)

    async def _create(self, node: str, labels: dict[str, str]) -> dict[str, Any]:
        try:
            created = await self.kube.create(
                Node.from_dict({"metadata": {"name": node, "labels": labels}, "spec": {}})
            )
        except ApiError as exc:
            if exc.status.code != 409:
                raise
            return (await self.kube.get(Node, node)).to_dict()
        log.info("node registered", extra={"node": node})
        return created.to_dict()

    async def renew(self, node: str) -> None:
        spec = {
            "holderIdentity": node,
            "leaseDurationSeconds": self.lease_duration_s,
            "renewTime": now_micro(),
        }
        try:
            await self.kube.patch(
                Lease,
                node,
                {"spec": spec},
                namespace=LEASE_NAMESPACE,
                patch_type=PatchType.MERGE,
            )
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            meta: dict[str, Any] = {"name": node, "namespace": LEASE_NAMESPACE}
            uid = self.node_uids.get(node)
            if uid:
                # As the kubelet does: the Lease goes when its Node is deleted.
                meta["ownerReferences"] = [
                    {"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}
                ]
            await self.kube.create(Lease.from_dict({"metadata": meta, "spec": spec}))
        self.renewals += 1
