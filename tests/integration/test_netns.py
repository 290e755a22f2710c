"""The netns fault harness (tests/netns.py) with real traffic: a trio echo server in the root
namespace on ``host_ip``, and a client process started inside the namespace with
``exec_prefix``, through a link that is cut, restored and degraded."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from tests.appliance import REQUIRE_ROOT_ENV
from tests.netns import POOL, EdgeLink, link_exists, netns_exists
from tests.processes import LineReader, start

# One connection attempt and three echoes; prints a single "connected ..." or "failed ..." line.
CLIENT = """
import socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    conn = socket.create_connection((host, port), timeout=timeout)
except OSError as error:
    print("failed", type(error).__name__, error, flush=True)
    sys.exit(0)
rtts = []
for i in range(3):
    message = f"ping {i}\\n".encode()
    began = time.monotonic()
    conn.sendall(message)
    echoed = b""
    while len(echoed) < len(message):
        echoed += conn.recv(100)
    rtts.append((time.monotonic() - began) * 1000)
    assert echoed == message, echoed
print("connected", " ".join(f"{rtt:.1f}" for rtt in rtts), flush=True)
"""


@dataclass
class Probe:
    connected: bool
    detail: str

    @property
    def rtts_ms(self) -> list[float]:
        assert self.connected, self.detail
        return [float(rtt) for rtt in self.detail.split()]


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def echo_server(nursery: trio.Nursery, host: str) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host=host))
    return listeners[0].socket.getsockname()[1]


async def probe(link: EdgeLink, host: str, port: int, *, connect_timeout: float = 1.0) -> Probe:
    """Run the client inside the link's namespace against host:port."""
    process = await start(
        *link.exec_prefix, sys.executable, "-c", CLIENT, host, str(port), str(connect_timeout)
    )
    try:
        match = await LineReader(process).wait_for(r"^(connected|failed) ?(.*)$")
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return Probe(match.group(1) == "connected", match.group(2))


async def test_link_carries_traffic_fails_while_cut_and_recovers_on_restore():
    with trio.fail_after(10), EdgeLink("netns-test") as link:
        async with trio.open_nursery() as nursery:
            port = await echo_server(nursery, link.host_ip)

            assert (await probe(link, link.host_ip, port)).connected

            link.cut()
            assert link.is_cut
            cut = await probe(link, link.host_ip, port, connect_timeout=1.0)
            assert not cut.connected
            assert cut.detail.startswith("TimeoutError"), cut.detail

            link.restore()
            assert not link.is_cut
            restored = await probe(link, link.host_ip, port)
            assert restored.connected, restored.detail

            nursery.cancel_scope.cancel()


async def test_degrade_adds_latency_and_clear_takes_it_away():
    with trio.fail_after(10), EdgeLink("netns-test") as link:
        async with trio.open_nursery() as nursery:
            port = await echo_server(nursery, link.host_ip)
            print(f"degrade backend: {link.degrade_backend}")

            assert max((await probe(link, link.host_ip, port)).rtts_ms) < 50

            link.degrade(delay_ms=100)
            # The delay applies to each direction, so a round trip gains ~200 ms.
            degraded = (await probe(link, link.host_ip, port)).rtts_ms
            assert min(degraded) >= 100, degraded

            link.clear()
            assert max((await probe(link, link.host_ip, port)).rtts_ms) < 50

            nursery.cancel_scope.cancel()


async def test_full_loss_drops_every_packet_until_cleared():
    with trio.fail_after(10), EdgeLink("netns-test") as link:
        async with trio.open_nursery() as nursery:
            port = await echo_server(nursery, link.host_ip)

            link.degrade(loss_pct=100)
            lost = await probe(link, link.host_ip, port, connect_timeout=1.0)
            assert not lost.connected
            assert lost.detail.startswith("TimeoutError"), lost.detail

            link.clear()
            assert (await probe(link, link.host_ip, port)).connected

            nursery.cancel_scope.cancel()


async def sleeper_in(link: EdgeLink) -> trio.Process:
    return await start(*link.exec_prefix, sys.executable, "-c", "import time; time.sleep(60)")


async def assert_gone(link: EdgeLink, sleeper: trio.Process) -> None:
    assert not netns_exists(link.netns)
    assert not link_exists(link.host_if)
    assert await sleeper.wait() == -9  # SIGKILLed by the cleanup, not left running


async def test_exit_removes_namespace_veth_and_processes_inside():
    with trio.fail_after(10):
        with EdgeLink("netns-test") as link:
            sleeper = await sleeper_in(link)
            link.degrade(delay_ms=10)
            assert netns_exists(link.netns)
            assert link_exists(link.host_if)
            assert link_exists(link.edge_if, netns=link.netns)
        await assert_gone(link, sleeper)


async def test_exit_cleans_up_also_when_the_body_raised():
    made: list[tuple[EdgeLink, trio.Process]] = []

    async def failing_body() -> None:
        with EdgeLink("netns-test") as link:
            made.append((link, await sleeper_in(link)))
            link.cut()
            raise RuntimeError("test body failed")

    with trio.fail_after(10):
        with pytest.raises(RuntimeError, match="test body failed"):
            await failing_body()
        await assert_gone(*made[0])


async def test_two_links_are_distinct_and_isolated():
    with trio.fail_after(10), EdgeLink("netns-test") as one, EdgeLink("netns-test") as two:
        assert one.netns != two.netns
        assert not one.subnet.overlaps(two.subnet)
        for link in (one, two):
            assert link.subnet.subnet_of(POOL)
            assert len(link.host_if) <= 15
            assert len(link.edge_if) <= 15
        async with trio.open_nursery() as nursery:
            port = await echo_server(nursery, two.host_ip)
            assert (await probe(two, two.host_ip, port)).connected
            # No default route in a namespace: one edge cannot reach the other link's host end.
            assert not (await probe(one, two.host_ip, port, connect_timeout=0.5)).connected
            nursery.cancel_scope.cancel()


def test_skips_without_root(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.delenv(REQUIRE_ROOT_ENV, raising=False)
    began = time.monotonic()
    with pytest.raises(pytest.skip.Exception, match="need root"), EdgeLink("netns-test"):
        pass
    assert time.monotonic() - began < 1


def test_fails_without_root_under_make_test(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv(REQUIRE_ROOT_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="need root"), EdgeLink("netns-test"):
        pass
