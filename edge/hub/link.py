"""Whether the edge is connected to the cloud, for the rest of the agent to follow.

The hub owns a ``LinkState`` and keeps it in the store under ``LINK_STATE_KEY`` (``publish``),
where `outpost status` reads it and where the parts of the agent that act when the link comes
back (pods and devices report again, the node reports its status) follow it through the store's
change feed, with a ``LinkWatch`` each. None of them polls the socket or calls the hub.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from edge.store.aio import AsyncStore

LINK_STATE_KEY = "cloud.link"
NEVER_CONNECTED = {"online": False, "since": 0.0, "reason": "never connected"}


class LinkState:
    def __init__(self) -> None:
        self.online = False
        self.since = time.time()
        self.reason = "not connected yet"
        self.connects = 0
        self._changed = trio.Event()

    def set(self, online: bool, reason: str) -> None:
        if online == self.online:
            self.reason = reason
            return
        self.online, self.since, self.reason = online, time.time(), reason
        if online:
            self.connects += 1
        self._changed.set()
        self._changed = trio.Event()

    def as_state(self) -> dict[str, Any]:
        return {
            "online": self.online,
            "since": self.since,
            "reason": self.reason,
            "connects": self.connects,
        }

    async def wait_change(self) -> bool:
        """Wait for the next change; returns the new ``online``."""
        await self._changed.wait()
        return self.online

    async def wait_online(self) -> None:
        while not self.online:
            await self.wait_change()


async def publish(aio: AsyncStore, link: LinkState) -> None:
    """Keep ``link`` in the store, at every change, until cancelled."""
    while True:
        state = link.as_state()
        await aio.set_state(LINK_STATE_KEY, state)
        if link.as_state() == state:  # else it changed while being written
            await link.wait_change()


class LinkWatch:
    """Tells, from the link states read from the store, when the link came back online.

    The feed may merge several changes into one (a link that dropped and came back between two
    reads): the count of connects in the state tells each new session apart all the same.
    """

    def __init__(self) -> None:
        self.online = False
        self.connects: int | None = None

    def update(self, state: dict[str, Any] | None) -> bool:
        """True when ``state`` is online on a session not seen online before."""
        state = state or {}
        online, connects = bool(state.get("online")), state.get("connects")
        came_back = online and (not self.online or connects != self.connects)
        self.online, self.connects = online, connects
        return came_back
