"""Container logs in the Kubernetes CRI log format, with size-based rotation.

Each line a container writes becomes ``<RFC3339Nano time> <stream> <tag> <content>``: the
stream is ``stdout`` or ``stderr``; the tag is ``F`` for a full line and ``P`` for a part of a
line longer than ``MAX_LINE`` (or one cut off when the container exited), exactly as kubelet's
tools read them. When a file passes ``max_bytes`` it is renamed ``<name>.1`` (older ones
shift to ``.2`` …, at most ``max_files`` kept) and a new one is started.

The formatting and parsing are pure; ``LogFile`` owns the file and ``pump`` reads a pipe into it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

MAX_LINE = 16 * 1024
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_FILES = 3


def timestamp(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def format_lines(stream: str, data: bytes, pending: bytes, when: str) -> tuple[bytes, bytes]:
    """CRI lines for ``pending + data``; returns ``(lines, new pending)`` where pending is an
    unfinished line kept for the next call (emitted as parts once over ``MAX_LINE``)."""
    buffer = pending + data
    out = bytearray()
    prefix = f"{when} {stream} ".encode()
    while True:
        newline = buffer.find(b"\n")
        if newline == -1 or newline > MAX_LINE:
            if len(buffer) >= MAX_LINE:
                out += prefix + b"P " + buffer[:MAX_LINE] + b"\n"
                buffer = buffer[MAX_LINE:]
                continue
            return bytes(out), buffer
        out += prefix + b"F " + buffer[:newline] + b"\n"
        buffer = buffer[newline + 1 :]


@dataclass(frozen=True)
class Entry:
    time: str
    stream: str
    partial: bool
    content: bytes


def parse_line(line: bytes) -> Entry | None:
    """One CRI log line, or None when it is not one (a torn last line after a crash)."""
    parts = line.rstrip(b"\n").split(b" ", 3)
    if len(parts) != 4 or parts[1] not in (b"stdout", b"stderr") or parts[2] not in (b"F", b"P"):
        return None
    return Entry(parts[0].decode(), parts[1].decode(), parts[2] == b"P", parts[3])


def lines_of(data: bytes) -> list[bytes]:
    """Lines ended by ``\n`` only: a container's ``\r`` is content, not a line break."""
    lines = data.split(b"\n")
    last = lines.pop()
    return [line + b"\n" for line in lines] + ([last] if last else [])


def messages(data: bytes) -> Iterator[Entry]:
    """Whole messages in a log's bytes: parts joined with the full line that ends them. Parts
    still open at the end (a line the container never finished) come last, marked partial."""
    parts: dict[str, Entry] = {}
    for line in lines_of(data):
        entry = parse_line(line)
        if entry is None:
            continue
        before = parts.pop(entry.stream, None)
        content = (before.content if before else b"") + entry.content
        if entry.partial:
            parts[entry.stream] = Entry(entry.time, entry.stream, True, content)
            continue
        yield Entry(entry.time, entry.stream, False, content)
    yield from parts.values()


class LogFile:
    """One container's log file, appended to and rotated by size."""

    def __init__(
        self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, max_files: int = DEFAULT_MAX_FILES
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_files = max_files
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        """Append whole CRI lines, rotating between lines so that no file passes the limit
        (unless one line alone does)."""
        chunk = bytearray()
        for line in lines_of(data):
            if self._size + len(chunk) + len(line) > self.max_bytes and self._size + len(chunk):
                self._flush(chunk)
                chunk.clear()
                self._rotate()
            chunk += line
        self._flush(chunk)

    def _flush(self, chunk: bytes | bytearray) -> None:
        if chunk:
            os.write(self._fd, chunk)
            self._size += len(chunk)

    def _rotate(self) -> None:
        os.close(self._fd)
        for n in range(self.max_files - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if n == self.max_files - 1:
                older.unlink(missing_ok=True)
            newer = self.path if n == 1 else self.path.with_name(f"{self.path.name}.{n - 1}")
            if newer.exists():
                newer.rename(older)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = 0

    def close(self) -> None:
        os.close(self._fd)


async def pump(fd: int, stream: str, log: LogFile) -> None:
    """Copy a container's pipe into its log until the container closes it (it exited)."""
    pending = b""
    async with trio.lowlevel.FdStream(fd) as pipe:
        while data := await pipe.receive_some(65536):
            lines, pending = format_lines(stream, data, pending, timestamp())
            log.write(lines)
    if pending:
        log.write(f"{timestamp()} {stream} P ".encode() + pending + b"\n")


def log_files(path: Path) -> list[Path]:
    """The current log file and its rotated predecessors, oldest first."""
    rotated = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    return [*rotated, path] if path.exists() else rotated


def container_log_dir(data_dir: Path, namespace: str, pod: str, container: str | None) -> Path:
    """The folder of one container's logs (``<data>/logs/<ns>_<pod>_<uid>/<container>``).

    With ``container`` None the pod must have exactly one. Raises ``LookupError`` with what
    exists when there is no such pod or container.
    """
    pods = sorted((data_dir / "logs").glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
    if not pods:
        raise LookupError(f"no logs for pod {namespace}/{pod} in {data_dir / 'logs'}")
    folder = pods[-1]
    containers = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if container is None:
        if len(containers) != 1:
            raise LookupError(
                f"pod {namespace}/{pod} has containers {', '.join(containers)}: choose one with -c"
            )
        container = containers[0]
    if container not in containers:
        raise LookupError(
            f"pod {namespace}/{pod} has no container {container!r}"
            f" (it has {', '.join(containers) or 'none'})"
        )
    return folder / container


def current_log(folder: Path) -> Path:
    """The log of the container's latest run (attempts are numbered from 0)."""
    runs = sorted((p for p in folder.glob("*.log") if p.stem.isdigit()), key=lambda p: int(p.stem))
    if not runs:
        raise LookupError(f"no log files in {folder}")
    return runs[-1]
