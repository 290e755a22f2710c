"""The upstream outbox: coalescing, numbering, acknowledgements, resending, and the disk budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.store import DROP_ORDER, ReportResult, Store, StoreError
from edge.wire.events import Op


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "edge.db") as store:
        yield store


def bodies(messages: list) -> list:
    return [m.body for m in messages]


# -- coalescing --------------------------------------------------------------------------------


def test_a_newer_report_replaces_the_queued_one_in_its_place(store: Store) -> None:
    assert store.report(Op.STATUS, "ns/Pod/a", "a1", rv="1") is ReportResult.QUEUED
    assert store.report(Op.STATUS, "ns/Pod/b", "b1") is ReportResult.QUEUED
    assert store.report("status", "ns/Pod/a", "a2", rv="2") is ReportResult.COALESCED
    assert store.outbox_size()[1] == 2
    sent = store.take_for_send(10)
    assert [(m.key, m.rv, m.body) for m in sent] == [
        ("ns/Pod/a", "2", "a2"),
        ("ns/Pod/b", "", "b1"),
    ]
    assert [m.op for m in sent] == [Op.STATUS, Op.STATUS]
    assert len({m.id for m in sent}) == 2


def test_coalescing_is_by_op_and_key_unless_the_caller_says_otherwise(store: Store) -> None:
    store.report(Op.STATUS, "ns/Pod/a", "status")
    store.report(Op.TWIN, "ns/Pod/a", "twin")
    store.report(Op.EVENT, "ns/Pod/a", "started", coalesce_key="event-1")
    store.report(Op.EVENT, "ns/Pod/a", "started again", coalesce_key="event-2")
    assert bodies(store.take_for_send(10)) == ["status", "twin", "started", "started again"]


def test_a_report_never_replaces_one_in_flight(store: Store) -> None:
    store.report(Op.STATUS, "ns/Pod/a", "first")
    [first] = store.take_for_send(10)
    assert store.report(Op.STATUS, "ns/Pod/a", "second") is ReportResult.QUEUED
    [second] = store.take_for_send(10)
    assert (first.seq, first.body, second.seq, second.body) == (1, "first", 2, "second")
    assert bodies(store.unacked(0)) == ["first", "second"]


def test_a_bad_report_is_refused_and_nothing_is_queued(store: Store) -> None:
    with pytest.raises(StoreError, match="upstream ops are telemetry, status, event, twin"):
        store.report(Op.PUT, "ns/Pod/a", {})
    with pytest.raises(StoreError, match="op 'reboot'"):
        store.report("reboot", "ns/Pod/a", {})
    with pytest.raises(StoreError, match="body cannot be stored"):
        store.report(Op.STATUS, "ns/Pod/a", {"when": object()})
    assert store.outbox_size() == (0, 0)
    assert store.commits == 0


# -- numbering, acknowledgements, resending ----------------------------------------------------


def test_numbers_are_contiguous_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    with Store(path) as store:
        for n in range(5):
            store.report(Op.TELEMETRY, f"sensor/{n}", n)
        taken = store.take_for_send(2)
        assert [(m.seq, m.body) for m in taken] == [(1, 0), (2, 1)]
        assert store.commits == 6
    with Store(path) as store:
        assert store.unacked(0) == taken
        assert [(m.seq, m.body) for m in store.take_for_send(2)] == [(3, 2), (4, 3)]
        assert store.sending_from == 1


def test_take_of_nothing_writes_nothing(store: Store) -> None:
    assert store.take_for_send(10) == []
    store.report(Op.STATUS, "ns/Pod/a", 1)
    commits = store.commits
    assert store.take_for_send(0) == []
    assert store.commits == commits
    with pytest.raises(ValueError, match="limit"):
        store.take_for_send(-1)


def test_acked_deletes_and_unacked_resends_with_the_same_numbers(store: Store) -> None:
    for n in range(5):
        store.report(Op.EVENT, "ns/Pod/a", n, coalesce_key=f"e{n}")
    sent = store.take_for_send(4)
    assert store.acked(2) == 2
    assert store.unacked(2) == sent[2:]
    # The cloud may restart from a lagging watermark: it gets what is still in flight.
    assert store.unacked(0) == sent[2:]
    assert store.sending_from == 3
    assert store.outbox_size()[1] == 3


def test_a_repeated_ack_writes_nothing(store: Store) -> None:
    store.report(Op.STATUS, "ns/Pod/a", 1)
    store.take_for_send(1)
    assert store.acked(1) == 1
    commits = store.commits
    assert store.acked(1) == 0
    assert store.acked(0) == 0
    assert store.commits == commits


def test_an_ack_beyond_what_was_numbered_is_refused(store: Store) -> None:
    store.report(Op.STATUS, "ns/Pod/a", 1)
    store.take_for_send(1)
    with pytest.raises(StoreError, match=r"acknowledged upstream message 7.* ever numbered is 1"):
        store.acked(7)
    assert [m.seq for m in store.unacked(0)] == [1]


def test_resume_settles_what_the_cloud_has_and_returns_the_rest(store: Store) -> None:
    for n in range(4):
        store.report(Op.TELEMETRY, f"s{n}", n)
    sent = store.take_for_send(3)
    assert store.resume(1) == sent[1:]
    assert store.sending_from == 2
    assert store.resume(3) == []
    assert store.sending_from == 4
    assert [m.seq for m in store.take_for_send(10)] == [4]


def test_numbers_are_never_reused_after_everything_was_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    with Store(path) as store:
        store.report(Op.STATUS, "ns/Pod/a", 1)
        store.report(Op.STATUS, "ns/Pod/b", 1)
        store.take_for_send(10)
        store.acked(2)
        assert store.outbox_size() == (0, 0)
        assert store.sending_from == 3
    with Store(path) as store:
        assert store.sending_from == 3
        store.report(Op.STATUS, "ns/Pod/a", 2)
        assert [m.seq for m in store.take_for_send(10)] == [3]


# -- grouping writes ---------------------------------------------------------------------------


def test_a_batch_commits_many_reports_once(store: Store) -> None:
    with store.batch():
        for n in range(100):
            store.report(Op.TELEMETRY, f"sensor/{n % 7}", n, coalesce_key=f"t{n}")
        store.take_for_send(10)
        store.set_state("polled", 100)
    assert store.commits == 1
    assert store.outbox_size()[1] == 100


def test_an_exception_out_of_a_batch_rolls_all_of_it_back(store: Store) -> None:
    store.report(Op.STATUS, "ns/Pod/kept", 1)

    def poll_and_fail() -> None:
        with store.batch():
            store.report(Op.STATUS, "ns/Pod/a", 1)
            store.take_for_send(10)
            raise RuntimeError("the poller failed")

    with pytest.raises(RuntimeError, match="poller failed"):
        poll_and_fail()
    assert bodies(store.take_for_send(10)) == [1]
    assert [m.key for m in store.unacked(0)] == ["ns/Pod/kept"]
    assert store.sending_from == 1


def test_a_failing_call_inside_a_batch_undoes_only_itself(store: Store) -> None:
    with store.batch():
        store.report(Op.STATUS, "ns/Pod/a", 1)
        with pytest.raises(StoreError):
            store.acked(5)
        with pytest.raises(StoreError):
            store.report(Op.STATUS, "ns/Pod/b", object())
        with store.batch():
            store.report(Op.STATUS, "ns/Pod/c", 1)
    assert store.commits == 1
    assert [m.key for m in store.take_for_send(10)] == ["ns/Pod/a", "ns/Pod/c"]


# -- the disk budget ---------------------------------------------------------------------------

# Every report below has the same size: keys and coalescing keys of equal length, equal bodies.
BODY = "x" * 100


def report(store: Store, op: Op, n: int, body: str = BODY) -> ReportResult:
    return store.report(op, f"k{n:03d}", body, coalesce_key=f"c{n:03d}")


def entry_size(tmp_path: Path) -> int:
    with Store(tmp_path / "measure.db") as store:
        report(store, Op.TWIN, 0)
        return store.outbox_size()[0]


def queued(store: Store) -> list[tuple[Op, str]]:
    """(op, key) of everything in the outbox, in queue order, without changing it."""
    return [(m.op, m.key) for m in store.unacked(0)] + [
        (Op(op), key)
        for op, key in store._db.execute("SELECT op, key FROM outbox WHERE seq IS NULL ORDER BY id")
    ]


@pytest.fixture
def full(tmp_path: Path) -> Iterator[Store]:
    """A store whose budget holds exactly ten reports: three telemetry, three status, two
    events and two twin reports, interleaved so that op order and age order differ."""
    with Store(tmp_path / "edge.db", outbox_budget=10 * entry_size(tmp_path)) as store:
        ops = [Op.TWIN, Op.TELEMETRY, Op.STATUS, Op.EVENT, Op.TELEMETRY]
        ops += [Op.STATUS, Op.TWIN, Op.EVENT, Op.STATUS, Op.TELEMETRY]
        with store.batch():
            for n, op in enumerate(ops):
                assert report(store, op, n) is ReportResult.QUEUED
        yield store


def test_room_is_made_in_drop_order_oldest_first(full: Store) -> None:
    budget = full.outbox_budget
    dropped_keys = []
    for n in range(100, 109):
        before = {key for _, key in queued(full)}
        assert report(full, Op.TWIN, n) is ReportResult.QUEUED
        [gone] = before - {key for _, key in queued(full)}
        dropped_keys.append(gone)
        assert full.outbox_size()[0] <= budget
    # telemetry (1, 4, 9), then status (2, 5, 8), then events (3, 7), then the oldest twin (0)
    assert dropped_keys == ["k001", "k004", "k009", "k002", "k005", "k008", "k003", "k007", "k000"]
    assert full.dropped == {Op.TELEMETRY: 3, Op.STATUS: 3, Op.EVENT: 2, Op.TWIN: 1}
    assert list(full.dropped) == list(DROP_ORDER)


def test_a_report_displaces_only_its_own_op_or_ops_dropped_before_it(full: Store) -> None:
    def ops() -> list[Op]:
        return [op for op, _ in queued(full)]

    # Status displaces telemetry first, then the oldest status, never events or twin reports.
    for n in range(100, 107):
        assert report(full, Op.STATUS, n) is ReportResult.QUEUED
    assert ops() == [Op.TWIN, Op.EVENT, Op.TWIN, Op.EVENT] + [Op.STATUS] * 6
    assert [key for _, key in queued(full)][4:] == [f"k{n}" for n in range(101, 107)]
    # Telemetry has nothing left it may displace: the new report itself goes.
    before = queued(full)
    assert report(full, Op.TELEMETRY, 300) is ReportResult.DROPPED
    assert queued(full) == before
    # An event displaces the oldest status, not a twin report.
    assert report(full, Op.EVENT, 200) is ReportResult.QUEUED
    assert "k101" not in [key for _, key in queued(full)]
    assert ops().count(Op.TWIN) == 2
    assert full.dropped == {Op.TELEMETRY: 4, Op.STATUS: 5, Op.EVENT: 0, Op.TWIN: 0}


def test_reports_in_flight_are_never_dropped(full: Store) -> None:
    in_flight = full.take_for_send(10)
    assert report(full, Op.TWIN, 100) is ReportResult.DROPPED
    assert full.unacked(0) == in_flight
    assert full.dropped == {Op.TELEMETRY: 0, Op.STATUS: 0, Op.EVENT: 0, Op.TWIN: 1}
    full.acked(1)
    assert report(full, Op.TWIN, 100) is ReportResult.QUEUED


def test_a_report_larger_than_the_budget_drops_nothing_else(full: Store) -> None:
    before = queued(full)
    assert report(full, Op.TWIN, 100, body="x" * full.outbox_budget) is ReportResult.DROPPED
    assert queued(full) == before
    assert full.dropped[Op.TWIN] == 1


def test_a_growing_coalesced_report_makes_room_and_keeps_its_place(full: Store) -> None:
    # Entry 6 is a twin report; twice its body needs one more entry's worth of room.
    assert report(full, Op.TWIN, 6, body=BODY * 2) is ReportResult.COALESCED
    keys = [key for _, key in queued(full)]
    assert "k001" not in keys  # the oldest telemetry made room
    assert keys.index("k006") == 5
    assert full.outbox_size()[0] <= full.outbox_budget


def test_a_coalesced_report_that_cannot_fit_leaves_the_queued_one(full: Store) -> None:
    full.take_for_send(9)  # only entry 9, telemetry, is still unsent
    assert report(full, Op.TELEMETRY, 9, body=BODY * 3) is ReportResult.DROPPED
    assert full.dropped[Op.TELEMETRY] == 1
    [last] = full.take_for_send(10)
    assert (last.key, last.body) == ("k009", BODY)


def test_drop_counts_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    with Store(path, outbox_budget=1) as store:
        store.report(Op.EVENT, "ns/Pod/a", "too big for one byte")
        assert store.dropped[Op.EVENT] == 1
    with Store(path) as store:
        assert store.dropped == {Op.TELEMETRY: 0, Op.STATUS: 0, Op.EVENT: 1, Op.TWIN: 0}


def test_outbox_size_counts_bytes_and_entries(store: Store) -> None:
    store.report(Op.STATUS, "ns/Pod/a", "a" * 1000)
    one, _ = store.outbox_size()
    assert one > 1000
    store.report(Op.STATUS, "ns/Pod/b", "b" * 1000)
    assert store.outbox_size() == (2 * one, 2)
    store.report(Op.STATUS, "ns/Pod/a", "a" * 500)
    assert store.outbox_size() == (2 * one - 500, 2)
    store.take_for_send(10)
    store.acked(2)
    assert store.outbox_size() == (0, 0)


# -- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_is_a_clear_error_and_loses_nothing(store: Store) -> None:
    store.report(Op.STATUS, "ns/Pod/a", "kept")
    # A database page limit fails writes the way a full file system does.
    pages = store._db.execute("PRAGMA page_count").fetchall()[0][0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 3}")

    def flood() -> None:
        with store.batch():
            for n in range(100):
                store.report(Op.TELEMETRY, f"s{n}", "x" * 4000, coalesce_key=f"t{n}")

    with pytest.raises(StoreError, match="disk is full; free space on that file system"):
        flood()
    assert store.outbox_size()[1] == 1
    assert [(m.key, m.body) for m in store.take_for_send(10)] == [("ns/Pod/a", "kept")]


def test_another_writer_holding_the_lock_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    with Store(path, busy_timeout_s=0.05) as store, Store(path) as other:
        with other.batch():
            other.set_state("holding", True)
            with pytest.raises(StoreError, match="another process holds the database's write"):
                store.report(Op.STATUS, "ns/Pod/a", 1)
        assert store.outbox_size() == (0, 0)
        store.report(Op.STATUS, "ns/Pod/a", 1)
        assert store.get_state("holding") is True
