"""Devices end to end, as a user runs them: `kubectl apply` of a DeviceModel and a Device, a real
`outpost-cloud serve` and a joined `outpost run`, a Modbus RTU thermostat simulated on a paced
serial line (tests/serialkit.py), DeviceStatus read back from the apiserver, and telemetry
through a real mosquitto.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from tests.channelkit import Cloud, Edge
from tests.cluster.controlplane import ControlPlane
from tests.mqttkit import Mosquitto, TestClient
from tests.serialkit import FarEnd, modbus_line
from tests.waiting import eventually

pytestmark = pytest.mark.usefixtures("control_plane")

REPORT_S = 1.0


def manifests(namespace: str, node: str, far: FarEnd, *, setpoint: str, cycle_s: float) -> str:
    ns = int(cycle_s * 1e9)
    model = {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "DeviceModel",
        "metadata": {"name": "thermostat", "namespace": namespace},
        "spec": {
            "protocol": "modbus-rtu",
            "properties": [
                {"name": "temperature", "type": "FLOAT", "accessMode": "ReadOnly", "unit": "C"},
                {"name": "setpoint", "type": "FLOAT", "accessMode": "ReadWrite", "unit": "C",
                 "minimum": 5, "maximum": 35},
            ],
        },
    }  # fmt: skip

    def register(table: str, offset: int) -> dict[str, Any]:
        return {
            "protocolName": "modbus-rtu",
            # A thermostat keeping tenths of a degree in one signed register.
            "configData": {
                "register": table,
                "offset": offset,
                "limit": 1,
                "dataType": "int16",
                "scale": 0.1,
            },
        }

    device = {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "Device",
        "metadata": {"name": "thermo-1", "namespace": namespace},
        "spec": {
            "deviceModelRef": {"name": "thermostat"},
            "nodeName": node,
            "protocol": {
                "protocolName": "modbus-rtu",
                "configData": {
                    "serialPort": far.port,
                    "baudRate": far.baudrate,
                    "dataBits": 8,
                    "parity": "none",
                    "stopBits": 1,
                    "slaveID": 1,
                    "timeout": 0.2,
                },
            },
            "properties": [
                {
                    "name": "temperature",
                    "collectCycle": ns,
                    "reportCycle": int(REPORT_S * 1e9),
                    "reportToCloud": True,
                    "visitors": register("InputRegister", 0),
                },
                {
                    "name": "setpoint",
                    "desired": {"value": setpoint},
                    "collectCycle": int(0.5e9),
                    "reportCycle": int(REPORT_S * 1e9),
                    "reportToCloud": True,
                    "visitors": register("HoldingRegister", 1),
                },
            ],
        },
    }
    return yaml.safe_dump_all([model, device])


@dataclass
class Site:
    plane: ControlPlane
    cloud: Cloud
    edge: Edge
    far: FarEnd
    namespace: str

    async def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = await trio.run_process(
            [str(self.plane.kubectl_path), f"--kubeconfig={self.plane.kubeconfig}", *args],
            stdin=stdin.encode() if stdin is not None else b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    async def apply(self, setpoint: str, cycle_s: float = 0.2) -> None:
        text = manifests(self.namespace, self.edge.node, self.far, setpoint=setpoint,
                         cycle_s=cycle_s)  # fmt: skip
        await self.kubectl("apply", "-n", self.namespace, "-f", "-", stdin=text)

    async def status(self) -> dict[str, Any] | None:
        result = await trio.run_process(
            [str(self.plane.kubectl_path), f"--kubeconfig={self.plane.kubeconfig}",
             "get", "devicestatus", "thermo-1", "-n", self.namespace, "-o", "json"],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            return None
        return json.loads(result.stdout).get("status")

    async def twin(self, prop: str, field: str = "reported") -> str | None:
        status = await self.status() or {}
        for twin in status.get("twins") or ():
            if twin.get("propertyName") == prop:
                return (twin.get(field) or {}).get("value")
        return None

    async def until_twin(self, prop: str, value: str, field: str = "reported", within: float = 20):
        async def reached() -> bool:
            return await self.twin(prop, field) == value

        await eventually(
            reached, f"the twin's {prop} {field} is {value}", within=within, interval=0.1
        )


async def collect(listener: TestClient, topic: str, quiet_s: float = 3.0) -> list[Any]:
    """Every message on ``topic`` until it has been quiet for ``quiet_s``."""
    got = []
    while True:
        try:
            got.append(await listener.expect(topic, within=quiet_s))
        except AssertionError:
            listener.seen.clear()
            return got


@asynccontextmanager
async def site(
    plane: ControlPlane, tmp_path: Path, cloud_args: tuple[str, ...] = ()
) -> AsyncIterator[Site]:
    namespace = f"dev-{secrets.token_hex(3)}"
    node = f"gw-{secrets.token_hex(3)}"
    plane.kubectl("create", "namespace", namespace)
    cloud = Cloud(
        plane,
        tmp_path,
        extra_args=["--device-status-interval", "0.5", "--lease-renew-interval", "2", *cloud_args],
    )
    edge = Edge(
        node,
        tmp_path,
        run_args=["--runc-root", tmp_path / "runc", "--pod-subnet", "10.93.0.0/16"],
    )
    await cloud.start()
    try:
        await edge.join(cloud)
        await edge.start()
        await edge.wait_online()
        async with modbus_line(tmp_path / "line", baudrate=19200, slaves=(1,)) as far:
            yield Site(plane, cloud, edge, far, namespace)
    finally:
        await edge.stop()
        await cloud.stop()
        plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        plane.kubectl("delete", "node", node, "--wait=false", check=False)


async def test_a_modbus_thermostat_applied_with_kubectl_reports_and_takes_its_setpoint(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    (tmp_path / "line").mkdir()
    async with site(control_plane, tmp_path) as s:
        await s.far.set(1, "ir", 0, [215])
        applied = time.monotonic()
        await s.apply(setpoint="21.5")
        await s.until_twin("temperature", "21.5")
        online = time.monotonic() - applied
        status = await s.status()
        assert status["state"] == "online"
        # Applied to reported in the apiserver: the device must first reach the node, open the
        # line and read once; then it reports within two report cycles.
        print(f"kubectl apply to reported temperature in DeviceStatus: {online:.2f} s")
        assert online < 2 * REPORT_S + 3

        # The desired setpoint reaches the holding register (seen by the simulator) and comes
        # back as reported and observedDesired.
        await s.until_twin("setpoint", "21.5", "observedDesired")
        assert await s.far.get(1, "hr", 1) == [215]
        await s.apply(setpoint="23")
        await s.until_twin("setpoint", "23", "observedDesired")
        assert await s.far.get(1, "hr", 1) == [230]
        await s.until_twin("setpoint", "23")

        # A change on the device side shows up too.
        changed = time.monotonic()
        await s.far.set(1, "ir", 0, [198])
        await s.until_twin("temperature", "19.8")
        assert time.monotonic() - changed < 2 * REPORT_S + 1.5

        out = await s.kubectl("get", "devices,devicestatuses", "-n", s.namespace)
        assert "thermo-1" in out
        assert "online" in out


async def test_an_offline_hour_arrives_after_reconnect_latest_value_and_bounded_history(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """An hour of once-a-second readings, compressed 100 times: the simulator's temperature
    changes every 10 ms and the device collects every 10 ms, for 36 s while the cloud is away.
    """
    (tmp_path / "line").mkdir()
    with Mosquitto() as broker, TestClient(broker) as listener:
        async with site(control_plane, tmp_path, ("--telemetry-mqtt", broker.url)) as s:
            topic = f"outpost/telemetry/{s.edge.node}/{s.namespace}/thermo-1"
            await listener.subscribe(topic)
            await s.far.set(1, "ir", 0, [100])
            await s.apply(setpoint="20", cycle_s=0.01)
            await s.until_twin("temperature", "10")

            await s.cloud.kill()
            produced = 0

            async def vary() -> None:
                nonlocal produced
                while True:
                    produced += 1
                    await s.far.set(1, "ir", 0, [100 + produced % 200])
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(vary)
                await trio.sleep(36)
                nursery.cancel_scope.cancel()
            # A last value set after the variation stopped (a set cut short by the cancellation
            # may or may not have happened): the edge must report exactly this one.
            await s.far.set(1, "ir", 0, [333])
            await trio.sleep(0.5)
            last = "33.3"
            queued = (await s.edge.status())["outbox"]["entries"]
            print(f"offline: {produced} simulator changes, {queued} reports queued on the edge")
            assert queued > 500  # the history was kept while the cloud was away

            await s.cloud.start()
            # The edge's reconnect backoff has grown while the cloud was away (up to 60 s).
            await s.until_twin("temperature", last, within=150)
            values = [json.loads(m.payload)["value"] for m in await collect(listener, topic)]
            print(f"after reconnect: {len(values)} readings of history arrived")
            assert len(values) >= 500
            assert float(last) in values or last in map(str, values)
