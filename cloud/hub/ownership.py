"""Which replica of outpost-cloud serves which node, kept in Kubernetes Leases.

Several replicas share the nodes without talking to each other: Kubernetes is the only thing
they share. Two kinds of ``coordination.k8s.io/v1`` Lease in ``outpost-system`` say who does what:

- ``outpost-replica-<id>``: one per replica, renewed every third of its duration. It is the
  replica's liveness: when it runs out (the replica died, or lost the apiserver), every node it
  held may be taken over.
- ``outpost-node-<node>``: one per node, naming the replica that holds the node's session
  (``holderIdentity``) and its URL (annotation ``outpost.io/replica-url``). It is written only
  when a node changes hands: taken (created, or updated with the resourceVersion read, so two
  replicas cannot both win), and released when the node's session has ended.

Per-node leases are not renewed: with thousands of nodes, renewing each one every few seconds
would be thousands of apiserver writes a second; one replica Lease carries the liveness of all
of its nodes instead. A node lease counts only while its holder's replica Lease is unexpired.

A replica that cannot renew its own Lease before it runs out stops serving its nodes
(``on_lost``) a margin before others may take them: it never serves a node another replica
serves. Expiry is judged from the holder's ``renewTime``, so replicas' clocks must agree to
well within that margin (NTP does).

A replica that takes a node back must know whether another replica served it in between: then
its memory of the node's stream is stale. It keeps the resourceVersion of its own last write to
each node lease; the same resourceVersion later means nobody else has written it since.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import os
import re
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx2
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

log = logging.getLogger("cloud.hub.ownership")

NAMESPACE = "outpost-system"
NODE_PREFIX = "outpost-node-"
REPLICA_PREFIX = "outpost-replica-"
URL_ANNOTATION = "outpost.io/replica-url"
KIND_LABEL = "outpost.io/lease"
DEFAULT_DURATION_S = 15
# A replica stops serving this long (or a quarter of its lease) before others may take its
# nodes over.
FENCE_MARGIN_S = 2.0
# Replica Leases expired this long are deleted by whichever replica notices (a restarted
# replica has a new id, so its old Lease would stay forever).
FORGET_AFTER_S = 600.0
MAX_NAME = 253
RELEASE_CONCURRENCY = 16

KubeErrors = (ApiError, httpx2.TransportError)


class OwnershipUnavailable(Exception):
    """Who owns the node cannot be settled now (apiserver unreachable, or this replica is not
    renewing its own Lease); the edge should come back shortly."""


@dataclass(frozen=True)
class Owned:
    """This replica serves the node. ``continuous``: nobody else has served it since this
    replica last did, so what it remembers of the node's stream is still true."""

    continuous: bool


@dataclass(frozen=True)
class Elsewhere:
    """Another live replica serves the node, at ``url``, for at least ``retry_after_s`` more
    seconds unless it renews its Lease (the time an edge should give it before coming back)."""

    replica: str
    url: str
    retry_after_s: int


@dataclass(frozen=True)
class ReplicaView:
    """What a replica's Lease tells the others."""

    id: str
    renewed: float | None  # POSIX seconds
    duration_s: float

    def expires_in(self, now: float) -> float:
        if self.renewed is None:
            return 0.0
        return self.renewed + self.duration_s - now


def judge(
    holder: str | None,
    url: str,
    me: str,
    my_url: str,
    replica: ReplicaView | None,
    now: float,
) -> Elsewhere | None:
    """Whether a node lease held by ``holder`` at ``url`` (whose replica Lease is ``replica``,
    None when there is none) keeps the node from ``me``: None means ``me`` may take it.

    A holder that advertises ``me``'s own URL is an earlier run of ``me`` (only one process
    can listen there): sending the edge to it would send it back here."""
    if not holder or holder == me or replica is None or not url or url == my_url:
        return None
    left = replica.expires_in(now)
    if left <= 0:
        return None
    return Elsewhere(holder, url, max(1, math.ceil(left)))


def lease_name(prefix: str, name: str) -> str:
    """``prefix + name``, shortened with a hash when that is longer than a name may be."""
    full = prefix + name
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{full[: MAX_NAME - 17]}-{digest}"


def default_replica_id() -> str:
    """``<hostname>-<pid>``, made a valid Kubernetes name."""
    return sanitize_id(f"{socket.gethostname()}-{os.getpid()}")


def sanitize_id(text: str) -> str:
    name = re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.")
    return name or "replica"


def _posix(value: dt.datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _replica_view(lease: Lease) -> ReplicaView:
    spec = lease.spec or LeaseSpec()
    return ReplicaView(
        spec.holderIdentity or "",
        _posix(spec.renewTime),
        float(spec.leaseDurationSeconds or DEFAULT_DURATION_S),
    )


class Holdings:
    """The nodes this replica holds, and until when (trio clock) its own Lease vouches for them.

    ``Ownership`` keeps it; the hub's watermark flusher reads it, to write the marks of held
    nodes only. It stands apart so that the flusher, which the ownership calls before it
    releases nodes, can be built first.
    """

    def __init__(self) -> None:
        # node -> resourceVersion of our last write to its lease, while we hold it.
        self.owned: dict[str, str] = {}
        self.valid_until = -math.inf

    def owns(self, node: str) -> bool:
        return node in self.owned and trio.current_time() < self.valid_until


class Ownership:
    """This replica's share of the nodes. ``run`` keeps its replica Lease and releases nodes
    whose sessions have ended; the hub asks ``claim`` for every connecting node, and calls
    ``unclaim`` when that connection is over.

    ``before_release(nodes)`` runs before nodes are released (the hub persists their
    watermarks there, so the next owner reads the latest); it returns False to keep them for
    now. ``on_lost(nodes)`` is called when nodes are no longer this replica's to serve.
    """

    def __init__(
        self,
        kube: AsyncClient,
        replica_id: str,
        url: str,
        *,
        namespace: str = NAMESPACE,
        duration_s: int = DEFAULT_DURATION_S,
        holdings: Holdings | None = None,
        before_release: Callable[[list[str]], Awaitable[bool]] | None = None,
        on_lost: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.kube = kube
        self.id = replica_id
        self.url = url
        self.namespace = namespace
        self.duration_s = duration_s
        self.before_release = before_release
        self.on_lost = on_lost
        self.holdings = holdings if holdings is not None else Holdings()
        # node -> resourceVersion of our last write to its lease after we released it, until
        # someone else writes it.
        self.released: dict[str, str] = {}
        self.claims: Counter[str] = Counter()
        self._lease: Lease | None = None
        self._locks: dict[str, trio.Lock] = {}
        self._forgotten_at = -math.inf

    @property
    def renew_interval_s(self) -> float:
        return self.duration_s / 3

    def owns(self, node: str) -> bool:
        return self.holdings.owns(node)

    # -- the replica Lease --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this replica's Lease until cancelled; started once it is first written."""
        await self._renew()
        log.info(
            "replica lease held",
            extra={"replica": self.id, "url": self.url, "duration_s": self.duration_s},
        )
        task_status.started()
        while True:
            wait = self.renew_interval_s
            try:
                await self._renew()
            except KubeErrors as exc:
                wait = 1.0
                log.warning(
                    "cannot renew the replica lease",
                    extra={"replica": self.id, "error": str(exc), "valid_s": self._valid_s()},
                )
            self._fence_if_lapsed()
            await self._release_idle()
            await self._forget_dead_replicas()
            # Wake in time to stop serving if renewals keep failing.
            deadline = self.holdings.valid_until - trio.current_time()
            await trio.sleep(max(0.05, min(wait, deadline)) if self.holdings.owned else wait)

    def _valid_s(self) -> float:
        return round(self.holdings.valid_until - trio.current_time(), 1)

    async def _renew(self) -> None:
        started = trio.current_time()
        now = dt.datetime.now(dt.UTC)
        lease = self._lease
        if lease is None:
            lease = Lease(
                metadata=ObjectMeta(
                    name=lease_name(REPLICA_PREFIX, self.id),
                    namespace=self.namespace,
                    labels={KIND_LABEL: "replica"},
                    annotations={URL_ANNOTATION: self.url},
                ),
                spec=LeaseSpec(
                    holderIdentity=self.id,
                    leaseDurationSeconds=self.duration_s,
                    acquireTime=now,
                    renewTime=now,
                ),
            )
            try:
                self._lease = await self.kube.create(lease)
            except ApiError as exc:
                if exc.status.code != 409:
                    raise
                # Our id was used before (a restart with --replica-id): the Lease is ours.
                self._lease = await self.kube.get(
                    Lease, lease.metadata.name, namespace=self.namespace
                )
                await self._renew()
                return
        else:
            assert lease.spec is not None
            lease.spec.renewTime = now
            lease.spec.holderIdentity = self.id
            lease.spec.leaseDurationSeconds = self.duration_s
            try:
                self._lease = await self.kube.replace(lease)
            except ApiError as exc:
                # Deleted, or changed under us: start again from what is there.
                self._lease = None
                if exc.status.code not in (404, 409):
                    raise
                await self._renew()
                return
        margin = min(FENCE_MARGIN_S, self.duration_s / 4)
        self.holdings.valid_until = started + self.duration_s - margin

    def _fence_if_lapsed(self) -> None:
        if trio.current_time() < self.holdings.valid_until or not self.holdings.owned:
            return
        lost = sorted(self.holdings.owned)
        log.error(
            "replica lease lapsed, no longer serving its nodes",
            extra={"replica": self.id, "nodes": len(lost)},
        )
        self.holdings.owned.clear()
        self.released.clear()
        if self.on_lost is not None:
            self.on_lost(lost)

    async def resign(self) -> None:
        """Give every node up at once (a clean shutdown): others may take them straight away."""
        if self._lease is None:
            return
        try:
            await self.kube.delete(Lease, self._lease.metadata.name, namespace=self.namespace)
        except KubeErrors as exc:
            log.warning("cannot delete the replica lease", extra={"error": str(exc)})
            return
        log.info(
            "replica lease deleted", extra={"replica": self.id, "nodes": len(self.holdings.owned)}
        )
        self._lease = None
        self.holdings.owned.clear()

    async def _forget_dead_replicas(self) -> None:
        now = trio.current_time()
        if now - self._forgotten_at < FORGET_AFTER_S / 10:
            return
        self._forgotten_at = now
        wall = dt.datetime.now(dt.UTC).timestamp()
        try:
            async for lease in self.kube.list(
                Lease, namespace=self.namespace, labels={KIND_LABEL: "replica"}
            ):
                view = _replica_view(lease)
                if view.id != self.id and view.expires_in(wall) < -FORGET_AFTER_S:
                    await self.kube.delete(Lease, lease.metadata.name, namespace=self.namespace)
                    log.info("forgot a dead replica's lease", extra={"replica": view.id})
        except KubeErrors as exc:
            log.info("cannot tidy replica leases", extra={"error": str(exc)})

    # -- node leases --------------------------------------------------------------------------

    def _lock(self, node: str) -> trio.Lock:
        return self._locks.setdefault(node, trio.Lock())

    async def claim(self, node: str) -> Owned | Elsewhere:
        """Take ``node`` for a connection, unless a live replica holds it. On ``Owned`` the
        caller must call ``unclaim`` once the connection is over."""
        if trio.current_time() >= self.holdings.valid_until:
            raise OwnershipUnavailable("this replica is not renewing its lease")
        async with self._lock(node):
            if self.owns(node):
                self.claims[node] += 1
                return Owned(continuous=True)
            try:
                verdict = await self._take(node)
            except KubeErrors as exc:
                raise OwnershipUnavailable(f"cannot read or write the node's lease: {exc}") from exc
            if isinstance(verdict, Owned):
                self.claims[node] += 1
            return verdict

    def unclaim(self, node: str) -> None:
        """A connection that claimed ``node`` is over; with none left, it is released soon."""
        self.claims[node] -= 1
        if self.claims[node] <= 0:
            del self.claims[node]

    async def _take(self, node: str) -> Owned | Elsewhere:
        name = lease_name(NODE_PREFIX, node)
        for _ in range(3):
            try:
                lease = await self.kube.get(Lease, name, namespace=self.namespace)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
                lease = None
            spec = lease.spec if lease is not None and lease.spec else LeaseSpec()
            holder = spec.holderIdentity
            if lease is not None and holder and holder != self.id:
                url = (lease.metadata.annotations or {}).get(URL_ANNOTATION, "")
                replica = await self._replica(holder)
                now = dt.datetime.now(dt.UTC).timestamp()
                verdict = judge(holder, url, self.id, self.url, replica, now)
                if verdict is not None:
                    # Another replica serves it: what we remember of it will be stale.
                    self.released.pop(node, None)
                    return verdict
            rv = lease.metadata.resourceVersion if lease is not None else None
            continuous = rv is not None and self.released.get(node) == rv
            try:
                written = await self._write(node, name, lease, spec)
            except ApiError as exc:
                if exc.status.code == 409:
                    continue  # someone else wrote it first; look again
                raise
            self.released.pop(node, None)
            self.holdings.owned[node] = written.metadata.resourceVersion
            if holder and holder != self.id:
                log.info("took a node over", extra={"node": node, "from": holder})
            return Owned(continuous=continuous)
        raise OwnershipUnavailable("the node's lease keeps changing")

    async def _write(self, node: str, name: str, lease: Lease | None, spec: LeaseSpec) -> Lease:
        now = dt.datetime.now(dt.UTC)
        transitions = (spec.leaseTransitions or 0) + (1 if spec.holderIdentity else 0)
        new_spec = LeaseSpec(
            holderIdentity=self.id,
            leaseDurationSeconds=self.duration_s,
            acquireTime=now,
            renewTime=now,
            leaseTransitions=transitions,
        )
        if lease is None:
            return await self.kube.create(
                Lease(
                    metadata=ObjectMeta(
                        name=name,
                        namespace=self.namespace,
                        labels={KIND_LABEL: "node"},
                        annotations={URL_ANNOTATION: self.url},
                    ),
                    spec=new_spec,
                )
            )
        lease.spec = new_spec
        annotations = lease.metadata.annotations or {}
        lease.metadata.annotations = {**annotations, URL_ANNOTATION: self.url}
        return await self.kube.replace(lease)

    async def _replica(self, replica_id: str) -> ReplicaView | None:
        try:
            lease = await self.kube.get(
                Lease, lease_name(REPLICA_PREFIX, replica_id), namespace=self.namespace
            )
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        return _replica_view(lease)

    async def _release_idle(self) -> None:
        idle = [node for node in self.holdings.owned if not self.claims.get(node)]
        if not idle or trio.current_time() >= self.holdings.valid_until:
            return
        if self.before_release is not None and not await self.before_release(idle):
            return
        limiter = trio.CapacityLimiter(RELEASE_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            for node in idle:
                nursery.start_soon(self._release, node, limiter)

    async def _release(self, node: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter, self._lock(node):
            if self.claims.get(node) or node not in self.holdings.owned:
                return  # a connection came back meanwhile
            try:
                lease = await self.kube.get(
                    Lease, lease_name(NODE_PREFIX, node), namespace=self.namespace
                )
                if lease.spec is None or lease.spec.holderIdentity != self.id:
                    self._lose([node])
                    return
                lease.spec.holderIdentity = None
                lease.spec.renewTime = dt.datetime.now(dt.UTC)
                written = await self.kube.replace(lease)
            except ApiError as exc:
                if exc.status.code in (404, 409):
                    self._lose([node])
                else:
                    log.warning("cannot release a node", extra={"node": node, "error": str(exc)})
                return
            except httpx2.TransportError as exc:
                log.warning("cannot release a node", extra={"node": node, "error": str(exc)})
                return
            del self.holdings.owned[node]
            self.released[node] = written.metadata.resourceVersion
            log.info("released a node", extra={"node": node})

    def _lose(self, nodes: Iterable[str]) -> None:
        lost = [node for node in nodes if self.holdings.owned.pop(node, None) is not None]
        for node in lost:
            self.released.pop(node, None)
        if lost:
            log.warning("nodes taken by another replica", extra={"nodes": ",".join(lost)})
            if self.on_lost is not None:
                self.on_lost(lost)
