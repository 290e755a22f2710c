"""The store from trio: every call runs in one worker thread, in order.

APSW blocks while SQLite commits (an fsync on flash can take tens of milliseconds), so store
calls must not run on the trio loop. One limiter slot keeps the store's single-writer rule and
keeps calls in the order they were made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

from edge.store.store import Store

T = TypeVar("T")


class AsyncStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the store's worker thread; ``fn`` is usually a bound Store method."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
