"""Keeps the pods that run equal to the pods that should: one supervisor per desired pod.

The desired pods come from a ``source``: the store (what the cloud sent) or, in standalone mode,
a folder of manifests. After an agent restart the same supervisors start again and adopt the
containers that kept running; runc containers of pods no longer desired are removed.

A pod whose ``metadata.deletionTimestamp`` is set, or that disappears from the source, is
stopped gracefully, within ``metadata.deletionGracePeriodSeconds`` when the deletion set one.
Its supervisor's last report says ``stopped: true``, which lets the cloud remove the Pod. A
pod that arrives already being deleted and that nothing here runs (created and deleted while
the node was offline) gets that report too, once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from edge.pods import process
from edge.pods.cni import CniError
from edge.pods.network import PodNetworkError
from edge.pods.resolver import referenced_objects
from edge.pods.runc import RuncError
from edge.pods.status import SUMMARY_STATE, ContainerStatus, PodRuntime, pod_status
from edge.pods.supervisor import ANNOTATION_POD, PodSupervisor, Services, container_hash
from edge.pods.volumes import VolumeError
from edge.wire.keys import TOKEN_KIND, pod_key

log = logging.getLogger("edge.pods")

Source = Callable[[], Awaitable[dict[str, dict[str, Any]]]]  # uid -> pod


class PodManager:
    def __init__(self, services: Services, source: Source) -> None:
        self.s = services
        self.source = source
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
            namespace, _, rest = key.partition("/")
            kind, _, name = rest.partition("/")
            if kind in ("ConfigMap", "Secret", TOKEN_KIND):
                changed.add((namespace, kind, name))
        if not changed:
            return
        for supervisor in list(self.supervisors.values()):
            namespace = supervisor.pod["metadata"].get("namespace", "default")
            uses = {(namespace, kind, name) for kind, name in referenced_objects(supervisor.pod)}
            if uses & changed:
                supervisor.objects_changed()

    async def run(self, resync_s: float = 5.0) -> None:
        process.become_subreaper()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reap)
            await self._remove_orphans()
            while True:
                self._wake = trio.Event()
                await self.reconcile()
                self.adopted_ready.set()
                with trio.move_on_after(resync_s):
                    await self._wake.wait()

    async def _reap(self) -> None:
        while True:
            await trio.sleep(1)
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
    spec = pod.get("spec", {})
    containers = (*spec.get("initContainers", []), *spec.get("containers", []))
    return [container_hash(c) for c in containers]
