"""The tests' one way to wait for a condition (tests/waiting.py) holds them to their deadline
and says what it saw when it gives up."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from tests.waiting import eventually, eventually_sync


async def test_it_returns_the_first_truthy_value_once_another_task_makes_it_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box: list[str] = []

    async def fill() -> None:
        await trio.sleep(3)
        box.append("done")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fill)
        started = trio.current_time()
        assert await eventually(lambda: box and box[0], "the box is filled") == "done"
        assert 3 <= trio.current_time() - started < 3.5


async def test_an_async_check_is_awaited(autojump_clock: trio.testing.MockClock) -> None:
    calls = []

    async def check() -> int:
        calls.append(trio.current_time())
        return len(calls) >= 3 and len(calls)

    assert await eventually(check, "the third call", interval=1) == 3
    assert calls[-1] - calls[0] == pytest.approx(2)


async def test_it_fails_at_the_deadline_showing_what_it_awaited_and_saw_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    values = iter(range(1000))
    started = trio.current_time()
    with pytest.raises(AssertionError) as raised:
        await eventually(lambda: next(values) < 0 and "never", "a count goes negative", within=2)
    assert trio.current_time() - started == pytest.approx(2)
    assert str(raised.value) == (
        "timed out after 2 s waiting until a count goes negative; last: False"
    )


async def test_a_hanging_async_check_is_cut_off_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def hangs() -> None:
        await trio.sleep_forever()

    with pytest.raises(AssertionError, match=r"after 5 s .*the check never finished"):
        await eventually(hangs, "it answers", within=5)
    assert trio.current_time() == pytest.approx(5)


async def test_an_ignored_exception_is_not_yet_and_is_shown_when_it_never_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def missing() -> bool:
        raise FileNotFoundError("/run/ready")

    with pytest.raises(AssertionError, match=r"last raised FileNotFoundError") as raised:
        await eventually(missing, "the file exists", within=1, ignoring=(FileNotFoundError,))
    assert isinstance(raised.value.__cause__, FileNotFoundError)


async def test_an_ignored_exception_gives_way_to_the_value(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = iter([KeyError("a"), KeyError("b"), "found"])

    def check() -> str:
        result = next(attempts)
        if isinstance(result, Exception):
            raise result
        return result

    assert await eventually(check, "the key exists", ignoring=(KeyError,)) == "found"


async def test_any_other_exception_ends_the_wait_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def broken() -> bool:
        raise ValueError("a bug in the check")

    with pytest.raises(ValueError, match="a bug in the check"):
        await eventually(broken, "never", within=100, ignoring=(KeyError,))
    assert trio.current_time() == 0


def test_the_blocking_flavour_returns_once_the_condition_holds() -> None:
    ready_at = time.monotonic() + 0.1
    assert eventually_sync(lambda: time.monotonic() >= ready_at, "the time comes", within=5)


def test_the_blocking_flavour_fails_at_its_deadline_with_the_last_value() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError) as raised:
        eventually_sync(lambda: [], "the list fills", within=0.2, interval=0.01)
    assert 0.2 <= time.monotonic() - started < 2
    assert str(raised.value) == "timed out after 0.2 s waiting until the list fills; last: []"


def test_the_blocking_flavour_shows_the_last_ignored_exception() -> None:
    def refused() -> bool:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(AssertionError, match="last raised ConnectionRefusedError") as raised:
        eventually_sync(
            refused, "it listens", within=0.05, interval=0.01, ignoring=(ConnectionRefusedError,)
        )
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
