"""A pod's status as Kubernetes shows it, computed from what the agent knows: pure functions.

The supervisor keeps a ``ContainerStatus`` per container (its state machine's output) and calls
``pod_status`` whenever something changed; the result goes to the outbox as the pod's status
report, which the cloud merge-patches into the Pod's status subresource.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

# Local state key prefix of each pod's last status summary, by pod uid: `outpost status` reads
# them, with or without the agent running.
SUMMARY_STATE = "pod-status/"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerStatus:
    """One container as kubelet reports it. ``state`` is waiting, running or terminated."""

    name: str
    image: str
    state: str = "waiting"
    reason: str = "ContainerCreating"
    message: str = ""
    container_id: str = ""
    image_id: str = ""
    started_at: str = ""
    finished_at: str = ""
    exit_code: int | None = None
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    last_terminated: dict[str, Any] | None = None

    def waiting(self, reason: str, message: str = "") -> None:
        self.state, self.reason, self.message, self.ready = "waiting", reason, message, False

    def running(self, container_id: str, started_at: str) -> None:
        self.state, self.reason, self.message = "running", "", ""
        self.container_id, self.started_at, self.finished_at = container_id, started_at, ""
        self.exit_code = None

    def terminated(self, exit_code: int | None, reason: str = "", message: str = "") -> None:
        code = 137 if exit_code is None else exit_code
        self.state, self.exit_code, self.ready, self.started = "terminated", code, False, False
        self.reason = reason or ("Completed" if code == 0 else "Error")
        self.message = message
        self.finished_at = now_rfc3339()
        self.last_terminated = self._terminated()

    def _terminated(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at or None,
            "finishedAt": self.finished_at or None,
            "containerID": self.container_id or None,
        }
        if self.message:
            body["message"] = self.message
        return {k: v for k, v in body.items() if v is not None}

    def to_k8s(self) -> dict[str, Any]:
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self._terminated()}
        else:
            waiting = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        body: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {},
        }
        if self.container_id:
            body["containerID"] = f"runc://{self.container_id}"
        # lastState is the termination before the current run.
        if self.last_terminated and self.state != "terminated":
            body["lastState"] = {"terminated": self.last_terminated}
        return body


@dataclass
class PodRuntime:
    """What the supervisor knows about one pod beyond its containers."""

    restart_policy: str = "Always"
    init: list[ContainerStatus] = field(default_factory=list)
    containers: list[ContainerStatus] = field(default_factory=list)
    initialized: bool = False
    pod_ip: str = ""
    host_ip: str = ""
    start_time: str = ""
    failure: tuple[str, str] | None = None  # (reason, message) when the pod cannot run at all
    deleting: bool = False


def _condition(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    condition: dict[str, Any] = {"type": kind, "status": "True" if ok else "False"}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def phase(rt: PodRuntime) -> str:
    if rt.failure is not None:
        return "Failed" if rt.failure[0] in ("Invalid", "Evicted") else "Pending"
    if any(
        c.state == "terminated" and c.exit_code and rt.restart_policy == "Never" for c in rt.init
    ):
        return "Failed"
    if not rt.initialized:
        return "Pending"
    states = [c.state for c in rt.containers]
    if any(s == "running" for s in states):
        return "Running"
    if all(s == "terminated" for s in states) and rt.restart_policy != "Always":
        codes = [c.exit_code for c in rt.containers]
        if all(code == 0 for code in codes):
            return "Succeeded"
        if rt.restart_policy == "Never":
            return "Failed"
    # Restarting between runs (CrashLoopBackOff) still counts as Running once it has run.
    if any(c.restart_count or c.state == "terminated" for c in rt.containers):
        return "Running"
    return "Pending"


def pod_status(rt: PodRuntime) -> dict[str, Any]:
    """The Pod's ``status`` as kubelet would write it."""
    ready_containers = all(c.ready for c in rt.containers) and bool(rt.containers)
    not_ready = [c.name for c in rt.containers if not c.ready]
    containers_message = f"containers with unready status: [{' '.join(not_ready)}]"
    status: dict[str, Any] = {
        "phase": phase(rt),
        "conditions": [
            _condition("PodScheduled", True),
            _condition(
                "Initialized",
                rt.initialized,
                "" if rt.initialized else "ContainersNotInitialized",
            ),
            _condition(
                "ContainersReady",
                ready_containers,
                "" if ready_containers else "ContainersNotReady",
                "" if ready_containers else containers_message,
            ),
            _condition(
                "Ready",
                ready_containers,
                "" if ready_containers else "ContainersNotReady",
                "" if ready_containers else containers_message,
            ),
        ],
        "containerStatuses": [c.to_k8s() for c in rt.containers],
    }
    if rt.init:
        status["initContainerStatuses"] = [c.to_k8s() for c in rt.init]
    if rt.failure is not None:
        status["reason"], status["message"] = rt.failure
    if rt.pod_ip:
        status["podIP"] = rt.pod_ip
        status["podIPs"] = [{"ip": rt.pod_ip}]
    if rt.host_ip:
        status["hostIP"] = rt.host_ip
        status["hostIPs"] = [{"ip": rt.host_ip}]
    if rt.start_time:
        status["startTime"] = rt.start_time
    return status


class CrashLoop:
    """kubelet's restart backoff: the first restart at once, then 10 s, doubling to 5 min;
    forgotten once a run lasts 10 min."""

    def __init__(self, base_s: float = 10.0, cap_s: float = 300.0, reset_s: float = 600.0):
        self.base_s, self.cap_s, self.reset_s = base_s, cap_s, reset_s
        self._last: float | None = None

    def next_delay(self, ran_for_s: float) -> float:
        if ran_for_s >= self.reset_s:
            self._last = None
        if self._last is None:
            self._last = 0.0
        else:
            self._last = min(self.cap_s, max(self.base_s, self._last * 2))
        return self._last


def should_restart(policy: str, exit_code: int | None) -> bool:
    if policy == "Always":
        return True
    if policy == "OnFailure":
        return exit_code != 0
    return False


def summary(key: str, report: dict[str, Any]) -> dict[str, Any]:
    """The few fields of pod ``key``'s status report that `outpost status` shows."""
    status = report.get("status", {})
    containers = status.get("containerStatuses", [])
    return {
        "pod": key,
        "phase": status.get("phase", "Unknown"),
        "ready": sum(1 for c in containers if c.get("ready")),
        "containers": len(containers),
        "restarts": sum(c.get("restartCount", 0) for c in containers),
    }
