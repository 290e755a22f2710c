"""The one way a report goes up to the cloud: into the store's outbox, then the sender wakes.

Pods, devices and the node reporter hand their reports to ``Upstream``; it queues each in the
store's outbox in one commit (``Store.report``: durable, coalesced by key, within the disk
budget). It calls nobody: the hub's sender follows the store's change feed, sees the outbox
change and sends when the link allows. Standalone, with no cloud to tell, reports are not
queued at all (the outbox would only fill up); the local state kept beside them still is.
"""

from __future__ import annotations

import uuid
from typing import Any

from edge.store.aio import AsyncStore
from edge.store.store import Store
from edge.wire.events import Op


class Upstream:
    def __init__(self, aio: AsyncStore, *, cloud: bool) -> None:
        self.aio = aio
        self.cloud = cloud

    async def report(
        self, op: Op, key: str, body: dict[str, Any], coalesce_key: str | None = None
    ) -> None:
        """Queue ``body`` (``coalesce_key`` as ``Store.report`` takes it)."""
        if self.cloud:
            await self.aio.report(op, key, body, coalesce_key)

    async def event(self, key: str, body: dict[str, Any]) -> None:
        """Queue an event: never merged with another, each has its own coalescing key."""
        await self.report(Op.EVENT, key, body, f"event:{uuid.uuid4().hex}")

    async def status(self, key: str, body: dict[str, Any], state: str, summary: Any) -> None:
        """Queue a status and keep ``summary`` (None: forget it) in local state ``state``, in
        one commit: the outbox forgets a report once the cloud has it, the summary stays for
        ``outpost status``."""
        await self.aio.run(self._status, key, body, state, summary)

    def _status(self, key: str, body: dict[str, Any], state: str, summary: Any) -> None:
        store: Store = self.aio.store
        with store.batch():
            if self.cloud:
                store.report(Op.STATUS, key, body)
            if summary is None:
                store.delete_state(state)
            else:
                store.set_state(state, summary)
