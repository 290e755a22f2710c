"""`outpost device ls|get`, reading the views the device manager saves in the store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml
from click.testing import CliRunner

from edge.cli import cli
from edge.devices.drivers import Buses
from edge.devices.manager import INDEX_KEY, DeviceManager, state_key
from edge.devices.model import DeviceConfig, PropertyConfig
from edge.devices.twin import DeviceTwin
from edge.manifests import ManifestWriter
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.upstream import Upstream


def views() -> dict[str, dict[str, Any]]:
    props = [
        PropertyConfig(name="temperature", type="FLOAT", unit="C", access_mode="ReadOnly"),
        PropertyConfig(name="setpoint", type="FLOAT", desired="21.5"),
    ]
    twin = DeviceTwin(DeviceConfig("plant", "t1", "u1", "modbus-rtu", {}, props, "thermostat"), 0)
    twin.read_done("temperature", 20.5, 1.0)
    twin.write_done("setpoint", 1.1)
    twin.read_done("setpoint", 21.5, 1.2, readback=True)
    dead = DeviceTwin(DeviceConfig("plant", "t2", "u2", "modbus-rtu", {}, props[:1]), 0)
    for i in range(3):
        dead.read_failed("temperature", "Timeout", "slave 2 did not answer within 0.5 s", i)
    return {"plant/Device/t1": twin.view(), "plant/Device/t2": dead.view()}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    with Store(tmp_path / "store.db") as store:
        for key, view in views().items():
            store.set_state(state_key(key), {**view, "updated": time.time() - 5})
        store.set_state(INDEX_KEY, sorted(views()))
    return tmp_path


def test_ls(data_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["device", "--data-dir", str(data_dir), "ls"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "NAMESPACE", "NAME", "STATE", "PROTOCOL", "UPDATED", "VALUES", "REASON"
    ]  # fmt: skip
    assert lines[1].split()[:6] == ["plant", "t1", "online", "modbus-rtu", "5s", "temperature=20.5"]
    assert "Timeout" in lines[2]
    assert "offline" in lines[2]
    as_json = CliRunner().invoke(cli, ["device", "--data-dir", str(data_dir), "ls", "--json"])
    assert [v["name"] for v in json.loads(as_json.output)] == ["t1", "t2"]


def test_get(data_dir: Path) -> None:
    args = ["device", "--data-dir", str(data_dir), "get", "t1", "-n", "plant"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "state:     online" in result.output
    assert any(
        line.split()[:4] == ["setpoint", "float", "ReadWrite", "21.5"]
        and line.split()[-3:] == ["21.5", "21.5", "yes"]
        for line in result.output.splitlines()
    ), result.output
    dead = CliRunner().invoke(cli, [*args[:3], "get", "t2", "-n", "plant", "--json"])
    assert json.loads(dead.output)["reasons"][0]["reason"] == "Timeout"
    missing = CliRunner().invoke(cli, [*args[:3], "get", "t9"])
    assert missing.exit_code == 1
    assert "no device default/t9 on this gateway (devices: plant/t1, plant/t2)" in missing.output


def test_without_a_store(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["device", "--data-dir", str(tmp_path), "ls"])
    assert result.exit_code == 1
    assert "no store" in result.output


async def test_standalone_agent_runs_devices_from_the_folder_and_reports_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    model = {
        "kind": "DeviceModel",
        "metadata": {"name": "m"},
        "spec": {"properties": [{"name": "t", "type": "int"}]},
    }
    dev = {
        "kind": "Device",
        "metadata": {"name": "d"},
        "spec": {
            "deviceModelRef": {"name": "missing"},
            "protocol": {"protocolName": "modbus-tcp", "configData": {"ip": "127.0.0.1"}},
            "properties": [],
        },
    }
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "d.yaml").write_text(yaml.safe_dump_all([model, dev]))
    with Store(tmp_path / "store.db") as store:
        # As `outpost run --standalone` wires them: the folder writes, the devices follow.
        aio = AsyncStore(store)
        devices = DeviceManager(aio, "gw", Upstream(aio, cloud=False).report, Buses())
        async with trio.open_nursery() as nursery:
            await nursery.start(ManifestWriter(manifests, "gw", aio).run)
            nursery.start_soon(devices.run)
            await devices.ready.wait()
            nursery.cancel_scope.cancel()
        assert store.outbox_size() == (0, 0)  # standalone: nothing queued for a cloud
        view = store.get_state(state_key("default/Device/d"))
        assert view["reasons"][0]["reason"] == "ModelNotFound"
