"""Whether the edge is connected to the cloud, for the rest of the agent to watch.

Components that behave differently offline (status reporting, the CLI's ``status``) read
``online`` or wait for the next change; they never poll the socket themselves.
"""

from __future__ import annotations

import time

import trio


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

    async def wait_change(self) -> bool:
        """Wait for the next change; returns the new ``online``."""
        await self._changed.wait()
        return self.online

    async def wait_online(self) -> None:
        while not self.online:
            await self.wait_change()
