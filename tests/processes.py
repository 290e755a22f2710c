"""Helpers for tests that run Outpost's commands (or the cluster command) as real processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


async def start(*args: str | Path, **kwargs) -> trio.Process:
    """Start a process with stdout and stderr merged into one readable pipe."""
    return await trio.lowlevel.open_process(
        [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        **kwargs,
    )


class LineReader:
    """Reads a process's output line by line.

    Every line read is echoed to stdout, which pytest shows when a test fails, so a timeout
    (put a ``trio.fail_after`` around ``wait_for``) still shows what the process said.
    """

    def __init__(self, process: trio.Process) -> None:
        self._stream = process.stdout
        self._buffer = b""

    async def wait_for(self, pattern: str) -> re.Match[str]:
        regex = re.compile(pattern)
        while True:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                line = raw.decode(errors="replace")
                print(line)
                if match := regex.search(line):
                    return match
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise AssertionError(f"output ended before a line matched {pattern!r}")
            self._buffer += chunk
