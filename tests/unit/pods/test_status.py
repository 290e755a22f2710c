"""Pod status as kubelet computes it: phases, conditions, container states, restart backoff."""

from __future__ import annotations

import pytest

from edge.pods.status import (
    ContainerStatus,
    CrashLoop,
    PodRuntime,
    phase,
    pod_status,
    should_restart,
)


def runtime(policy: str = "Always", *states: str) -> PodRuntime:
    rt = PodRuntime(restart_policy=policy, initialized=True)
    for i, state in enumerate(states):
        c = ContainerStatus(f"c{i}", "busybox")
        if state == "running":
            c.running(f"id{i}", "2026-11-26T00:00:00Z")
        elif state.startswith("exit"):
            c.running(f"id{i}", "2026-11-26T00:00:00Z")
            c.terminated(int(state[4:]))
        rt.containers.append(c)
    return rt


@pytest.mark.parametrize(
    ("policy", "states", "expected"),
    [
        ("Always", ("waiting",), "Pending"),
        ("Always", ("running", "waiting"), "Running"),
        ("Never", ("exit0", "exit0"), "Succeeded"),
        ("Never", ("exit0", "exit1"), "Failed"),
        ("OnFailure", ("exit0",), "Succeeded"),
        ("Always", ("exit0",), "Running"),
        ("OnFailure", ("exit2",), "Running"),
    ],
)
def test_phase_follows_kubelet(policy: str, states: tuple[str, ...], expected: str) -> None:
    assert phase(runtime(policy, *states)) == expected


def test_an_uninitialized_pod_is_pending_and_a_failed_init_with_never_fails() -> None:
    rt = runtime("Never", "waiting")
    rt.initialized = False
    assert phase(rt) == "Pending"
    init = ContainerStatus("setup", "busybox")
    init.terminated(3)
    rt.init.append(init)
    assert phase(rt) == "Failed"


def test_conditions_and_container_states_read_like_kubectl_expects() -> None:
    rt = runtime("Always", "running", "running")
    rt.containers[0].ready = True
    rt.pod_ip, rt.host_ip, rt.start_time = "10.88.0.5", "192.0.2.1", "2026-11-26T00:00:00Z"
    status = pod_status(rt)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready == {
        "type": "Ready",
        "status": "False",
        "reason": "ContainersNotReady",
        "message": "containers with unready status: [c1]",
    }
    assert status["podIPs"] == [{"ip": "10.88.0.5"}]
    c0 = status["containerStatuses"][0]
    assert c0["state"] == {"running": {"startedAt": "2026-11-26T00:00:00Z"}}
    assert c0["containerID"] == "runc://id0"
    rt.containers[1].ready = True
    assert next(c for c in pod_status(rt)["conditions"] if c["type"] == "Ready")["status"] == "True"


def test_a_restarted_container_shows_its_last_termination() -> None:
    c = ContainerStatus("app", "busybox")
    c.running("a", "2026-11-26T00:00:00Z")
    c.terminated(1)
    c.restart_count = 1
    c.waiting("CrashLoopBackOff", "back-off 10s restarting failed container")
    body = c.to_k8s()
    assert body["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert body["lastState"]["terminated"]["exitCode"] == 1
    assert body["lastState"]["terminated"]["reason"] == "Error"
    assert body["restartCount"] == 1


def test_an_unknown_exit_code_is_reported_as_137() -> None:
    c = ContainerStatus("app", "busybox")
    c.terminated(None, "ContainerStatusUnknown")
    assert c.to_k8s()["state"]["terminated"]["exitCode"] == 137


def test_crash_loop_backoff_restarts_at_once_then_doubles_to_the_cap_and_resets() -> None:
    loop = CrashLoop(base_s=10, cap_s=300, reset_s=600)
    assert [loop.next_delay(1) for _ in range(8)] == [0, 10, 20, 40, 80, 160, 300, 300]
    assert loop.next_delay(601) == 0


@pytest.mark.parametrize(
    ("policy", "code", "restart"),
    [("Always", 0, True), ("OnFailure", 0, False), ("OnFailure", 1, True), ("Never", 1, False)],
)
def test_restart_policy(policy: str, code: int, restart: bool) -> None:
    assert should_restart(policy, code) is restart
