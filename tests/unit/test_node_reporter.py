"""When the joined agent reports its node's status (virtual time), and how it reads the host."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.lowlevel
import trio.testing

from edge import node_info
from edge.hub.link import LINK_STATE_KEY
from edge.node_reporter import NodeReporter
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.upstream import Upstream
from edge.wire.events import Op
from tests.unit.test_node_info import RUNC_VERSION, facts

T = TypeVar("T")


class InlineStore(AsyncStore):
    """The real store, called on the trio thread: virtual time must not run on while a worker
    thread commits."""

    async def _execute(self, call: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint()
        return call()


class Runc:
    calls = 0

    async def version(self) -> str:
        Runc.calls += 1
        return RUNC_VERSION


def node_reports(store: Store) -> list[dict[str, Any]]:
    """The node's status reports queued in the outbox, oldest first (each taken once)."""
    return [m.body for m in store.take_for_send(100) if m.op == Op.STATUS]


async def test_node_status_at_start_on_reconnect_and_each_minute_it_changed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    host = {"facts": facts()}

    class Reporter(NodeReporter):
        async def read(self) -> dict[str, Any]:
            return node_info.node_status("gw-17", host["facts"], "0.1.0")

    with Store(tmp_path / "store.db") as store:
        aio = InlineStore(store)
        reporter = Reporter(
            "gw-17", tmp_path, Runc(), "https://c:8443", aio, Upstream(aio, cloud=True)
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reporter.run)
            await trio.sleep(1)
            sent = node_reports(store)
            assert [(m.op, m.key) for m in store.unacked(0)] == [(Op.STATUS, "/Node/gw-17")]
            await trio.sleep(130)  # two unchanged minutes: nothing new
            assert node_reports(store) == []
            host["facts"] = dataclasses.replace(facts(), memory_available_kib=1)
            await trio.sleep(60)
            changed = node_reports(store)
            assert len(changed) == 1
            pressure = {c["type"]: c["status"] for c in changed[0]["conditions"]}
            assert pressure["MemoryPressure"] == "True"
            await aio.set_state(LINK_STATE_KEY, {"online": True, "since": 1.0, "reason": "up"})
            await trio.sleep(1)
            again = node_reports(store)  # unchanged, but the cloud may have lost it
            assert again == changed
            await aio.set_state(LINK_STATE_KEY, {"online": False, "since": 2.0, "reason": "cut"})
            await trio.sleep(1)
            assert node_reports(store) == []  # going offline says nothing
            nursery.cancel_scope.cancel()
        assert len(sent) == 1


async def test_the_node_status_reader_asks_runc_once_and_routes_to_the_cloud(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[str, str | None]] = []

    def read_facts(data_dir: Path, *, runc_version: str, cloud_host: str | None) -> Any:
        seen.append((runc_version, cloud_host))
        return facts(runc_version=runc_version)

    monkeypatch.setattr(node_info, "read_facts", read_facts)
    runc = Runc()
    Runc.calls = 0
    with Store(tmp_path / "store.db") as store:
        aio = AsyncStore(store)
        reporter = NodeReporter(
            "gw-17",
            tmp_path,
            runc,
            "https://cloud.example.com:8443",
            aio,
            Upstream(aio, cloud=True),
        )
        body = await reporter.read()
        await reporter.read()
    assert body["nodeInfo"]["containerRuntimeVersion"] == "runc://1.1.5+ds1"
    assert seen == [("1.1.5+ds1", "cloud.example.com")] * 2
    assert Runc.calls == 1
