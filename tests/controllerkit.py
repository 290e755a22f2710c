"""The edge controller in-process against the real apiserver, with edges played by the test.

``start_controller`` runs an ``EdgeController`` and a ``Hub`` (TLS WebSockets on loopback);
``agent`` is a real ``EdgeHub`` on a real store with no agent behind it: the test reads what
reached the store (``FakeAgent.keys``/``get``) and writes the reports an agent would
(``FakeAgent.report``). ``cloud_kube`` (tests/conftest.py) gives the controller only the rights
of `outpost-cloud rbac`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from lightkube import AsyncClient

from cloud.hub.server import Hub, HubSettings
from cloud.hub.streams import NodeStreams
from cloud.mirror.controller import ControllerSettings, EdgeController
from edge.hub.client import EdgeHub
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.store.feed import Changes
from edge.wire.events import Op
from tests.hubkit import Pki


@dataclass
class Cloud:
    controller: EdgeController
    hub: Hub
    pki: Pki


@dataclass
class FakeAgent:
    """The test's stand-in for an agent: a reader of the node's store, and a reporter."""

    node: str
    reader: Store
    edge: EdgeHub

    def keys(self, kind: str) -> set[str]:
        return {key for key, _, _ in self.reader.list(kind)}

    def get(self, key: str) -> Any:
        found = self.reader.get(key)
        return None if found is None else found[1]

    def report(self, op: Op, key: str, body: Any, coalesce_key: str | None = None) -> None:
        # Written on the test's own connection, which the edge's change feed cannot see: the
        # feed is told, as the agent's own writes tell it.
        self.reader.report(op, key, body, coalesce_key=coalesce_key)
        self.edge.store.feed.publish(Changes(outbox=True))


async def start_controller(
    kube: AsyncClient, folder: Path, nursery: trio.Nursery, settings: ControllerSettings
) -> Cloud:
    pki = Pki.create(folder / "pki")
    streams = NodeStreams()
    controller = EdgeController(kube, streams, settings)
    hub = Hub(
        HubSettings(host="127.0.0.1", port=0, heartbeat_s=2),
        pki.server_context(),
        streams=streams,
        source=controller.source,
        sink=controller.reports,
        lifecycle=controller.nodes,
    )
    nursery.start_soon(controller.run)
    with trio.fail_after(60):
        await controller.source.ready.wait()
    await nursery.start(hub.run)
    return Cloud(controller, hub, pki)


@asynccontextmanager
async def agent(cloud: Cloud, path: Path, node: str) -> AsyncIterator[FakeAgent]:
    assert cloud.hub.port is not None
    with Store(path) as store, Store(path) as reader:
        edge = EdgeHub(AsyncStore(store), cloud.pki.edge_config(node, cloud.hub.port))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(edge.run)
            with trio.fail_after(10):
                await edge.link.wait_online()
            yield FakeAgent(node, reader, edge)
            nursery.cancel_scope.cancel()
