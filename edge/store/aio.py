"""The store from trio: every call runs in one worker thread, in order, and what it committed is
published on the store's change feed.

APSW blocks while SQLite commits (an fsync on flash can take tens of milliseconds), so store
calls must not run on the trio loop. One limiter slot keeps the store's single-writer rule and
keeps calls in the order they were made.

Every write of this process goes through ``run``, so ``feed`` sees every commit: the parts of
the agent follow it (``feed.subscribe()``) instead of calling one another or polling the
database. Writes by other processes are not on the feed; the CLI only reads, and the one thing
another process may add, a report in the outbox, the hub's sender notices on its heartbeat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

from edge.store.feed import ChangeFeed, Changes
from edge.store.store import Store
from edge.wire.events import Op

T = TypeVar("T")


class AsyncStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.feed = ChangeFeed()
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the store's worker thread; ``fn`` is usually a bound Store method.
        What it committed, even if it then raised, is published on ``feed``."""
        taken: list[Changes] = []

        def call() -> T:
            try:
                return fn(*args)
            finally:
                taken.append(self.store.take_changes())

        try:
            return await self._execute(call)
        finally:
            if taken:
                self.feed.publish(taken[0])

    async def _execute(self, call: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def get_state(self, key: str, default: Any = None) -> Any:
        return await self.run(self.store.get_state, key, default)

    async def set_state(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``; None deletes the key."""
        if value is None:
            await self.run(self.store.delete_state, key)
        else:
            await self.run(self.store.set_state, key, value)

    async def report(self, op: Op, key: str, body: Any, coalesce_key: str | None = None) -> None:
        """Queue an upstream report (``Store.report``); the outbox sender follows the feed."""
        await self.run(self.store.report, op, key, body, "", coalesce_key)
