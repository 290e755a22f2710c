"""Keeps the pods that run equal to the pods that should: one supervisor per desired pod.

The desired pods are read from a ``source``: the store, where the hub (joined) or the manifest
folder (standalone) wrote them (``store_pods``). The manager follows the store's change feed: a
changed Pod makes it reconcile, a changed ConfigMap, Secret or token reaches the pods that use
it, and the link coming back online makes every pod report again. A full reconcile also runs
every ``RESYNC_S`` as a safety net for what the feed cannot see (a store restored or edited by
another process). After an agent restart the same supervisors start again and adopt the
containers that kept running; runc containers of pods no longer desired are removed. Every
``IMAGE_GC_S`` the images no pod here uses are collected, least recently used first.

A pod whose ``metadata.deletionTimestamp`` is set, or that disappears from the source, is
stopped gracefully, within ``metadata.deletionGracePeriodSeconds`` when the deletion set one.
Its supervisor's last report says ``stopped: true``, which lets the cloud remove the Pod. A
pod that arrives already being deleted and that nothing here runs (created and deleted while
the node was offline) gets that report too, once.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from edge.hub.link import LINK_STATE_KEY, LinkWatch
from edge.pods import process
from edge.pods.cni import CniError
from edge.pods.containers import all_containers
from edge.pods.network import PodNetworkError
from edge.pods.resolver import referenced_objects
from edge.pods.runc import RuncError
from edge.pods.runtime import Objects
from edge.pods.status import SUMMARY_STATE, ContainerStatus, PodRuntime, pod_status
from edge.pods.status import summary as pod_status_summary
from edge.pods.supervisor import ANNOTATION_POD, PodSupervisor, Services, container_hash
from edge.pods.volumes import VolumeError
from edge.store.aio import AsyncStore
from edge.store.feed import Changes
from edge.upstream import Upstream
from edge.wire.keys import TOKEN_KIND, pod_key, split_key

log = logging.getLogger("edge.pods")

Source = Callable[[], Awaitable[dict[str, dict[str, Any]]]]  # uid -> pod
OBJECT_KINDS = ("ConfigMap", "Secret", TOKEN_KIND)
RESYNC_S = 300.0
IMAGE_GC_S = 600.0
REAP_SWEEP_S = 60.0


def store_pods(aio: AsyncStore, node: str) -> Source:
    """Pods in the store bound to ``node`` (or to no node), by uid."""

    async def source() -> dict[str, dict[str, Any]]:
        rows = await aio.run(aio.store.list, "Pod")
        pods = {}
        for _, _, pod in rows:
            if pod.get("spec", {}).get("nodeName") in (None, "", node):
                pods[pod["metadata"]["uid"]] = pod
        return pods

    return source


def store_objects(aio: AsyncStore) -> Objects:
    """ConfigMaps and Secrets from the store, for volumes and env."""

    async def objects(kind: str, namespace: str) -> dict[str, dict[str, Any]]:
        rows = await aio.run(aio.store.list, kind)
        prefix = f"{namespace}/{kind}/"
        return {key[len(prefix) :]: body for key, _, body in rows if key.startswith(prefix)}

    return objects


async def report_status(upstream: Upstream, key: str, body: dict[str, Any]) -> None:
    """A pod's status report, and its summary for ``outpost status`` (gone once it stopped)."""
    summary = None if body.get("stopped") else pod_status_summary(key, body)
    await upstream.status(key, body, SUMMARY_STATE + body["uid"], summary)


class PodManager:
    """``follow`` is the store whose change feed the manager follows (see the module
    docstring); without it, ``changed``, ``objects_changed`` and ``report_again`` are called
    by whoever changes the source."""

    def __init__(
        self, services: Services, source: Source, follow: AsyncStore | None = None
    ) -> None:
        self.s = services
        self.source = source
        self.follow = follow
        self.supervisors: dict[str, PodSupervisor] = {}
        self.stopping: set[str] = set()
        # Deleted pods whose stop the cloud has been told of, so that it is told once.
        self.confirmed: set[str] = set()
        self._wake = trio.Event()
        self.adopted_ready = trio.Event()

    def changed(self) -> None:
        """The source may have changed: reconcile soon."""
        self._wake.set()

    def report_again(self) -> None:
        """Every pod reports its status again, changed or not (the link is back)."""
        for supervisor in list(self.supervisors.values()):
            supervisor.report_again()

    def objects_changed(self, keys: Iterable[str]) -> None:
        """Store keys (``ns/Kind/name``) that changed: the pods using one of them rewrite their
        volumes and retry a start that waited for it."""
        changed = set()
        for key in keys:
            namespace, kind, name = split_key(key)
            if kind in OBJECT_KINDS:
                changed.add((namespace, kind, name))
        if not changed:
            return
        for supervisor in list(self.supervisors.values()):
            namespace = supervisor.pod["metadata"].get("namespace", "default")
            uses = {(namespace, kind, name) for kind, name in referenced_objects(supervisor.pod)}
            if uses & changed:
                supervisor.objects_changed()

    async def run(self, resync_s: float = RESYNC_S) -> None:
        process.become_subreaper()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reap)
            if self.follow is not None:
                await nursery.start(self._follow, self.follow)
            await self._remove_orphans()
            nursery.start_soon(self._collect_images)
            while True:
                self._wake = trio.Event()
                await self.reconcile()
                self.adopted_ready.set()
                with trio.move_on_after(resync_s):
                    await self._wake.wait()

    async def _follow(
        self, aio: AsyncStore, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        link = LinkWatch()
        with aio.feed.subscribe() as feed:
            task_status.started()
            async for changes in feed:
                self._act_on(changes)
                if changes.state_changed(LINK_STATE_KEY) and link.update(
                    await aio.get_state(LINK_STATE_KEY)
                ):
                    # The node lifecycle controller may have marked the pods not ready while
                    # the node was away.
                    self.report_again()

    def _act_on(self, changes: Changes) -> None:
        if changes.touches("Pod"):
            self.changed()
        if changes.everything:
            for supervisor in list(self.supervisors.values()):
                supervisor.objects_changed()
        else:
            self.objects_changed(changes.kinds(*OBJECT_KINDS))

    async def _collect_images(self) -> None:
        """Keep images within their disk budget: those no pod here uses go, least recent
        first."""
        while True:
            await trio.sleep(IMAGE_GC_S)
            in_use = {
                c.get("image", "")
                for supervisor in list(self.supervisors.values())
                for c in all_containers(supervisor.pod)
            }
            result = await trio.to_thread.run_sync(self.s.runtime.images.gc, in_use)
            if result.removed_images or result.removed_blobs:
                log.info(
                    "images collected",
                    extra={
                        "images": len(result.removed_images),
                        "freed_bytes": result.freed_bytes,
                    },
                )

    async def _reap(self) -> None:
        """Reap runc's orphaned helpers as they end: each exit (or a zombie reparented to us)
        sends SIGCHLD. Signals merge, so each one reaps all there are, and a slow sweep covers
        a signal lost before this task started."""
        with trio.open_signal_receiver(signal.SIGCHLD) as exits:
            while True:
                with trio.move_on_after(REAP_SWEEP_S):
                    await exits.__anext__()
                await trio.to_thread.run_sync(process.reap_runc_orphans)

    async def reconcile(self) -> None:
        pods = await self.source()
        desired = {uid: pod for uid, pod in pods.items() if not _deleting(pod)}
        deleting = {uid: pod for uid, pod in pods.items() if _deleting(pod)}
        for uid, supervisor in list(self.supervisors.items()):
            pod = desired.get(uid)
            if uid in self.stopping or (
                pod is not None and _hashes(pod) == _hashes(supervisor.pod)
            ):
                continue
            # Gone, being deleted, or changed: stop it in the background (a grace period must
            # not hold up other pods); a changed pod starts again once it has stopped.
            self.stopping.add(uid)
            grace = _grace_s(deleting.get(uid))
            log.info(
                "stopping pod",
                extra={"pod": supervisor.key, "changed": pod is not None, "grace_s": grace},
            )
            self._nursery.start_soon(self._stop, uid, supervisor, grace, uid in deleting)
        self.confirmed.intersection_update(deleting)
        for uid, pod in deleting.items():
            if uid not in self.supervisors and uid not in self.confirmed:
                await self._confirm_never_ran(uid, pod)
        for uid, pod in desired.items():
            if uid not in self.supervisors:
                supervisor = PodSupervisor(self.s, pod)
                log.info("pod admitted", extra={"pod": supervisor.key, "uid": uid})
                self.supervisors[uid] = supervisor
                self._nursery.start_soon(supervisor.run)

    async def _stop(
        self, uid: str, supervisor: PodSupervisor, grace_s: float | None, deleting: bool
    ) -> None:
        try:
            await supervisor.stop(grace_s)
            if deleting:
                # Its own last report said stopped.
                self.confirmed.add(uid)
        finally:
            del self.supervisors[uid]
            self.stopping.discard(uid)
            self.changed()

    async def _confirm_never_ran(self, uid: str, pod: dict[str, Any]) -> None:
        spec = pod.get("spec", {})
        rt = PodRuntime(restart_policy=spec.get("restartPolicy", "Always"))
        rt.containers = [
            ContainerStatus(c["name"], c.get("image", "")) for c in spec.get("containers", [])
        ]
        await self.s.report(pod_key(pod), {"uid": uid, "status": pod_status(rt), "stopped": True})
        self.confirmed.add(uid)
        log.info("deleted pod confirmed stopped", extra={"pod": pod_key(pod), "uid": uid})

    async def _remove_orphans(self) -> None:
        """Pods no longer wanted (removed while the agent was down, or being deleted when an
        earlier agent stopped, their grace period run out meanwhile): their runc containers
        are removed and the pods torn down (mounts, network, directory, cgroups)."""
        pods = await self.source()
        leftovers: dict[str, dict[str, Any]] = {}
        for state in await self.s.runc.list():
            uid = state.annotations.get(ANNOTATION_POD)
            pod = pods.get(uid or "")
            if uid is None or (pod is not None and not _deleting(pod)):
                continue
            log.info("removing orphaned container", extra={"id": state.id, "pod_uid": uid})
            try:
                await self.s.runc.delete(state.id, force=True)
            except RuncError as exc:
                log.warning("cannot remove container", extra={"id": state.id, "error": str(exc)})
            leftovers[uid] = pod if pod is not None else _stub(uid)
        # Pods whose containers were already gone when an earlier agent stopped mid-teardown
        # (or crashed) still hold their mounts, network and directory.
        pod_dirs = self.s.data_dir / "pods"
        found = await trio.to_thread.run_sync(
            lambda: [d.name for d in pod_dirs.iterdir()] if pod_dirs.is_dir() else []
        )
        for uid in found:
            pod = pods.get(uid)
            if uid not in leftovers and (pod is None or _deleting(pod)):
                leftovers[uid] = pod if pod is not None else _stub(uid)
        for uid, pod in leftovers.items():
            try:
                await self.s.runtime.teardown(pod)
            except (VolumeError, PodNetworkError, CniError, OSError) as exc:
                log.warning("cannot tear down pod", extra={"pod_uid": uid, "error": str(exc)})
                continue
            await self.s.save_state(f"pod/{uid}", None)
            await self.s.save_state(SUMMARY_STATE + uid, None)


def _stub(uid: str) -> dict[str, Any]:
    """What teardown needs of a pod no source knows any more: its uid. Its network, if it had
    one of its own, is found by uid; a host-network pod has none to remove."""
    return {"metadata": {"uid": uid}, "spec": {}}


def _deleting(pod: dict[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _grace_s(pod: dict[str, Any] | None) -> float | None:
    """The deletion's grace period, which overrides the spec's; None to use the spec's."""
    if pod is None:
        return None
    grace = pod["metadata"].get("deletionGracePeriodSeconds")
    return None if grace is None else max(0.0, float(grace))


def _hashes(pod: dict[str, Any]) -> list[str]:
    return [container_hash(c) for c in all_containers(pod)]
