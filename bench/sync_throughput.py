"""How many downstream messages per second one edge applies, commits durably and acknowledges.

Usage: .venv/bin/python bench/sync_throughput.py [--messages N] [--body-bytes B]

A cloud hub runs in a child process with an in-memory source (no Kubernetes: this measures the
channel and the store). The edge side is the real edge hub with a real store in a temporary
folder, SQLite in WAL mode with synchronous=FULL, so every commit is fsynced. Once the edge is
online the hub is told to publish N distinct objects; the clock runs from that moment until
the hub has seen every one acknowledged (an ack is sent only after the commit).

The last line is ``sync_throughput msgs_per_s=… commits_per_msg=…``. Target: 5,000 msg/s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloud.hub.server import Hub, HubSettings  # noqa: E402
from cloud.hub.source import MemorySource  # noqa: E402
from cloud.hub.streams import NodeStreams  # noqa: E402
from cloud.hub.tls import server_context  # noqa: E402
from edge.hub.client import EdgeHub  # noqa: E402
from edge.store import Store  # noqa: E402
from edge.store.aio import AsyncStore  # noqa: E402
from tests.hubkit import Pki  # noqa: E402

NODE = "bench-node"


async def serve_hub(folder: Path) -> None:
    """The child: a hub on a free port; reads "go N B" on stdin, publishes, reports the acks."""
    streams = NodeStreams()
    source = MemorySource(streams)
    tls = server_context(
        (folder / "server.crt").read_bytes(),
        (folder / "server.key").read_bytes(),
        (folder / "ca.crt").read_bytes(),
    )
    hub = Hub(
        HubSettings(host="127.0.0.1", port=0, queue_capacity=1_000_000),
        tls,
        streams=streams,
        source=source,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(hub.run)
        print(f"port {port}", flush=True)
        stdin = trio.lowlevel.FdStream(0)
        line = b""
        while not line.endswith(b"\n"):
            line += await stdin.receive_some(100)
        _, count, size = line.decode().split()
        started = time.monotonic()
        body = {"data": "x" * int(size)}
        for i in range(int(count)):
            source.put(NODE, f"bench/ConfigMap/obj-{i}", body, uid=f"uid-{i}")
        stream = hub.streams[NODE]
        target = stream.inflight.next_seq - 1 + len(stream.queue)
        published = time.monotonic()
        while stream.inflight.acked < target:  # noqa: ASYNC110 - polled at 2 ms resolution
            await trio.sleep(0.002)
        print(f"acked {started} {published} {time.monotonic()} {target}", flush=True)
        nursery.cancel_scope.cancel()


async def measure(count: int, size: int, folder: Path) -> None:
    pki = Pki.create(folder)
    pki.ca.issue("outpost-cloud", server_names=("127.0.0.1",)).write(folder, "server")
    (folder / "ca.crt").write_bytes(pki.ca_pem)
    hub = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--serve-hub", str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    buffered = b""

    async def readline() -> str:
        nonlocal buffered
        while b"\n" not in buffered:
            chunk = await hub.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError("the hub process exited early")
            buffered += chunk
        line, buffered = buffered.split(b"\n", 1)
        return line.decode()

    try:
        port = int((await readline()).split()[1])
        config = pki.edge_config(NODE, port)
        with Store(folder / "edge.db") as store:
            edge = EdgeHub(AsyncStore(store), config)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(edge.run)
                with trio.fail_after(30):
                    await edge.link.wait_online()
                commits_before = store.commits
                await hub.stdin.send_all(f"go {count} {size}\n".encode())
                line = await readline()
                nursery.cancel_scope.cancel()
            commits = store.commits - commits_before
            batches = edge.applied_batches
        _, started, published, acked, target = line.split()
        elapsed = float(acked) - float(started)
        rate = count / elapsed
        print(
            f"messages: {count} distinct objects, {size}-byte bodies (+{int(target) - count} sync)"
        )
        print(f"publish in the hub: {float(published) - float(started):.3f} s")
        print(f"published → all acknowledged: {elapsed:.3f} s")
        print(f"edge commits: {commits} in {batches} applied batches")
        print(f"sync_throughput msgs_per_s={rate:.0f} commits_per_msg={commits / count:.4f}")
    finally:
        hub.kill()
        await hub.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000, help="objects to publish")
    parser.add_argument("--body-bytes", type=int, default=200, help="payload size per object")
    parser.add_argument("--serve-hub", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hub:
        trio.run(serve_hub, args.serve_hub)
        return
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as folder:
        trio.run(measure, args.messages, args.body_bytes, Path(folder))


if __name__ == "__main__":
    main()
