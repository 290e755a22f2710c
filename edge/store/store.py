"""The edge's single source of truth: one SQLite database, one writer.

``Store`` holds what the cloud wants this node to run (the objects), how far the downstream
stream has been applied (the high-water mark), what must go up (the outbox, see
``edge.store.outbox`` for coalescing, the disk budget and the drop order) and the agent's own
state. A restart, or a power cut, reopens the file and carries on from exactly what was committed.

What callers may rely on:

- Every method that writes commits before it returns, unless it runs inside ``batch()``, in
  which case the whole block commits when it exits. ``apply_batch`` always commits before it
  returns, so the caller may acknowledge the batch the moment it has the result.
- Commits are durable against power loss (WAL with ``synchronous=FULL``). Because each commit is
  a flash write, callers group writes: one ``apply_batch`` per received batch, ``batch()`` around
  bursts of reports.
- A method that raises has changed nothing (inside ``batch()``: nothing of its own; the block
  decides about the rest). Errors are ``StoreError``, with the path and what was being done.

``Store`` is synchronous and not thread-safe: it holds one connection and expects one caller at a
time. Trio code runs its methods with ``trio.to_thread.run_sync`` through a ``CapacityLimiter(1)``
owned by whoever owns the store; a ``batch()`` block runs whole inside one such call.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import apsw

from edge import defaults
from edge.store import outbox
from edge.store.feed import Changes, Pending
from edge.store.outbox import ReportResult
from edge.store.schema import LATEST, MIGRATIONS, pack, unpack
from edge.wire.events import DOWNSTREAM_OPS, UPSTREAM_OPS, Message, Op

# After a checkpoint SQLite truncates the WAL file to this size, so one large transaction does not
# leave a large file behind for good.
_WAL_SIZE_LIMIT = 4 * 1024 * 1024


_EPOCH_KEY = "stream.epoch"


class StoreError(Exception):
    """The store could not do what was asked; the message says what, where, and why."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer Outpost than this one."""

    def __init__(self, path: str, found: int, known: int) -> None:
        super().__init__(
            f"{path} has schema version {found}, but this Outpost knows versions up to {known}:"
            " it was written by a newer Outpost. Run that version again, or move the file aside"
            " to start empty (desired state comes back from the cloud; unsent reports and local"
            " state are lost)."
        )
        self.path = path
        self.found = found
        self.known = known


class InvalidMessageError(StoreError):
    """A downstream message the store cannot apply: wrong op, malformed key, unstorable body."""


class SequenceGapError(StoreError):
    """A downstream message skipped sequence numbers: the ones in between were never applied."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What ``Store.apply_batch`` did.

    ``hwm`` is the high-water mark after the batch, the number to acknowledge. Each message is
    counted once: ``applied`` changed stored state, ``unchanged`` advanced the mark without
    changing anything (a PUT of the rv already stored, a DELETE of a missing key), ``duplicates``
    were at or below the mark already and were skipped. ``changed`` lists the keys of the
    applied messages, in order, for whoever acts on desired state.
    """

    hwm: int
    applied: int
    duplicates: int
    unchanged: int
    changed: tuple[str, ...] = ()


class Store:
    """The database at ``path``, created and migrated to the current schema as needed.

    ``outbox_budget`` bounds the outbox in bytes; it may change between runs (a smaller budget
    takes effect as new reports arrive, and never drops entries already in flight).
    ``busy_timeout_s`` is how long to wait for another process holding the write lock (a CLI
    command, say) before failing.

    ``commits`` counts the write transactions committed since opening that changed something
    (one that changed nothing writes nothing to disk): benchmarks divide messages by it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        outbox_budget: int = defaults.OUTBOX_BUDGET,
        busy_timeout_s: float = 5.0,
    ) -> None:
        if outbox_budget < 1:
            raise ValueError(f"outbox_budget must be at least 1 byte, got {outbox_budget}")
        self.path = os.fspath(path)
        self.outbox_budget = outbox_budget
        self.commits = 0
        self._depth = 0
        # What each open transaction level changed, and what committed ones did since the last
        # take_changes(): the change feed's input (edge.store.feed).
        self._changing: list[Pending] = []
        self._committed = Pending()
        try:
            self._db = apsw.Connection(self.path)
        except apsw.Error as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        try:
            self._configure(busy_timeout_s)
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _configure(self, busy_timeout_s: float) -> None:
        try:
            self._db.setbusytimeout(round(busy_timeout_s * 1000))
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        except apsw.NotADBError as exc:
            raise StoreError(
                f"{self.path} is not an SQLite database, or is corrupt ({exc}); move it aside"
                " to start empty"
            ) from exc
        except apsw.Error as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        if mode != "wal":
            raise StoreError(
                f"{self.path}: SQLite refused WAL journal mode (got {mode!r}); the store needs a"
                " local file system that supports shared memory"
            )

    def _migrate(self) -> None:
        while self._migrate_step():
            pass
        # Counting starts with the caller's writes, so that benchmarks see only theirs.
        self.commits = 0

    def _migrate_step(self) -> bool:
        """Apply the next migration in its own transaction; False once the schema is current."""
        # The version is read under the write lock, so two processes opening the same new file
        # do not both run a step.
        with self._write("upgrading the schema"):
            version = self._db.execute("PRAGMA user_version").fetchall()[0][0]
            if version > LATEST:
                raise SchemaTooNewError(self.path, version, LATEST)
            if version == LATEST:
                return False
            self._db.execute(MIGRATIONS[version])
            # PRAGMA takes no bound parameters; this is an int computed here.
            self._db.execute(f"PRAGMA user_version = {version + 1}")
        return True

    def close(self) -> None:
        """Close the database. Everything committed is already on disk; this only releases it."""
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        """A transaction, or inside one a savepoint, so that a failing step undoes only itself."""
        depth = self._depth
        savepoint = f"s{depth}"
        before = self._db.total_changes()
        if depth and not self._db.in_transaction:
            # SQLite itself rolled the enclosing transaction back after an error (a full disk,
            # say) that the caller caught; writing on would commit piecemeal.
            raise StoreError(
                f"{self.path}: {what}: the enclosing batch was already rolled back after an error"
            )
        try:
            self._db.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {savepoint}")
        except apsw.Error as exc:
            raise self._failure(f"{what}: cannot start a transaction", exc) from exc
        self._depth = depth + 1
        self._changing.append(Pending())
        try:
            yield
        except BaseException as exc:
            self._depth = depth
            self._changing.pop()
            self._undo(savepoint)
            if isinstance(exc, apsw.Error):
                raise self._failure(f"{what} failed", exc) from exc
            raise
        self._depth = depth
        changes = self._changing.pop()
        try:
            self._db.execute("COMMIT" if depth == 0 else f"RELEASE {savepoint}")
        except apsw.Error as exc:
            self._undo(savepoint)
            raise self._failure(f"{what}: commit failed", exc) from exc
        if depth:
            self._changing[-1].add(changes)
        else:
            self._committed.add(changes)
            if self._db.total_changes() != before:
                self.commits += 1

    def _failure(self, what: str, exc: apsw.Error) -> StoreError:
        hint = ""
        if isinstance(exc, apsw.FullError):
            hint = "; free space on that file system, or give the outbox a smaller budget"
        elif isinstance(exc, apsw.BusyError):
            hint = "; another process holds the database's write lock"
        return StoreError(f"{self.path}: {what}: {exc}{hint}")

    def _undo(self, savepoint: str) -> None:
        # Some errors (a full disk, say) make SQLite roll back the whole transaction itself.
        if not self._db.in_transaction:
            return
        if self._depth == 0:
            self._db.execute("ROLLBACK")
        else:
            self._db.execute(f"ROLLBACK TO {savepoint}")
            self._db.execute(f"RELEASE {savepoint}")

    @property
    def _changed(self) -> Pending:
        """What the innermost open transaction changed; kept only if it commits."""
        return self._changing[-1]

    def take_changes(self) -> Changes:
        """What the transactions committed since the last call changed (``edge.store.feed``).

        Bounded like a feed subscription: past ``feed.DEFAULT_LIMIT`` keys it says
        ``everything``, so a caller that never takes them (a benchmark, a CLI) holds little.
        """
        return self._committed.take()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group writes into one commit (flash wear: one write instead of many).

        Nothing inside is durable until the block exits normally; an exception out of the block
        rolls all of it back. A method that raises inside the block undoes only its own part, so
        a caller may catch the error and go on. Blocks nest. ``apply_batch`` refuses to run
        inside one, because it promises a commit before it returns.
        """
        with self._write("batch"):
            yield

    # -- downstream: desired state -----------------------------------------------------------

    @property
    def hwm(self) -> int:
        """The last downstream sequence number applied (0 before the first)."""
        return self._db.execute("SELECT hwm FROM inbound").fetchall()[0][0]

    def apply_batch(self, messages: Iterable[Message]) -> ApplyResult:
        """Apply downstream messages and advance the high-water mark, in one committed
        transaction; acknowledge ``result.hwm`` only after this returns.

        Messages at or below the mark are redeliveries and are skipped. The next one must be
        exactly the mark plus one: a gap raises ``SequenceGapError`` and an upstream op, a key
        that is not ``namespace/kind/name`` or a body msgpack cannot carry raises
        ``InvalidMessageError``; either way nothing of the batch is applied, not even the
        messages before the bad one.

        A PUT whose non-empty rv equals the stored one changes nothing but still advances the
        mark: after a cloud restart the cloud resends what it cannot prove was applied.
        """
        if self._depth:
            raise StoreError(
                "apply_batch cannot run inside batch(): it commits before returning, so that the"
                " caller may acknowledge what it applied"
            )
        prepared = [(message, *self._prepare(message)) for message in messages]
        applied = duplicates = unchanged = 0
        changed: list[str] = []
        with self._write("applying a downstream batch"):
            start = hwm = self.hwm
            for message, kind, body in prepared:
                if message.seq <= hwm:
                    duplicates += 1
                    continue
                if message.seq != hwm + 1:
                    missing = (
                        f"message {hwm + 1} is"
                        if message.seq == hwm + 2
                        else f"messages {hwm + 1} to {message.seq - 1} are"
                    )
                    raise SequenceGapError(
                        f"downstream message {message.seq} ({message.op} {message.key}) follows"
                        f" {hwm}: {missing} missing. Nothing of this batch was applied; the"
                        f" high-water mark stays at {start}."
                    )
                if self._apply_one(message, kind, body):
                    applied += 1
                    changed.append(message.key)
                else:
                    unchanged += 1
                hwm = message.seq
            if hwm != start:
                self._db.execute("UPDATE inbound SET hwm = ?", (hwm,))
        return ApplyResult(hwm, applied, duplicates, unchanged, tuple(changed))

    def skip_to(self, seq: int) -> None:
        """Raise the high-water mark to ``seq`` without applying anything.

        For a cloud that starts its stream beyond the mark (``Welcome.sending_from``): it only
        does so when this store was replaced or wiped, and then follows with a full resync.
        """
        with self._write(f"raising the high-water mark to {seq}"):
            self._db.execute("UPDATE inbound SET hwm = ? WHERE hwm < ?", (seq, seq))

    def _prepare(self, message: Message) -> tuple[str, bytes]:
        """The kind and stored body of a downstream message, or why it cannot be applied."""
        where = f"downstream message {message.seq} ({message.key!r})"
        if message.op not in DOWNSTREAM_OPS:
            raise InvalidMessageError(
                f"{where} has op {str(message.op)!r}, which only goes upstream; a downstream"
                " batch carries put, delete and sync"
            )
        parts = message.key.split("/")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise InvalidMessageError(
                f"{where}: the key must be namespace/kind/name (namespace empty for"
                " cluster-scoped objects)"
            )
        if message.op == Op.SYNC and not (
            isinstance(message.body, list) and all(isinstance(k, str) for k in message.body)
        ):
            raise InvalidMessageError(f"{where}: a sync message's body must be a list of keys")
        try:
            body = pack(message.body) if message.op in (Op.PUT, Op.SYNC) else b""
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidMessageError(f"{where}: the body cannot be stored: {exc}") from exc
        return parts[1], body

    def _apply_one(self, message: Message, kind: str, body: bytes) -> bool:
        """Apply one message; False when it changed nothing."""
        if message.op == Op.DELETE:
            self._db.execute("DELETE FROM objects WHERE key = ?", (message.key,))
            if not self._db.changes():
                return False
            self._changed.add_objects([message.key])
            return True
        if message.op == Op.SYNC:
            gone = [
                key
                for (key,) in self._db.execute(
                    "DELETE FROM objects WHERE key NOT IN (SELECT value FROM json_each(?))"
                    " RETURNING key",
                    (json.dumps(message.body),),
                )
            ]
            self._changed.add_objects(gone)
            return bool(gone)
        stored = self._db.execute("SELECT rv FROM objects WHERE key = ?", (message.key,)).fetchone()
        # An empty rv says nothing about the version, so it never counts as "already stored".
        if stored is not None and message.rv and stored[0] == message.rv:
            return False
        self._put(message.key, kind, message.rv, body)
        return True

    def _put(self, key: str, kind: str, rv: str, body: bytes) -> None:
        self._db.execute(
            "INSERT INTO objects (key, kind, rv, body, updated_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE"
            " SET rv = excluded.rv, body = excluded.body, updated_at = excluded.updated_at",
            (key, kind, rv, body, time.time()),
        )
        self._changed.add_objects([key])

    def replace_objects(self, objects: Mapping[str, tuple[str, Any]]) -> tuple[str, ...]:
        """Make the stored objects exactly ``objects`` (key -> ``(rv, body)``), in one commit;
        returns the keys that changed.

        For a writer that owns all desired state instead of the cloud: the standalone manifest
        folder. An object whose non-empty rv is the stored one is left alone. When this
        changes anything on a store that has applied the cloud's stream, the high-water mark
        goes back to 0: what is stored no longer follows that stream, so a later joined run
        starts as a wiped store does and the cloud sends it everything again.
        """
        prepared = []
        for key, (rv, body) in objects.items():
            kind, packed = self._prepare(Message(0, "", Op.PUT, key, rv, body))
            prepared.append((key, kind, rv, packed))
        changed: list[str] = []
        with self._write("replacing the desired objects"):
            stored = dict(self._db.execute("SELECT key, rv FROM objects"))
            for key, kind, rv, packed in prepared:
                if rv and stored.get(key) == rv:
                    continue
                self._put(key, kind, rv, packed)
                changed.append(key)
            gone = sorted(stored.keys() - objects.keys())
            for key in gone:
                self._db.execute("DELETE FROM objects WHERE key = ?", (key,))
            self._changed.add_objects(gone)
            changed.extend(gone)
            if changed:
                self._db.execute("UPDATE inbound SET hwm = 0")
        return tuple(changed)

    def get(self, key: str) -> tuple[str, Any] | None:
        """The stored ``(rv, body)`` of the object ``namespace/kind/name``, or None."""
        row = self._db.execute("SELECT rv, body FROM objects WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], unpack(row[1]))

    def list(self, kind: str) -> list[tuple[str, str, Any]]:
        """Every stored object of ``kind`` as ``(key, rv, body)``, ordered by key."""
        return [
            (key, rv, unpack(body))
            for key, rv, body in self._db.execute(
                "SELECT key, rv, body FROM objects WHERE kind = ? ORDER BY key", (kind,)
            )
        ]

    def counts(self) -> dict[str, int]:
        """How many objects of each kind are stored."""
        return dict(self._db.execute("SELECT kind, COUNT(*) FROM objects GROUP BY kind"))

    # -- upstream: the outbox ----------------------------------------------------------------

    def report(
        self,
        op: Op | str,
        key: str,
        body: Any,
        rv: str = "",
        coalesce_key: str | None = None,
    ) -> ReportResult:
        """Queue an upstream report durably; see ``edge.store.outbox`` for what happens to it.

        ``coalesce_key`` defaults to ``"{op}:{key}"``, so a newer status of an object replaces
        its queued older one. Give each event a unique key unless repeats may be merged.
        Returns whether the report was queued, coalesced, or dropped for lack of budget.
        """
        try:
            upstream = Op(op)
        except ValueError:
            upstream = None
        if upstream not in UPSTREAM_OPS:
            ops = ", ".join(o.value for o in outbox.DROP_ORDER)
            raise StoreError(f"cannot report {key!r} with op {str(op)!r}: upstream ops are {ops}")
        try:
            packed = pack(body)
        except (TypeError, ValueError, OverflowError) as exc:
            raise StoreError(
                f"cannot report {upstream} {key!r}: the body cannot be stored: {exc}"
            ) from exc
        if coalesce_key is None:
            coalesce_key = f"{upstream}:{key}"
        with self._write(f"queueing {upstream} report {key!r}"):
            result = outbox.enqueue(
                self._db, upstream, key, rv, packed, coalesce_key, self.outbox_budget
            )
            if result != ReportResult.DROPPED:
                self._changed.add_outbox()
            return result

    def take_for_send(self, limit: int) -> list[Message]:
        """Number up to ``limit`` of the oldest unsent reports and return them, oldest first.

        The numbers continue from the highest ever assigned (never reused) and are committed
        before this returns, so a message sent after this call is resent with the same number
        after any restart (see ``unacked``).
        """
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        with self._write("numbering reports for sending"):
            return outbox.take(self._db, limit)

    def unacked(self, after_seq: int) -> list[Message]:
        """Numbered reports above ``after_seq``, in sequence order, with their numbers: what to
        send again on a new connection, so that the cloud can recognise repeats."""
        return outbox.in_flight_after(self._db, after_seq)

    def acked(self, seq: int) -> int:
        """The cloud has every report up to ``seq``: delete them. Returns how many there were.

        Raises ``StoreError`` for a number this store never assigned: the cloud and this
        database disagree about the stream, and deleting on that basis could lose reports.
        """
        last = outbox.last_seq(self._db)
        if seq > last:
            raise StoreError(
                f"{self.path}: the cloud acknowledged upstream message {seq}, but the highest"
                f" this store ever numbered is {last}; was the database replaced or restored"
                " from an older copy?"
            )
        lowest = outbox.lowest_in_flight(self._db)
        if lowest is None or lowest > seq:
            return 0
        with self._write(f"deleting reports acknowledged up to {seq}"):
            return outbox.delete_acked(self._db, seq)

    def resume(self, received: int) -> list[Message]:
        """A new connection on which the cloud says it has everything up to ``received``:
        ``acked(received)`` then ``unacked(received)``, the reports to send again first."""
        self.acked(received)
        return self.unacked(received)

    @property
    def sending_from(self) -> int:
        """The first upstream number a new connection will carry (``Hello.sending_from``): the
        lowest in flight, or the next to be assigned when nothing is."""
        lowest = outbox.lowest_in_flight(self._db)
        return outbox.last_seq(self._db) + 1 if lowest is None else lowest

    def outbox_size(self) -> tuple[int, int]:
        """``(bytes, entries)`` in the outbox, unsent and in flight; bytes as the budget counts
        them."""
        return outbox.totals(self._db)

    @property
    def dropped(self) -> dict[Op, int]:
        """Reports lost to the disk budget since the database was created, by op."""
        return outbox.drops(self._db)

    @property
    def epoch(self) -> str:
        """A random name for this database, made the first time it is asked for: the cloud
        tells a new store (whose sequence numbers start again at 1) from an old one with it."""
        epoch = self.get_state(_EPOCH_KEY)
        if epoch is None:
            epoch = secrets.token_hex(8)
            self.set_state(_EPOCH_KEY, epoch)
        return epoch

    @property
    def data_version(self) -> int:
        """Changes whenever another connection (a CLI command, another process) commits: a
        cheap way to notice reports queued by others."""
        return self._db.execute("PRAGMA data_version").fetchall()[0][0]

    # -- the agent's own state ---------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        """The value last set for ``key``, or ``default``."""
        row = self._db.execute("SELECT value FROM local_state WHERE key = ?", (key,)).fetchone()
        return default if row is None else unpack(row[0])

    def states(self, prefix: str) -> list[tuple[str, Any]]:
        """Every ``(key, value)`` of the local state whose key starts with ``prefix``, by key."""
        # A range rather than LIKE: keys may hold '%' or '_', and the range uses the primary key.
        return [
            (key, unpack(value))
            for key, value in self._db.execute(
                "SELECT key, value FROM local_state WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix + "\U0010ffff"),
            )
        ]

    def delete_state(self, key: str) -> None:
        """Forget ``key``; nothing happens if it was never set."""
        with self._write(f"deleting local state {key!r}"):
            self._db.execute("DELETE FROM local_state WHERE key = ?", (key,))
            if self._db.changes():
                self._changed.add_state(key)

    def set_state(self, key: str, value: Any) -> None:
        """Store any msgpack-able ``value`` under ``key``, replacing what was there."""
        try:
            packed = pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise StoreError(f"cannot store local state {key!r}: {exc}") from exc
        with self._write(f"storing local state {key!r}"):
            self._db.execute(
                "INSERT INTO local_state (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, packed),
            )
            self._changed.add_state(key)
