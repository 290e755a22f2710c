"""The device manager with the real Modbus drivers, a real store, and pymodbus slaves on a paced
serial line (socat) or a Modbus TCP server: the issue's thermostat and shared-bus acceptance on
the edge's side (values into TWIN reports, desired values onto the simulator)."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from edge.devices.drivers import Buses, Driver, open_driver
from edge.devices.manager import DeviceManager
from edge.devices.model import DeviceConfig, PropertyConfig
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.wire.events import Message, Op
from tests.serialkit import FarEnd, modbus_line, modbus_tcp_server
from tests.waiting import eventually

MODEL = {
    "apiVersion": "devices.outpost.io/v1beta1",
    "kind": "DeviceModel",
    "metadata": {"name": "thermostat", "namespace": "plant"},
    "spec": {
        "protocol": "modbus",
        "properties": [
            {"name": "temperature", "type": "float", "accessMode": "ReadOnly", "unit": "C"},
            {"name": "setpoint", "type": "float", "accessMode": "ReadWrite"},
        ],
    },
}


def thermostat(name: str, protocol: dict[str, Any], desired: str | None = None) -> dict[str, Any]:
    setpoint: dict[str, Any] = {
        "name": "setpoint",
        "collectCycle": 500_000_000,
        "reportCycle": 1_000_000_000,
        "visitors": {
            "protocolName": "modbus",
            "configData": {"register": "HoldingRegister", "offset": 1, "dataType": "int16",
                           "scale": 0.5},
        },
    }  # fmt: skip
    if desired is not None:
        setpoint["desired"] = {"value": desired}
    return {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "Device",
        "metadata": {"name": name, "namespace": "plant", "uid": f"uid-{name}"},
        "spec": {
            "deviceModelRef": {"name": "thermostat"},
            "nodeName": "gw",
            "protocol": protocol,
            "properties": [
                {
                    "name": "temperature",
                    "collectCycle": 500_000_000,
                    "reportCycle": 1_000_000_000,
                    "visitors": {
                        "protocolName": "modbus",
                        "configData": {
                            "register": "InputRegister",
                            "offset": 0,
                            "dataType": "int16",
                            "scale": 0.1,
                        },
                    },
                },
                setpoint,
            ],
        },
    }


def rtu(far: FarEnd, slave: int) -> dict[str, Any]:
    return {
        "protocolName": "modbus-rtu",
        "configData": {"serialPort": far.port, "baudRate": far.baudrate, "slaveID": slave,
                       "timeout": 0.2},
    }  # fmt: skip


class Edge:
    """A store, a device manager with the real drivers, and every report it made."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.aio = AsyncStore(store)
        self.seq = itertools.count(1)
        self.reports: list[tuple[float, Op, str, dict[str, Any]]] = []
        self.reads: dict[str, list[float]] = {}
        self.manager = DeviceManager(
            self.aio, "gw", self.report, Buses(), open_driver=self.open, resync_s=3600
        )

    async def open(self, config: DeviceConfig, buses: Buses) -> Driver:
        driver = await open_driver(config, buses)
        reads = self.reads.setdefault(config.name, [])
        read = driver.read

        async def timed(prop: PropertyConfig) -> Any:
            value = await read(prop)
            reads.append(time.monotonic())
            return value

        driver.read = timed  # type: ignore[method-assign]
        return driver

    async def report(self, op: Op, key: str, body: dict[str, Any], coalesce: str | None) -> None:
        self.reports.append((time.monotonic(), op, key, body))
        await self.aio.run(self.store.report, op, key, body, "", coalesce)

    async def put(self, *objects: dict[str, Any]) -> None:
        messages = []
        for obj in objects:
            meta = obj["metadata"]
            key = f"{meta['namespace']}/{obj['kind']}/{meta['name']}"
            messages.append(Message(next(self.seq), "id", Op.PUT, key, "", obj))
        await self.aio.run(self.store.apply_batch, messages)  # the manager follows the feed

    def twin(self, name: str) -> dict[str, Any] | None:
        twins = [b for _, op, k, b in self.reports if op == Op.TWIN and k == f"plant/Device/{name}"]
        return twins[-1] if twins else None

    async def wait_for(self, name: str, check: Any, within_s: float = 5.0) -> dict[str, Any]:
        def passing() -> dict[str, Any] | None:
            body = self.twin(name)
            return body if body is not None and check(body) else None

        return await eventually(passing, f"the twin of {name} passes its check", within=within_s)


def twin_value(body: dict[str, Any], prop: str, field: str = "reported") -> str | None:
    for entry in body["twins"]:
        if entry["propertyName"] == prop:
            return entry.get(field, {}).get("value")
    return None


@asynccontextmanager
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    with Store(tmp_path / "store.db") as store:
        e = Edge(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(e.manager.run)
            yield e
            nursery.cancel_scope.cancel()


async def test_modbus_rtu_thermostat(tmp_path: Path) -> None:
    async with modbus_line(tmp_path, baudrate=19200, slaves=(1,)) as far, edge(tmp_path) as e:
        await far.set(1, "ir", 0, [215])
        start = time.monotonic()
        await e.put(MODEL, thermostat("t1", rtu(far, 1)))
        body = await e.wait_for("t1", lambda b: twin_value(b, "temperature") == "21.5")
        assert time.monotonic() - start < 2 * 1.0 + 0.5  # within two report cycles
        assert body["state"] == "online"
        await far.set(1, "ir", 0, [230])
        await e.wait_for("t1", lambda b: twin_value(b, "temperature") == "23")

        # Desired setpoint: written to the holding register (checked on the simulator's side),
        # read back, and reflected in the twin.
        await e.put(thermostat("t1", rtu(far, 1), desired="22.5"))
        body = await e.wait_for("t1", lambda b: twin_value(b, "setpoint", "observedDesired"))
        assert await far.get(1, "hr", 1) == [45]
        assert twin_value(body, "setpoint", "observedDesired") == "22.5"
        assert twin_value(body, "setpoint") == "22.5"
        assert e.reads.keys() == {"t1"}  # the same driver throughout


async def test_eight_slaves_one_dead_the_live_ones_keep_their_cycle(tmp_path: Path) -> None:
    slaves = tuple(range(1, 9))
    async with (
        modbus_line(tmp_path, baudrate=115200, slaves=slaves, dead=(5,)) as far,
        edge(tmp_path) as e,
    ):
        await e.put(MODEL, *(thermostat(f"s{i}", rtu(far, i)) for i in slaves))
        await e.wait_for("s5", lambda b: b["state"] == "offline", within_s=10)
        begin = time.monotonic()
        await trio.sleep(6)
        end = time.monotonic()
        for i in slaves:
            if i == 5:
                continue
            reads = [t for t in e.reads[f"s{i}"] if begin <= t <= end]
            # Two properties at 0.5 s: 4 reads a second, 24 in the window; allow for the dead
            # slave's occasional probe (0.2 s timeout).
            assert len(reads) >= 20, (i, len(reads))
            assert e.twin(f"s{i}")["state"] == "online"
        dead = e.twin("s5")
        assert dead["reasons"][0]["reason"] == "Timeout"


async def test_modbus_tcp_device(tmp_path: Path) -> None:
    async with modbus_tcp_server(tmp_path, slaves=(1,)) as far, edge(tmp_path) as e:
        await far.set(1, "ir", 0, [199])
        protocol = {
            "protocolName": "modbus-tcp",
            "configData": {"ip": far.host, "port": far.tcp_port, "slaveID": 1},
        }
        await e.put(MODEL, thermostat("tcp", protocol, desired="20"))
        body = await e.wait_for(
            "tcp", lambda b: twin_value(b, "setpoint", "observedDesired") == "20"
        )
        assert twin_value(body, "temperature") == "19.9"
        assert await far.get(1, "hr", 1) == [40]
        # A device referring to a missing model, on the same node: reported, others unaffected.
        missing = thermostat("lost", protocol)
        missing["spec"]["deviceModelRef"]["name"] = "nope"
        await e.put(missing)
        lost = await e.wait_for("lost", lambda b: b["reasons"])
        assert lost["state"] == "unknown"
        assert lost["reasons"][0]["reason"] == "ModelNotFound"
        await far.set(1, "ir", 0, [201])
        await e.wait_for("tcp", lambda b: twin_value(b, "temperature") == "20.1")
