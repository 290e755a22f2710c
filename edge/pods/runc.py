"""The runc command line, from trio: create, start, state, list, kill, delete, exec.

Outpost keeps its containers under its own runc root (``/run/outpost/runc`` by default), so that
``runc list`` there is exactly Outpost's containers: that is what adoption after an agent restart
reads. Every call is a short-lived ``runc`` process; failures raise ``RuncError`` with runc's
own message.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from edge import defaults

log = logging.getLogger("edge.pods.runc")

DEFAULT_ROOT = defaults.RUNC_ROOT


class RuncError(Exception):
    """runc refused or failed; the message carries its stderr."""

    def __init__(self, action: str, container: str, detail: str) -> None:
        super().__init__(f"runc {action} {container}: {detail}")
        self.detail = detail


class ContainerNotFound(RuncError):
    pass


@dataclass(frozen=True)
class State:
    id: str
    pid: int
    status: str  # created | running | paused | stopped
    bundle: str
    annotations: dict[str, str]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        return cls(
            id=data["id"],
            pid=int(data.get("pid") or 0),
            status=data["status"],
            bundle=data.get("bundle", ""),
            annotations=data.get("annotations") or {},
        )


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    output: bytes


class Runc:
    def __init__(self, root: Path = DEFAULT_ROOT, binary: str = "runc") -> None:
        self.root = root
        self.binary = binary

    def _argv(self, *args: str | os.PathLike[str]) -> list[str]:
        return [self.binary, "--root", str(self.root), *(str(a) for a in args)]

    async def _run(self, action: str, container: str, *args: str | os.PathLike[str]) -> bytes:
        result = await trio.run_process(
            self._argv(*args), capture_stdout=True, capture_stderr=True, check=False
        )
        if result.returncode != 0:
            detail = _runc_message(result.stderr)
            if "does not exist" in detail or "not exist" in detail:
                raise ContainerNotFound(action, container, detail)
            raise RuncError(action, container, detail)
        return result.stdout

    async def create(
        self, container: str, bundle: Path, *, stdout: int, stderr: int, pid_file: Path
    ) -> int:
        """Create the container (its process waits for ``start``); returns its host pid.

        The container inherits ``stdout`` and ``stderr`` as they are (runc's pass-through
        mode), so whoever holds the read ends of those pipes holds its output.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        # runc's own errors would go to its stderr, which is the container's: have it log
        # them as JSON to a file in the bundle instead.
        argv = self._argv("create", "--bundle", bundle, "--pid-file", pid_file, container)
        argv[1:1] = ["--log", str(bundle / "runc.log"), "--log-format", "json"]
        process = await trio.run_process(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, check=False
        )
        if process.returncode != 0:
            raise RuncError("create", container, _read_runc_log(bundle))
        return int(await trio.Path(pid_file).read_text())

    async def version(self) -> str:
        """runc's ``--version`` output (parse it with ``edge.node_info.parse_runc_version``);
        empty when runc cannot be run."""
        try:
            result = await trio.run_process(
                [self.binary, "--version"], capture_stdout=True, capture_stderr=True, check=False
            )
        except OSError:
            return ""
        return result.stdout.decode(errors="replace") if result.returncode == 0 else ""

    async def start(self, container: str) -> None:
        await self._run("start", container, "start", container)

    async def state(self, container: str) -> State:
        return State.from_json(json.loads(await self._run("state", container, "state", container)))

    async def list(self) -> list[State]:
        if not self.root.exists():
            return []
        for attempt in range(3):
            try:
                out = await self._run("list", "*", "list", "--format", "json")
                break
            except RuncError as exc:
                # runc fails the whole list when a container is deleted while it reads.
                if "no such file or directory" not in exc.detail or attempt == 2:
                    raise
        return [State.from_json(item) for item in json.loads(out or b"null") or []]

    async def kill(self, container: str, sig: signal.Signals = signal.SIGTERM) -> None:
        await self._run("kill", container, "kill", container, str(int(sig)))

    async def delete(self, container: str, *, force: bool = False) -> None:
        try:
            await self._run(
                "delete", container, "delete", *(["--force"] if force else []), container
            )
        except ContainerNotFound:
            return

    async def exec(
        self, container: str, argv: list[str], *, env: list[str] | None = None
    ) -> ExecResult:
        """Run ``argv`` inside the running container; put a timeout around the call."""
        args = ["exec"]
        for item in env or ():
            args += ["--env", item]
        process = await trio.run_process(
            self._argv(*args, container, *argv),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
        return ExecResult(process.returncode, process.stdout)


def _runc_message(stderr: bytes) -> str:
    """runc logs JSON-ish lines (``level=error msg="…"``); keep the message of the last one."""
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return "failed without a message"
    last = lines[-1]
    if 'msg="' in last:
        return last.split('msg="', 1)[1].rsplit('"', 1)[0].replace('\\"', '"')
    return last


def _read_runc_log(bundle: Path) -> str:
    path = bundle / "runc.log"
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return "failed (see the container's log)"
    errors = [entry.get("msg", "") for entry in lines if entry.get("level") == "error"]
    return errors[-1] if errors else "failed (see the container's log)"
