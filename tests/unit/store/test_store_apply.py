"""Applying downstream batches: order, redelivery, gaps, no-op PUTs, deletes, and one commit per
batch; plus the agent's local state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.store import InvalidMessageError, SequenceGapError, Store, StoreError
from edge.wire.events import Message, Op


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "edge.db") as store:
        yield store


def put(seq: int, name: str, rv: str, body: object = None) -> Message:
    return Message(seq, f"m{seq}", Op.PUT, f"ns/ConfigMap/{name}", rv, body)


def delete(seq: int, name: str) -> Message:
    return Message(seq, f"m{seq}", Op.DELETE, f"ns/ConfigMap/{name}")


def snapshot(store: Store) -> tuple[int, list[tuple[str, str, object]]]:
    return store.hwm, store.list("ConfigMap")


def test_in_order_messages_are_applied_and_the_mark_advances(store: Store) -> None:
    result = store.apply_batch([put(1, "a", "1", {"v": 1}), put(2, "b", "2", [1, 2])])
    assert (result.hwm, result.applied, result.duplicates, result.unchanged) == (2, 2, 0, 0)
    assert result.changed == ("ns/ConfigMap/a", "ns/ConfigMap/b")
    assert store.hwm == 2
    assert store.get("ns/ConfigMap/a") == ("1", {"v": 1})
    assert store.list("ConfigMap") == [
        ("ns/ConfigMap/a", "1", {"v": 1}),
        ("ns/ConfigMap/b", "2", [1, 2]),
    ]
    assert store.get("ns/ConfigMap/missing") is None


def test_list_is_by_kind_and_cluster_scoped_keys_work(store: Store) -> None:
    store.apply_batch(
        [
            put(1, "a", "1"),
            Message(2, "m2", Op.PUT, "/Node/gw-1", "5", {"ready": True}),
            Message(3, "m3", Op.PUT, "ns/Pod/web", "6", {"image": "nginx"}),
        ]
    )
    assert store.list("Node") == [("/Node/gw-1", "5", {"ready": True})]
    assert [key for key, _, _ in store.list("Pod")] == ["ns/Pod/web"]
    assert store.list("Secret") == []


def test_redelivered_messages_are_skipped_and_counted(store: Store) -> None:
    store.apply_batch([put(1, "a", "1", "first"), put(2, "b", "2")])
    result = store.apply_batch([put(1, "a", "1", "resent"), put(2, "b", "2"), put(3, "c", "3")])
    assert (result.hwm, result.applied, result.duplicates, result.unchanged) == (3, 1, 2, 0)
    assert store.get("ns/ConfigMap/a") == ("1", "first")


def test_a_batch_of_only_redeliveries_writes_nothing(store: Store) -> None:
    store.apply_batch([put(1, "a", "1"), put(2, "b", "2")])
    commits = store.commits
    result = store.apply_batch([put(1, "a", "1"), put(2, "b", "2")])
    assert (result.hwm, result.duplicates) == (2, 2)
    assert store.commits == commits


def test_a_gap_is_refused_and_changes_nothing(store: Store) -> None:
    store.apply_batch([put(1, "a", "1", "old")])
    before = snapshot(store)
    commits = store.commits
    # Message 2 alone would be fine; the gap after it must undo it too.
    with pytest.raises(SequenceGapError, match=r"follows 2: messages 3 to 4 are missing") as e:
        store.apply_batch([put(2, "a", "2", "new"), put(5, "b", "5")])
    assert "high-water mark stays at 1" in str(e.value)
    assert snapshot(store) == before
    assert store.commits == commits
    # Nothing half-done blocks the next, correct batch.
    assert store.apply_batch([put(2, "a", "2", "new")]).hwm == 2


def test_a_gap_of_one_message_reads_well(store: Store) -> None:
    with pytest.raises(SequenceGapError, match=r"follows 0: message 1 is missing"):
        store.apply_batch([put(2, "a", "2")])
    assert store.hwm == 0


def test_an_upstream_op_in_a_downstream_batch_is_refused(store: Store) -> None:
    store.apply_batch([put(1, "a", "1")])
    before = snapshot(store)
    bad = Message(3, "m3", Op.STATUS, "ns/ConfigMap/b", "", {})
    with pytest.raises(InvalidMessageError, match=r"downstream message 3 .* op 'status'"):
        store.apply_batch([put(2, "c", "2"), bad])
    assert snapshot(store) == before


@pytest.mark.parametrize("key", ["ConfigMap/a", "ns/ConfigMap/", "ns//a", "a/b/c/d", ""])
def test_a_malformed_key_is_refused(store: Store, key: str) -> None:
    with pytest.raises(InvalidMessageError, match="namespace/kind/name"):
        store.apply_batch([Message(1, "m1", Op.PUT, key, "1", {})])
    assert store.hwm == 0


def test_an_unstorable_body_is_refused(store: Store) -> None:
    with pytest.raises(InvalidMessageError, match="body cannot be stored"):
        store.apply_batch([put(1, "a", "1", object())])
    assert snapshot(store) == (0, [])


def test_a_put_of_the_stored_rv_is_a_no_op_that_advances_the_mark(store: Store) -> None:
    store.apply_batch([put(1, "a", "7", "stored")])
    result = store.apply_batch([put(2, "a", "7", "resent after a cloud restart")])
    assert (result.hwm, result.applied, result.unchanged, result.changed) == (2, 0, 1, ())
    assert store.get("ns/ConfigMap/a") == ("7", "stored")


def test_an_empty_rv_always_replaces(store: Store) -> None:
    store.apply_batch([put(1, "a", "", "one")])
    result = store.apply_batch([put(2, "a", "", "two")])
    assert (result.applied, result.unchanged) == (1, 0)
    assert store.get("ns/ConfigMap/a") == ("", "two")


def test_delete_removes_and_a_missing_key_is_fine(store: Store) -> None:
    store.apply_batch([put(1, "a", "1"), put(2, "b", "2")])
    result = store.apply_batch([delete(3, "a"), delete(4, "never-existed")])
    assert (result.hwm, result.applied, result.unchanged) == (4, 1, 1)
    assert result.changed == ("ns/ConfigMap/a",)
    assert [key for key, _, _ in store.list("ConfigMap")] == ["ns/ConfigMap/b"]


def test_one_commit_per_batch(store: Store) -> None:
    store.apply_batch([put(seq, f"c{seq % 10}", str(seq)) for seq in range(1, 101)])
    assert store.commits == 1
    store.apply_batch([put(seq, "x", str(seq)) for seq in range(101, 151)])
    assert store.commits == 2
    assert store.hwm == 150


def test_an_empty_batch_does_nothing(store: Store) -> None:
    assert store.apply_batch([]) == store.apply_batch(iter(()))
    assert store.apply_batch([]).hwm == 0
    assert store.commits == 0


def test_apply_batch_refuses_to_run_inside_batch(store: Store) -> None:
    with store.batch(), pytest.raises(StoreError, match="cannot run inside batch"):
        store.apply_batch([put(1, "a", "1")])
    assert store.hwm == 0


def test_local_state_round_trips_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    with Store(path) as store:
        assert store.get_state("pods") is None
        assert store.get_state("pods", default={}) == {}
        store.set_state("pods", {"web": {"pid": 42}})
        store.set_state("pods", {"web": {"pid": 43}})
        store.set_state("raw", b"\x00\xff")
        with pytest.raises(StoreError, match="cannot store local state 'bad'"):
            store.set_state("bad", {1, 2})
    with Store(path) as store:
        assert store.get_state("pods") == {"web": {"pid": 43}}
        assert store.get_state("raw") == b"\x00\xff"
        assert store.get_state("bad", "absent") == "absent"


def test_local_state_lists_by_prefix_and_forgets_deleted_keys(store: Store) -> None:
    for key in ("pod-status/b", "pod-status/a", "pod/a", "pod-status%", "pod-statusx", "z"):
        store.set_state(key, key.upper())
    # Only keys under the prefix, in key order: not a LIKE pattern, not a neighbouring prefix.
    assert store.states("pod-status/") == [
        ("pod-status/a", "POD-STATUS/A"),
        ("pod-status/b", "POD-STATUS/B"),
    ]
    store.delete_state("pod-status/a")
    store.delete_state("never-set")
    assert store.states("pod-status/") == [("pod-status/b", "POD-STATUS/B")]
    assert store.get_state("pod-status/a", "gone") == "gone"


def test_sync_deletes_every_object_not_listed_and_keeps_the_rest(store: Store) -> None:
    store.apply_batch([put(1, "a", "1"), put(2, "b", "2"), put(3, "c", "3")])
    inventory = ["ns/ConfigMap/a", "ns/ConfigMap/c", "ns/ConfigMap/not-yet-sent"]
    result = store.apply_batch([Message(4, "m4", Op.SYNC, "/Inventory/gw-1", "", inventory)])
    assert (result.hwm, result.applied) == (4, 1)
    assert [key for key, _, _ in store.list("ConfigMap")] == ["ns/ConfigMap/a", "ns/ConfigMap/c"]
    again = store.apply_batch([Message(5, "m5", Op.SYNC, "/Inventory/gw-1", "", inventory)])
    assert (again.applied, again.unchanged) == (0, 1)


def test_a_sync_without_a_key_list_is_refused_and_nothing_applied(store: Store) -> None:
    store.apply_batch([put(1, "a", "1")])
    with pytest.raises(InvalidMessageError, match="list of keys"):
        store.apply_batch([put(2, "b", "2"), Message(3, "m3", Op.SYNC, "/Inventory/x", "", "a")])
    assert snapshot(store) == (1, [("ns/ConfigMap/a", "1", None)])


def test_skip_to_raises_the_mark_but_never_lowers_it(store: Store) -> None:
    store.apply_batch([put(1, "a", "1")])
    store.skip_to(10)
    assert store.hwm == 10
    store.skip_to(5)
    assert store.hwm == 10
    assert store.apply_batch([put(11, "b", "2")]).applied == 1
