"""One pod, from admission to removal: sandbox, volumes, images, init containers, containers
with their restarts and probes, status reports, graceful stop, and adoption after an agent
restart.

A ``PodSupervisor`` is a trio task. Cancelling it (the agent stops or restarts) leaves every
container running: only ``stop`` (the pod was deleted) stops them. What it must find again
after a restart is kept in the store's local state under ``pod/<uid>``.

Besides status reports it emits the kubelet's events (Pulling, Pulled, Created, Started,
Killing, BackOff, Unhealthy, Failed) through ``Services.event``. They go through a small
bounded queue so that a slow outbox never holds up a container; when it is full (an event
storm) further events are dropped and logged. A crash loop repeats its BackOff event at
each restart, as the kubelet does: the cloud aggregates repeats.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from edge.pods import logs, process
from edge.pods.probes import ProbeSpec, ProbeState, Target, probe_forever
from edge.pods.resolver import ContainerConfigError
from edge.pods.runc import ContainerNotFound, Runc, RuncError
from edge.pods.status import (
    ContainerStatus,
    CrashLoop,
    PodRuntime,
    now_rfc3339,
    pod_status,
    should_restart,
)
from edge.pods.volumes import VolumeError
from edge.wire.keys import pod_key

log = logging.getLogger("edge.pods")

ANNOTATION_POD = "io.outpost.pod-uid"
ANNOTATION_CONTAINER = "io.outpost.container"
DEFAULT_GRACE_S = 30
EVENT_QUEUE = 64
# Waiting reasons that mean the image could not be pulled: their retries are "Back-off
# pulling image" events rather than a crash loop's.
_PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff")


def container_hash(container: dict[str, Any]) -> str:
    """Changes when the container's spec does, which restarts it (as kubelet does)."""
    return hashlib.sha256(json.dumps(container, sort_keys=True).encode()).hexdigest()[:16]


async def _no_events(key: str, body: dict[str, Any]) -> None:
    pass


@dataclass
class Services:
    """What every pod supervisor shares.

    ``report(key, body)`` queues a pod's status report; ``event(key, body)`` one event, whose
    body is the wire contract's (uid, reason, message, type, fieldPath, time).
    ``volume_resync_s`` is how often a running pod's ConfigMap, Secret and projected volumes
    are rewritten from the store even when nobody said they changed (the kubelet's resync).
    """

    data_dir: Path
    runc: Runc
    runtime: Any  # edge.pods.runtime.ContainerRuntime: images, bundles, networks
    save_state: Callable[[str, Any], Awaitable[None]]
    load_state: Callable[[str], Awaitable[Any]]
    report: Callable[[str, dict[str, Any]], Awaitable[None]]
    event: Callable[[str, dict[str, Any]], Awaitable[None]] = field(default=_no_events)
    crash_base_s: float = 10.0
    crash_cap_s: float = 300.0
    volume_resync_s: float = 60.0
    log_max_bytes: int = logs.DEFAULT_MAX_BYTES
    log_max_files: int = logs.DEFAULT_MAX_FILES


@dataclass
class Running:
    """A container process this agent started or adopted."""

    id: str
    pid: int
    holder_pid: int
    holder_fds: tuple[int, int]
    attempt: int
    started_monotonic: float
    exit: process.Exit
    bundle: Path


class PodSupervisor:
    def __init__(self, services: Services, pod: dict[str, Any]) -> None:
        self.s = services
        self.pod = pod
        self.uid: str = pod["metadata"]["uid"]
        self.key = pod_key(pod)
        spec = pod.get("spec", {})
        self.rt = PodRuntime(restart_policy=spec.get("restartPolicy", "Always"))
        self.rt.init = [
            ContainerStatus(c["name"], c.get("image", "")) for c in spec.get("initContainers", [])
        ]
        self.rt.containers = [
            ContainerStatus(c["name"], c.get("image", "")) for c in spec.get("containers", [])
        ]
        self.running: dict[str, Running] = {}
        self.sandbox: Any = None
        self.dir = services.data_dir / "pods" / self.uid
        self._state: dict[str, Any] = {"containers": {}}
        self._report_due = trio.Event()
        # The last status reported; None to report the next one whatever it is.
        self._reported: dict[str, Any] | None = None
        self._refresh_due = trio.Event()
        self._events_in, self._events_out = trio.open_memory_channel[dict[str, Any]](EVENT_QUEUE)
        # Set once by ``stop``: from then on no container starts again.
        self._stopping = trio.Event()
        # The pauses before a restart or a retried start, each a scope that ``stop`` cancels;
        # True for those a change of the objects the pod uses cancels too.
        self._pauses: dict[trio.CancelScope, bool] = {}
        self._refreshing = trio.CancelScope()
        self._cancel = trio.CancelScope()
        self._ended: dict[str, trio.Event] = {}
        # Where the supervisor's own tasks run: reports, events, log pumps, exit watchers.
        self._nursery: trio.Nursery | None = None
        self.done = trio.Event()

    # -- state kept across agent restarts -------------------------------------------------------

    async def _save(self) -> None:
        await self.s.save_state(f"pod/{self.uid}", self._state)

    def _changed(self) -> None:
        self._report_due.set()

    def report_again(self) -> None:
        """Report the status even if unchanged (the cloud may have lost track of it: the node
        was away and the node lifecycle controller marked the pod not ready)."""
        self._reported = None
        self._report_due.set()

    def objects_changed(self) -> None:
        """A ConfigMap, Secret or token the pod uses changed: rewrite its volumes, and retry a
        container start that failed for want of one without waiting out its backoff."""
        self._refresh_due.set()
        for pause, on_change in self._pauses.items():
            if on_change:
                pause.cancel()

    async def _reporter(self) -> None:
        while True:
            await self._report_due.wait()
            self._report_due = trio.Event()
            status = pod_status(self.rt)
            if status != self._reported:
                # Before the report: a report_again meanwhile must not be forgotten.
                self._reported = status
                await self.s.report(self.key, {"uid": self.uid, "status": status})
            # Coalesce bursts (a probe flip right after a start): at most 5 reports a second.
            await trio.sleep(0.2)

    # -- events ---------------------------------------------------------------------------------

    def _event(self, reason: str, message: str, container: str = "", warning: bool = False) -> None:
        body = {
            "uid": self.uid,
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "fieldPath": self._field_path(container),
            "time": now_rfc3339(),
        }
        try:
            self._events_in.send_nowait(body)
        except trio.WouldBlock:
            log.warning("event dropped", extra={"pod": self.key, "reason": reason})

    def _field_path(self, container: str) -> str:
        if not container:
            return ""
        spec = self.pod.get("spec", {})
        init = any(c["name"] == container for c in spec.get("initContainers", []))
        return f"spec.{'initContainers' if init else 'containers'}{{{container}}}"

    async def _eventer(self) -> None:
        async for body in self._events_out:
            await self.s.event(self.key, body)

    async def _flush_events(self) -> None:
        """Send what is queued now: the supervisor's tasks are about to be cancelled."""
        while True:
            try:
                body = self._events_out.receive_nowait()
            except trio.WouldBlock:
                return
            await self.s.event(self.key, body)

    # -- volumes --------------------------------------------------------------------------------

    async def _refresher(self) -> None:
        """Rewrite the volumes when their objects change and every ``volume_resync_s``, until
        the pod stops (``stop`` cancels ``_refreshing``)."""
        with self._refreshing:
            while True:
                with trio.move_on_after(self.s.volume_resync_s):
                    await self._refresh_due.wait()
                self._refresh_due = trio.Event()
                # Before a first start there is nothing to refresh: the start writes the volumes.
                if self.running:
                    await self._refresh()

    async def _refresh(self) -> None:
        try:
            await self.s.runtime.refresh_volumes(self.pod, self.sandbox)
        except (VolumeError, ContainerConfigError) as exc:
            log.warning(
                "cannot refresh volumes, keeping their files",
                extra={"pod": self.key, "error": str(exc)},
            )

    # -- running --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Bring the pod up (adopting what runs already) and keep it up, until cancelled."""
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._reporter)
                    nursery.start_soon(self._eventer)
                    nursery.start_soon(self._refresher)
                    await self._run(nursery)
        finally:
            self.done.set()

    async def _run(self, nursery: trio.Nursery) -> None:
        self._state = await self.s.load_state(f"pod/{self.uid}") or {"containers": {}}
        self.rt.start_time = self._state.setdefault("start_time", now_rfc3339())
        problem = self.s.runtime.validate(self.pod)
        if problem:
            self.rt.failure = ("Invalid", problem)
            self._changed()
            self._event("Failed", f"Error: {problem}", warning=True)
            log.warning("pod cannot run", extra={"pod": self.key, "reason": problem})
            await trio.sleep_forever()
        self.sandbox = await self.s.runtime.sandbox(self.pod, self._state)
        self.rt.pod_ip, self.rt.host_ip = self.sandbox.ip, self.sandbox.host_ip
        await self._save()
        self._changed()
        adopted = await self._adopt()
        if not adopted:
            await self._run_init_containers()
        self.rt.initialized = True
        self._changed()
        for index, container in enumerate(self.pod["spec"]["containers"]):
            self._ended[container["name"]] = trio.Event()
            nursery.start_soon(self._supervise, container, self.rt.containers[index])

    async def _adopt(self) -> bool:
        """Take over containers an earlier agent started; True when any is still running."""
        found = False
        for index, container in enumerate(self.pod["spec"]["containers"]):
            record = self._state["containers"].get(container["name"])
            if not record:
                continue
            status = self.rt.containers[index]
            status.restart_count = record.get("restart_count", 0)
            status.image_id = record.get("image_id", "")
            try:
                state = await self.s.runc.state(record["id"])
            except ContainerNotFound:
                continue
            if state.status != "running" or not process.alive(state.pid):
                continue
            pipes = process.reopen_pipes(record["holder_pid"], tuple(record["holder_fds"]))
            try:
                exit_ = process.Exit(state.pid)
            except ProcessLookupError:
                continue
            running = Running(
                record["id"],
                state.pid,
                record["holder_pid"],
                tuple(record["holder_fds"]),
                record["attempt"],
                trio.current_time() - (time.time() - record.get("started_wall", time.time())),
                exit_,
                Path(state.bundle),
            )
            self._watch(running)
            self.running[container["name"]] = running
            status.running(record["id"], record.get("started_at", now_rfc3339()))
            status.started = True
            if pipes is not None:
                self._pump(running, container, pipes)
            log.info(
                "adopted container",
                extra={"pod": self.key, "container": container["name"], "pid": state.pid},
            )
            found = True
        return found

    async def _run_init_containers(self) -> None:
        for index, container in enumerate(self.pod["spec"].get("initContainers", [])):
            status = self.rt.init[index]
            backoff = CrashLoop(self.s.crash_base_s, self.s.crash_cap_s)
            while True:
                code = await self._run_once(container, status)
                if code == 0:
                    break
                if self.rt.restart_policy == "Never":
                    self._changed()
                    await trio.sleep_forever()
                status.restart_count += 1
                delay = backoff.next_delay(0)
                if delay:
                    status.waiting(
                        "CrashLoopBackOff", f"back-off {delay:.0f}s restarting failed container"
                    )
                    self._changed()
                    self._back_off_event(container["name"], status)
                    await self._pause(delay, until_objects_change=True)

    async def _run_once(self, container: dict[str, Any], status: ContainerStatus) -> int | None:
        """Start one container, wait for it to end; its exit code (None if unknown)."""
        running = await self._start(container, status)
        if running is None:
            return 1
        code = await running.exit.wait()
        await self._finish(container, status, running, code)
        return code

    async def _supervise(self, container: dict[str, Any], status: ContainerStatus) -> None:
        try:
            await self._supervise_loop(container, status)
        finally:
            self._ended[container["name"]].set()

    async def _supervise_loop(self, container: dict[str, Any], status: ContainerStatus) -> None:
        backoff = CrashLoop(self.s.crash_base_s, self.s.crash_cap_s)
        name = container["name"]
        while not self._stopping.is_set():
            running = self.running.get(name) or await self._start(container, status)
            if running is None:
                # Could not start (image, config): retry with the same backoff.
                if status.reason in _PULL_FAILURES:
                    self._back_off_event(name, status)
                delay = backoff.next_delay(0) or self.s.crash_base_s
                await self._pause(delay, until_objects_change=True)
                continue
            ran_from = running.started_monotonic
            async with trio.open_nursery() as watchers:
                watchers.start_soon(self._probe_all, container, status, running)
                code = await running.exit.wait()
                watchers.cancel_scope.cancel()
            # The clean-up must finish even when the agent is stopping meanwhile.
            with trio.CancelScope(shield=True):
                await self._finish(container, status, running, code)
            if self._stopping.is_set() or not should_restart(self.rt.restart_policy, code):
                self._changed()
                return
            delay = backoff.next_delay(trio.current_time() - ran_from)
            status.restart_count += 1
            self._state["containers"][name]["restart_count"] = status.restart_count
            await self._save()
            if delay:
                status.waiting(
                    "CrashLoopBackOff",
                    f"back-off {delay:.0f}s restarting failed container={name} pod={self.key}",
                )
                self._changed()
                self._back_off_event(name, status)
                await self._pause(delay)

    def _back_off_event(self, name: str, status: ContainerStatus) -> None:
        if status.reason in _PULL_FAILURES:
            self._event("BackOff", f'Back-off pulling image "{status.image}"', name, warning=True)
        else:
            meta = self.pod["metadata"]
            self._event(
                "BackOff",
                f"Back-off restarting failed container {name} in pod"
                f" {meta['name']}_{meta.get('namespace', 'default')}({self.uid})",
                name,
                warning=True,
            )

    async def _pause(self, seconds: float, *, until_objects_change: bool = False) -> None:
        """Sleep before a restart, cut short by a stop; with ``until_objects_change`` (before
        retrying a start that failed) also by a change of the objects the pod uses: the
        ConfigMap it waited for may have arrived."""
        if self._stopping.is_set():
            return
        with trio.CancelScope() as pause:
            self._pauses[pause] = until_objects_change
            try:
                await trio.sleep(seconds)
            finally:
                del self._pauses[pause]

    async def _probe_all(
        self, container: dict[str, Any], status: ContainerStatus, running: Running
    ) -> None:
        probes = {
            kind: ProbeSpec.from_container(kind, container[f"{kind}Probe"])
            for kind in ("startup", "liveness", "readiness")
            if container.get(f"{kind}Probe")
        }
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if p.get("name")}

        async def exec_in(argv: list[str]) -> int:
            return (await self.s.runc.exec(running.id, argv)).exit_code

        target = Target(self.sandbox.probe_ip, exec_in)
        if "readiness" not in probes:
            status.ready = True
            self._changed()
        startup_done = trio.Event()
        if "startup" not in probes:
            startup_done.set()
            status.started = True

        def changed(state: ProbeState, why: str) -> None:
            kind = state.spec.kind
            if kind == "startup" and state.passing:
                status.started = True
                startup_done.set()
            elif kind == "readiness":
                status.ready = bool(state.passing)
            elif state.passing is False:
                log.info(
                    "probe failed, restarting container",
                    extra={
                        "pod": self.key,
                        "container": container["name"],
                        "probe": kind,
                        "why": why,
                    },
                )
                self._event(
                    "Killing",
                    f"Container {container['name']} failed {kind} probe, will be restarted",
                    container["name"],
                )
                nursery.start_soon(self._kill, running, signal.SIGKILL)
            self._changed()

        def failed(state: ProbeState, why: str) -> None:
            # One event per failed probe, as the kubelet: a passing probe says nothing.
            self._event(
                "Unhealthy",
                f"{state.spec.kind.capitalize()} probe failed: {why}",
                container["name"],
                warning=True,
            )

        async with trio.open_nursery() as nursery:
            if "startup" in probes:
                nursery.start_soon(
                    probe_forever,
                    ProbeState(probes["startup"]),
                    target,
                    ports,
                    changed,
                    failed,
                )
                await startup_done.wait()
            for kind in ("liveness", "readiness"):
                if kind in probes:
                    nursery.start_soon(
                        probe_forever, ProbeState(probes[kind]), target, ports, changed, failed
                    )

    async def _kill(self, running: Running, sig: signal.Signals) -> None:
        # A container that already exited cannot be signalled; that is fine.
        with contextlib.suppress(RuncError):
            await self.s.runc.kill(running.id, sig)

    # -- one container process ------------------------------------------------------------------

    async def _start(self, container: dict[str, Any], status: ContainerStatus) -> Running | None:
        name = container["name"]
        record = self._state["containers"].get(name, {})
        attempt = record.get("attempt", -1) + 1
        try:

            async def notify(reason: str, message: str) -> None:
                self._event(reason, message, name)

            prepared = await self.s.runtime.prepare(
                self.pod, container, self.sandbox, attempt, status, notify
            )
        except Exception as exc:  # any failure to prepare is reported in the pod's status
            reason = getattr(exc, "reason", "CreateContainerError")
            status.waiting(reason, str(exc))
            self._changed()
            if reason in _PULL_FAILURES:
                message = f'Failed to pull image "{status.image}": {exc}'
            else:
                message = f"Error: {exc}"
            self._event("Failed", message, name, warning=True)
            log.warning(
                "cannot start container",
                extra={"pod": self.key, "container": name, "reason": reason, "error": str(exc)},
            )
            return None
        container_id = f"{self.uid}-{name}"
        await self.s.runc.delete(container_id, force=True)
        pipes = process.open_pipes()
        try:
            pid = await self.s.runc.create(
                container_id,
                prepared.bundle,
                stdout=pipes.stdout_write,
                stderr=pipes.stderr_write,
                pid_file=prepared.bundle / "container.pid",
            )
        except RuncError as exc:
            for fd in (pipes.stdout_read, pipes.stderr_read):
                os.close(fd)
            status.waiting("RunContainerError", exc.detail)
            self._changed()
            self._event("Failed", f"Error: {exc.detail}", name, warning=True)
            return None
        finally:
            for fd in (pipes.stdout_write, pipes.stderr_write):
                with contextlib.suppress(OSError):
                    os.close(fd)
        holder_pid = await process.hold(pipes, pid)
        holder_fds = (pipes.stdout_read, pipes.stderr_read)
        running = Running(
            container_id,
            pid,
            holder_pid,
            holder_fds,
            attempt,
            trio.current_time(),
            process.Exit(pid),
            prepared.bundle,
        )
        self._watch(running)
        self._pump(running, container, (pipes.stdout_read, pipes.stderr_read))
        self._event("Created", f"Created container {name}", name)
        # Created after stop looked for containers to stop: it must not run.
        if self._stopping.is_set():
            await self._kill(running, signal.SIGKILL)
        await self.s.runc.start(container_id)
        self._event("Started", f"Started container {name}", name)
        started_at = now_rfc3339()
        status.image_id = prepared.image_id
        status.running(container_id, started_at)
        # Without a readiness probe a running container is ready, in the same report.
        status.ready = not container.get("readinessProbe")
        status.started = not container.get("startupProbe")
        self.running[name] = running
        self._state["containers"][name] = {
            "id": container_id,
            "attempt": attempt,
            "holder_pid": holder_pid,
            "holder_fds": list(holder_fds),
            "started_at": started_at,
            "started_wall": time.time(),
            "restart_count": status.restart_count,
            "image_id": prepared.image_id,
            "hash": container_hash(container),
        }
        await self._save()
        self._changed()
        log.info("container started", extra={"pod": self.key, "container": name, "pid": pid})
        return running

    def _watch(self, running: Running) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(running.exit.watch)

    def _pump(self, running: Running, container: dict[str, Any], fds: tuple[int, int]) -> None:
        assert self._nursery is not None
        path = self.s.runtime.log_path(self.pod, container["name"], running.attempt)
        log_file = logs.LogFile(path, self.s.log_max_bytes, self.s.log_max_files)

        async def pump_both() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(logs.pump, fds[0], "stdout", log_file)
                    nursery.start_soon(logs.pump, fds[1], "stderr", log_file)
            finally:
                log_file.close()

        self._nursery.start_soon(pump_both)

    async def _finish(
        self,
        container: dict[str, Any],
        status: ContainerStatus,
        running: Running,
        code: int | None,
        reason: str = "",
    ) -> None:
        name = container["name"]
        self.running.pop(name, None)
        status.terminated(code, reason or ("" if code is not None else "ContainerStatusUnknown"))
        process.stop_holder(running.holder_pid)
        try:
            await self.s.runc.delete(running.id, force=True)
        except RuncError as exc:
            log.warning("cannot delete container", extra={"id": running.id, "error": str(exc)})
        await self.s.runtime.release(running.bundle)
        self._changed()
        log.info("container exited", extra={"pod": self.key, "container": name, "code": code})

    # -- stopping -------------------------------------------------------------------------------

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop every container gracefully (preStop, SIGTERM, grace period, SIGKILL), then
        remove the sandbox and the pod's files. Its logs stay."""
        self._stopping.set()
        self._refreshing.cancel()
        for pause in self._pauses:
            pause.cancel()
        spec = self.pod.get("spec", {})
        grace = (
            spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
            if grace_s is None
            else grace_s
        )
        deadline = trio.current_time() + grace
        async with trio.open_nursery() as nursery:
            for container in spec.get("containers", []):
                running = self.running.get(container["name"])
                if running is not None:
                    nursery.start_soon(self._stop_one, container, running, deadline)
        # Each container's supervisor records its exit and cleans up before ending.
        with trio.move_on_after(10):
            for ended in self._ended.values():
                await ended.wait()
        # The reporter goes first: a status it is still writing must not land after (and, the
        # outbox coalescing by key, replace) the report that says the pod stopped.
        self._cancel.cancel()
        await self.done.wait()
        await self._flush_events()
        await self.s.report(
            self.key, {"uid": self.uid, "status": pod_status(self.rt), "stopped": True}
        )
        if self.sandbox is not None:
            await self.s.runtime.teardown(self.pod)
        await self.s.save_state(f"pod/{self.uid}", None)
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _stop_one(self, container: dict[str, Any], running: Running, deadline: float) -> None:
        self._event("Killing", f"Stopping container {container['name']}", container["name"])
        pre_stop = (container.get("lifecycle") or {}).get("preStop")
        if pre_stop:
            with trio.move_on_at(deadline):
                if "exec" in pre_stop:
                    await self.s.runc.exec(running.id, list(pre_stop["exec"].get("command", [])))
                elif "sleep" in pre_stop:
                    await trio.sleep(pre_stop["sleep"].get("seconds", 0))
        await self._kill(running, signal.SIGTERM)
        with trio.move_on_at(deadline) as waited:
            await running.exit.wait()
        if waited.cancelled_caught:
            await self._kill(running, signal.SIGKILL)
            with trio.move_on_after(5):
                await running.exit.wait()
