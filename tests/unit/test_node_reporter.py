"""When the joined agent reports its node's status and re-reports its pods (virtual time)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from edge import agent, node_info
from edge.hub.link import LinkState
from tests.unit.test_node_info import RUNC_VERSION, facts


class Hub:
    def __init__(self) -> None:
        self.reports: list[tuple[str, str, dict[str, Any]]] = []

    async def report(self, op: str, key: str, body: dict[str, Any]) -> None:
        self.reports.append((op, key, body))


async def test_node_status_at_start_on_reconnect_and_each_minute_it_changed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    host = {"facts": facts()}

    async def read() -> dict[str, Any]:
        return node_info.node_status("gw-17", host["facts"], "0.1.0")

    hub, link = Hub(), LinkState()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._report_node, hub, link, "gw-17", read)
        await trio.sleep(1)
        assert [(op, key) for op, key, _ in hub.reports] == [("status", "/Node/gw-17")]
        await trio.sleep(130)  # two unchanged minutes: nothing new
        assert len(hub.reports) == 1
        host["facts"] = dataclasses.replace(facts(), memory_available_kib=1)
        await trio.sleep(60)
        assert len(hub.reports) == 2
        pressure = {c["type"]: c["status"] for c in hub.reports[-1][2]["conditions"]}
        assert pressure["MemoryPressure"] == "True"
        link.set(True, "connected")  # unchanged, but the cloud may have lost it
        await trio.sleep(1)
        assert len(hub.reports) == 3
        assert hub.reports[2][2] == hub.reports[1][2]
        link.set(False, "cut")  # going offline says nothing
        await trio.sleep(1)
        assert len(hub.reports) == 3
        nursery.cancel_scope.cancel()


async def test_the_node_status_reader_asks_runc_once_and_routes_to_the_cloud(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[str, str | None]] = []

    def read_facts(data_dir: Path, *, runc_version: str, cloud_host: str | None) -> Any:
        seen.append((runc_version, cloud_host))
        return facts(runc_version=runc_version)

    class Runc:
        calls = 0

        async def version(self) -> str:
            Runc.calls += 1
            return RUNC_VERSION

    monkeypatch.setattr(node_info, "read_facts", read_facts)
    config = SimpleNamespace(cloud_url="https://cloud.example.com:8443")
    read = agent._node_status("gw-17", tmp_path, Runc(), config)
    body = await read()
    await read()
    assert body["nodeInfo"]["containerRuntimeVersion"] == "runc://1.1.5+ds1"
    assert seen == [("1.1.5+ds1", "cloud.example.com")] * 2
    assert Runc.calls == 1


async def test_pods_report_again_each_time_the_link_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = LinkState()
    manager = SimpleNamespace(count=0)
    manager.report_again = lambda: setattr(manager, "count", manager.count + 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._report_pods_on_reconnect, link, manager)
        await trio.sleep(0.01)
        for online in (True, False, True):
            link.set(online, "")
            await trio.sleep(0.01)
        assert manager.count == 2
        nursery.cancel_scope.cancel()
