"""The store's tables, as an ordered list of migrations tracked by ``PRAGMA user_version``.

A migration is never edited once released: a gateway in the field may have applied it. A schema
change is a new step appended to ``MIGRATIONS``; ``user_version`` counts the steps applied, so a
database at version 2 has run ``MIGRATIONS[0]`` and ``MIGRATIONS[1]``. Each step runs in its own
transaction together with the ``user_version`` bump, so a power cut mid-upgrade leaves the
database at a version it really has.

``edge.store.store.Store`` applies them when it opens a database, and refuses a database written
by a newer Outpost (after a rollback of the agent, say): this code cannot know what the newer
steps changed.

Bodies and values are stored as msgpack (``pack``/``unpack``), the wire's own encoding, so a
body goes from frame to row without changing shape.
"""

from __future__ import annotations

from typing import Any

import msgpack

_V1 = """
-- Desired state from the cloud, one row per object. ``kind`` repeats the middle part of the key
-- so that "every Pod" is an index lookup.
CREATE TABLE objects (
    key        TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    rv         TEXT NOT NULL,
    body       BLOB NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX objects_kind ON objects (kind);

-- The downstream high-water mark: the last cloud sequence number applied. One row, always.
CREATE TABLE inbound (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    hwm INTEGER NOT NULL CHECK (hwm >= 0)
);
INSERT INTO inbound (id, hwm) VALUES (1, 0);

-- Upstream reports waiting to be sent (seq NULL) or sent and not yet acknowledged. The row id
-- is the queue position: coalescing updates a row in place and so keeps it.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY,
    coalesce_key TEXT NOT NULL,
    op           TEXT NOT NULL CHECK (op IN ('telemetry', 'status', 'event', 'twin')),
    key          TEXT NOT NULL,
    rv           TEXT NOT NULL,
    body         BLOB NOT NULL,
    size         INTEGER NOT NULL CHECK (size >= 0),
    seq          INTEGER UNIQUE,
    msg_id       TEXT NOT NULL,
    created_at   REAL NOT NULL
);
CREATE UNIQUE INDEX outbox_unsent_key ON outbox (coalesce_key) WHERE seq IS NULL;
-- The eviction scan: unsent entries of one op, oldest first.
CREATE INDEX outbox_unsent_op ON outbox (op, id) WHERE seq IS NULL;

-- The last upstream sequence number ever assigned. Kept apart from the outbox rows because
-- those are deleted when acknowledged, and a number must never be reused.
CREATE TABLE outbound (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq INTEGER NOT NULL CHECK (last_seq >= 0)
);
INSERT INTO outbound (id, last_seq) VALUES (1, 0);

-- Running totals of the outbox, kept by triggers so that checking the disk budget does not
-- scan the table, and so that they roll back with the rows they describe.
CREATE TABLE outbox_totals (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    bytes   INTEGER NOT NULL,
    entries INTEGER NOT NULL
);
INSERT INTO outbox_totals (id, bytes, entries) VALUES (1, 0, 0);
CREATE TRIGGER outbox_totals_insert AFTER INSERT ON outbox BEGIN
    UPDATE outbox_totals SET bytes = bytes + NEW.size, entries = entries + 1;
END;
CREATE TRIGGER outbox_totals_delete AFTER DELETE ON outbox BEGIN
    UPDATE outbox_totals SET bytes = bytes - OLD.size, entries = entries - 1;
END;
CREATE TRIGGER outbox_totals_resize AFTER UPDATE OF size ON outbox BEGIN
    UPDATE outbox_totals SET bytes = bytes - OLD.size + NEW.size;
END;

-- Reports dropped to keep within the disk budget, by op. Persisted so that what a long outage
-- cost survives the reboots that happened during it.
CREATE TABLE outbox_drops (
    op    TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);

-- The agent's own state (what it started, what it last reported): its namespace, not the cloud's.
CREATE TABLE local_state (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""

MIGRATIONS: tuple[str, ...] = (_V1,)
"""Step ``i`` takes a database from version ``i`` to ``i + 1``. Append only."""

LATEST = len(MIGRATIONS)


def pack(value: Any) -> bytes:
    """The stored form of a body or value: msgpack, the same encoding the wire uses.

    Raises ``TypeError`` for values msgpack cannot carry; the store turns that into a
    ``StoreError`` naming the key.
    """
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    # Non-string map keys are allowed because the wire codec allows them: whatever the store
    # accepted from a message must come back out.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
