"""Waiting, in tests, for something that other tasks or processes make true.

What a test waits on is often not its own to signal: a process writes a file, the apiserver
changes an object, a library flips a flag from its callbacks. ``eventually`` polls such a
condition until it holds or its deadline passes, and then fails saying what was awaited, for how
long, and what the condition last returned or raised: what one needs to read a timeout in CI.
``eventually_sync`` is the same outside trio (fixtures that start a process, harnesses called
from threads).

Where a trio Event, a channel or a process's exit can say that the thing happened, wait on that
instead; and a test that proves something does *not* happen within a window sleeps through the
window on purpose, which is no job for this module.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

DEFAULT_WITHIN_S = 15.0
DEFAULT_INTERVAL_S = 0.05


class _NeverFinished:
    def __repr__(self) -> str:
        return "<the check never finished>"


NEVER_FINISHED = _NeverFinished()


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    what: str,
    *,
    within: float = DEFAULT_WITHIN_S,
    interval: float = DEFAULT_INTERVAL_S,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """Wait until ``check()`` (sync or async) returns something truthy, and return it.

    ``what`` completes "timed out … waiting until": say what should become true. An exception
    of a type in ``ignoring`` counts as "not yet" (an object not created yet, a file not
    written); any other one ends the wait at once. The deadline, ``within`` seconds of trio's
    clock, also bounds a check that hangs: an async check is cancelled at it. On timeout the
    ``AssertionError`` shows the last value returned, or the last exception raised (also chained
    as its cause).
    """
    last: Any = NEVER_FINISHED
    with trio.move_on_after(within):
        while True:
            try:
                value = check()
                if inspect.isawaitable(value):
                    value = await value
            except ignoring as exc:
                last = exc
            else:
                if value:
                    return value
                last = value
            await trio.sleep(interval)
    raise _timed_out(what, within, last)


def eventually_sync(
    check: Callable[[], T],
    what: str,
    *,
    within: float = DEFAULT_WITHIN_S,
    interval: float = DEFAULT_INTERVAL_S,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """``eventually`` for blocking code: polls with ``time.sleep`` on the monotonic clock. A
    check that blocks is not interrupted; the deadline is judged after it returns."""
    last: Any = NEVER_FINISHED
    deadline = time.monotonic() + within
    while True:
        try:
            value = check()
        except ignoring as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise _timed_out(what, within, last)
        time.sleep(interval)


def _timed_out(what: str, within: float, last: Any) -> AssertionError:
    said = f"last raised {last!r}" if isinstance(last, BaseException) else f"last: {last!r}"
    error = AssertionError(f"timed out after {within:g} s waiting until {what}; {said}")
    if isinstance(last, BaseException):
        error.__cause__ = last
    return error
