"""Liveness, readiness and startup probes: kubelet's rules as a small state machine, and the
three ways to probe (exec, httpGet, tcpSocket).

``ProbeState`` decides; ``run_probe`` performs one check; ``Prober`` loops a probe on its period
and reports changes. The rules, as kubelet has them:

- readiness starts as failed and passes after ``successThreshold`` consecutive successes;
- liveness and startup start as passing (liveness) or unknown (startup) and fail after
  ``failureThreshold`` consecutive failures, which restarts the container;
- liveness and readiness do not run until the startup probe, if any, has succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger("edge.pods.probes")


@dataclass(frozen=True)
class ProbeSpec:
    kind: str  # liveness | readiness | startup
    handler: dict[str, Any]  # the probe dict: exec / httpGet / tcpSocket (+ grpc unsupported)
    initial_delay_s: float = 0
    period_s: float = 10
    timeout_s: float = 1
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def from_container(cls, kind: str, probe: dict[str, Any]) -> ProbeSpec:
        return cls(
            kind=kind,
            handler=probe,
            initial_delay_s=probe.get("initialDelaySeconds", 0),
            period_s=probe.get("periodSeconds", 10),
            timeout_s=probe.get("timeoutSeconds", 1),
            # Kubernetes requires 1 for liveness and startup.
            success_threshold=probe.get("successThreshold", 1) if kind == "readiness" else 1,
            failure_threshold=probe.get("failureThreshold", 3),
        )


@dataclass
class ProbeState:
    spec: ProbeSpec
    passing: bool | None = field(init=False)
    successes: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        self.passing = {"readiness": False, "liveness": True, "startup": None}[self.spec.kind]

    def record(self, ok: bool) -> bool:
        """Count one result; True when ``passing`` changed."""
        before = self.passing
        if ok:
            self.successes += 1
            self.failures = 0
            if self.successes >= self.spec.success_threshold:
                self.passing = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= self.spec.failure_threshold:
                self.passing = False
        return self.passing != before


@dataclass(frozen=True)
class Target:
    """Where a probe reaches the container."""

    ip: str
    exec: Callable[[list[str]], Awaitable[int]]  # runs a command inside, returns its exit code


def _port(value: Any, ports: dict[str, int]) -> int:
    if isinstance(value, int):
        return value
    if str(value).isdigit():
        return int(value)
    if value in ports:
        return ports[value]
    raise ValueError(f"probe port {value!r} is not a number nor a named container port")


async def run_probe(spec: ProbeSpec, target: Target, ports: dict[str, int]) -> tuple[bool, str]:
    """One check; ``(ok, why)``. A timeout is a failure."""
    handler = spec.handler
    try:
        with trio.fail_after(spec.timeout_s):
            if "exec" in handler:
                code = await target.exec(list(handler["exec"].get("command", [])))
                return code == 0, f"exit code {code}"
            if "httpGet" in handler:
                get = handler["httpGet"]
                scheme = get.get("scheme", "HTTP").lower()
                host = get.get("host") or target.ip
                url = f"{scheme}://{host}:{_port(get['port'], ports)}{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                return await _http_get(url, headers)
            if "tcpSocket" in handler:
                tcp = handler["tcpSocket"]
                host = tcp.get("host") or target.ip
                stream = await trio.open_tcp_stream(host, _port(tcp["port"], ports))
                await stream.aclose()
                return True, "connected"
    except trio.TooSlowError:
        return False, f"timed out after {spec.timeout_s} s"
    except (OSError, ValueError) as exc:
        return False, str(exc) or type(exc).__name__
    return False, "no exec, httpGet or tcpSocket handler (grpc probes are not supported)"


async def _http_get(url: str, headers: dict[str, str]) -> tuple[bool, str]:
    # Imported on the first HTTP probe: a gateway without one never loads the HTTP stack (some
    # 100 modules, several MiB of the agent's memory).
    import httpx2

    try:
        # Kubernetes does not verify probe certificates.
        async with httpx2.AsyncClient(verify=False, trust_env=False) as client:
            response = await client.get(url, headers=headers)
    except httpx2.HTTPError as exc:
        return False, str(exc) or type(exc).__name__
    ok = 200 <= response.status_code < 400
    return ok, f"HTTP {response.status_code} from {url}"


async def probe_forever(
    state: ProbeState,
    target: Target,
    ports: dict[str, int],
    on_change: Callable[[ProbeState, str], None],
    on_failure: Callable[[ProbeState, str], None] | None = None,
) -> None:
    """Probe on the spec's period until cancelled; ``on_change`` hears each flip, and
    ``on_failure`` each failed check (before the flip it may cause)."""
    await trio.sleep(state.spec.initial_delay_s)
    while True:
        ok, why = await run_probe(state.spec, target, ports)
        if not ok:
            log.debug("probe failed", extra={"probe": state.spec.kind, "why": why})
            if on_failure is not None:
                on_failure(state, why)
        if state.record(ok):
            on_change(state, why)
        await trio.sleep(state.spec.period_s)
