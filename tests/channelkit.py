"""Real `outpost-cloud serve` and `outpost run` processes for the channel's end-to-end tests.

The cloud talks to the harness's real apiserver; an edge joins with a real token and runs with
its own data folder, optionally inside a network namespace (``tests.netns.EdgeLink``).
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio
from lightkube import AsyncClient
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap

from cloud.mirror.edge_index import NODE_LABEL
from edge.store import Store
from tests.cluster.controlplane import ControlPlane, free_port
from tests.processes import REPO, VENV_BIN
from tests.waiting import eventually


class LogFile:
    """A process's merged output, written to a file: nothing blocks on a full pipe however
    much it logs, and the whole log stays readable after it was killed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    @property
    def lines(self) -> list[str]:
        return self.path.read_text(errors="replace").splitlines()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """The first line from the last match on that matches; put a fail_after around it."""
        regex = re.compile(pattern)

        def next_match() -> re.Match[str] | None:
            data = self.path.read_bytes()[self._offset :]
            end = data.rfind(b"\n") + 1
            for line in data[:end].decode(errors="replace").splitlines(keepends=True):
                self._offset += len(line.encode())
                if match := regex.search(line):
                    return match
            return None

        # The callers' deadlines differ (a failover, a restart); theirs is the one that counts.
        return await eventually(
            next_match, f"{self.path.name} has a line matching {pattern!r}", within=math.inf
        )


async def spawn(log: Path, *args: str | Path) -> tuple[trio.Process, LogFile]:
    with log.open("ab") as out:
        process = await trio.lowlevel.open_process(
            [str(a) for a in args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
    return process, LogFile(log)


class Managed:
    """A long-running process a test starts, kills with -9, or stops with SIGTERM; every run's
    output is kept in ``runs``."""

    process: trio.Process | None = None

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended within 10 s."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await self.process.wait()
            await self.kill()


class Cloud(Managed):
    """One `outpost-cloud serve` process; ``start`` again after ``kill`` to restart it.

    It listens on every address; ``host`` is the one edges use (and the certificate names).
    ``extra_args`` go on the end of `serve`'s command line (more --tls-san, timers).
    """

    def __init__(
        self,
        plane: ControlPlane,
        folder: Path,
        *,
        host: str = "127.0.0.1",
        heartbeat: float = 1,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.plane = plane
        self.folder = folder
        self.host = host
        self.port = free_port()
        self.heartbeat = heartbeat
        self.extra_args = list(extra_args)
        self.report_log = folder / "reports.jsonl"
        self.process: trio.Process | None = None
        self.runs: list[LogFile] = []

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def start(self) -> None:
        self.process, output = await spawn(
            self.folder / f"cloud-{len(self.runs)}.log",
            VENV_BIN / "outpost-cloud",
            "serve",
            "--kubeconfig",
            self.plane.kubeconfig,
            "--listen",
            f"0.0.0.0:{self.port}",
            "--tls-san",
            self.host,
            "--metrics-listen",
            "",
            "--heartbeat",
            str(self.heartbeat),
            "--report-log",
            self.report_log,
            *self.extra_args,
        )
        self.runs.append(output)
        with trio.fail_after(30):
            await output.wait_for(r"msg=\"hub listening\"")

    async def token(self, node: str) -> str:
        result = await trio.run_process(
            [
                VENV_BIN / "outpost-cloud",
                "token",
                "create",
                node,
                "--kubeconfig",
                self.plane.kubeconfig,
            ],
            capture_stdout=True,
            capture_stderr=True,
        )
        return result.stdout.decode().strip()


class Edge(Managed):
    """One gateway: its data folder, and its `outpost run` process when running.

    ``run_args`` go on the end of `outpost run`'s command line (--runc-root, --pod-subnet).
    """

    def __init__(
        self, node: str, folder: Path, prefix: Sequence[str] = (), run_args: Sequence[str] = ()
    ) -> None:
        self.node = node
        self.data_dir = folder / node
        self.prefix = list(prefix)
        self.run_args = [str(a) for a in run_args]
        self.process: trio.Process | None = None
        self.runs: list[LogFile] = []

    async def join(self, cloud: Cloud, url: str | None = None) -> None:
        token = await cloud.token(self.node)
        await trio.run_process(
            [
                *self.prefix,
                VENV_BIN / "outpost",
                "join",
                "--cloud",
                url or cloud.url,
                "--token",
                token,
                "--node-name",
                self.node,
                "--data-dir",
                self.data_dir,
            ],
            capture_stdout=True,
        )

    async def start(self, url: str | None = None) -> None:
        args = ["--cloud", url] if url else []
        self.process, output = await spawn(
            self.data_dir.parent / f"{self.node}-{len(self.runs)}.log",
            *self.prefix,
            VENV_BIN / "outpost",
            "--log-level",
            "debug",
            "run",
            "--data-dir",
            self.data_dir,
            *args,
            *self.run_args,
        )
        self.runs.append(output)

    async def wait_online(self) -> None:
        with trio.fail_after(30):
            await self.runs[-1].wait_for(r"msg=\"cloud link up\"")

    async def status(self) -> dict:
        result = await trio.run_process(
            [VENV_BIN / "outpost", "status", "--json", "--data-dir", self.data_dir],
            capture_stdout=True,
        )
        return json.loads(result.stdout)

    def store(self) -> Store:
        return Store(self.data_dir / "store.db")

    def objects(self) -> dict[str, tuple[str, dict]]:
        """What the edge holds: key → (rv, data)."""
        with self.store() as store:
            return {key: (rv, body["data"]) for key, rv, body in store.list("ConfigMap")}

    def applied_ranges(self) -> list[tuple[int, int]]:
        """Every downstream range the edge logged as applied, over all its runs."""
        pattern = re.compile(r"msg=applied first=(\d+) last=(\d+)")
        ranges = []
        for run in self.runs:
            for line in run.lines:
                if m := pattern.search(line):
                    ranges.append((int(m.group(1)), int(m.group(2))))
        return ranges


async def cloud_objects(kube: AsyncClient, node: str) -> dict[str, tuple[str, dict]]:
    """What the cloud says ``node`` should hold: key → (rv, data)."""
    return {
        f"{cm.metadata.namespace}/ConfigMap/{cm.metadata.name}": (
            cm.metadata.resourceVersion,
            cm.data or {},
        )
        async for cm in kube.list(ConfigMap, namespace="*", labels={NODE_LABEL: node})
    }


def configmap(name: str, node: str, data: dict[str, str], namespace: str = "default") -> ConfigMap:
    return ConfigMap(
        metadata=ObjectMeta(name=name, namespace=namespace, labels={NODE_LABEL: node}),
        data=data,
    )
