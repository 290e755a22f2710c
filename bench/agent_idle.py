"""How much CPU an idle agent takes, and how often it wakes up, with a few pods running.

Usage: .venv/bin/python bench/agent_idle.py [--pods 5] [--seconds 60] [--settle 10]   (as root)

The agent is the real ``outpost run --standalone`` process, set up as ``bench/pod_start.py``
sets it up (its helpers, imported): its own data folder, manifests folder and runc root in a
temporary folder, the busybox test image pulled from a loopback registry into its data folder
(which also fills its bytecode cache) before the registry is stopped, and the agent running from
that bytecode. A ``mosquitto`` on loopback is its eventbus broker (``OUTPOST_EVENTBUS``), so the
eventbus is connected and idle rather than reconnecting to a broker that is not there. No
devices, no cloud.

``--pods`` hostNetwork busybox pods, each looping on ``sleep 1`` (``bench/pod_start.py``'s
manifest), are written to the manifests folder at once; without ``--probe-period`` they have no
readiness probe, so all the agent does is its own loops (with one, every period is also a
``runc exec`` per pod). Once `outpost status --json` shows every pod Running and ``--settle``
seconds more have passed, the agent is watched for ``--seconds``:

- CPU: utime + stime of the agent process from /proc/<agent>/stat, which sums all of its
  threads (trio's worker threads included) and none of its child processes: not the
  containers, not the pipe holders (``tail``), not ``runc``. The CPU of the children the agent
  waited for in the window (``runc`` and probe ``runc exec`` runs: cutime + cstime) is printed
  apart, not counted. In percent of one CPU.
- Wake-ups: voluntary + involuntary context switches of every thread of the agent
  (/proc/<agent>/task/*/status), sampled every second and summed per thread, so a worker
  thread that ends in the window loses at most its last second. Per second. The involuntary
  ones (the thread was preempted: more the machine's load than the agent) are printed apart.

Also printed: the load average before and after (other work on the machine shows there, and
in the figures), and the threads that took CPU or woke up in the window.

The last line is ``agent_idle cpu_pct=… wakeups_per_s=…``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.pod_start import (  # noqa: E402
    OUTPOST,
    PROBE,
    Agent,
    clean_up,
    compiled_env,
    manifest,
    pull,
)
from tests.mqttkit import Mosquitto  # noqa: E402
from tests.podkit import busybox_registry  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 1.0


def pod_manifest(name: str, image: str, probe_period: int) -> dict:
    """``bench/pod_start.py``'s pod, with its readiness probe only if ``probe_period``."""
    body = manifest(name, image)
    container = body["spec"]["containers"][0]
    if probe_period:
        container["readinessProbe"] = {
            "exec": {"command": ["sh", "-c", PROBE]},
            "periodSeconds": probe_period,
        }
    else:
        container.pop("readinessProbe", None)
    return body


def write_pods(agent: Agent, image: str, count: int, probe_period: int) -> list[str]:
    names = [f"idle-{i:02d}" for i in range(count)]
    for name in names:
        # Written aside and renamed: the agent never reads half a manifest.
        path = agent.manifests / f"{name}.json"
        path.with_suffix(".tmp").write_text(json.dumps(pod_manifest(name, image, probe_period)))
        path.with_suffix(".tmp").rename(path)
    return names


async def status(agent: Agent) -> dict:
    """`outpost status --json` of the agent's data folder (it reads the store)."""
    result = await trio.run_process(
        [str(OUTPOST), "status", "--json", "--data-dir", str(agent.data_dir)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=agent.env,
    )
    if result.returncode != 0:
        return {}
    return json.loads(result.stdout)


async def wait_running(agent: Agent, names: list[str], seconds: float) -> float:
    """Until `outpost status` shows every pod Running; how long that took."""
    started = time.monotonic()
    keys = {f"default/Pod/{name}" for name in names}
    pods: dict = {}
    with trio.move_on_after(seconds):
        while True:
            if agent.process is not None and agent.process.returncode is not None:
                raise RuntimeError(f"the agent exited ({agent.process.returncode}): {tail(agent)}")
            pods = (await status(agent)).get("pods", {})
            if all(pods.get(key, {}).get("phase") == "Running" for key in keys):
                return time.monotonic() - started
            await trio.sleep(0.5)
    phases = {key: pods.get(key, {}).get("phase") for key in sorted(keys)}
    raise RuntimeError(f"pods not Running within {seconds:.0f} s: {phases}\n{tail(agent)}")


def tail(agent: Agent, lines: int = 10) -> str:
    if not agent.log.exists():
        return "(no agent log)"
    return "\n".join(agent.log.read_text(errors="replace").splitlines()[-lines:])


# -- /proc ---------------------------------------------------------------------------------------


def stat_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) of a process, in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return utime + stime, cutime + cstime


@dataclass
class Thread:
    """One thread's counters now and when the window first saw it (zero if started in it)."""

    name: str
    now: tuple[int, int, int]  # utime + stime ticks, context switches, of which involuntary
    first: tuple[int, int, int] = (0, 0, 0)

    def delta(self, index: int) -> int:
        return self.now[index] - self.first[index]


def threads(pid: int) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """Per thread: its name and (utime + stime ticks, voluntary + involuntary context
    switches, involuntary ones)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        forced = int(fields["nonvoluntary_ctxt_switches"])
        switches = int(fields["voluntary_ctxt_switches"]) + forced
        after = stat[stat.rindex(")") + 2 :].split()
        ticks = int(after[11]) + int(after[12])
        found[int(task.name)] = (fields["Name"].strip(), (ticks, switches, forced))
    return found


@dataclass
class Window:
    """CPU and wake-ups of one process over a time window, followed thread by thread."""

    pid: int
    seconds: float = 0.0
    own_ticks: int = 0
    children_ticks: int = 0
    threads: dict[int, Thread] = field(default_factory=dict)

    @property
    def cpu_pct(self) -> float:
        return self.own_ticks / TICK / self.seconds * 100

    @property
    def children_pct(self) -> float:
        return self.children_ticks / TICK / self.seconds * 100

    @property
    def switches(self) -> int:
        return sum(t.delta(1) for t in self.threads.values())

    @property
    def involuntary(self) -> int:
        return sum(t.delta(2) for t in self.threads.values())

    @property
    def wakeups_per_s(self) -> float:
        return self.switches / self.seconds

    def sample(self, first: bool = False) -> None:
        for tid, (name, counters) in threads(self.pid).items():
            thread = self.threads.get(tid)
            if thread is None:
                # Alive at the first sample: counted from now; started in the window: from zero.
                self.threads[tid] = Thread(name, counters, counters if first else (0, 0, 0))
            else:
                thread.now = counters


async def watch(pid: int, seconds: float) -> Window:
    window = Window(pid)
    own_before, children_before = stat_ticks(pid)
    window.sample(first=True)
    started = time.monotonic()
    deadline = started + seconds
    while (now := time.monotonic()) < deadline:
        await trio.sleep(min(SAMPLE_S, deadline - now))
        window.sample()
    own_after, children_after = stat_ticks(pid)
    window.sample()
    window.seconds = time.monotonic() - started
    window.own_ticks = own_after - own_before
    window.children_ticks = children_after - children_before
    return window


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def code_root(env: dict[str, str]) -> str:
    """Where the agent's ``edge`` package comes from, resolved the way the agent resolves it."""
    probe = subprocess.run(
        [sys.executable, "-c", "import edge; print(edge.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    return probe.stdout.strip() or probe.stderr.strip()


# -- the run -------------------------------------------------------------------------------------


async def measure(image: str, folder: Path, args: argparse.Namespace, broker: Mosquitto) -> None:
    env = {**compiled_env(folder / "pycache"), "OUTPOST_EVENTBUS": broker.url}
    print(f"agent code: {code_root(env)}")
    agent = Agent(folder / "agent", env)
    try:
        names = write_pods(agent, image, args.pods, args.probe_period)
        await agent.start()
        took = await wait_running(agent, names, 60 + 5 * args.pods)
        probe = f"every {args.probe_period} s" if args.probe_period else "none"
        print(
            f"{args.pods} pods Running {took:.1f} s after the agent's start"
            f" (eventbus {broker.url}, readiness probe {probe})"
        )
        await trio.sleep(args.settle)
        before = loadavg()
        window = await watch(agent.pid, args.seconds)
        after = loadavg()
        if agent.process is not None and agent.process.returncode is not None:
            raise RuntimeError(f"the agent exited during the window: {tail(agent)}")
        pods = (await status(agent)).get("pods", {})
        running = sum(1 for pod in pods.values() if pod.get("phase") == "Running")
        alive = len(threads(agent.pid))
    finally:
        with trio.CancelScope(shield=True):
            await clean_up(agent)

    print(f"window: {window.seconds:.1f} s, after {args.settle:.0f} s settling; {running} pods")
    print(f"load average before {before}, after {after}")
    print(
        f"agent CPU: {window.own_ticks / TICK:.2f} s = {window.cpu_pct:.2f} % of one CPU"
        f" (utime + stime, {TICK} ticks/s)"
    )
    print(
        f"not counted, children the agent waited for (runc …): {window.children_ticks / TICK:.2f}"
        f" s = {window.children_pct:.2f} %"
    )
    print(
        f"wake-ups: {window.switches} context switches = {window.wakeups_per_s:.1f}/s over"
        f" {len(window.threads)} threads ({alive} alive at the end);"
        f" involuntary {window.involuntary / window.seconds:.1f}/s (preempted: the machine's load)"
    )
    by_name: dict[str, list[int]] = {}
    for thread in window.threads.values():
        totals = by_name.setdefault(thread.name, [0, 0, 0])
        totals[0] += 1
        totals[1] += thread.delta(0)
        totals[2] += thread.delta(1)
    for name, (count, ticks, switches) in sorted(by_name.items(), key=lambda i: -i[1][2]):
        print(
            f"  {name:<16} x{count:<3} CPU {ticks / TICK:6.2f} s"
            f"  wake-ups {switches / window.seconds:7.1f}/s"
        )
    print(f"agent_idle cpu_pct={window.cpu_pct:.2f} wakeups_per_s={window.wakeups_per_s:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=5, help="pods running while idle")
    parser.add_argument("--seconds", type=float, default=60, help="the measured window")
    parser.add_argument(
        "--settle", type=float, default=10, help="seconds after all pods are Running, not measured"
    )
    parser.add_argument(
        "--probe-period",
        type=int,
        default=0,
        help="give each pod an exec readiness probe with this period (0: no probe)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("runc needs root")
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as name:
        folder = Path(name)
        with busybox_registry() as (_, image):
            pull(image, folder)
        with Mosquitto() as broker:
            trio.run(measure, image, folder, args, broker)


if __name__ == "__main__":
    main()
