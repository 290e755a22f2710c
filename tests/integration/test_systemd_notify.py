"""A real `outpost run --standalone` started as systemd would start a Type=notify unit: a real
AF_UNIX datagram socket as NOTIFY_SOCKET receives READY=1 once the pods are adopted, WATCHDOG=1
for as long as it runs, and STOPPING=1 on SIGTERM; runc, a child of the agent, never sees
NOTIFY_SOCKET (`runc start` would wait for the container to notify, and hang)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.channelkit import LogFile
from tests.podkit import busybox_registry
from tests.processes import REPO, VENV_BIN
from tests.waiting import eventually

pytestmark = pytest.mark.requires_root("runc needs root")

WATCHDOG_USEC = 400_000  # WatchdogSec=0.4s: a ping every 0.2 s


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    with busybox_registry() as (_, ref):
        yield ref


class Systemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._arrived = trio.Event()

    async def serve(self) -> None:
        await self.sock.bind(str(self.path))
        while True:
            data = await self.sock.recv(4096)
            self.messages.append((time.monotonic(), data.decode()))
            self._arrived.set()
            self._arrived = trio.Event()

    def times(self, message: str) -> list[float]:
        return [t for t, m in self.messages if message in m.split("\n")]

    async def wait_for(self, message: str) -> float:
        while not self.times(message):
            await self._arrived.wait()
        return self.times(message)[0]


def runc_containers(root: Path) -> dict[str, str]:
    result = subprocess.run(
        ["runc", "--root", str(root), "list", "--format", "json"], capture_output=True, check=False
    )
    return {c["id"]: c["status"] for c in json.loads(result.stdout or b"null") or []}


def pod_statuses(data_dir: Path) -> dict:
    result = subprocess.run(
        [VENV_BIN / "outpost", "status", "--json", "--data-dir", data_dir],
        capture_output=True,
        check=True,
    )
    return json.loads(result.stdout)["pods"]


async def test_ready_watchdog_and_stopping_reach_systemd(tmp_path: Path, image: str) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "app.yaml").write_text(
        f"""apiVersion: v1
kind: Pod
metadata: {{name: app}}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "echo NOTIFY_SOCKET=$NOTIFY_SOCKET; while true; do sleep 1; done"]
"""
    )
    runc_root = tmp_path / "runc"
    systemd = Systemd(tmp_path / "notify")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID")}

    async def start(log_name: str) -> tuple[trio.Process, LogFile]:
        log = LogFile(tmp_path / log_name)
        with log.path.open("ab") as out:
            process = await trio.lowlevel.open_process(
                [
                    str(VENV_BIN / "outpost"),
                    "run",
                    "--standalone",
                    "--manifests",
                    str(manifests),
                    "--data-dir",
                    str(tmp_path / "data"),
                    "--runc-root",
                    str(runc_root),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=env | {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)},
            )
        return process, log

    async with trio.open_nursery() as nursery:
        nursery.start_soon(systemd.serve)
        await eventually(systemd.path.exists, "the notify socket is bound")
        process, log = await start("agent.log")
        try:
            with trio.fail_after(60):
                ready_at = await systemd.wait_for("READY=1")
            assert any('msg="pods adopted"' in line for line in log.lines), log.lines
            ready = next(m for t, m in systemd.messages if t == ready_at)
            assert "STATUS=running, 1 pods adopted" in ready.split("\n")
            # The watchdog was fed during start-up already, and keeps being fed.
            await trio.sleep(1.5)
            after = [t for t in systemd.times("WATCHDOG=1") if t > ready_at]
            assert len(after) >= 5, systemd.messages
            gaps = [b - a for a, b in itertools.pairwise(after)]
            assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
            # runc started the pod: it did not wait for the container to notify.
            await eventually(
                lambda: "running" in runc_containers(runc_root).values(), "the pod runs"
            )
            result = await trio.run_process(
                [VENV_BIN / "outpost", "logs", "app", "--data-dir", tmp_path / "data"],
                capture_stdout=True,
            )
            assert result.stdout.decode().splitlines() == ["NOTIFY_SOCKET="]
            # `outpost status` lists the pod, read from the store beside the running agent.
            await eventually(
                lambda: (
                    pod_statuses(tmp_path / "data").get("default/Pod/app", {}).get("phase")
                    == "Running"
                ),
                "outpost status shows the pod running",
            )
            assert pod_statuses(tmp_path / "data")["default/Pod/app"]["ready"] == 1
            status = await trio.run_process(
                [VENV_BIN / "outpost", "status", "--data-dir", tmp_path / "data"],
                capture_stdout=True,
            )
            text = status.stdout.decode()
            assert "pods:      1\n  default/app  Running  ready 1/1  restarts 0\n" in text, text
            assert systemd.times("STOPPING=1") == []

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await process.wait() == 0
            assert len(systemd.times("STOPPING=1")) == 1
            assert "running" in runc_containers(runc_root).values()  # pods outlive the agent
        finally:
            # Remove the pod through a new agent, then stop it.
            (manifests / "app.yaml").unlink()
            if process.returncode is None:
                process.kill()
                await process.wait()
            process, log = await start("cleanup.log")
            # Gone means torn down too (mounts, network), not only out of runc's list.
            pods = tmp_path / "data" / "pods"

            def torn_down() -> bool:
                return not runc_containers(runc_root) and not (
                    pods.exists() and any(pods.iterdir())
                )

            try:
                await eventually(
                    torn_down, "the new agent has torn the pod down", within=60, interval=0.2
                )
            finally:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                nursery.cancel_scope.cancel()
    assert pod_statuses(tmp_path / "data") == {}  # a removed pod leaves `outpost status`
