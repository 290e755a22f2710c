"""The store's change feed: what each commit changed, for every part of the agent that follows it.

The store is where the parts of the agent meet. Writers (the hub, the manifest folder, the pod
and device managers) commit to it; readers (pods, devices, the eventbus, the outbox sender)
subscribe here and act on the keys that changed, instead of being called by the writers or
polling the database.

``Changes`` is plain data: the object keys (``namespace/Kind/name``) and local-state keys a
commit touched, whether a report was queued in the outbox, or ``everything`` when the exact keys
are not known. ``ChangeFeed`` hands them to any number of ``Subscription``s.

What a subscriber may rely on:

- Nothing is lost: every change published after ``subscribe()`` reaches the subscription,
  merged with the others it has not yet taken (a key changed twice is seen once).
- Memory is bounded: when more than ``limit`` keys pile up for a subscriber that is not
  keeping up, they are replaced by one ``everything`` ("resync everything"), never queued.
- The first ``next()`` returns ``everything``: a new subscriber starts with a full read.
- ``publish`` never blocks and never fails, whatever the subscribers do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

DEFAULT_LIMIT = 4096
"""Keys a subscription holds before it falls back to "resync everything"."""


@dataclass(frozen=True, slots=True)
class Changes:
    """What one or more commits changed."""

    objects: frozenset[str] = frozenset()
    state: frozenset[str] = frozenset()
    outbox: bool = False
    everything: bool = False

    def __bool__(self) -> bool:
        return bool(self.objects or self.state or self.outbox or self.everything)

    def kinds(self, *kinds: str) -> frozenset[str]:
        """The changed object keys whose kind is one of ``kinds``."""
        return frozenset(key for key in self.objects if kinds_of(key) in kinds)

    def touches(self, *kinds: str) -> bool:
        """Whether an object of one of ``kinds`` may have changed."""
        return self.everything or any(kinds_of(key) in kinds for key in self.objects)

    def state_changed(self, key: str) -> bool:
        """Whether the local-state ``key`` may have changed."""
        return self.everything or key in self.state

    def states(self, prefix: str) -> frozenset[str]:
        """The changed local-state keys that start with ``prefix``."""
        return frozenset(key for key in self.state if key.startswith(prefix))


def kinds_of(key: str) -> str:
    """The kind in an object key ``namespace/Kind/name`` ("" for a malformed key)."""
    parts = key.split("/", 2)
    return parts[1] if len(parts) == 3 else ""


EVERYTHING = Changes(everything=True)
NOTHING = Changes()


class Pending:
    """Changes being gathered (by a transaction, for a subscriber), bounded by ``limit`` keys
    like a subscription; adding a key costs the same however many are held."""

    __slots__ = ("everything", "limit", "objects", "outbox", "state")

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.objects: set[str] = set()
        self.state: set[str] = set()
        self.outbox = False
        self.everything = False

    def __bool__(self) -> bool:
        return bool(self.objects or self.state or self.outbox or self.everything)

    def add_objects(self, keys: Iterable[str]) -> None:
        if not self.everything:
            self.objects.update(keys)
            self._bound()

    def add_state(self, key: str) -> None:
        if not self.everything:
            self.state.add(key)
            self._bound()

    def add_outbox(self) -> None:
        self.outbox = True

    def add(self, changes: Changes | Pending) -> None:
        self.outbox = self.outbox or changes.outbox
        if changes.everything:
            self._all()
        elif not self.everything:
            self.objects.update(changes.objects)
            self.state.update(changes.state)
            self._bound()

    def take(self) -> Changes:
        """What was gathered, as plain data; nothing is held afterwards."""
        if self.everything:
            taken = EVERYTHING
        elif self:
            taken = Changes(frozenset(self.objects), frozenset(self.state), self.outbox)
        else:
            taken = NOTHING
        self.objects, self.state, self.outbox, self.everything = set(), set(), False, False
        return taken

    def _bound(self) -> None:
        if len(self.objects) + len(self.state) > self.limit:
            self._all()

    def _all(self) -> None:
        self.everything = True
        self.objects.clear()
        self.state.clear()


class Subscription:
    """One reader's view of the feed; made by ``ChangeFeed.subscribe``."""

    def __init__(self, limit: int) -> None:
        self._pending = Pending(limit)
        self._pending.add(EVERYTHING)
        self._ready = trio.Event()
        self._ready.set()

    def _add(self, changes: Changes) -> None:
        self._pending.add(changes)
        self._ready.set()

    async def next(self) -> Changes:
        """Wait until something changed, then take everything changed since the last call."""
        await self._ready.wait()
        self._ready = trio.Event()
        return self._pending.take()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Changes:
        return await self.next()


class ChangeFeed:
    """Publishes each commit's ``Changes`` to every subscription (see the module docstring)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._subscriptions: list[Subscription] = []

    def publish(self, changes: Changes) -> None:
        if not changes:
            return
        for subscription in self._subscriptions:
            subscription._add(changes)

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """A subscription for the ``with`` block; it stops receiving when the block ends."""
        subscription = Subscription(self.limit)
        self._subscriptions.append(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.remove(subscription)
