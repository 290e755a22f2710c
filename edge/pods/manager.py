"""Keeps the pods that run equal to the pods that should: one supervisor per desired pod.

The desired pods come from a ``source``: the store (what the cloud sent) or, in standalone mode,
a folder of manifests. After an agent restart the same supervisors start again and adopt the
containers that kept running; runc containers of pods no longer desired are removed.

A pod whose ``metadata.deletionTimestamp`` is set, or that disappears from the source, is
stopped gracefully.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from edge.pods import process
from edge.pods.runc import RuncError
from edge.pods.supervisor import ANNOTATION_POD, PodSupervisor, Services, container_hash

log = logging.getLogger("edge.pods")

Source = Callable[[], Awaitable[dict[str, dict[str, Any]]]]  # uid -> pod


class PodManager:
    def __init__(self, services: Services, source: Source) -> None:
        self.s = services
        self.source = source
        self.supervisors: dict[str, PodSupervisor] = {}
        self.stopping: set[str] = set()
        self._wake = trio.Event()
        self.adopted_ready = trio.Event()

    def changed(self) -> None:
        """The source may have changed: reconcile soon."""
        self._wake.set()

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
        desired = {
            uid: pod
            for uid, pod in (await self.source()).items()
            if not pod["metadata"].get("deletionTimestamp")
        }
        for uid, supervisor in list(self.supervisors.items()):
            pod = desired.get(uid)
            if uid in self.stopping or (
                pod is not None and _hashes(pod) == _hashes(supervisor.pod)
            ):
                continue
            # Gone, being deleted, or changed: stop it in the background (a grace period must
            # not hold up other pods); a changed pod starts again once it has stopped.
            self.stopping.add(uid)
            log.info("stopping pod", extra={"pod": supervisor.key, "changed": pod is not None})
            self._nursery.start_soon(self._stop, uid, supervisor)
        for uid, pod in desired.items():
            if uid not in self.supervisors:
                supervisor = PodSupervisor(self.s, pod)
                log.info("pod admitted", extra={"pod": supervisor.key, "uid": uid})
                self.supervisors[uid] = supervisor
                self._nursery.start_soon(supervisor.run)

    async def _stop(self, uid: str, supervisor: PodSupervisor) -> None:
        try:
            await supervisor.stop()
        finally:
            del self.supervisors[uid]
            self.stopping.discard(uid)
            self.changed()

    async def _remove_orphans(self) -> None:
        """runc containers whose pod is no longer wanted (deleted while the agent was down)."""
        desired = await self.source()
        for state in await self.s.runc.list():
            uid = state.annotations.get(ANNOTATION_POD)
            if uid is None or uid in desired:
                continue
            log.info("removing orphaned container", extra={"id": state.id, "pod_uid": uid})
            try:
                await self.s.runc.delete(state.id, force=True)
            except RuncError as exc:
                log.warning("cannot remove container", extra={"id": state.id, "error": str(exc)})


def _hashes(pod: dict[str, Any]) -> list[str]:
    spec = pod.get("spec", {})
    containers = (*spec.get("initContainers", []), *spec.get("containers", []))
    return [container_hash(c) for c in containers]
