"""The report log: exactly-once effect across a cloud crash, a torn last line, a new store."""

from __future__ import annotations

import json
from pathlib import Path

from cloud.hub.reports import ReportLog
from edge.wire.events import Message, Op


def reports(*seqs: int) -> list[Message]:
    return [Message(seq, f"r{seq}", Op.EVENT, "ns/Pod/p", "", {"n": seq}) for seq in seqs]


async def test_repeats_after_a_restart_are_not_logged_again(tmp_path: Path) -> None:
    path = tmp_path / "reports.jsonl"
    log = ReportLog(path)
    await log.apply("gw", reports(1, 2, 3))
    log.close()
    # A crash tore the last line mid-write: it was never acknowledged, so it comes again.
    with path.open("ab") as f:
        f.write(b'{"node":"gw","seq":4,"id"')
    again = ReportLog(path)
    assert again.last == {"gw": 3}
    await again.apply("gw", reports(2, 3, 4))
    again.close()
    assert again.duplicates == 2
    logged = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq"] for r in logged] == [1, 2, 3, 4]


async def test_a_new_edge_store_counts_from_one_again_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "reports.jsonl"
    log = ReportLog(path)
    await log.apply("gw", reports(1, 2))
    await log.restart("gw", "new-epoch")
    await log.apply("gw", reports(1))
    log.close()
    assert ReportLog(path).last == {"gw": 1}
