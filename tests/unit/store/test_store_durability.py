"""A store killed at a random moment reopens consistent, with everything it had committed.

A child process applies batches in a loop and prints each high-water mark once ``apply_batch``
has returned, which is when the edge would acknowledge it; between batches it queues reports in
``batch()`` blocks. The test kills it with SIGKILL at a random point, reopens the file and checks
that the database is intact, nothing acknowledged is missing, and no batch is half applied.

SIGKILL shows that a commit never depends on the process living on; surviving power loss also
needs the fsyncs of ``synchronous=FULL``, which ``test_store_schema`` checks is set.
"""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import apsw

from edge.store import Store
from edge.wire.events import Message, Op

REPO = Path(__file__).resolve().parents[3]
BATCH = 5
REPORTS = 5


def message(i: int) -> Message:
    """Downstream message ``i``: 50 keys, every 7th message a delete, bodies of varying size."""
    key = f"ns/ConfigMap/c{i % 50}"
    if i % 7 == 0:
        return Message(i, f"m{i}", Op.DELETE, key)
    return Message(i, f"m{i}", Op.PUT, key, str(i), {"i": i, "pad": "x" * (i % 300)})


CHILD = f"""
import sys
from edge.store import Store
from edge.wire.events import Message, Op

{inspect.getsource(message)}

store = Store(sys.argv[1])
seq = store.hwm
reports = store.outbox_size()[1]
while True:
    seq = store.apply_batch([message(i) for i in range(seq + 1, seq + {BATCH + 1})]).hwm
    print(seq, flush=True)
    with store.batch():
        for _ in range({REPORTS}):
            reports += 1
            store.report("telemetry", "sensor", {{"n": reports}}, coalesce_key=f"r{{reports}}")
"""


def expected_objects(hwm: int) -> dict[str, str]:
    objects: dict[str, str] = {}
    for i in range(1, hwm + 1):
        m = message(i)
        if m.op is Op.DELETE:
            objects.pop(m.key, None)
        else:
            objects[m.key] = m.rv
    return objects


def run_until_killed(path: Path, rng: random.Random) -> list[int]:
    """Start the child, kill it after a random number of batches plus a random delay; returns
    the marks it printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    assert child.stderr is not None
    printed: list[bytes] = []
    try:
        for _ in range(rng.randint(1, 30)):
            line = child.stdout.readline()
            if not line:
                break
            printed.append(line)
        time.sleep(rng.uniform(0, 0.005))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    printed += child.stdout.read().split()
    errors = child.stderr.read().decode()
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL, errors
    return [int(line) for line in printed]


def test_a_killed_store_reopens_consistent(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    path = tmp_path / "edge.db"
    acknowledged = 0
    for _ in range(3):
        printed = run_until_killed(path, rng)
        assert printed, "the child printed nothing"
        acknowledged = printed[-1]

        db = apsw.Connection(str(path))
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], seed
        rows = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchall()[0]
        db.close()

        with Store(path) as store:
            hwm = store.hwm
            assert acknowledged <= hwm <= acknowledged + BATCH, seed
            assert hwm % BATCH == 0, f"a batch was half applied (seed {seed})"
            stored = store.list("ConfigMap")
            assert {key: rv for key, rv, _ in stored} == expected_objects(hwm), seed
            assert all(body["i"] == int(rv) for _, rv, body in stored), seed
            entries, size = rows
            assert store.outbox_size() == (size, entries), seed
            assert entries % REPORTS == 0, f"a batch() block was half committed (seed {seed})"
        acknowledged = hwm
