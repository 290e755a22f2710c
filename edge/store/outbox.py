"""The upstream outbox: reports queued durably, coalesced by key, numbered when taken for sending.

An entry is *unsent* until ``take`` gives it the next upstream sequence number, then *in flight*
until the cloud acknowledges that number and ``delete_acked`` removes it. Numbers come from a
counter stored apart from the entries, so they continue from the highest ever assigned and are
never reused, even when every entry has been acknowledged and deleted.

Coalescing: at most one unsent entry exists per coalescing key. A report whose key matches an
unsent entry replaces that entry's op, key, rv, body and message id in place, keeping its
position in the queue, so a status that changes ten times while the cloud is away is sent once,
at the place its first change was queued. In-flight entries are never touched: the cloud may
already have them under their sequence number.

Disk budget and drop order: the entries' sizes (``entry_size``) add up to at most the budget.
When a report would exceed it, unsent entries are dropped to make room, in this order:

1. telemetry, oldest first;
2. then status, oldest first;
3. then event, oldest first;
4. then twin, oldest first.

A report only displaces entries of its own op or of ops dropped before it: a telemetry report
makes room by dropping older telemetry, never a status or a twin report; a twin report may drop
anything unsent. In-flight entries are never dropped. When even that would not make enough room,
nothing is dropped and the new report itself is discarded (an unsent entry it would have
replaced stays as it was). Every dropped entry, and every discarded report, is counted by op in
``outbox_drops``.

These are functions over a connection, run inside a transaction the caller
(``edge.store.store.Store``) opened, so that several of them commit together. They trust their
arguments; the Store validates what comes from outside.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from enum import StrEnum

import apsw

from edge.store.schema import unpack
from edge.wire.events import Message, Op

DROP_ORDER: tuple[Op, ...] = (Op.TELEMETRY, Op.STATUS, Op.EVENT, Op.TWIN)
"""Upstream ops, first dropped first."""

ROW_OVERHEAD = 64
"""Bytes counted per entry beyond its data: an estimate of what a row and its index entries cost
on disk, so that a flood of tiny reports is bounded by the budget too."""


class ReportResult(StrEnum):
    """What ``Store.report`` did with a report."""

    QUEUED = "queued"
    """Added at the end of the queue."""
    COALESCED = "coalesced"
    """Replaced the unsent entry with the same coalescing key, in its place."""
    DROPPED = "dropped"
    """Discarded: it did not fit in the budget (see the drop order above)."""


def entry_size(coalesce_key: str, key: str, rv: str, body: bytes) -> int:
    """The bytes an entry counts against the budget: its data plus ``ROW_OVERHEAD``."""
    text = len(coalesce_key.encode()) + len(key.encode()) + len(rv.encode())
    return text + len(body) + ROW_OVERHEAD


def enqueue(
    db: apsw.Connection,
    op: Op,
    key: str,
    rv: str,
    body: bytes,
    coalesce_key: str,
    budget: int,
) -> ReportResult:
    """Queue one report, coalescing and keeping within ``budget`` as the module describes."""
    size = entry_size(coalesce_key, key, rv, body)
    existing = db.execute(
        "SELECT id, size FROM outbox WHERE seq IS NULL AND coalesce_key = ?", (coalesce_key,)
    ).fetchone()
    replaced_id, replaced_size = existing if existing else (None, 0)
    used, _ = totals(db)
    excess = used - replaced_size + size - budget
    if excess > 0:
        victims = _victims(db, op, excess, replaced_id)
        if victims is None:
            _count_drops(db, {op: 1})
            return ReportResult.DROPPED
        db.executemany("DELETE FROM outbox WHERE id = ?", [(row_id,) for row_id, _ in victims])
        counts: dict[Op, int] = {}
        for _, victim_op in victims:
            counts[victim_op] = counts.get(victim_op, 0) + 1
        _count_drops(db, counts)
    # A fresh message id either way: the id names this content, and the replaced content was
    # never sent, so nothing refers to its id.
    msg_id = uuid.uuid4().hex
    if replaced_id is not None:
        db.execute(
            "UPDATE outbox SET op = ?, key = ?, rv = ?, body = ?, size = ?, msg_id = ?"
            " WHERE id = ?",
            (op.value, key, rv, body, size, msg_id, replaced_id),
        )
        return ReportResult.COALESCED
    db.execute(
        "INSERT INTO outbox (coalesce_key, op, key, rv, body, size, msg_id, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (coalesce_key, op.value, key, rv, body, size, msg_id, time.time()),
    )
    return ReportResult.QUEUED


def _victims(
    db: apsw.Connection, op: Op, needed: int, spare: int | None
) -> list[tuple[int, Op]] | None:
    """Unsent entries to drop, in drop order, freeing at least ``needed`` bytes; None if the
    entries a report of ``op`` may displace cannot free that much. ``spare`` is the entry being
    coalesced into, whose size the caller already counted as freed."""
    chosen: list[tuple[int, Op]] = []
    freed = 0
    # Closed on return so that its open statement ends before the caller deletes rows.
    with closing(_candidates(db, op, spare)) as candidates:
        for row_id, victim_op, size in candidates:
            chosen.append((row_id, victim_op))
            freed += size
            if freed >= needed:
                return chosen
    return None


def _candidates(db: apsw.Connection, op: Op, spare: int | None) -> Iterator[tuple[int, Op, int]]:
    # Lazily, one op at a time: in the common case (a telemetry flood displacing old telemetry)
    # the first row or two suffice, and the partial index on (op, id) finds them directly.
    for victim_op in DROP_ORDER[: DROP_ORDER.index(op) + 1]:
        for row_id, size in db.execute(
            "SELECT id, size FROM outbox WHERE seq IS NULL AND op = ? AND id IS NOT ? ORDER BY id",
            (victim_op.value, spare),
        ):
            yield row_id, victim_op, size


def _count_drops(db: apsw.Connection, counts: dict[Op, int]) -> None:
    db.executemany(
        "INSERT INTO outbox_drops (op, count) VALUES (?, ?)"
        " ON CONFLICT (op) DO UPDATE SET count = count + excluded.count",
        [(op.value, n) for op, n in counts.items()],
    )


def take(db: apsw.Connection, limit: int) -> list[Message]:
    """Number the ``limit`` oldest unsent entries with the next sequence numbers."""
    last = last_seq(db)
    rows = db.execute(
        "SELECT id, msg_id, op, key, rv, body FROM outbox WHERE seq IS NULL ORDER BY id LIMIT ?",
        (limit,),
    ).fetchall()
    messages = []
    for seq, (row_id, msg_id, op, key, rv, body) in enumerate(rows, start=last + 1):
        db.execute("UPDATE outbox SET seq = ? WHERE id = ?", (seq, row_id))
        messages.append(Message(seq, msg_id, Op(op), key, rv, unpack(body)))
    if messages:
        db.execute("UPDATE outbound SET last_seq = ?", (messages[-1].seq,))
    return messages


def in_flight_after(db: apsw.Connection, after_seq: int) -> list[Message]:
    """Entries numbered above ``after_seq``, in sequence order, with their numbers."""
    return [
        Message(seq, msg_id, Op(op), key, rv, unpack(body))
        for seq, msg_id, op, key, rv, body in db.execute(
            "SELECT seq, msg_id, op, key, rv, body FROM outbox WHERE seq > ? ORDER BY seq",
            (after_seq,),
        )
    ]


def delete_acked(db: apsw.Connection, seq: int) -> int:
    """Delete the entries numbered ``seq`` or below; returns how many there were."""
    db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
    return db.changes()


def lowest_in_flight(db: apsw.Connection) -> int | None:
    return db.execute("SELECT min(seq) FROM outbox").fetchall()[0][0]


def last_seq(db: apsw.Connection) -> int:
    """The highest sequence number ever assigned (0 before the first)."""
    return db.execute("SELECT last_seq FROM outbound").fetchall()[0][0]


def totals(db: apsw.Connection) -> tuple[int, int]:
    """(bytes counted against the budget, entries), unsent and in flight together."""
    bytes_, entries = db.execute("SELECT bytes, entries FROM outbox_totals").fetchall()[0]
    return bytes_, entries


def drops(db: apsw.Connection) -> dict[Op, int]:
    """Dropped and discarded reports by op, every upstream op present, in drop order."""
    counted = dict(db.execute("SELECT op, count FROM outbox_drops").fetchall())
    return {op: counted.get(op.value, 0) for op in DROP_ORDER}
