"""Where upstream reports go once the hub has them, before it acknowledges them.

The hub acknowledges a report only after its sink has applied it durably, and a sink must apply
each ``(node, seq)`` at most once, even when the edge sends it again after a cloud crash (the
persisted watermark may lag what was acknowledged). Together that is exactly-once effect.

``ReportLog`` is the sink for audit and tests: one JSON line per report in a file, written and
fsynced before the acknowledgement. On start it reads the file back to learn each node's last
logged sequence number, which is what makes repeats harmless. The edge controller's sink
(``cloud.mirror.kube_reports``) writes to Kubernetes; ``Fanout`` runs it and the log together.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from edge.wire.events import Message

log = logging.getLogger("cloud.hub.reports")


class ReportSink(Protocol):
    async def apply(self, node: str, messages: Sequence[Message]) -> None: ...

    async def restart(self, node: str, epoch: str) -> None:
        """The node's edge has a new store, numbering its reports from 1 again."""


class LogOnly:
    """The default sink: a debug log line per report, nothing kept."""

    async def restart(self, node: str, epoch: str) -> None:
        log.info("edge store replaced", extra={"node": node, "epoch": epoch})

    async def apply(self, node: str, messages: Sequence[Message]) -> None:
        for message in messages:
            log.debug(
                "report",
                extra={"node": node, "seq": message.seq, "op": str(message.op), "key": message.key},
            )


class Fanout:
    """Several sinks, each applying every report in turn (Kubernetes, then the audit log)."""

    def __init__(self, *sinks: ReportSink) -> None:
        self.sinks = sinks

    async def apply(self, node: str, messages: Sequence[Message]) -> None:
        for sink in self.sinks:
            await sink.apply(node, messages)

    async def restart(self, node: str, epoch: str) -> None:
        for sink in self.sinks:
            await sink.restart(node, epoch)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class ReportLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: dict[str, int] = {}
        self.duplicates = 0
        if path.exists():
            with path.open("rb") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        # A torn last line from a crash mid-write: it was never acknowledged.
                        continue
                    node = record["node"]
                    if "restart" in record:
                        self.last[node] = 0
                    else:
                        self.last[node] = max(self.last.get(node, 0), record["seq"])
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        self._file = path.open("ab")
        self._limiter = trio.CapacityLimiter(1)

    async def apply(self, node: str, messages: Sequence[Message]) -> None:
        last = self.last.get(node, 0)
        fresh = [m for m in messages if m.seq > last]
        self.duplicates += len(messages) - len(fresh)
        if not fresh:
            return
        lines = b"".join(
            json.dumps(
                {
                    "node": node,
                    "seq": m.seq,
                    "id": m.id,
                    "op": str(m.op),
                    "key": m.key,
                    "rv": m.rv,
                    "body": _jsonable(m.body),
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
            for m in fresh
        )
        await trio.to_thread.run_sync(self._append, lines, limiter=self._limiter)
        self.last[node] = fresh[-1].seq

    async def restart(self, node: str, epoch: str) -> None:
        line = json.dumps({"node": node, "restart": epoch}).encode() + b"\n"
        await trio.to_thread.run_sync(self._append, line, limiter=self._limiter)
        self.last[node] = 0

    def _append(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line a crash left half-written, so the next record starts on its own line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
