"""The joined agent's ``/Node/<node>`` status report: at start, each time the link comes back,
and every ``INTERVAL_S`` when it changed.

``edge.node_info`` builds the body from what the host says; this is the trio shell around it.
It reads the host in a worker thread, queues the report through ``edge.upstream`` and follows
the link state the hub keeps in the store (``edge.hub.link``): it calls neither.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from edge import node_info
from edge.hub.link import LINK_STATE_KEY, LinkWatch
from edge.pods.runc import Runc
from edge.store.aio import AsyncStore
from edge.upstream import Upstream
from edge.version import __version__
from edge.wire.events import Op
from edge.wire.keys import node_key

log = logging.getLogger("edge.node")

INTERVAL_S = 60.0


class NodeReporter:
    def __init__(
        self,
        node: str,
        data_dir: Path,
        runc: Runc,
        cloud_url: str,
        aio: AsyncStore,
        upstream: Upstream,
    ) -> None:
        self.node = node
        self.data_dir = data_dir
        self.runc = runc
        self.cloud_host = urlsplit(cloud_url).hostname
        self.aio = aio
        self.upstream = upstream
        self._runc_version: str | None = None

    async def read(self) -> dict[str, Any]:
        """The node's status report, from the host (runc is asked its version once)."""
        if self._runc_version is None:
            self._runc_version = node_info.parse_runc_version(await self.runc.version())
        runc_version, cloud_host = self._runc_version, self.cloud_host
        facts = await trio.to_thread.run_sync(
            lambda: node_info.read_facts(
                self.data_dir, runc_version=runc_version, cloud_host=cloud_host
            )
        )
        return node_info.node_status(self.node, facts, __version__)

    async def run(self) -> None:
        link = LinkWatch()
        last: dict[str, Any] | None = None
        due = True
        with self.aio.feed.subscribe() as feed:
            while True:
                body = await self.read()
                if due or body != last:
                    await self.upstream.report(Op.STATUS, node_key(self.node), body)
                    log.info(
                        "node status reported",
                        extra={"conditions": {c["type"]: c["status"] for c in body["conditions"]}},
                    )
                    last = body
                due = False
                with trio.move_on_after(INTERVAL_S):
                    async for changes in feed:
                        if changes.state_changed(LINK_STATE_KEY) and link.update(
                            await self.aio.get_state(LINK_STATE_KEY)
                        ):
                            due = True  # unchanged, maybe, but the cloud may have lost it
                            break
