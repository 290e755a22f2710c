"""Property: whatever mix of reports, sends, acknowledgements and restarts, the outbox keeps its
promises.

A model follows what the outbox should hold — unsent entries by coalescing key in queue order,
the numbers in flight — and after every step the database is checked against it: numbers are
contiguous and never reused, at most one unsent entry per coalescing key with the newest body,
the sizes add up and stay within the budget, entries are only ever lost to the drop rules, and
drops follow the drop order.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from pathlib import Path

import apsw
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge.store import DROP_ORDER, ReportResult, Store
from edge.store.outbox import entry_size
from edge.store.schema import pack, unpack
from edge.wire.events import Op

BUDGET = 2_000


class Outbox(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "edge.db"
        self.store = Store(self.path, outbox_budget=BUDGET)
        # A second connection sees only what was committed, which is what a restart would see.
        self.peek = apsw.Connection(str(self.path))
        self.reports = 0
        self.unsent: OrderedDict[str, tuple[Op, int]] = OrderedDict()
        self.last_seq = 0
        self.acked = 0
        self.created = 0
        self.discarded = 0
        self.deleted = 0

    def teardown(self) -> None:
        self.peek.close()
        self.store.close()
        self.dir.cleanup()

    def _unsent_rows(self) -> list[tuple[str, Op, int]]:
        return [
            (coalesce_key, Op(op), unpack(body)["n"])
            for coalesce_key, op, body in self.peek.execute(
                "SELECT coalesce_key, op, body FROM outbox WHERE seq IS NULL ORDER BY id"
            )
        ]

    def _unsent_sizes(self) -> OrderedDict[str, tuple[Op, int]]:
        return OrderedDict(
            (coalesce_key, (Op(op), size))
            for coalesce_key, op, size in self.peek.execute(
                "SELECT coalesce_key, op, size FROM outbox WHERE seq IS NULL ORDER BY id"
            )
        )

    @rule(
        op=st.sampled_from(DROP_ORDER),
        key=st.sampled_from(["a", "b", "c"]),
        pad=st.integers(0, 600),
        unique=st.booleans(),
    )
    def report(self, op: Op, key: str, pad: int, unique: bool) -> None:
        self.reports += 1
        n = self.reports
        body = {"n": n, "pad": "x" * pad}
        given_key = f"u{n}" if unique else None
        coalesce_key = given_key or f"{op}:{key}"
        before = self._unsent_sizes()
        used = self.store.outbox_size()[0]
        size = entry_size(coalesce_key, key, "", pack(body))

        result = self.store.report(op, key, body, coalesce_key=given_key)

        rank = DROP_ORDER.index
        replaced = before[coalesce_key][1] if coalesce_key in before else 0
        displaceable = sum(
            s for k, (o, s) in before.items() if k != coalesce_key and rank(o) <= rank(op)
        )
        if result is ReportResult.DROPPED:
            assert used - replaced + size - displaceable > BUDGET, "dropped though it could fit"
            self.discarded += 1
            return
        assert (result is ReportResult.COALESCED) == (coalesce_key in self.unsent)
        self.created += result is ReportResult.QUEUED
        self.unsent[coalesce_key] = (op, n)

        remaining = set(self._unsent_sizes())
        evicted = [k for k in before if k not in remaining]
        if evicted:
            gone_ops = {before[k][0] for k in evicted}
            worst = max(gone_ops, key=rank)
            assert rank(worst) <= rank(op), "displaced a report of a later op"
            survivors = [o for k, (o, _) in before.items() if k in remaining and k != coalesce_key]
            assert all(rank(o) >= rank(worst) for o in survivors), "skipped an earlier op"
            for gone_op in gone_ops:
                of_op = [k for k, (o, _) in before.items() if o is gone_op and k != coalesce_key]
                lost = [k for k in of_op if k in evicted]
                assert lost == of_op[: len(lost)], "dropped a newer entry before an older one"
            last = [k for k in evicted if before[k][0] is worst][-1]
            assert self.store.outbox_size()[0] + before[last][1] > BUDGET, "dropped too many"
        for k in evicted:
            del self.unsent[k]

    @rule(limit=st.integers(0, 4))
    def take(self, limit: int) -> None:
        taken = self.store.take_for_send(limit)
        assert [m.seq for m in taken] == list(
            range(self.last_seq + 1, self.last_seq + 1 + len(taken))
        )
        assert len(taken) == min(limit, len(self.unsent))
        for message in taken:
            coalesce_key, (op, n) = self.unsent.popitem(last=False)
            assert (message.op, message.body["n"]) == (op, n), coalesce_key
        self.last_seq += len(taken)

    @precondition(lambda self: self.last_seq > 0)
    @rule(data=st.data(), reconnect=st.booleans())
    def ack(self, data: st.DataObject, reconnect: bool) -> None:
        seq = data.draw(st.integers(0, self.last_seq))
        if reconnect:
            resent = self.store.resume(seq)
            assert [m.seq for m in resent] == list(
                range(max(seq, self.acked) + 1, self.last_seq + 1)
            )
            deleted = max(0, seq - self.acked)
        else:
            deleted = self.store.acked(seq)
            assert deleted == max(0, seq - self.acked)
        self.deleted += deleted
        self.acked = max(self.acked, seq)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store(self.path, outbox_budget=BUDGET)

    @invariant()
    def consistent(self) -> None:
        rows = self.peek.execute("SELECT seq, size FROM outbox").fetchall()
        in_flight = sorted(seq for seq, _ in rows if seq is not None)
        assert in_flight == list(range(self.acked + 1, self.last_seq + 1))
        assert [m.seq for m in self.store.unacked(self.acked)] == in_flight
        assert self.store.sending_from == self.acked + 1
        total = sum(size for _, size in rows)
        assert self.store.outbox_size() == (total, len(rows))
        assert total <= BUDGET
        assert [(k, op, n) for k, (op, n) in self.unsent.items()] == self._unsent_rows()
        evicted = sum(self.store.dropped.values()) - self.discarded
        assert len(rows) == self.created - evicted - self.deleted


TestOutbox = Outbox.TestCase
TestOutbox.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
