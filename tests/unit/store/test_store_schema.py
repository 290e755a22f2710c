"""Opening a store: creating the schema, re-opening, upgrading, and refusing what it cannot use."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest

from edge.store import SchemaTooNewError, Store, StoreError, schema
from edge.wire.events import Message, Op


def _sql(path: Path, query: str) -> list[tuple]:
    db = apsw.Connection(str(path))
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def _schema_text(path: Path) -> list[tuple]:
    return _sql(path, "SELECT type, name, sql FROM sqlite_master ORDER BY type, name")


def test_a_new_file_gets_the_latest_schema(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    with Store(path) as store:
        assert store.hwm == 0
        assert store.outbox_size() == (0, 0)
        assert store.sending_from == 1
        assert store.commits == 0
        # Connection settings are per connection, so only the store's own can show them.
        db = store._db
        assert db.execute("PRAGMA synchronous").fetchall() == [(2,)]  # FULL
        assert db.execute("PRAGMA foreign_keys").fetchall() == [(1,)]
        assert db.execute("PRAGMA busy_timeout").fetchall() == [(5000,)]
    assert _sql(path, "PRAGMA user_version") == [(schema.LATEST,)]
    assert _sql(path, "PRAGMA journal_mode") == [("wal",)]
    tables = {name for (name,) in _sql(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"objects", "inbound", "outbox", "outbound", "local_state"} <= tables


def test_reopening_changes_nothing_and_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    with Store(path) as store:
        store.apply_batch([Message(1, "m1", Op.PUT, "ns/ConfigMap/a", "7", {"a": 1})])
        store.set_state("boot", 3)
    before = _schema_text(path)
    with Store(path) as store:
        assert store.commits == 0
        assert store.hwm == 1
        assert store.get("ns/ConfigMap/a") == ("7", {"a": 1})
        assert store.get_state("boot") == 3
    assert _schema_text(path) == before
    assert _sql(path, "PRAGMA user_version") == [(schema.LATEST,)]


def test_a_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    newer = schema.LATEST + 1
    _sql(path, f"PRAGMA user_version = {newer}")
    with pytest.raises(SchemaTooNewError) as caught:
        Store(path)
    message = str(caught.value)
    assert f"schema version {newer}" in message
    assert f"versions up to {schema.LATEST}" in message
    assert str(path) in message
    assert (caught.value.found, caught.value.known) == (newer, schema.LATEST)
    assert _sql(path, "PRAGMA user_version") == [(newer,)]
    assert _schema_text(path) == []


def test_an_upgrade_applies_only_the_missing_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "edge.db"
    with Store(path) as store:
        store.set_state("kept", True)
    step = "CREATE TABLE added_later (x INTEGER); INSERT INTO added_later VALUES (42);"
    monkeypatch.setattr("edge.store.store.MIGRATIONS", (*schema.MIGRATIONS, step))
    monkeypatch.setattr("edge.store.store.LATEST", schema.LATEST + 1)
    with Store(path) as store:
        assert store.get_state("kept") is True
    assert _sql(path, "PRAGMA user_version") == [(schema.LATEST + 1,)]
    assert _sql(path, "SELECT x FROM added_later") == [(42,)]


def test_a_failing_step_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "edge.db"
    Store(path).close()
    # The first statement succeeds and the second fails: the step's transaction must undo both.
    step = "CREATE TABLE half_done (x INTEGER); INSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr("edge.store.store.MIGRATIONS", (*schema.MIGRATIONS, step))
    monkeypatch.setattr("edge.store.store.LATEST", schema.LATEST + 1)
    with pytest.raises(StoreError, match=r"upgrading the schema failed.*no_such_table"):
        Store(path)
    assert _sql(path, "PRAGMA user_version") == [(schema.LATEST,)]
    assert not _sql(path, "SELECT name FROM sqlite_master WHERE name = 'half_done'")


def test_a_file_that_is_not_a_database_gets_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    path.write_bytes(b"this is a firmware image, not a database" * 100)
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store(path)


def test_a_missing_directory_gets_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "edge.db"
    with pytest.raises(StoreError, match=r"cannot open the store at .*edge\.db"):
        Store(path)


def test_the_budget_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outbox_budget"):
        Store(tmp_path / "edge.db", outbox_budget=0)
