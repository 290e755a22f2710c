"""A network-namespace fault harness: an edge process behind a link that a test can break.

``EdgeLink`` makes a network namespace joined to the root namespace by a veth pair with a /30
from 10.213.0.0/16. A test listens on ``host_ip`` in the root namespace (where the cloud runs),
starts the edge with ``exec_prefix + argv`` so it lives in the namespace, and then ``cut()``\\s
and ``restore()``\\s the link or ``degrade()``\\s it. Leaving the ``with`` block kills whatever
still runs in the namespace and removes the namespace and the veth pair, also when the body
raised::

    with EdgeLink("cloud-edge") as link:
        edge = await start(*link.exec_prefix, VENV_BIN / "outpost", ...)
        link.degrade(delay_ms=100, loss_pct=5)
        link.cut()
        link.restore()

The namespace has no default route: from inside it only ``host_ip`` is reachable.

``degrade()`` uses ``tc netem`` on both ends of the pair, so its delay and loss apply to each
direction (a round trip gains twice ``delay_ms``). On a kernel built without sch_netem it falls
back to an NFQUEUE delayer: iptables in the namespace hands every packet crossing the edge end,
in and out, to a small process (``python -m tests.netns nfqueue-delay``) that holds it for the
same delay and jitter and drops the same share. ``EdgeLink.degrade_backend`` says which is used.

A test is skipped only when this machine cannot make namespaces at all (not root, no
CAP_NET_ADMIN); any other failure of ``ip``, ``tc`` or ``iptables`` raises ``NetnsError``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import heapq
import ipaddress
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from tests.appliance import lacking_root, require_root
from tests.waiting import eventually_sync

REPO = Path(__file__).resolve().parent.parent

POOL = ipaddress.IPv4Network("10.213.0.0/16")
SUBNETS = POOL.num_addresses // 4  # /30s in the pool
LOCK_FILE = Path("/run/lock/outpost-netns.lock")

_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21  # `ip netns add` mounts /run/netns and unshares
_NFQUEUE_NUM = 0  # queue numbers are per namespace, and the namespace is ours

Backend = Literal["auto", "netem", "nfqueue"]
T = TypeVar("T")

_instances = itertools.count()
_netem_available: bool | None = None


class NetnsError(RuntimeError):
    """An ``ip``, ``tc`` or ``iptables`` command, or the harness around them, failed."""


def _run(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = [*args] if netns is None else ["ip", "netns", "exec", netns, *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as error:
        raise NetnsError(f"`{argv[0]}` is not installed: {error}") from error
    except subprocess.TimeoutExpired as error:
        raise NetnsError(f"`{' '.join(argv)}` did not finish in 30 s") from error
    if check and result.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


def _ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    return json.loads(_run("ip", "-j", *args, netns=netns) or "[]")


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def require_netns() -> None:
    """Skip the calling test when this process cannot make network namespaces, or fail it
    under ``OUTPOST_REQUIRE_ROOT`` (see tests/appliance.py)."""
    require_root("network-namespace tests need root (`ip netns add` mounts /run/netns)")
    caps = _capabilities()
    for bit, name in ((_CAP_NET_ADMIN, "CAP_NET_ADMIN"), (_CAP_SYS_ADMIN, "CAP_SYS_ADMIN")):
        if not caps & (1 << bit):
            lacking_root(f"network-namespace tests need {name}, which this process lacks")
    if shutil.which("ip") is None:
        raise NetnsError("`ip` (iproute2) is not installed; the netns harness needs it")


def netns_exists(name: str) -> bool:
    return any(entry["name"] == name for entry in _ip_json("netns", "list"))


def link_exists(name: str, *, netns: str | None = None) -> bool:
    result = subprocess.run(
        ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def netns_pids(name: str) -> list[int]:
    return [int(pid) for pid in _run("ip", "netns", "pids", name).split()]


def _kill_all_in(name: str, *, timeout: float = 5.0) -> None:
    """SIGKILL every process in the namespace and wait until none is left."""

    def none_left() -> bool:
        pids = [pid for pid in netns_pids(name) if pid != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    eventually_sync(
        none_left, f"no process in netns {name} survives SIGKILL", within=timeout, interval=0.02
    )


def _remove_netns(name: str) -> None:
    """Kill what runs in a namespace, delete its veths (both ends go at once), then itself."""
    _kill_all_in(name)
    for link in _ip_json("link", "show", "type", "veth", netns=name):
        _run("ip", "-n", name, "link", "del", link["ifname"])
    _run("ip", "netns", "del", name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netem_available(netns: str) -> bool:
    """Whether the kernel has the netem qdisc (probed once, on ``lo`` inside ``netns``)."""
    global _netem_available
    if _netem_available is None:
        probe = subprocess.run(
            ["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "lo", "root", "netem"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0:
            _run("tc", "qdisc", "del", "dev", "lo", "root", netns=netns)
            _netem_available = True
        elif "unknown" in probe.stderr.lower():
            _netem_available = False
        else:
            raise NetnsError(f"probing for tc netem failed: {probe.stderr.strip()}")
    return _netem_available


class EdgeLink:
    """A network namespace for an edge process, joined to the root namespace by a veth pair.

    ``name_prefix`` starts the namespace's name, which goes on with this process's pid and a
    counter (``cloud-edge-4242-0``) so parallel runs never collide. The /30 is the first free
    one from a starting point derived from the pid and the counter; it is checked against
    every address, route and link in the root namespace under a lock file, so two harnesses
    never share one.
    """

    def __init__(
        self, name_prefix: str = "outpost-edge", *, degrade_backend: Backend = "auto"
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name_prefix):
            raise ValueError(f"name_prefix must be 1-32 of [A-Za-z0-9_.-], not {name_prefix!r}")
        self._prefix = name_prefix
        self._counter = next(_instances)
        self._requested_backend: Backend = degrade_backend
        self._netns: str | None = None
        self._index: int | None = None
        self._degraded = False
        self._cut = False
        self._delayer: subprocess.Popen[str] | None = None

    # -- what a test reads ---------------------------------------------------------------

    @property
    def netns(self) -> str:
        return self._require(self._netns)

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        index = self._require(self._index)
        return ipaddress.IPv4Network((int(POOL.network_address) + 4 * index, 30))

    @property
    def host_ip(self) -> str:
        """The root-namespace end, where the cloud listens."""
        return str(self.subnet.network_address + 1)

    @property
    def edge_ip(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def host_if(self) -> str:
        return f"otp{self._require(self._index):04x}h"

    @property
    def edge_if(self) -> str:
        """The namespace's end of the pair (it has this name inside the namespace)."""
        return f"otp{self._require(self._index):04x}e"

    @property
    def exec_prefix(self) -> list[str]:
        """Put before an argv to run that command inside the namespace."""
        return ["ip", "netns", "exec", self.netns]

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def degrade_backend(self) -> Literal["netem", "nfqueue"]:
        """What ``degrade()`` uses here: tc netem, or the NFQUEUE delayer without it."""
        if self._requested_backend != "auto":
            return self._requested_backend
        return "netem" if netem_available(self.netns) else "nfqueue"

    def _require(self, value: T | None) -> T:
        if value is None:
            raise NetnsError("the EdgeLink is not set up: use it as a context manager")
        return value

    def __repr__(self) -> str:
        if self._netns is None:
            return f"EdgeLink({self._prefix!r}, not set up)"
        return f"EdgeLink(netns={self.netns}, host={self.host_ip}, edge={self.edge_ip})"

    # -- set up and tear down ------------------------------------------------------------

    def __enter__(self) -> EdgeLink:
        require_netns()
        try:
            self._set_up()
        except BaseException:
            self._tear_down(suppress=True)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._tear_down(suppress=False)

    def _set_up(self) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        with LOCK_FILE.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._sweep_stale()
            self._netns = self._free_netns_name()
            try:
                _run("ip", "netns", "add", self._netns)
            except NetnsError as error:
                self._netns = None
                if "Operation not permitted" in str(error):
                    lacking_root(f"this machine cannot create network namespaces: {error}")
                raise
            self._index = self._free_subnet()
            _run(
                "ip",
                "link",
                "add",
                self.host_if,
                "type",
                "veth",
                "peer",
                "name",
                self.edge_if,
                "netns",
                self.netns,
            )
            self._configure_ends()
        _run("ip", "link", "set", "lo", "up", netns=self.netns)

    def _configure_ends(self) -> None:
        prefix = f"/{self.subnet.prefixlen}"
        _run("ip", "addr", "replace", self.host_ip + prefix, "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "-n", self.netns, "addr", "replace", self.edge_ip + prefix, "dev", self.edge_if)
        _run("ip", "-n", self.netns, "link", "set", self.edge_if, "up")

    def _free_netns_name(self) -> str:
        existing = {entry["name"] for entry in _ip_json("netns", "list")}
        counter = self._counter
        while (name := f"{self._prefix}-{os.getpid()}-{counter}") in existing:
            counter = next(_instances)
        return name

    def _free_subnet(self) -> int:
        used: list[ipaddress.IPv4Network] = []
        for link in _ip_json("-4", "addr", "show"):
            for info in link.get("addr_info", []):
                used.append(ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}").network)
        for route in _ip_json("-4", "route", "show", "table", "all"):
            dst = route.get("dst", "")
            if dst and dst[0].isdigit():
                used.append(ipaddress.IPv4Network(dst, strict=False))
        links = {link["ifname"] for link in _ip_json("link", "show")}
        start = (os.getpid() * 64 + self._counter) % SUBNETS
        for offset in range(SUBNETS):
            index = (start + offset) % SUBNETS
            subnet = ipaddress.IPv4Network((int(POOL.network_address) + 4 * index, 30))
            names = {f"otp{index:04x}h", f"otp{index:04x}e"}
            # Anything at least as wide as the pool (a default route, a 10/8) is shadowed by the
            # /30's own connected route, so only narrower networks count as taken.
            taken = any(net.prefixlen > POOL.prefixlen and subnet.overlaps(net) for net in used)
            if not taken and not names & links:
                return index
        raise NetnsError(f"no free /30 left in {POOL}")

    def _sweep_stale(self) -> None:
        """Remove namespaces with this prefix left by processes that died without cleaning up."""
        pattern = re.compile(rf"{re.escape(self._prefix)}-(\d+)-\d+")
        for entry in _ip_json("netns", "list"):
            match = pattern.fullmatch(entry["name"])
            if match and not _pid_alive(int(match.group(1))):
                _remove_netns(entry["name"])

    def _tear_down(self, *, suppress: bool) -> None:
        errors: list[str] = []

        def attempt(step: Callable[..., object], *args: str) -> None:
            try:
                step(*args)
            except Exception as error:
                errors.append(f"{getattr(step, '__name__', step)}: {error}")

        attempt(self._stop_delayer)
        if self._index is not None:
            # Deleting the root end takes the namespace's end with it, at once; deleting only
            # the namespace would leave the root end to vanish some time later.
            attempt(self._delete_veth)
        if self._netns is not None:
            attempt(_remove_netns, self._netns)
            if netns_exists(self._netns):
                errors.append(f"netns {self._netns} still exists after teardown")
        self._degraded = False
        if errors and not suppress:
            raise NetnsError(f"cleaning up {self!r} failed: " + "; ".join(errors))

    def _delete_veth(self) -> None:
        if link_exists(self.host_if):
            try:
                _run("ip", "link", "del", self.host_if)
            except NetnsError:
                if link_exists(self.host_if):
                    raise

    # -- faults --------------------------------------------------------------------------

    def cut(self) -> None:
        """Take the link down: nothing gets between the namespace and the root namespace."""
        _run("ip", "link", "set", self.host_if, "down")
        self._cut = True

    def restore(self, *, timeout: float = 3.0) -> None:
        """Bring both ends back up with their addresses, and wait until they carry traffic."""
        self._configure_ends()

        def both_up() -> bool:
            host = _ip_json("link", "show", "dev", self.host_if)[0]
            edge = _ip_json("link", "show", "dev", self.edge_if, netns=self.netns)[0]
            return host["operstate"] == "UP" and edge["operstate"] == "UP"

        eventually_sync(
            both_up,
            f"{self.host_if} and {self.edge_if} are UP after restore()",
            within=timeout,
            interval=0.01,
        )
        self._cut = False

    def degrade(
        self, *, loss_pct: float = 0.0, delay_ms: float = 0.0, jitter_ms: float = 0.0
    ) -> None:
        """Delay (± jitter, uniformly) and drop packets in each direction; replaces any earlier
        degrade()."""
        if not 0 <= loss_pct <= 100:
            raise ValueError(f"loss_pct must be within 0-100, not {loss_pct}")
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must not be negative")
        self.clear()
        if self.degrade_backend == "netem":
            netem = ["netem"]
            if delay_ms or jitter_ms:
                netem += ["delay", f"{delay_ms}ms", f"{jitter_ms}ms"]
            if loss_pct:
                netem += ["loss", f"{loss_pct}%"]
            self._degraded = True
            _run("tc", "qdisc", "replace", "dev", self.host_if, "root", *netem)
            _run("tc", "qdisc", "replace", "dev", self.edge_if, "root", *netem, netns=self.netns)
        else:
            self._degraded = True
            self._start_delayer(loss_pct=loss_pct, delay_ms=delay_ms, jitter_ms=jitter_ms)

    def clear(self) -> None:
        """Undo degrade(): the link is clean again."""
        if not self._degraded:
            return
        if self.degrade_backend == "netem":
            for netns, dev in ((None, self.host_if), (self.netns, self.edge_if)):
                if "netem" in _run("tc", "qdisc", "show", "dev", dev, netns=netns):
                    _run("tc", "qdisc", "del", "dev", dev, "root", netns=netns)
        else:
            for chain in ("INPUT", "OUTPUT"):
                _run("iptables", "-w", "-F", chain, netns=self.netns)
            self._stop_delayer()
        self._degraded = False

    def _start_delayer(self, *, loss_pct: float, delay_ms: float, jitter_ms: float) -> None:
        if shutil.which("iptables") is None:
            raise NetnsError(
                "the kernel has no sch_netem, and the NFQUEUE fallback needs `iptables`"
            )
        delayer = subprocess.Popen(
            [
                *self.exec_prefix,
                *(sys.executable, "-m", "tests.netns", "nfqueue-delay", f"--queue={_NFQUEUE_NUM}"),
                *(f"--delay-ms={delay_ms}", f"--jitter-ms={jitter_ms}", f"--loss-pct={loss_pct}"),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._delayer = delayer
        assert delayer.stdout is not None
        ready, _, _ = select.select([delayer.stdout], [], [], 10)
        line = delayer.stdout.readline().strip() if ready else "(nothing in 10 s)"
        if line != "ready":
            rest = delayer.stdout.read() if delayer.poll() is not None else ""
            raise NetnsError(f"the NFQUEUE delayer did not start: {line} {rest}".strip())
        for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
            _run(
                "iptables",
                "-w",
                "-A",
                chain,
                direction,
                self.edge_if,
                "-j",
                "NFQUEUE",
                "--queue-num",
                str(_NFQUEUE_NUM),
                netns=self.netns,
            )

    def _stop_delayer(self) -> None:
        delayer, self._delayer = self._delayer, None
        if delayer is None:
            return
        crashed = delayer.poll()
        delayer.kill()
        delayer.wait(5)
        output = delayer.stdout.read() if delayer.stdout else ""
        if delayer.stdout:
            delayer.stdout.close()
        if crashed is not None:
            raise NetnsError(f"the NFQUEUE delayer had died (exit {crashed}): {output.strip()}")


# -- the NFQUEUE delayer, run inside the namespace as `python -m tests.netns nfqueue-delay` ----

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_PACKET = _NFNL_SUBSYS_QUEUE << 8 | 0
_NFQNL_MSG_VERDICT = _NFNL_SUBSYS_QUEUE << 8 | 1
_NFQNL_MSG_CONFIG = _NFNL_SUBSYS_QUEUE << 8 | 2
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NFQA_PACKET_HDR = 1
_NFQA_VERDICT_HDR = 2
_NFQA_CFG_CMD = 1
_NFQA_CFG_PARAMS = 2
_NFQNL_CFG_CMD_BIND = 1
_NFQNL_COPY_META = 1
_NF_DROP = 0
_NF_ACCEPT = 1


def _nl_attr(kind: int, payload: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(payload), kind) + payload
    return attr + b"\0" * (-len(attr) % 4)


def _nfq_message(kind: int, queue: int, attrs: bytes, *, flags: int, seq: int) -> bytes:
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, _NLM_F_REQUEST | flags, seq, 0) + body


def _nl_messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            return
        yield kind, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def _nl_attrs(payload: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def _nfqueue_delay(queue: int, delay_ms: float, jitter_ms: float, loss_pct: float) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, 0))
    config = [
        _nl_attr(_NFQA_CFG_CMD, struct.pack("!BBH", _NFQNL_CFG_CMD_BIND, 0, 0)),
        _nl_attr(_NFQA_CFG_PARAMS, struct.pack("!IB", 0, _NFQNL_COPY_META)),
    ]
    for seq, attr in enumerate(config, 1):
        sock.send(_nfq_message(_NFQNL_MSG_CONFIG, queue, attr, flags=_NLM_F_ACK, seq=seq))
        for kind, payload in _nl_messages(sock.recv(65536)):
            if kind == _NLMSG_ERROR and (errno := -struct.unpack_from("=i", payload)[0]):
                raise OSError(errno, f"configuring NFQUEUE {queue}: {os.strerror(errno)}")
    print("ready", flush=True)

    rng = random.Random()
    held: list[tuple[float, int]] = []  # (release time, packet id)

    def verdict(packet_id: int, decision: int) -> None:
        attr = _nl_attr(_NFQA_VERDICT_HDR, struct.pack("!II", decision, packet_id))
        sock.send(_nfq_message(_NFQNL_MSG_VERDICT, queue, attr, flags=0, seq=0))

    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        if select.select([sock], [], [], timeout)[0]:
            for kind, payload in _nl_messages(sock.recv(1 << 16)):
                if kind != _NFQNL_MSG_PACKET:
                    continue
                for attr_kind, value in _nl_attrs(payload[4:]):
                    if attr_kind == _NFQA_PACKET_HDR:
                        (packet_id,) = struct.unpack_from("!I", value)
                        if rng.random() * 100 < loss_pct:
                            verdict(packet_id, _NF_DROP)
                        else:
                            wait = max(0.0, delay_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000
                            heapq.heappush(held, (time.monotonic() + wait, packet_id))
        now = time.monotonic()
        while held and held[0][0] <= now:
            verdict(heapq.heappop(held)[1], _NF_ACCEPT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.netns")
    commands = parser.add_subparsers(dest="command", required=True)
    delay = commands.add_parser("nfqueue-delay", help="delay and drop the packets of an NFQUEUE")
    delay.add_argument("--queue", type=int, default=_NFQUEUE_NUM)
    delay.add_argument("--delay-ms", type=float, default=0.0)
    delay.add_argument("--jitter-ms", type=float, default=0.0)
    delay.add_argument("--loss-pct", type=float, default=0.0)
    args = parser.parse_args(argv)
    _nfqueue_delay(args.queue, args.delay_ms, args.jitter_ms, args.loss_pct)


if __name__ == "__main__":
    main()
