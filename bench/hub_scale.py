"""How many edge connections one cloud hub process holds, and what each costs.

Usage::

    .venv/bin/python bench/hub_scale.py --nodes 5000
    .venv/bin/python bench/hub_scale.py --nodes 10000 --workers 4 --rounds 5
    .venv/bin/python bench/hub_scale.py --nodes 2000 --layer tls      # what TLS alone costs
    .venv/bin/python bench/hub_scale.py --nodes 2000 --tracemalloc 1 --objects  # the heap
    .venv/bin/python bench/hub_scale.py --nodes 1000 --profile        # where the CPU goes

It makes a throwaway CA and N node certificates (EC P-256, CN=node, O=outpost:nodes) in a
temporary folder, starts the hub (``bench/_hub_process.py``: ``Hub`` with a ``MemorySource``,
default ``HubSettings``) in a process of its own, and W worker processes that each hold N/W
simulated edges. A simulated edge is a TLS WebSocket from one of several 127.0.0.x source
addresses, speaking the protocol through the sans-IO ``edge.wire.connection.Connection``: hello,
welcome, acknowledgements and heartbeats, with no store behind it. Edges connect a bounded number
at a time and honour the hub's 503 Retry-After. The workers run at a lower priority (nice 10):
on one machine they share the CPUs with the hub, which should not wait for them.

Then it measures, in this order:

- connect: the time for all N to hold a session;
- memory: the hub's RSS (VmRSS) before any connection and after all N are connected and a quiet
  window has passed, as KB per node;
- idle CPU: the hub's CPU time over ``--idle-s`` seconds (30: two heartbeat intervals, so the
  figure does not depend on where the heartbeats fall) in which only heartbeats flow, as a
  percentage of one core;
- fan-out: ``--rounds`` rounds, each one update to every node (the hub ``put``s it to each node
  of its source as fast as it can); a node's latency is its arrival time minus the round's
  start. p50 and p99 are over all nodes and rounds; a node missing at the round's deadline
  counts as infinitely late. Each round also shows the CPU the hub and the workers used, and
  the hub's garbage collections.

Every phase has a deadline, so the run ends; the children are killed on the way out. All
traffic stays on 127.0.0.0/8. The last line is::

    hub_scale nodes=N rss_kb_per_node=… idle_cpu_pct=… fanout_p50_ms=… fanout_p99_ms=…

Diagnostics: ``--layer tcp|tls|ws`` replaces the hub by a bare server that only holds
connections up to that layer (no fan-out then), so the differences between layers say where a
connection's memory goes; ``--tracemalloc``, ``--objects`` and ``--profile`` look inside the hub
(and slow it down); ``--hub-gc`` tries garbage-collector settings the hub does not have.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
BENCH = SCRIPT.parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import trio  # noqa: E402
from trio_websocket import (  # noqa: E402
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from bench._hub_process import (  # noqa: E402
    FANOUT_KEY,
    LAYERS,
    Lines,
    cpu_s,
    node_name,
    raise_nofile,
)
from cloud.pki import NODE_ORGANIZATION  # noqa: E402
from edge.websocket import CONNECT_PATH, retry_after_header  # noqa: E402
from edge.wire import codec  # noqa: E402
from edge.wire.codec import ProtocolError  # noqa: E402
from edge.wire.connection import (  # noqa: E402
    Connection,
    Opened,
    PeerClosed,
    Received,
    Refused,
    Role,
)
from edge.wire.window import InFlight, ReceiveWindow  # noqa: E402
from tests.cluster.certs import CertificateAuthority  # noqa: E402

HOST = "127.0.0.1"
AGENT = "hub-scale-bench"
REPORT_EVERY_S = 0.25


# -- certificates ---------------------------------------------------------------------------


def write_pki(folder: Path, nodes: int) -> None:
    """The CA, the hub's serving certificate, and one PEM (certificate + key) per node."""
    ca = CertificateAuthority("hub-scale-ca")
    (folder / "ca.pem").write_bytes(ca.pair.cert_pem)
    server = ca.issue("outpost-cloud", server_names=(HOST, "localhost"))
    server.write(folder, "server")
    (folder / "nodes").mkdir()
    for index in range(nodes):
        pair = ca.issue(node_name(index), organizations=(NODE_ORGANIZATION,), client=True)
        path = folder / "nodes" / f"{node_name(index)}.pem"
        path.write_bytes(pair.cert_pem + pair.key_pem)
        path.chmod(0o600)


# -- a worker process: N/W simulated edges --------------------------------------------------


class Down(Exception):
    """A session ended or did not start; try again after ``retry_after_s`` if given."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass
class SimNode:
    name: str
    source: str
    ssl_context: ssl.SSLContext
    # The resume state outlives connections, as in a real edge (there it is in SQLite).
    inflight: InFlight = field(default_factory=lambda: InFlight(window=16))
    receiver: ReceiveWindow = field(default_factory=lambda: ReceiveWindow(0))


@dataclass
class WorkerState:
    connected: int = 0
    attempts: int = 0
    sessions: int = 0
    turned_away: int = 0
    disconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    last_error: str = ""
    latencies: list[tuple[int, float]] = field(default_factory=list)

    def error(self, exc: BaseException) -> None:
        self.errors[type(exc).__name__] += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]


def first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state = WorkerState()
        concurrency = max(1, math.ceil(args.connect_concurrency / args.workers))
        self.slots = trio.Semaphore(concurrency)
        self.port: int = args.port
        self.layer: str = args.layer
        self.count = 0

    def load_nodes(self) -> list[SimNode]:
        a = self.args
        ca = (Path(a.pki) / "ca.pem").read_text()
        sources = [f"127.0.0.{2 + i}" for i in range(a.source_addresses)]
        nodes = []
        for index in range(a.worker, a.nodes, a.workers):
            ctx = ssl.create_default_context(cadata=ca)
            ctx.load_cert_chain(Path(a.pki) / "nodes" / f"{node_name(index)}.pem")
            source = sources[(index // a.workers) % len(sources)]
            nodes.append(SimNode(node_name(index), source, ctx))
        return nodes

    async def run(self) -> None:
        raise_nofile()
        os.nice(self.args.worker_nice)
        started = time.perf_counter()
        nodes = self.load_nodes()
        self.count = len(nodes)
        emit({"type": "ready", "nodes": len(nodes), "load_s": time.perf_counter() - started})
        go = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._control, go, nursery.cancel_scope)
            nursery.start_soon(self._report)
            await go.wait()
            for node in nodes:
                nursery.start_soon(self._keep_connected, node)

    async def _control(self, go: trio.Event, scope: trio.CancelScope) -> None:
        """Commands from the bench on stdin; its end (the bench is gone) stops the worker."""
        commands = Lines(trio.lowlevel.FdStream(os.dup(0)))
        while (line := await commands.next()) is not None:
            if line == "connect":
                go.set()
            elif line == "quit":
                break
        scope.cancel()

    async def _report(self) -> None:
        s = self.state
        frozen = False
        while True:
            if not frozen and s.connected == self.count:
                # Their long-lived objects out of the collector's way: the simulated edges'
                # CPU competes with the hub's on this machine.
                gc.collect()
                gc.freeze()
                frozen = True
            await trio.sleep(REPORT_EVERY_S)
            latencies, s.latencies = s.latencies, []
            emit(
                {
                    "type": "status",
                    "connected": s.connected,
                    "attempts": s.attempts,
                    "sessions": s.sessions,
                    "turned_away": s.turned_away,
                    "disconnects": s.disconnects,
                    "errors": dict(s.errors),
                    "last_error": s.last_error,
                    "lat": latencies,
                    "cpu_s": cpu_s(),
                }
            )

    async def _keep_connected(self, node: SimNode) -> None:
        while True:
            delay = await self._session(node)
            await trio.sleep(delay)

    async def _session(self, node: SimNode) -> float:
        """One connection, from connecting to its end; returns how long to wait before the
        next one."""
        s = self.state
        delay = random.uniform(0.5, 1.5)
        try:
            await self._connect_and_serve(node)
        except* ConnectionRejected as group:
            rejected = first_leaf(group)
            assert isinstance(rejected, ConnectionRejected)
            s.turned_away += 1
            hint = retry_after_header(rejected)
            if hint:
                delay = random.uniform(hint, hint * 1.5)
            else:
                s.error(rejected)
        except* Down as group:
            down = first_leaf(group)
            assert isinstance(down, Down)
            s.error(down)
            if down.retry_after_s:
                delay = random.uniform(down.retry_after_s, down.retry_after_s * 1.5)
        except* (
            OSError,
            ssl.SSLError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            ConnectionClosed,
            HandshakeError,
            ProtocolError,
        ) as group:
            s.error(first_leaf(group))
        return delay

    async def _connect_and_serve(self, node: SimNode) -> None:
        s, a = self.state, self.args
        stream: trio.SSLStream | None = None
        tcp: trio.SocketStream | None = None
        holding_slot = True
        await self.slots.acquire()
        try:
            async with trio.open_nursery() as nursery:
                s.attempts += 1
                with trio.fail_after(a.handshake_timeout_s):
                    tcp = await trio.open_tcp_stream(HOST, self.port, local_address=node.source)
                    ws: WebSocketConnection | None = None
                    conn: Connection | None = None
                    if self.layer != "tcp":
                        stream = trio.SSLStream(tcp, node.ssl_context, server_hostname=HOST)
                        await stream.do_handshake()
                    if self.layer in ("ws", "hub"):
                        assert stream is not None
                        ws = await wrap_client_stream(
                            nursery,
                            stream,
                            f"{HOST}:{self.port}",
                            CONNECT_PATH,
                            message_queue_size=1,
                            max_message_size=codec.DEFAULT_MAX_FRAME,
                        )
                    if self.layer == "hub":
                        assert ws is not None
                        conn = await self._open(ws, node)
                self.slots.release()
                holding_slot = False
                s.connected += 1
                s.sessions += 1
                try:
                    await self._hold(tcp, stream, ws, conn)
                finally:
                    s.connected -= 1
                    s.disconnects += 1
                    nursery.cancel_scope.cancel()
        finally:
            if holding_slot:
                self.slots.release()
            if stream is not None:
                await trio.aclose_forcefully(stream)
            elif tcp is not None:
                await trio.aclose_forcefully(tcp)

    async def _open(self, ws: WebSocketConnection, node: SimNode) -> Connection:
        conn = Connection(
            Role.EDGE, now=trio.current_time(), inflight=node.inflight, receiver=node.receiver
        )
        await ws.send_message(conn.hello(node.name, AGENT))
        data = await ws.get_message()
        for event in conn.receive(binary(data), trio.current_time()):
            match event:
                case Refused(reason, retry_after_s):
                    raise Down(f"refused: {reason}", retry_after_s)
                case PeerClosed(reason):
                    raise Down(f"closed: {reason}")
                case Opened():
                    return conn
        raise Down("no welcome")

    async def _hold(
        self,
        tcp: trio.SocketStream,
        stream: trio.SSLStream | None,
        ws: WebSocketConnection | None,
        conn: Connection | None,
    ) -> None:
        if conn is not None:
            assert ws is not None
            await self._serve(ws, conn)
        elif ws is not None:
            while True:
                await ws.get_message()
        else:
            reader = stream if stream is not None else tcp
            while await reader.receive_some():
                pass
        raise Down("connection closed by the hub")

    async def _serve(self, ws: WebSocketConnection, conn: Connection) -> None:
        """Apply (record) what arrives, acknowledge it, and keep the heartbeat."""
        s = self.state
        tick = max(0.5, conn.heartbeat_s / 3)
        while True:
            with trio.move_on_after(tick):
                data = await ws.get_message()
                arrived = time.time()
                for event in conn.receive(binary(data), trio.current_time()):
                    match event:
                        case Received(messages):
                            for m in messages:
                                if m.key == FANOUT_KEY and isinstance(m.body, dict):
                                    s.latencies.append((m.body["round"], arrived - m.body["t"]))
                            conn.applied(messages[-1].seq)
                        case PeerClosed(reason):
                            raise Down(f"hub closed the session: {reason}")
            now = trio.current_time()
            for frame in conn.outgoing(now):
                await ws.send_message(frame)
            if conn.expired(now):
                raise Down("hub silent for three heartbeats")


def binary(data: bytes | str) -> bytes:
    if isinstance(data, str):
        raise ProtocolError("text WebSocket message")
    return data


def emit(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


# -- the bench: starts and drives the processes ---------------------------------------------


class ChildDied(Exception):
    pass


class Child:
    """A child process driven by lines on stdin, answering JSON lines on stdout."""

    def __init__(self, name: str, process: trio.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log
        assert process.stdout is not None
        self.lines = Lines(process.stdout)

    @classmethod
    async def start(cls, name: str, argv: list[str], log: Path) -> Child:
        with log.open("wb") as out:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out, cwd=REPO
            )
        return cls(name, process, log)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send_all(line.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChildDied(f"{self.name} is gone:\n{self.log_tail()}") from exc

    async def receive(self) -> dict[str, Any]:
        line = await self.lines.next()
        if line is None:
            raise ChildDied(f"{self.name} ended:\n{self.log_tail()}")
        return json.loads(line)

    async def ask(self, command: str, limit_s: float = 60) -> dict[str, Any]:
        with trio.fail_after(limit_s):
            await self.send(command)
            return await self.receive()

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                with contextlib.suppress(ChildDied):
                    await self.send("quit")
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


@dataclass
class WorkerView:
    ready: bool = False
    status: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fleet:
    """What the workers reported."""

    views: list[WorkerView]
    latencies: dict[int, list[float]] = field(default_factory=dict)

    def total(self, key: str) -> Any:
        return sum(v.status.get(key, 0) for v in self.views)

    def errors(self) -> Counter[str]:
        errors: Counter[str] = Counter()
        for v in self.views:
            errors.update(v.status.get("errors", {}))
        return errors

    def last_error(self) -> str:
        return next((e for v in self.views if (e := v.status.get("last_error"))), "")


async def follow(worker: Child, view: WorkerView, fleet: Fleet) -> None:
    while True:
        message = await worker.receive()
        if message["type"] == "ready":
            view.ready = True
        elif message["type"] == "status":
            for round_, latency in message.pop("lat"):
                fleet.latencies.setdefault(round_, []).append(latency)
            view.status = message


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def ms(value: float) -> str:
    return "inf" if math.isinf(value) else "nan" if math.isnan(value) else f"{value * 1000:.0f}"


def say(line: str) -> None:
    print(line, flush=True)


async def wait_until(predicate: Any, limit_s: float, progress: Any = None) -> bool:
    deadline = trio.current_time() + limit_s
    shown = trio.current_time()
    while not predicate():
        if trio.current_time() >= deadline:
            return False
        if progress is not None and trio.current_time() - shown >= 5:
            shown = trio.current_time()
            progress()
        await trio.sleep(0.05)
    return True


async def bench(args: argparse.Namespace) -> None:
    raise_nofile()
    folder = Path(tempfile.mkdtemp(prefix="hub-scale-"))
    children: list[Child] = []
    try:
        async with trio.open_nursery() as nursery:
            await measure(args, folder, children, nursery)
            nursery.cancel_scope.cancel()
    finally:
        for child in children:
            await child.stop()
        if args.keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


async def measure(
    args: argparse.Namespace, folder: Path, children: list[Child], nursery: trio.Nursery
) -> None:
    n = args.nodes
    say(
        f"hub_scale: {n} nodes, {args.workers} worker processes, source addresses"
        f" 127.0.0.2-127.0.0.{1 + args.source_addresses}, layer {args.layer},"
        f" {os.cpu_count()} CPUs"
    )
    started = time.perf_counter()
    await trio.to_thread.run_sync(write_pki, folder, n)
    say(f"certificates: {n} node certificates issued in {time.perf_counter() - started:.1f} s")

    hub_argv = [
        sys.executable,
        str(BENCH / "_hub_process.py"),
        f"--pki={folder}",
        f"--host={HOST}",
        f"--layer={args.layer}",
        f"--max-handshakes={args.max_handshakes}",
        f"--heartbeat-s={args.heartbeat_s}",
        f"--tracemalloc={args.tracemalloc}",
    ]
    hub = await Child.start("hub", hub_argv, folder / "hub.log")
    children.append(hub)
    with trio.fail_after(60):
        first = await hub.receive()
    port = first["port"]
    await trio.sleep(1)
    before = await hub.ask("stats")
    say(f"hub: pid {first['pid']}, port {port}, rss before connections {before['rss_kb']} KB")

    fleet = Fleet([WorkerView() for _ in range(args.workers)])
    workers: list[Child] = []
    for index in range(args.workers):
        argv = [
            sys.executable,
            str(SCRIPT),
            f"--nodes={n}",
            f"--workers={args.workers}",
            f"--worker={index}",
            f"--port={port}",
            f"--pki={folder}",
            f"--layer={args.layer}",
            f"--connect-concurrency={args.connect_concurrency}",
            f"--source-addresses={args.source_addresses}",
            f"--handshake-timeout-s={args.handshake_timeout_s}",
            f"--worker-nice={args.worker_nice}",
        ]
        worker = await Child.start(f"worker {index}", argv, folder / f"worker-{index}.log")
        children.append(worker)
        workers.append(worker)
        nursery.start_soon(follow, worker, fleet.views[index], fleet)
    started = time.perf_counter()
    if not await wait_until(lambda: all(v.ready for v in fleet.views), 300):
        raise ChildDied("workers did not load their certificates in 300 s")
    say(f"workers: ready in {time.perf_counter() - started:.1f} s (node TLS contexts loaded)")

    # -- connect ------------------------------------------------------------------------------
    connect_started = trio.current_time()
    for worker in workers:
        await worker.send("connect")

    def connect_progress() -> None:
        say(
            f"  connecting: {fleet.total('connected')}/{n} after"
            f" {trio.current_time() - connect_started:.0f} s,"
            f" {fleet.total('turned_away')} turned away, {sum(fleet.errors().values())} errors"
        )

    all_in = await wait_until(
        lambda: fleet.total("connected") >= n, args.connect_timeout_s, connect_progress
    )
    connect_s = trio.current_time() - connect_started
    connected = fleet.total("connected")
    errors = fleet.errors()
    say(
        f"connect: {connected}/{n} nodes in {connect_s:.1f} s ({connected / connect_s:.0f}/s);"
        f" {fleet.total('attempts')} attempts, {fleet.total('turned_away')} turned away (503),"
        f" errors {dict(errors) or 0}"
        + (
            ""
            if all_in
            else f" -- NOT ALL CONNECTED by the {args.connect_timeout_s:.0f} s deadline"
        )
    )
    if errors:
        say(f"  last error: {fleet.last_error()}")
    if connected == 0:
        say("hub_scale: no node connected; see the logs with --keep")
        summary(n, math.nan, math.nan, math.nan, math.nan)
        return

    for step in filter(None, args.hub_gc.split("+")):
        command = (
            f"gc {step}" if step in ("freeze", "time") else f"gc threshold {step.replace(',', ' ')}"
        )
        say(f"experiment: hub {command} -> {await hub.ask(command, limit_s=120)}")

    # -- memory and idle CPU ------------------------------------------------------------------
    await trio.sleep(args.settle_s)
    settled = await hub.ask("stats")
    sessions_before = fleet.total("sessions")
    await trio.sleep(args.idle_s)
    idle = await hub.ask("stats")
    idle_cpu_pct = 100 * (idle["cpu_s"] - settled["cpu_s"]) / (idle["time"] - settled["time"])
    held = idle["connected"]
    rss_per_node = (idle["rss_kb"] - before["rss_kb"]) / max(held, 1)
    say(
        f"hub rss: {before['rss_kb'] / 1024:.1f} MB before connections,"
        f" {settled['rss_kb'] / 1024:.1f} MB {args.settle_s:.0f} s after all connected,"
        f" {idle['rss_kb'] / 1024:.1f} MB after the idle window"
    )
    say(
        f"memory: {rss_per_node:.1f} KB per node"
        f" ({(idle['rss_kb'] - before['rss_kb']) / 1024:.1f} MB / {held} nodes the hub holds)"
    )
    if args.tracemalloc:
        say(
            f"memory: of which Python heap (tracemalloc)"
            f" {(idle['traced_kb'] - before['traced_kb']) / max(held, 1):.1f} KB per node"
        )
    reconnects = fleet.total("sessions") - sessions_before
    say(
        f"idle: hub cpu {idle_cpu_pct:.1f} % of one core over {idle['time'] - settled['time']:.1f}"
        f" s with only heartbeats (every {args.heartbeat_s or 15:g} s);"
        f" {reconnects} reconnects in the window; hub gc {idle['gc_count']} collections,"
        f" {idle['gc_total_s'] * 1000:.0f} ms"
    )
    if args.profile:
        await hub.ask("profile start")
        await trio.sleep(args.idle_s)
        show_profile("idle", await hub.ask("profile stop", limit_s=120))
    if args.layer != "hub":
        await profile(args, hub)
        summary(n, rss_per_node, idle_cpu_pct, math.nan, math.nan)
        return

    # -- fan-out ------------------------------------------------------------------------------
    samples: list[float] = []
    missing_total = 0
    if args.profile:
        await hub.ask("profile start")
    for round_ in range(1, args.rounds + 1):
        acks = await hub.ask("stats")
        workers_cpu = fleet.total("cpu_s")
        put = await hub.ask(f"fanout {round_} {n}")
        arrived = await wait_until(
            lambda r=round_: len(fleet.latencies.get(r, ())) >= n, args.round_timeout_s
        )
        await trio.sleep(REPORT_EVERY_S * 2)  # the last status lines
        got = sorted(fleet.latencies.get(round_, ()))
        missing = max(0, n - len(got))
        missing_total += missing
        samples.extend(got)
        after = await hub.ask("stats")
        workers_cpu = fleet.total("cpu_s") - workers_cpu
        acked = after["ack_count"] - acks["ack_count"]
        ack_mean = (after["ack_sum_s"] - acks["ack_sum_s"]) / acked if acked else math.nan
        say(
            f"fanout round {round_}: {len(got)}/{n} nodes"
            + ("" if arrived else f" by the {args.round_timeout_s:.0f} s deadline")
            + f", p50 {ms(percentile(got, 0.5))} ms, p99 {ms(percentile(got, 0.99))} ms,"
            f" max {ms(got[-1] if got else math.nan)} ms;"
            f" hub put loop {put['put_s'] * 1000:.0f} ms,"
            f" hub send-to-ack mean {ms(ack_mean)} ms over {acked} acks"
        )
        say(
            f"  cpu in the round: hub {(after['cpu_s'] - acks['cpu_s']) * 1000:.0f} ms,"
            f" workers {workers_cpu * 1000:.0f} ms; hub gc: {after['gc_count']} collections,"
            f" {after['gc_total_s'] * 1000:.0f} ms cpu, longest {after['gc_max_s'] * 1000:.0f} ms"
            f" (count, s) by generation {after['gc_by_generation']},"
            f" {after['gc_collected']} objects freed"
        )
        await trio.sleep(args.pause_s)
    if args.profile:
        show_profile("fan-out rounds", await hub.ask("profile stop", limit_s=120))
    samples.sort()
    samples.extend([math.inf] * missing_total)
    p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
    say(
        f"fanout: p50 {ms(p50)} ms, p99 {ms(p99)} ms over {args.rounds} rounds x {n} nodes;"
        f" {missing_total} deliveries missing"
    )
    if fleet.total("sessions") != sessions_before:
        say(f"  note: {fleet.total('sessions') - sessions_before} reconnects during the run")
    await profile(args, hub)
    summary(n, rss_per_node, idle_cpu_pct, p50, p99)


async def profile(args: argparse.Namespace, hub: Child) -> None:
    lines = hub.log.read_text(errors="replace").splitlines()
    if lines:
        say(f"hub log: {len(lines)} lines (warnings and errors), the last ones:")
        for line in lines[-5:]:
            say(f"  {line[:200]}")
    trimmed = await hub.ask("trim")
    if "rss_kb" in trimmed:
        say(
            f"hub rss after gc + malloc_trim: {trimmed['rss_kb'] / 1024:.1f} MB"
            f" (was {trimmed['rss_kb_before'] / 1024:.1f} MB)"
        )
    if args.objects:
        objects = await hub.ask("objects", limit_s=120)
        say(f"hub python objects: {objects['total']} tracked by gc; most numerous:")
        for name, count, size_kb in objects["top"]:
            say(f"  {count:>9} {size_kb:>8} KB  {name}")
    if args.tracemalloc:
        traced = await hub.ask("tracemalloc", limit_s=300)
        say(
            f"hub tracemalloc: {traced['traced_kb'] / 1024:.1f} MB traced of"
            f" {traced['rss_kb'] / 1024:.1f} MB rss; largest sites:"
        )
        for where, size_kb, count in traced["by_line"]:
            say(f"  {size_kb:>8} KB {count:>9} blocks  {where}")
        say("by file:")
        for where, size_kb, count in traced["by_file"]:
            say(f"  {size_kb:>8} KB {count:>9} blocks  {where}")


def show_profile(what: str, stats: dict[str, Any]) -> None:
    say(f"hub profile, {what}: {stats['total_s']:.2f} s in Python functions (with cProfile on)")
    for title, key in (("own time", "by_own"), ("cumulative", "by_cumulative")):
        say(f"  by {title}:      calls    own s    cum s")
        for where, calls, own, cumulative in stats[key]:
            say(f"  {calls:>25} {own:>8.3f} {cumulative:>8.3f}  {where}")


def summary(n: int, rss: float, cpu: float, p50: float, p99: float) -> None:
    say(
        f"hub_scale nodes={n} rss_kb_per_node={rss:.1f} idle_cpu_pct={cpu:.1f}"
        f" fanout_p50_ms={ms(p50)} fanout_p99_ms={ms(p99)}"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--nodes", type=int, default=1000, help="simulated edges (default 1000)")
    add("--workers", type=int, default=4, help="processes holding the edges (default 4)")
    add("--source-addresses", type=int, default=8, help="127.0.0.2 and up (default 8)")
    add("--rounds", type=int, default=5, help="fan-out rounds (default 5)")
    add(
        "--idle-s",
        type=float,
        default=30,
        help="idle CPU window (default 30 s: whole heartbeat intervals, wherever they fall)",
    )
    add("--settle-s", type=float, default=5, help="wait after all connected (default 5 s)")
    add("--pause-s", type=float, default=1, help="between fan-out rounds (default 1 s)")
    add("--connect-concurrency", type=int, default=32, help="handshakes at once, all workers")
    add("--connect-timeout-s", type=float, default=300, help="deadline for all to connect")
    add("--round-timeout-s", type=float, default=30, help="deadline for one fan-out round")
    add("--handshake-timeout-s", type=float, default=20, help="one connection attempt")
    add(
        "--worker-nice",
        type=int,
        default=10,
        help="niceness of the worker processes (default 10), so that the simulated edges"
        " do not take CPU from the hub when both want it",
    )
    add("--max-handshakes", type=int, default=0, help="HubSettings.max_handshakes (0: default)")
    add("--heartbeat-s", type=float, default=0, help="HubSettings.heartbeat_s (0: default)")
    add("--layer", choices=LAYERS, default="hub", help="hold connections up to this layer")
    add("--objects", action="store_true", help="count the hub's Python objects at the end")
    add("--profile", action="store_true", help="cProfile the hub: an idle window, then fan-out")
    add("--tracemalloc", type=int, default=0, metavar="FRAMES", help="trace the hub's heap")
    add(
        "--hub-gc",
        default="",
        metavar="STEP+STEP",
        help="experiment: once all are connected, in the hub: 'freeze' (gc.freeze), 'time'"
        " (time a collection of each generation), or 'G0,G1,G2' (gc.set_threshold); the hub"
        " itself does none of these",
    )
    add("--keep", action="store_true", help="keep the temporary folder (certificates, logs)")
    # A worker process, started by the bench itself.
    add("--worker", type=int, default=None, help=argparse.SUPPRESS)
    add("--port", type=int, default=0, help=argparse.SUPPRESS)
    add("--pki", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.workers < 1 or not 1 <= args.source_addresses <= 250:
        parser.error("--nodes and --workers must be positive, --source-addresses 1 to 250")
    return args


def main() -> None:
    args = parse()
    if args.worker is not None:
        trio.run(Worker(args).run)
        return
    try:
        trio.run(bench, args)
    except* (ChildDied, trio.TooSlowError) as group:
        say(f"hub_scale: failed: {first_leaf(group)!r}")
        summary(args.nodes, math.nan, math.nan, math.nan, math.nan)
        sys.exit(1)


if __name__ == "__main__":
    main()
