"""How fast a cached-image pod starts on the agent, and how much memory the agent takes.

Usage: .venv/bin/python bench/pod_start.py [--pods N] [--burst M]   (as root: runc)

A loopback registry serves the busybox test image, which ``outpost image pull`` caches in the
agent's data folder; the registry is then stopped, so no pod can pull anything. The agent is the
real ``outpost run --standalone`` process, with its own data folder, manifests folder and runc
root in a temporary folder; it is told nothing but pod manifests. It runs from compiled bytecode,
as an installed package does: PYTHONDONTWRITEBYTECODE is dropped and PYTHONPYCACHEPREFIX points
into the temporary folder, filled by the pull (which imports everything the agent does).

Each pod is a hostNetwork busybox whose command touches /tmp/started and then loops, with an
exec readiness probe (periodSeconds 1) that touches /tmp/ready the first time it runs.

- Admitted: the agent's ``pod admitted`` log line (its reconcile took the pod up). A manifest
  written to the folder waits for the folder to be read first: standalone, the manifest writer
  reads it when inotify says it changed (``edge.manifests``) and the pod manager reconciles as
  soon as the store changed; that wait is printed apart.
- Running: the agent's ``container started`` log line (after ``runc start``).
- Ready: every container ready in the pod's status summary, which the agent commits with each
  status report (``pod-status/<uid>`` in the store's local state; read-only SQLite queries
  every 10 ms; the agent reports at most 5 times a second per pod).

Both log timestamps are the agent's own (wall clock, millisecond resolution). ``--pods`` pods
are started one at a time: the next manifest is written (and the previous one removed) once
the previous pod is Ready, so each start has the agent to itself, apart from the previous pod
being stopped in the background. Then ``--burst`` manifests are written at once, as an extra
figure. Where the time goes is read from file times in each container's bundle: the overlay
mount (``work/``), ``config.json`` (spec written), ``container.pid`` (``runc create`` done),
and the two files the container and its probe touch (file-system clock, a few ms coarse).

PSS is that of the agent process only, not its containers and not the per-container pipe
holders (``tail``; their PSS is printed apart). It is measured with 0 pods (after start-up),
with ``--burst`` pods running, and with 0 pods again at the end. /proc/<agent>/smaps_rollup
splits every page the agent shares with this benchmark's own Python process (libpython,
libcrypto, …) between the two, which a gateway does not: the figures used are computed from
/proc/<agent>/pagemap and /proc/kpagecount as PSS with this process left out (the same sum as
smaps_rollup's otherwise); the raw smaps_rollup figure is printed next to them. An extra idle
figure is taken from an agent compiling its modules from source at start, when this shell has
PYTHONDONTWRITEBYTECODE set.

The last line is ``pod_start p50_ms=… p99_ms=… agent_pss_mb_idle=… agent_pss_mb_20pods=…``
(p50/p99 from admitted to running, nearest rank; MB are MiB). Targets on the reference
machine: p50 ≤ 300 ms, p99 ≤ 1 s, PSS with 20 pods ≤ 40 MB.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import apsw
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge.pods.status import SUMMARY_STATE  # noqa: E402
from edge.store.schema import unpack  # noqa: E402
from tests.podkit import busybox_registry  # noqa: E402

OUTPOST = Path(sys.executable).parent / "outpost"
NAMESPACE = "default"
POLL_S = 0.01
COMMAND = "touch /tmp/started; while true; do sleep 1; done"
PROBE = "test -e /tmp/ready || touch /tmp/ready"
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1


def manifest(name: str, image: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "hostNetwork": True,
            # busybox sh as PID 1 ignores SIGTERM: a stop takes the grace period, then SIGKILL.
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", COMMAND],
                    "readinessProbe": {
                        "exec": {"command": ["sh", "-c", PROBE]},
                        "periodSeconds": 1,
                    },
                }
            ],
        },
    }


def compiled_env(pycache: Path) -> dict[str, str]:
    """The environment of an agent that runs from bytecode (cached in ``pycache``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def parse_logfmt(line: str) -> dict[str, str]:
    fields = {}
    for key, value in LOGFMT.findall(line):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        fields[key] = value
    return fields


def parse_ts(ts: str) -> float:
    moment = dt.datetime.strptime(ts.rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f")
    return moment.replace(tzinfo=dt.UTC).timestamp()


def pct(values: list[float], p: float) -> float:
    """Nearest rank: of 50 values, p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def spread(values: list[float]) -> str:
    return f"p50={ms(pct(values, 50))} p99={ms(pct(values, 99))} max={ms(max(values))} ms"


# -- memory ------------------------------------------------------------------------------------


def smaps_rollup_kb(pid: int) -> dict[str, int]:
    """``Pss``, ``Pss_Anon`` and ``Pss_File`` of one process as the kernel sums them, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Pss_Anon", "Pss_File"):
            fields[name] = int(rest.split()[0])
    return fields


def resident_pages(pid: int) -> list[int]:
    """The page frame of every resident page ``pid`` maps, once per mapping of it."""
    frames = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            if line.rstrip().endswith("[vsyscall]"):
                continue
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            pagemap.seek(start // PAGE * 8)
            for (entry,) in struct.iter_unpack("Q", pagemap.read((end - start) // PAGE * 8)):
                if entry >> 63:  # present
                    frames.append(entry & PFN_MASK)
    return frames


def pss_without_me_kb(pid: int) -> float:
    """PSS of ``pid`` (each page divided among the processes mapping it), this process left
    out of those: what it would be without the benchmark running next to it."""
    mine = collections.Counter(resident_pages(os.getpid()))
    total = 0.0
    with open("/proc/kpagecount", "rb") as counts:
        for frame in resident_pages(pid):
            counts.seek(frame * 8)
            (mapped,) = struct.unpack("Q", counts.read(8))
            total += 1 / max(1, mapped - mine[frame])
    return total * PAGE / 1024


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def holders_pss_kb(agent_pid: int) -> tuple[int, int]:
    """(count, summed PSS) of the agent's pipe holders (``tail`` children)."""
    count = total = 0
    for child in children(agent_pid):
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() != "tail":
                continue
            total += smaps_rollup_kb(child)["Pss"]
            count += 1
        except (OSError, KeyError):
            continue
    return count, total


@dataclass
class PssSamples:
    without_me: list[float] = field(default_factory=list)  # MB
    raw: list[float] = field(default_factory=list)  # MB, smaps_rollup
    last: dict[str, int] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return max(self.without_me)

    def line(self, label: str) -> str:
        anon = self.last["Pss_Anon"] / 1024
        return (
            f"agent PSS {label}: {self.value:.1f} MB = anon {anon:.1f} + files"
            f" {self.value - anon:.1f} (max of {len(self.without_me)} samples 1 s apart;"
            f" smaps_rollup, sharing pages with this benchmark's Python: {max(self.raw):.1f})"
        )


async def sample_pss(pid: int, samples: int) -> PssSamples:
    result = PssSamples()
    for i in range(samples):
        if i:
            await trio.sleep(1)
        result.without_me.append(pss_without_me_kb(pid) / 1024)
        result.last = smaps_rollup_kb(pid)
        result.raw.append(result.last["Pss"] / 1024)
    return result


# -- the agent and what it says ----------------------------------------------------------------


@dataclass
class Pod:
    name: str
    written: float = 0.0
    uid: str = ""
    admitted: float = 0.0
    started: float = 0.0
    ready: float = 0.0
    stamps: dict[str, float] = field(default_factory=dict)
    admitted_seen: trio.Event = field(default_factory=trio.Event)
    started_seen: trio.Event = field(default_factory=trio.Event)
    ready_seen: trio.Event = field(default_factory=trio.Event)

    @property
    def key(self) -> str:
        return f"{NAMESPACE}/Pod/{self.name}"


class Agent:
    """``outpost run --standalone`` with everything in ``folder``; its output in a file."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.data_dir = folder / "data"
        self.manifests = folder / "manifests"
        self.runc_root = folder / "runc"
        self.log = folder / "agent.log"
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.process: trio.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = await trio.lowlevel.open_process(
                [
                    str(OUTPOST),
                    "run",
                    "--standalone",
                    "--manifests",
                    str(self.manifests),
                    "--data-dir",
                    str(self.data_dir),
                    "--runc-root",
                    str(self.runc_root),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=self.env,
            )

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def write(self, pod: Pod, image: str) -> None:
        # Written aside and renamed: the agent never reads half a manifest.
        path = self.manifests / f"{pod.name}.json"
        path.with_suffix(".tmp").write_text(json.dumps(manifest(pod.name, image)))
        path.with_suffix(".tmp").rename(path)
        pod.written = time.time()

    def remove(self, pod: Pod) -> None:
        (self.manifests / f"{pod.name}.json").unlink(missing_ok=True)

    def bundle(self, pod: Pod) -> Path:
        return self.data_dir / "pods" / pod.uid / "containers" / "main-0"

    async def containers(self) -> list[str]:
        result = await trio.run_process(
            ["runc", "--root", str(self.runc_root), "list", "--format", "json"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if result.returncode != 0:
            # runc list fails when a container's state goes while it reads it: ask again.
            return [f"(runc list failed: {result.stderr.decode().strip()})"]
        return [c["id"] for c in json.loads(result.stdout or b"null") or []]


async def mounts_under(folder: Path) -> list[str]:
    mounts = await trio.Path("/proc/mounts").read_text()
    return [line.split()[1] for line in mounts.splitlines() if str(folder) in line.split()[1]]


class Observer:
    """Follows the agent's log and the pods' status summaries in its store."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.pods: dict[str, Pod] = {}
        self.problems: list[str] = []
        self.adopted = trio.Event()
        self._offset = 0
        self._db: apsw.Connection | None = None

    def add(self, name: str) -> Pod:
        self.pods[name] = pod = Pod(name)
        return pod

    async def run(self) -> None:
        try:
            while True:
                self._read_log()
                self._read_summaries()
                await trio.sleep(POLL_S)
        finally:
            if self._db is not None:
                self._db.close()

    def _read_log(self) -> None:
        if not self.agent.log.exists():
            return
        with self.agent.log.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            self._line(line)

    def _line(self, line: str) -> None:
        fields = parse_logfmt(line)
        if fields.get("level") in ("warning", "error", "critical"):
            self.problems.append(line)
        msg = fields.get("msg")
        if msg == "pods adopted":
            self.adopted.set()
        pod = self.pods.get(fields.get("pod", "").removeprefix(f"{NAMESPACE}/Pod/"))
        if pod is None or "ts" not in fields:
            return
        if msg == "pod admitted" and not pod.admitted:
            pod.uid, pod.admitted = fields["uid"], parse_ts(fields["ts"])
            pod.admitted_seen.set()
        elif msg == "container started" and not pod.started:
            pod.started = parse_ts(fields["ts"])
            pod.started_seen.set()

    def _read_summaries(self) -> None:
        """Each pod's status summary, which the agent commits with every status report (the
        store's local state, ``pod-status/<uid>``, what `outpost status` shows): a pod is Ready
        once every container is."""
        waiting = {
            SUMMARY_STATE + p.uid: p for p in self.pods.values() if p.admitted and not p.ready
        }
        if not waiting:
            return
        if self._db is None:
            path = self.agent.data_dir / "store.db"
            self._db = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
            self._db.setbusytimeout(1000)
        marks = ",".join("?" * len(waiting))
        rows = self._db.execute(
            f"SELECT key, value FROM local_state WHERE key IN ({marks})", tuple(waiting)
        ).fetchall()
        now = time.time()
        for key, value in rows:
            summary = unpack(value)
            pod = waiting[key]
            if summary["containers"] and summary["ready"] == summary["containers"]:
                pod.ready = now
                pod.ready_seen.set()

    async def wait(self, event: trio.Event, seconds: float, what: str) -> None:
        with trio.move_on_after(seconds) as waited:
            await event.wait()
        if waited.cancelled_caught:
            recent = "\n".join(self.problems[-5:]) or "(no warnings in the agent's log)"
            raise RuntimeError(f"{what}: not within {seconds:.0f} s; the agent said:\n{recent}")


# -- figures -----------------------------------------------------------------------------------


async def stamp(agent: Agent, pod: Pod) -> None:
    """File times of a running pod's bundle: where its start-up time went."""
    bundle = agent.bundle(pod)
    files = {
        "mounted": bundle / "work",  # overlayfs creates work/work when mounting
        "spec": bundle / "config.json",
        "created": bundle / "container.pid",
        "running": bundle / "upper/tmp/started",
        "probed": bundle / "upper/tmp/ready",
    }
    with trio.move_on_after(2):
        for name, path in files.items():
            while not path.exists():  # noqa: ASYNC110 - written by other processes
                await trio.sleep(POLL_S)
            pod.stamps[name] = path.stat().st_mtime


STEPS = (
    ("admitted", "mounted", "state, sandbox, image lookup, pod dir, overlay mount"),
    ("mounted", "spec", "spec generation"),
    ("spec", "created", "runc create (after a runc delete of any stale one)"),
    ("created", "running", "pipe holder, runc start, the command runs"),
    ("running", "started", "agent logs started (after saving its state)"),
    ("started", "probed", "first readiness probe (runc exec)"),
    ("probed", "ready", "Ready reported (status coalescing, commit, our 10 ms poll)"),
)


def report(title: str, pods: list[Pod]) -> list[float]:
    running = [p.started - p.admitted for p in pods]
    print(title)
    print(f"  admitted → running: {spread(running)}")
    print(f"  admitted → Ready:   {spread([p.ready - p.admitted for p in pods])}")
    waited = [p.admitted - p.written for p in pods]
    print(f"  manifest written → admitted (the folder's re-read, not counted): {spread(waited)}")
    print("  where the time goes (median of each step; file times, a few ms coarse):")
    times = [
        {**p.stamps, "admitted": p.admitted, "started": p.started, "ready": p.ready} for p in pods
    ]
    for first, then, what in STEPS:
        deltas = [t[then] - t[first] for t in times if first in t and then in t]
        if deltas:
            print(f"    {first:>8} → {then:<8} {ms(pct(deltas, 50)):>5} ms  {what}")
    return running


async def leftovers(agent: Agent) -> list[str]:
    return [*await agent.containers(), *await mounts_under(agent.data_dir)]


async def wait_gone(agent: Agent, seconds: float) -> list[str]:
    """Until no container is left and nothing is mounted in the data folder; what is left."""
    with trio.move_on_after(seconds):
        while await leftovers(agent):  # noqa: ASYNC110 - other processes' doing: polled
            await trio.sleep(0.2)
    return await leftovers(agent)


def zombies(pid: int) -> str:
    """The zombie children of ``pid`` (a child subreaper), by name."""
    found: collections.Counter[str] = collections.Counter()
    for child in children(pid):
        try:
            lines = Path(f"/proc/{child}/status").read_text().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
        if fields.get("State", "").startswith("Z"):
            found[fields["Name"]] += 1
    return ", ".join(f"{n} {name}" for name, n in found.most_common()) or "none"


async def removed(agent: Agent, what: str, seconds: float) -> None:
    """Wait for the pods just deleted to be gone; say so if the agent left something."""
    left = await wait_gone(agent, seconds)
    if left:
        print(
            f"  AGENT BUG: {seconds:.0f} s after {what} were deleted, still there: {left};"
            f" the agent's zombie children: {zombies(agent.pid)}"
        )


# -- the run -----------------------------------------------------------------------------------


async def idle_from_source(folder: Path) -> PssSamples:
    """Idle PSS of an agent that compiles its modules at start (no bytecode written)."""
    agent = Agent(folder, {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    observer = Observer(agent)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observer.run)
        await agent.start()
        try:
            await observer.wait(observer.adopted, 30, "the agent started")
            await trio.sleep(2)
            return await sample_pss(agent.pid, 3)
        finally:
            with trio.CancelScope(shield=True):
                await agent.stop()
            nursery.cancel_scope.cancel()


async def measure(image: str, folder: Path, count: int, burst: int) -> None:
    agent = Agent(folder / "agent", compiled_env(folder / "pycache"))
    observer = Observer(agent)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observer.run)
        started = time.monotonic()
        await agent.start()
        try:
            await observer.wait(observer.adopted, 30, "the agent started")
            print(f"agent up (pods adopted) {time.monotonic() - started:.2f} s after its start")
            await trio.sleep(2)
            idle = await sample_pss(agent.pid, 3)
            print(idle.line("with 0 pods"))

            # One at a time: each pod is admitted with the previous one Ready.
            sequence: list[Pod] = []
            previous = None
            for i in range(count):
                pod = observer.add(f"seq-{i:02d}")
                agent.write(pod, image)
                if previous is not None:
                    agent.remove(previous)
                await observer.wait(pod.admitted_seen, 20, f"{pod.name} admitted")
                await observer.wait(pod.started_seen, 20, f"{pod.name} running")
                await observer.wait(pod.ready_seen, 20, f"{pod.name} Ready")
                await stamp(agent, pod)
                sequence.append(pod)
                previous = pod
            if previous is not None:
                agent.remove(previous)
            await removed(agent, "the last of them", 30)
            running = report(
                f"{count} pods one at a time (each admitted as the previous one, Ready, is"
                " deleted):",
                sequence,
            )
            print((await sample_pss(agent.pid, 1)).line(f"with 0 pods, after those {count}"))

            # A burst: every manifest at once, admitted by one reconcile.
            pods = [observer.add(f"burst-{i:02d}") for i in range(burst)]
            for pod in pods:
                agent.write(pod, image)
            for pod in pods:
                await observer.wait(pod.ready_seen, 60, f"{pod.name} Ready")
            for pod in pods:
                await stamp(agent, pod)
            report(f"{burst} pods at once (extra):", pods)
            first = min(p.admitted for p in pods)
            print(
                f"  all {burst} running {ms(max(p.started for p in pods) - first)} ms and Ready"
                f" {ms(max(p.ready for p in pods) - first)} ms after the first was admitted"
            )

            await trio.sleep(5)  # a few probe periods: the steady state with these pods
            loaded = await sample_pss(agent.pid, 5)
            print(loaded.line(f"with {burst} pods"))
            holders, holders_kb = holders_pss_kb(agent.pid)
            print(f"  not counted: {holders} pipe holders (tail), {holders_kb / 1024:.1f} MB PSS")

            for pod in pods:
                agent.remove(pod)
            await removed(agent, f"those {burst}", 30)
            print(f"  the agent's zombie children now: {zombies(agent.pid)}")
            await trio.sleep(2)
            print((await sample_pss(agent.pid, 3)).line("with 0 pods again, at the end"))
        finally:
            with trio.CancelScope(shield=True):
                await clean_up(agent)
            nursery.cancel_scope.cancel()
    left = await mounts_under(folder)
    if left:
        raise RuntimeError(f"mounts left under {folder}: {left}")
    print("clean-up: pods removed, agent stopped, no container or mount left")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        source = await idle_from_source(folder / "from-source")
        print(source.line("with 0 pods, compiling from source (PYTHONDONTWRITEBYTECODE)"))
    print(
        f"pod_start p50_ms={ms(pct(running, 50))} p99_ms={ms(pct(running, 99))}"
        f" agent_pss_mb_idle={idle.value:.1f} agent_pss_mb_{burst}pods={loaded.value:.1f}"
    )


async def clean_up(agent: Agent) -> None:
    """Remove the pods through the agent; force whatever it left (after a failure)."""
    for path in agent.manifests.glob("*"):
        path.unlink()
    if agent.process is not None and agent.process.returncode is None:
        await wait_gone(agent, 30)
    await agent.stop()
    for container in await agent.containers():
        if container.startswith("("):
            continue
        print(f"clean-up: forcing the removal of container {container}")
        await trio.run_process(
            ["runc", "--root", str(agent.runc_root), "delete", "--force", container], check=False
        )
    for target in reversed(await mounts_under(agent.folder)):
        print(f"clean-up: unmounting {target}")
        await trio.run_process(["umount", "-l", target], check=False)


def pull(image: str, folder: Path) -> None:
    """Cache ``image`` in the agent's data folder; this also fills the bytecode cache."""
    pulled = subprocess.run(
        [OUTPOST, "image", "--data-dir", folder / "agent" / "data", "pull", image],
        capture_output=True,
        env=compiled_env(folder / "pycache"),
        check=False,
        timeout=120,
    )
    if pulled.returncode != 0:
        raise RuntimeError(f"cannot pull {image}: {pulled.stderr.decode().strip()}")
    print(f"image: {pulled.stdout.decode().strip()}, cached; the registry is then stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=50, help="pods started one at a time")
    parser.add_argument("--burst", type=int, default=20, help="pods started at once")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("runc needs root")
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as name:
        folder = Path(name)
        with busybox_registry() as (_, image):
            pull(image, folder)
        trio.run(measure, image, folder, args.pods, args.burst)


if __name__ == "__main__":
    main()
