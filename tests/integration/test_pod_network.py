"""Pod networking (edge/pods/network.py) with the real CNI plugins in /usr/lib/cni, real network
namespaces and real iptables: pods reach each other, the host reaches them at their IP and
through hostPorts, teardown gives everything back, and a restarted agent finds its pods.

Each test gets its own bridge, network name (so iptables comments tell its rules apart) and a
free /24 from 10.214.0.0/16 with only two addresses for pods, so running out of addresses and
getting one back can be tested. Afterwards the fixture tears down the pods a test left set up;
what that teardown leaves behind (namespaces, iptables rules) is removed too and fails the
test. The bridge is removed without complaint: CNI DEL never removes it.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from edge.pods.cni import CniError, NetworkConfig, PortMapping
from edge.pods.network import (
    CNI_PATH,
    PodNetwork,
    PodNetworkError,
    Sandbox,
    host_network_sandbox,
    node_address,
)
from tests.netns import EdgeLink, require_netns
from tests.processes import REPO, LineReader, start

TEST_POOL = ipaddress.IPv4Network("10.214.0.0/16")  # next to tests/netns.py's 10.213.0.0/16
# portmap's chains shared by every container; the per-container ones are CNI-<hash>.
SHARED_CHAINS = {"CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ"}
HELLO = "hello from pod a\n"


async def sh(*argv: str | Path, netns: str | None = None) -> str:
    full = [*(["ip", "netns", "exec", netns] if netns else []), *map(str, argv)]
    process = await trio.run_process(full, capture_stdout=True, capture_stderr=True, check=False)
    if process.returncode != 0:
        raise AssertionError(
            f"`{shlex.join(full)}` failed (exit {process.returncode}): "
            f"{(process.stderr or process.stdout).decode(errors='replace').strip()}"
        )
    return process.stdout.decode()


async def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of the test pool that no address or route of this machine overlaps."""
    taken = []
    for line in (await sh("ip", "-4", "-o", "addr", "show")).splitlines():
        taken.append(ipaddress.IPv4Interface(line.split()[3]).network)
    for line in (await sh("ip", "-4", "route", "show", "table", "all")).splitlines():
        destination = line.split()[0]
        if destination[0].isdigit():
            network = ipaddress.IPv4Network(destination, strict=False)
            if network.prefixlen > TEST_POOL.prefixlen:
                taken.append(network)
    candidates = list(TEST_POOL.subnets(new_prefix=24))
    start_at = os.getpid() % len(candidates)
    for subnet in candidates[start_at:] + candidates[:start_at]:
        if not any(subnet.overlaps(network) for network in taken):
            return subnet
    raise AssertionError(f"no free /24 left in {TEST_POOL}")


async def nat_table() -> str:
    return await sh("iptables-save", "-t", "nat")


def pod_chains(nat: str, pod_uid: str) -> set[str]:
    """The per-pod chains that rules naming the pod jump to (bridge's masquerade chain,
    portmap's DNAT chain)."""
    chains = set()
    for line in nat.splitlines():
        if pod_uid in line and " -j CNI-" in line:
            chain = line.rsplit(" -j ", 1)[1].split()[0]
            if chain not in SHARED_CHAINS:
                chains.add(chain)
    return chains


async def sweep_nat_rules(marker: str) -> list[str]:
    """Delete the nat rules naming ``marker`` and the per-pod chains they jump to; returns the
    rules deleted."""
    nat = await nat_table()
    chains = pod_chains(nat, marker)
    rules = [line for line in nat.splitlines() if line.startswith("-A ") and marker in line]
    for rule in rules:
        await sh("iptables", "-w", "-t", "nat", "-D", *shlex.split(rule)[1:])
    for chain in chains:
        await sh("iptables", "-w", "-t", "nat", "-F", chain)
        await sh("iptables", "-w", "-t", "nat", "-X", chain)
    return rules


@dataclass
class Bench:
    network: PodNetwork
    state_dir: Path
    config: NetworkConfig
    uids: list[str] = field(default_factory=list)

    def new_uid(self) -> str:
        self.uids.append(str(uuid.uuid4()))
        return self.uids[-1]

    @property
    def pod_addresses(self) -> set[ipaddress.IPv4Address]:
        subnet = self.config.subnet
        return {subnet.network_address + 2, subnet.network_address + 3}

    def lease(self, sandbox: Sandbox) -> Path:
        """host-local's record that ``sandbox``'s address is taken."""
        return self.state_dir / "ipam" / self.config.name / str(sandbox.ip)


@pytest.fixture
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    require_netns()
    subnet = await free_subnet()
    config = NetworkConfig(
        name=f"outpost-test-{os.getpid()}",
        bridge=f"otpt{os.getpid() % 1_000_000}",
        subnet=subnet,
        range_start=subnet.network_address + 2,
        range_end=subnet.network_address + 3,
    )
    state_dir = tmp_path / "network"
    bench = Bench(PodNetwork(state_dir, config), state_dir, config)
    try:
        yield bench
    finally:
        await clean_up(bench)


async def clean_up(bench: Bench) -> None:
    left = []
    for pod_uid in await bench.network.attached_pods():
        try:
            await bench.network.teardown(pod_uid)
        except Exception as error:
            left.append(f"pod {pod_uid}, whose teardown failed: {error}")
    for pod_uid in bench.uids:
        netns = PodNetwork.netns_path(pod_uid)
        if netns.exists():
            left.append(f"namespace {netns}")
            await sh("ip", "netns", "delete", netns.name)
    left += await sweep_nat_rules(bench.config.name)
    if await trio.Path(f"/sys/class/net/{bench.config.bridge}").exists():
        await sh("ip", "link", "delete", bench.config.bridge)
    if left:
        pytest.fail("the test left this behind (now removed):\n" + "\n".join(left))


async def ping(source: Sandbox, target: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert source.netns_path is not None
    await sh("busybox", "ping", "-c1", "-W1", str(target), netns=source.netns_path.name)


async def http_get(host: str, port: int, path: str = "/hello.txt") -> str:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            response = b""
            async for chunk in stream:
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return probe.getsockname()[1]


async def node_address_in(netns: str) -> str:
    """What ``node_address()`` says inside another network namespace."""
    code = "import trio; from edge.pods.network import node_address; print(trio.run(node_address))"
    process = await trio.run_process(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        capture_stdout=True,
        cwd=REPO,
    )
    return process.stdout.decode().strip()


async def test_two_pods_reach_each_other_and_the_host_reaches_them_directly_and_by_host_port(
    bench: Bench, tmp_path: Path
) -> None:
    await bench.network.verify()
    host_port = free_tcp_port()
    a_uid, b_uid = bench.new_uid(), bench.new_uid()
    a = await bench.network.setup(a_uid, [PortMapping(host_port, 8000)])
    b = await bench.network.setup(b_uid)

    assert {a.ip, b.ip} == bench.pod_addresses
    assert a.gateway == b.gateway == bench.config.subnet.network_address + 1
    assert a.netns_path == Path(f"/run/netns/outpost-{a_uid}")
    assert not a.host_network
    inside = await sh("ip", "-4", "-o", "addr", "show", "dev", "eth0", netns=f"outpost-{a_uid}")
    assert f"{a.ip}/24" in inside
    await ping(a, b.ip)
    await ping(b, a.ip)

    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text(HELLO)
    server = await start(
        *("ip", "netns", "exec", a.netns_path.name),
        *(sys.executable, "-u", "-m", "http.server", "8000", "--directory", www),
    )
    try:
        with trio.fail_after(10):
            await LineReader(server).wait_for("Serving HTTP")
        assert await http_get(str(a.ip), 8000) == HELLO
        # Not wget's -T: Debian 12's static busybox 1.35 crashes with it.
        with trio.fail_after(5):
            from_b = await sh(
                *("busybox", "wget", "-q", "-O", "-", f"http://{a.ip}:8000/hello.txt"),
                netns=b.netns_path.name,
            )
        assert from_b == HELLO
        # OUTPUT-chain DNAT; 127.0.0.1 also needs route_localnet, which portmap sets.
        assert await http_get(str(await node_address()), host_port) == HELLO
        assert await http_get("127.0.0.1", host_port) == HELLO
    finally:
        server.kill()
        await server.wait()

    await bench.network.check(a_uid)
    await bench.network.check(b_uid)


async def test_teardown_gives_back_the_address_the_rules_and_the_namespace(bench: Bench) -> None:
    a_uid, b_uid, c_uid = bench.new_uid(), bench.new_uid(), bench.new_uid()
    a = await bench.network.setup(a_uid, [PortMapping(free_tcp_port(), 8000)])
    await bench.network.setup(b_uid)
    assert bench.lease(a).exists()
    chains = pod_chains(await nat_table(), a_uid)
    assert len(chains) == 2, chains  # masquerading and hostPort DNAT

    # Both addresses are taken: the failed setup says why and leaves nothing behind.
    with pytest.raises(CniError) as caught:
        await bench.network.setup(c_uid)
    assert caught.value.plugin == "bridge"
    assert "no IP addresses available" in caught.value.msg
    assert f"container {c_uid}" in str(caught.value)
    assert not PodNetwork.netns_path(c_uid).exists()
    assert sorted(await bench.network.attached_pods()) == sorted([a_uid, b_uid])
    assert c_uid not in await nat_table()

    await bench.network.teardown(a_uid)
    assert not a.netns_path.exists()
    assert not bench.lease(a).exists()
    nat = await nat_table()
    assert a_uid not in nat
    assert not any(chain in nat for chain in chains)
    assert await bench.network.attached_pods() == [b_uid]
    await bench.network.teardown(a_uid)  # again: nothing left to do

    c = await bench.network.setup(c_uid)
    assert c.ip == a.ip


def wrapped_loopback(directory: Path, on_add: str) -> tuple[Path, ...]:
    """A CNI path whose ``loopback`` runs the shell command ``on_add`` for ADD (and is the real
    one otherwise): the last plugin of the list fails after bridge and portmap did their part."""
    directory.mkdir()
    plugin = directory / "loopback"
    plugin.write_text(
        f'#!/bin/sh\nif [ "$CNI_COMMAND" = ADD ]; then {on_add}; fi\nexec {CNI_PATH[0]}/loopback\n'
    )
    plugin.chmod(0o755)
    return (directory, *CNI_PATH)


async def assert_nothing_left_of(bench: Bench, pod_uid: str) -> None:
    assert not PodNetwork.netns_path(pod_uid).exists()
    assert await bench.network.attached_pods() == []
    assert pod_uid not in await nat_table()
    leases = {path.name for path in (bench.state_dir / "ipam" / bench.config.name).iterdir()}
    assert not leases & {str(ip) for ip in bench.pod_addresses}


async def test_a_setup_that_fails_halfway_is_undone(bench: Bench, tmp_path: Path) -> None:
    failing = 'echo \'{"cniVersion":"1.0.0","code":11,"msg":"injected"}\'; exit 1'
    network = PodNetwork(
        bench.state_dir, bench.config, cni_path=wrapped_loopback(tmp_path / "cni", failing)
    )
    pod_uid = bench.new_uid()
    with pytest.raises(CniError) as caught:
        await network.setup(pod_uid, [PortMapping(free_tcp_port(), 8000)])
    error = caught.value
    assert (error.plugin, error.code, error.msg) == ("loopback", 11, "injected")
    assert "(CNI error 11, try again later)" in str(error)
    await assert_nothing_left_of(bench, pod_uid)


async def test_a_hung_plugin_is_killed_and_a_cancelled_setup_is_undone(
    bench: Bench, tmp_path: Path
) -> None:
    cni_path = wrapped_loopback(tmp_path / "cni", "exec sleep 60")
    impatient = PodNetwork(bench.state_dir, bench.config, cni_path=cni_path, plugin_timeout=0.5)
    pod_uid = bench.new_uid()
    with pytest.raises(CniError, match=r"did not finish within 0\.5 s and was killed"):
        await impatient.setup(pod_uid, [PortMapping(free_tcp_port(), 8000)])
    await assert_nothing_left_of(bench, pod_uid)

    network = PodNetwork(bench.state_dir, bench.config, cni_path=cni_path)
    with trio.move_on_after(0.5) as scope:
        await network.setup(pod_uid, [PortMapping(free_tcp_port(), 8000)])
    assert scope.cancelled_caught
    await assert_nothing_left_of(bench, pod_uid)


async def test_a_restarted_agent_adopts_and_checks_the_sandboxes_it_had(bench: Bench) -> None:
    a_uid = bench.new_uid()
    a = await bench.network.setup(a_uid, [PortMapping(free_tcp_port(), 8000)])

    restarted = PodNetwork(bench.state_dir, bench.config)
    assert await restarted.attached_pods() == [a_uid]
    assert await restarted.adopt(a_uid) == a
    await restarted.check(a_uid)

    unknown = bench.new_uid()
    assert await restarted.adopt(unknown) is None
    with pytest.raises(PodNetworkError, match="no network set up"):
        await restarted.check(unknown)
    with pytest.raises(PodNetworkError, match="already attached"):
        await restarted.setup(a_uid)


async def test_a_pod_whose_namespace_vanished_is_not_adopted_and_still_tears_down(
    bench: Bench,
) -> None:
    a_uid = bench.new_uid()
    a = await bench.network.setup(a_uid, [PortMapping(free_tcp_port(), 8000)])
    assert a.netns_path is not None
    dnat_chains = {c for c in pod_chains(await nat_table(), a_uid) if c.startswith("CNI-DN-")}
    await sh("ip", "netns", "delete", a.netns_path.name)

    assert await bench.network.adopt(a_uid) is None
    with pytest.raises(CniError) as caught:
        await bench.network.check(a_uid)
    assert caught.value.plugin == "bridge"

    await bench.network.teardown(a_uid)
    assert not bench.lease(a).exists()
    assert await bench.network.attached_pods() == []
    nat = await nat_table()
    assert not any(chain in nat for chain in dnat_chains)
    # bridge 1.1.1 finds the addresses whose masquerading it removes on the pod's interface,
    # which went with the namespace, so its rule stays (after a reboot, which is when a
    # namespace goes missing in practice, iptables is empty too).
    await sweep_nat_rules(a_uid)


async def test_host_network_pods_get_the_nodes_primary_address(bench: Bench) -> None:
    sandbox = await host_network_sandbox()
    assert sandbox.host_network
    assert sandbox.gateway is None
    # The kernel's source address for a destination only the default route leads to.
    probe = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe:
        try:
            await probe.connect(("203.0.113.1", 9))
            expected = probe.getsockname()[0]
        except OSError:  # no default route: any global address of the node
            expected = None
    if expected is not None:
        assert str(sandbox.ip) == expected
    else:
        assert str(sandbox.ip) in await sh("ip", "-o", "addr", "show", "scope", "global")

    # Inside a pod the default route is the bridge: the pod's own address.
    a = await bench.network.setup(bench.new_uid())
    assert a.netns_path is not None
    assert await node_address_in(a.netns_path.name) == str(a.ip)
    # No default route at all: the first global address.
    with EdgeLink("outpost-addr") as link:
        assert await node_address_in(link.netns) == link.edge_ip
