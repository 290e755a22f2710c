"""The cloud hub as the subject of ``bench/hub_scale.py``: one process, driven over stdin.

It runs ``cloud.hub.server.Hub`` with a ``MemorySource`` (no Kubernetes) and default
``HubSettings`` except the address and the options given, and answers one JSON line on stdout
per command line on stdin:

- ``stats``: RSS (VmRSS), CPU seconds (user + system), connected nodes, queue depth, counters,
  and the garbage collector's pauses since the last ``stats``.
- ``fanout ROUND COUNT``: ``MemorySource.put`` of ``ns/ConfigMap/fanout`` to nodes 0..COUNT-1,
  as fast as it can, with body ``{"t": time.time() when the round started, "round": ROUND}``.
- ``trim``: ``malloc_trim(0)``, then the RSS (how much of the RSS is freed heap kept by glibc).
- ``tracemalloc``: the top allocation sites (only with ``--tracemalloc``, which slows all down).
- ``objects``: Python objects alive, counted by type (the most numerous first).
- ``profile start`` / ``profile stop``: cProfile the hub between the two; ``stop`` answers with
  the functions that took the most time (cProfile roughly doubles the time everything takes).
- ``gc freeze`` / ``gc threshold G0 G1 G2`` / ``gc time``: experiments, not the hub's behaviour:
  move every object alive to the permanent generation, set the collector's thresholds, or time
  a collection of each generation (twice).
- ``quit`` (or end of stdin): stop.

``--layer`` swaps the hub for a bare server holding connections up to one layer (``tcp``, ``tls``,
``ws``), so the bench can tell what each layer of a connection costs in memory.

Not meant to be run by hand; ``hub_scale.py --help`` says how to run the bench.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import json
import logging
import os
import pstats
import resource
import ssl
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import trio  # noqa: E402
from trio_websocket import ConnectionClosed, wrap_server_stream  # noqa: E402

from cloud.hub.server import Hub, HubSettings, tune_gc  # noqa: E402
from cloud.hub.source import MemorySource  # noqa: E402
from cloud.hub.streams import NodeStreams  # noqa: E402
from cloud.hub.tls import server_context  # noqa: E402

FANOUT_KEY = "ns/ConfigMap/fanout"
LAYERS = ("hub", "ws", "tls", "tcp")


def node_name(index: int) -> str:
    return f"node-{index:05d}"


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (root may not go past it in a
    container); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class GcPauses:
    """Time the cyclic garbage collector stops the hub for (gc.callbacks): CPU time of this
    thread, so that time the process was not scheduled is not counted."""

    def __init__(self) -> None:
        self._started = 0.0
        self._reset()
        gc.callbacks.append(self._callback)

    def _reset(self) -> None:
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = 0.0
        self.collected = 0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
            return
        pause = time.thread_time() - self._started
        generation = info["generation"]
        self.count[generation] += 1
        self.total_s[generation] += pause
        self.max_s = max(self.max_s, pause)
        self.collected += info["collected"]

    def take(self) -> dict[str, Any]:
        """Pauses since the last take."""
        taken = {
            "gc_count": sum(self.count),
            "gc_total_s": sum(self.total_s),
            "gc_max_s": self.max_s,
            "gc_by_generation": [
                [n, round(s, 3)] for n, s in zip(self.count, self.total_s, strict=True)
            ],
            "gc_collected": self.collected,
        }
        self._reset()
        return taken


class Lines:
    """Lines from a trio receive stream (a pipe)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def next(self) -> str | None:
        """The next line without its newline; None at the end of the stream."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line.decode(errors="replace")
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                return None
            self.buffer += chunk


def reply(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


class Subject:
    """The server under test: the real hub, or a bare server holding connections to a layer."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        folder = Path(args.pki)
        self.ssl_context = server_context(
            (folder / "server.crt").read_bytes(),
            (folder / "server.key").read_bytes(),
            (folder / "ca.pem").read_bytes(),
        )
        streams = NodeStreams()
        self.source = MemorySource(streams)
        settings = HubSettings(host=args.host, port=0)
        if args.max_handshakes:
            settings.max_handshakes = args.max_handshakes
        if args.heartbeat_s:
            settings.heartbeat_s = args.heartbeat_s
        self.settings = settings
        self.hub = Hub(settings, self.ssl_context, streams=streams, source=self.source)
        tune_gc()  # as outpost-cloud serve does
        self.held = 0  # connections held by a bare layer server
        self.gc = GcPauses()
        self.profiler: cProfile.Profile | None = None

    async def run(self, task_status: trio.TaskStatus[int]) -> None:
        if self.args.layer == "hub":
            await self.hub.run(task_status=task_status)
            return
        handler: Callable[[trio.SocketStream], Any] = {
            "tcp": self._hold_tcp,
            "tls": self._hold_tls,
            "ws": self._hold_ws,
        }[self.args.layer]
        listeners = await trio.open_tcp_listeners(0, host=self.args.host, backlog=4096)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started(listeners[0].socket.getsockname()[1])

    async def _hold_tcp(self, tcp: trio.SocketStream) -> None:
        self.held += 1
        try:
            while await tcp.receive_some():
                pass
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            self.held -= 1
            await trio.aclose_forcefully(tcp)

    async def _hold_tls(self, tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
        try:
            await stream.do_handshake()
            self.held += 1
            try:
                while await stream.receive_some():
                    pass
            finally:
                self.held -= 1
        except (trio.BrokenResourceError, ssl.SSLError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _hold_ws(self, tcp: trio.SocketStream) -> None:
        # The same structure as the hub's: a nursery per connection for the WebSocket's reader.
        stream = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
        try:
            async with trio.open_nursery() as nursery:
                await stream.do_handshake()
                request = await wrap_server_stream(
                    nursery, stream, max_message_size=self.settings.max_frame, message_queue_size=1
                )
                ws = await request.accept()
                self.held += 1
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed:
                    pass
                finally:
                    self.held -= 1
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, ssl.SSLError, OSError, ConnectionClosed):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    # -- commands -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        # One collection of the registry: each one sums the depth of every node's stream.
        samples = {
            (sample.name, sample.labels.get("reason")): sample.value
            for metric in self.hub.metrics.registry.collect()
            for sample in metric.samples
        }

        def sample(name: str, reason: str | None = None) -> float:
            return samples.get((name, reason), 0.0)

        return {
            "time": time.time(),
            "rss_kb": rss_kb(),
            "cpu_s": cpu_s(),
            "connected": len(self.hub.sessions) if self.args.layer == "hub" else self.held,
            "depth": sample("outpost_hub_queue_depth"),
            "sessions_total": int(sample("outpost_hub_sessions_total")),
            "replaced": int(sample("outpost_hub_sessions_replaced_total")),
            "ack_sum_s": sample("outpost_hub_ack_latency_seconds_sum"),
            "ack_count": int(sample("outpost_hub_ack_latency_seconds_count")),
            "rejected": {
                reason: int(value)
                for (name, reason), value in samples.items()
                if name == "outpost_hub_rejected_total" and value
            },
            "traced_kb": tracemalloc.get_traced_memory()[0] // 1024,
            **self.gc.take(),
        }

    def fanout(self, round_: int, count: int) -> dict[str, Any]:
        started = time.time()
        body = {"t": started, "round": round_}
        for index in range(count):
            self.source.put(node_name(index), FANOUT_KEY, dict(body))
        return {"t": started, "put_s": time.time() - started}

    def trim(self) -> dict[str, Any]:
        gc.collect()
        before = rss_kb()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError) as exc:
            return {"error": str(exc)}
        return {"rss_kb_before": before, "rss_kb": rss_kb()}

    def tracemalloc(self) -> dict[str, Any]:
        if not tracemalloc.is_tracing():
            return {"error": "start the hub process with --tracemalloc"}
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        by_line = snapshot.statistics("lineno")[:40]
        by_file = snapshot.statistics("filename")[:25]
        current, peak = tracemalloc.get_traced_memory()
        return {
            "traced_kb": current // 1024,
            "peak_kb": peak // 1024,
            "rss_kb": rss_kb(),
            "by_line": [
                [str(s.traceback[0]), s.size // 1024, s.count] for s in by_line if s.traceback
            ],
            "by_file": [
                [s.traceback[0].filename, s.size // 1024, s.count] for s in by_file if s.traceback
            ],
        }

    def profile(self, action: str) -> dict[str, Any]:
        if action == "start":
            self.profiler = cProfile.Profile()
            self.profiler.enable()
            return {"started": True}
        if self.profiler is None:
            return {"error": "profile start first"}
        self.profiler.disable()
        stats = pstats.Stats(self.profiler)
        self.profiler = None
        rows = []
        table = stats.stats  # type: ignore[attr-defined]
        for (filename, line, function), (_, calls, own, cumulative, _) in table.items():
            rows.append([f"{Path(filename).name}:{line}({function})", calls, own, cumulative])
        total = sum(row[2] for row in rows)
        return {
            "total_s": total,
            "by_own": sorted(rows, key=lambda r: -r[2])[:30],
            "by_cumulative": sorted(rows, key=lambda r: -r[3])[:30],
        }

    def objects(self) -> dict[str, Any]:
        gc.collect()
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for obj in gc.get_objects():
            name = f"{type(obj).__module__}.{type(obj).__qualname__}"
            counts[name] += 1
            sizes[name] += sys.getsizeof(obj, 0)
        return {
            "total": sum(counts.values()),
            "top": [[name, n, sizes[name] // 1024] for name, n in counts.most_common(40)],
        }


def command(subject: Subject, name: str, *params: str) -> dict[str, Any]:
    match name, *params:
        case ["stats"]:
            return subject.stats()
        case ["fanout", round_, count]:
            return subject.fanout(int(round_), int(count))
        case ["trim"]:
            return subject.trim()
        case ["tracemalloc"]:
            return subject.tracemalloc()
        case ["objects"]:
            return subject.objects()
        case ["profile", action]:
            return subject.profile(action)
        case ["gc", "freeze"]:
            gc.collect()
            gc.freeze()
            return {"frozen": gc.get_freeze_count()}
        case ["gc", "threshold", *thresholds]:
            gc.set_threshold(*(int(t) for t in thresholds))
            return {"threshold": gc.get_threshold()}
        case ["gc", "time"]:
            took = []
            for generation in (0, 1, 2, 0, 1, 2):
                started = time.thread_time()
                gc.collect(generation)
                took.append(round(time.thread_time() - started, 4))
            return {"collect_s": took, "tracked": len(gc.get_objects())}
    return {"error": f"unknown command {name!r} {params}"}


async def main(args: argparse.Namespace) -> None:
    raise_nofile()
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    subject = Subject(args)
    commands = Lines(trio.lowlevel.FdStream(os.dup(0)))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(subject.run)
        reply({"port": port, "pid": os.getpid(), **subject.stats()})
        while (line := await commands.next()) is not None:
            if line.strip() == "quit":
                break
            try:
                reply(command(subject, *line.split()))
            except (ValueError, TypeError, IndexError) as exc:
                reply({"error": f"{line!r}: {exc}"})
        nursery.cancel_scope.cancel()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pki", required=True, help="folder with ca.pem, server.crt, server.key")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--layer", choices=LAYERS, default="hub")
    parser.add_argument("--max-handshakes", type=int, default=0, help="0: the default")
    parser.add_argument("--heartbeat-s", type=float, default=0, help="0: the default")
    parser.add_argument(
        "--tracemalloc", type=int, default=0, metavar="FRAMES", help="trace allocations"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse())
