"""Probe rules as kubelet has them, and the three probe kinds against real local targets."""

from __future__ import annotations

import pytest
import trio

from edge.pods.probes import ProbeSpec, ProbeState, Target, run_probe


def state(kind: str, **probe: int) -> ProbeState:
    return ProbeState(ProbeSpec.from_container(kind, probe))


def test_readiness_starts_failed_and_needs_its_success_threshold() -> None:
    s = state("readiness", successThreshold=2, failureThreshold=2)
    assert s.passing is False
    assert not s.record(True)
    assert s.record(True)
    assert s.passing is True
    assert not s.record(False)
    assert s.record(False)
    assert s.passing is False


def test_liveness_starts_passing_and_fails_after_the_failure_threshold() -> None:
    s = state("liveness", failureThreshold=3, successThreshold=5)
    assert s.spec.success_threshold == 1  # only readiness may ask for more
    assert s.passing is True
    for _ in range(2):
        assert not s.record(False)
    s.record(True)  # a success resets the count
    for _ in range(2):
        assert not s.record(False)
    assert s.record(False)
    assert s.passing is False


def test_startup_is_unknown_until_it_passes() -> None:
    s = state("startup")
    assert s.passing is None
    assert s.record(True)
    assert s.passing is True


async def _exit_code(argv: list[str]) -> int:
    return (await trio.run_process(argv, check=False)).returncode


TARGET = Target("127.0.0.1", _exit_code)


async def test_exec_probe_passes_on_exit_code_zero() -> None:
    ok = ProbeSpec("liveness", {"exec": {"command": ["true"]}})
    bad = ProbeSpec("liveness", {"exec": {"command": ["false"]}})
    assert (await run_probe(ok, TARGET, {}))[0]
    assert (await run_probe(bad, TARGET, {})) == (False, "exit code 1")


async def test_tcp_probe_connects_or_fails(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(trio.serve_tcp, lambda s: s.aclose(), 0)
    port = listeners[0].socket.getsockname()[1]
    named = ProbeSpec("readiness", {"tcpSocket": {"port": "web"}})
    assert (await run_probe(named, TARGET, {"web": port}))[0]
    closed = ProbeSpec("readiness", {"tcpSocket": {"port": 1}})
    assert not (await run_probe(closed, TARGET, {}))[0]


async def test_http_probe_judges_the_status_code(nursery: trio.Nursery) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(4096)
        status = b"200 OK" if b"GET /ok " in request else b"500 Oops"
        await stream.send_all(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, serve, 0)
    port = listeners[0].socket.getsockname()[1]
    ok = ProbeSpec("liveness", {"httpGet": {"path": "/ok", "port": port}})
    bad = ProbeSpec("liveness", {"httpGet": {"path": "/bad", "port": port}})
    assert (await run_probe(ok, TARGET, {}))[0]
    result = await run_probe(bad, TARGET, {})
    assert result[0] is False
    assert "HTTP 500" in result[1]


async def test_a_slow_probe_times_out() -> None:
    slow = ProbeSpec("liveness", {"exec": {"command": ["sleep", "5"]}}, timeout_s=0.2)
    assert await run_probe(slow, TARGET, {}) == (False, "timed out after 0.2 s")


@pytest.mark.parametrize("handler", [{}, {"grpc": {"port": 1}}])
async def test_an_unsupported_handler_fails_with_a_reason(handler: dict) -> None:
    assert "not supported" in (await run_probe(ProbeSpec("liveness", handler), TARGET, {}))[1]
