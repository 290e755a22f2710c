"""The agent as a process, standalone (no cloud at all): pods survive its kill -9 and are
adopted, not restarted; after a simulated reboot every pod runs again; `outpost logs` reads
their output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.channelkit import LogFile, Managed, spawn
from tests.podkit import busybox_registry
from tests.processes import VENV_BIN
from tests.waiting import eventually

pytestmark = pytest.mark.requires_root("runc needs root")

PODS = 10


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    with busybox_registry() as (_, ref):
        yield ref


class Agent(Managed):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data_dir = folder / "data"
        self.manifests = folder / "manifests"
        self.runc_root = folder / "runc"
        self.manifests.mkdir(parents=True)
        self.process: trio.Process | None = None
        self.runs: list[LogFile] = []

    async def start(self) -> None:
        self.process, output = await spawn(
            self.folder / f"agent-{len(self.runs)}.log",
            VENV_BIN / "outpost",
            "run",
            "--standalone",
            "--manifests",
            self.manifests,
            "--data-dir",
            self.data_dir,
            "--runc-root",
            self.runc_root,
        )
        self.runs.append(output)
        with trio.fail_after(30):
            await output.wait_for(r"msg=\"pods adopted\"")

    def containers(self) -> dict[str, int]:
        """Running containers: id -> host pid."""
        # runc fails the whole list when a container is deleted while it reads: try again.
        for _ in range(5):
            result = subprocess.run(
                ["runc", "--root", str(self.runc_root), "list", "--format", "json"],
                capture_output=True,
                check=False,
            )
            if result.returncode == 0:
                break
        result.check_returncode()
        return {
            c["id"]: c["pid"]
            for c in json.loads(result.stdout or b"null") or []
            if c["status"] == "running"
        }

    def write_pods(self, image: str) -> None:
        for i in range(PODS):
            (self.manifests / f"pod-{i}.yaml").write_text(
                f"""apiVersion: v1
kind: Pod
metadata: {{name: app-{i}}}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "echo started {i}; while true; do sleep 1; done"]
"""
            )


@pytest.fixture
async def agent(tmp_path: Path) -> Iterator[Agent]:
    agent = Agent(tmp_path)
    try:
        yield agent
    finally:
        # Remove the pods through the agent itself, then stop it.
        for manifest in agent.manifests.glob("*.yaml"):
            manifest.unlink()
        if agent.process is None or agent.process.returncode is not None:
            await agent.start()

        async def torn_down() -> bool:
            return not agent.containers() and not await mounts_under(tmp_path)

        try:
            await eventually(torn_down, "the agent has torn its pods down", within=60, interval=0.2)
        finally:
            await agent.stop()
        assert await mounts_under(tmp_path) == []


async def mounts_under(folder: Path) -> list[str]:
    mounts = await trio.Path("/proc/mounts").read_text()
    return [line.split()[1] for line in mounts.splitlines() if str(folder) in line.split()[1]]


async def test_pods_survive_kill_9_and_are_adopted_not_restarted(agent: Agent, image: str) -> None:
    agent.write_pods(image)
    await agent.start()
    await eventually(lambda: len(agent.containers()) == PODS, "all pods run")
    before = agent.containers()
    await agent.kill()
    assert agent.containers() == before  # nothing depends on the agent being alive
    await agent.start()
    await trio.sleep(3)  # a restart would have happened by now
    assert agent.containers() == before
    adopted = sum("adopted container" in line for line in agent.runs[-1].lines)
    assert adopted == PODS
    result = await trio.run_process(
        [VENV_BIN / "outpost", "logs", "app-3", "--data-dir", agent.data_dir],
        capture_stdout=True,
    )
    assert result.stdout.decode().splitlines() == ["started 3"]


async def test_after_a_reboot_every_pod_runs_again_without_the_cloud(
    agent: Agent, image: str
) -> None:
    agent.write_pods(image)
    await agent.start()
    await eventually(lambda: len(agent.containers()) == PODS, "all pods run")
    before = agent.containers()
    await agent.kill()
    # A reboot: every container process gone, runc's state (on /run) gone, mounts gone.
    for pid in before.values():
        os.kill(pid, signal.SIGKILL)
    await trio.run_process(["rm", "-rf", str(agent.runc_root)])
    for target in reversed(await mounts_under(agent.data_dir)):
        await trio.run_process(["umount", "-l", target])
    await agent.start()
    await eventually(lambda: len(agent.containers()) == PODS, "every pod runs again")
    assert set(agent.containers().values()).isdisjoint(before.values())
