"""The change feed: what each commit changed reaches every subscriber, merged and bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from edge.store import Store, StoreError
from edge.store.aio import AsyncStore
from edge.store.feed import EVERYTHING, ChangeFeed, Changes
from edge.wire.events import Message, Op


def put(seq: int, key: str, body: object = None, rv: str = "") -> Message:
    return Message(seq, f"m{seq}", Op.PUT, key, rv, body if body is not None else {"n": seq})


async def test_a_new_subscriber_starts_with_everything_then_gets_what_changed() -> None:
    feed = ChangeFeed()
    with feed.subscribe() as sub:
        assert await sub.next() == EVERYTHING
        feed.publish(Changes(objects=frozenset({"ns/Pod/a"})))
        feed.publish(Changes(state=frozenset({"cloud.link"}), outbox=True))
        feed.publish(Changes(objects=frozenset({"ns/Pod/a", "ns/Pod/b"})))
        assert await sub.next() == Changes(
            objects=frozenset({"ns/Pod/a", "ns/Pod/b"}),
            state=frozenset({"cloud.link"}),
            outbox=True,
        )


async def test_next_waits_until_something_changes() -> None:
    feed = ChangeFeed()
    with feed.subscribe() as sub:
        await sub.next()
        with trio.move_on_after(0.05) as waited:
            await sub.next()
        assert waited.cancelled_caught
        feed.publish(Changes())  # nothing changed: nobody is woken
        with trio.move_on_after(0.05) as waited:
            await sub.next()
        assert waited.cancelled_caught


async def test_every_subscriber_sees_every_change_and_a_closed_one_none() -> None:
    feed = ChangeFeed()
    with feed.subscribe() as first, feed.subscribe() as second:
        await first.next()
        await second.next()
        feed.publish(Changes(objects=frozenset({"ns/ConfigMap/c"})))
        assert (await first.next()).objects == {"ns/ConfigMap/c"}
        assert (await second.next()).objects == {"ns/ConfigMap/c"}
    feed.publish(Changes(outbox=True))  # no subscription left: nothing is held
    assert feed._subscriptions == []


async def test_a_subscriber_that_falls_behind_gets_resync_everything_not_a_queue() -> None:
    feed = ChangeFeed(limit=10)
    with feed.subscribe() as sub:
        await sub.next()
        for n in range(1000):
            feed.publish(Changes(objects=frozenset({f"ns/Pod/p{n}"})))
        assert sub._pending.everything  # memory: one flag, not 1000 keys
        assert not sub._pending.objects
        assert await sub.next() == EVERYTHING
        feed.publish(Changes(objects=frozenset({"ns/Pod/x"})))
        assert (await sub.next()).objects == {"ns/Pod/x"}


def test_changes_say_which_kinds_and_states_changed() -> None:
    changes = Changes(
        objects=frozenset({"ns/Pod/a", "ns/ConfigMap/c", "/Node/gw", "bad"}),
        state=frozenset({"device/ns/d", "devices", "cloud.link"}),
    )
    assert changes.kinds("ConfigMap", "Secret") == {"ns/ConfigMap/c"}
    assert changes.touches("Pod")
    assert not changes.touches("Device", "DeviceModel")
    assert changes.states("device/") == {"device/ns/d"}
    assert changes.state_changed("cloud.link")
    assert not changes.state_changed("pod/x")
    assert EVERYTHING.touches("Device")
    assert EVERYTHING.state_changed("anything")
    assert not Changes()
    assert Changes(outbox=True)


def test_the_store_records_what_its_commits_changed(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.take_changes()
        store.apply_batch([put(1, "ns/Pod/a"), put(2, "ns/ConfigMap/c")])
        store.set_state("cloud.link", {"online": True})
        store.report(Op.STATUS, "ns/Pod/a", {"phase": "Running"})
        assert store.take_changes() == Changes(
            objects=frozenset({"ns/Pod/a", "ns/ConfigMap/c"}),
            state=frozenset({"cloud.link"}),
            outbox=True,
        )
        assert store.take_changes() == Changes()
        # A PUT of the rv already stored and a DELETE of a missing key change nothing.
        store.apply_batch([put(3, "ns/Pod/b", rv="7")])
        store.take_changes()
        store.apply_batch([put(4, "ns/Pod/b", rv="7"), Message(5, "m5", Op.DELETE, "ns/Pod/none")])
        store.delete_state("never-set")
        assert store.take_changes() == Changes()
        # A sync names the keys it removed.
        store.apply_batch([Message(6, "m6", Op.SYNC, "/Sync/all", "", ["ns/Pod/b"])])
        assert store.take_changes().objects == {"ns/Pod/a", "ns/ConfigMap/c"}


def test_a_rolled_back_write_reports_no_change(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.take_changes()

        def failing_block() -> None:
            with store.batch():
                store.set_state("a", 1)
                raise RuntimeError("the block fails")

        with pytest.raises(RuntimeError):
            failing_block()
        with store.batch():
            store.set_state("b", 1)
            with pytest.raises(StoreError):
                store.set_state("c", object())  # cannot be stored: only its own part undone
        assert store.take_changes() == Changes(state=frozenset({"b"}))
        with pytest.raises(StoreError):
            store.apply_batch([put(1, "ns/Pod/a"), put(3, "ns/Pod/gap")])
        assert store.take_changes() == Changes()
        assert store.get("ns/Pod/a") is None


def test_changes_nobody_takes_stay_bounded(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.apply_batch([put(n, f"ns/ConfigMap/c{n}") for n in range(1, 5001)])
        assert store.take_changes() == EVERYTHING


async def test_async_store_publishes_each_commit_even_when_the_call_then_fails(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "s.db") as store:
        aio = AsyncStore(store)
        with aio.feed.subscribe() as sub:
            await sub.next()
            await aio.run(store.apply_batch, [put(1, "ns/Pod/a")])
            assert (await sub.next()).objects == {"ns/Pod/a"}

            def half_done() -> None:
                store.set_state("done", True)
                raise ValueError("then it fails")

            with pytest.raises(ValueError, match="then it fails"):
                await aio.run(half_done)
            assert (await sub.next()).state == {"done"}
            await aio.report(Op.EVENT, "ns/Pod/a", {"reason": "Started"}, "event:1")
            assert (await sub.next()).outbox
            await aio.set_state("x", None)  # deleting what was never set changes nothing
            with trio.move_on_after(0.05) as waited:
                await sub.next()
            assert waited.cancelled_caught
