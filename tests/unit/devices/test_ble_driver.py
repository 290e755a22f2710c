"""The BLE driver against the GATT peripheral simulator (tests/ble_sim.py) at the bluepy boundary:
reads and writes by UUID, notifications, dropped links, reconnect backoff, one call at a time per
adapter, and a clear error when bluepy is missing."""

from __future__ import annotations

import struct
import sys
import threading

import pytest
import trio

from edge.backoff import Backoff
from edge.devices import drivers
from edge.devices.drivers import Buses, ble
from edge.devices.drivers.base import DriverError
from edge.devices.model import DeviceConfig, parse_device
from tests.ble_sim import SimDevice, SimulatedBtle

MODEL = {
    "metadata": {"name": "sensor", "namespace": "default"},
    "spec": {
        "protocol": "ble",
        "properties": [
            {"name": "temperature", "type": "float", "accessMode": "ReadOnly"},
            {"name": "battery", "type": "int", "accessMode": "ReadOnly"},
            {"name": "name", "type": "string", "accessMode": "ReadWrite"},
            {"name": "interval", "type": "int", "accessMode": "ReadWrite"},
            {"name": "missing", "type": "int", "accessMode": "ReadOnly"},
        ],
    },
}
TEMP = "00002a6e-0000-1000-8000-00805f9b34fb"


def config(mac: str = "AA:BB:CC:DD:EE:01", name: str = "s1") -> DeviceConfig:
    visitors = {
        "temperature": {
            "characteristicUUID": TEMP,
            "dataFormat": "<h",
            "scale": 0.01,
            "notify": True,
        },
        "battery": {"characteristicUUID": "2A19", "dataFormat": "<B"},
        "name": {"characteristicUUID": "0x2a00", "dataFormat": "utf8"},
        "interval": {"characteristicUUID": "fff1", "dataFormat": "<H", "scale": 10},
        "missing": {"characteristicUUID": "fff9", "dataFormat": "<B"},
    }
    body = {
        "metadata": {"name": name, "namespace": "default", "uid": f"u-{name}"},
        "spec": {
            "deviceModelRef": {"name": "sensor"},
            "protocol": {"protocolName": "ble", "configData": {"macAddress": mac, "timeout": 0.5}},
            "properties": [
                {"name": n, "visitors": {"protocolName": "ble", "configData": v}}
                for n, v in visitors.items()
            ],
        },
    }
    return parse_device(body, MODEL)


def sensor(sim: SimulatedBtle, mac: str = "AA:BB:CC:DD:EE:01") -> SimDevice:
    device = sim.add_device(mac)
    device.add_characteristic("2a6e", struct.pack("<h", 2150), read=True, notify=True)
    device.add_characteristic("2a19", bytes([87]))
    device.add_characteristic("2a00", b"probe-1\x00", write=True)
    device.add_characteristic("fff1", struct.pack("<H", 6), write=True)
    return device


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ble, "BACKOFF", Backoff(base_s=0.05, cap_s=0.2))


async def test_reads_and_writes_by_uuid() -> None:
    sim = SimulatedBtle()
    device = sensor(sim)
    cfg = config()
    buses = Buses()
    driver = await ble.open_driver(cfg, buses, btle=sim)
    assert await driver.read(cfg.property("battery")) == 87
    assert await driver.read(cfg.property("temperature")) == 21.5  # read before any notification
    assert await driver.read(cfg.property("name")) == "probe-1"
    assert await driver.read(cfg.property("interval")) == 60
    await driver.write(cfg.property("interval"), 120)
    await driver.write(cfg.property("name"), "probe-2")
    assert device.writes == [
        ("0000fff1-0000-1000-8000-00805f9b34fb", struct.pack("<H", 12)),
        ("00002a00-0000-1000-8000-00805f9b34fb", b"probe-2"),
    ]
    assert await driver.read(cfg.property("interval")) == 120
    with pytest.raises(DriverError) as err:
        await driver.read(cfg.property("missing"))
    assert err.value.reason == "IllegalAddress"
    assert "0000fff9" in err.value.message
    # Every bluepy call ran in a worker thread, never in trio's.
    assert threading.main_thread().name not in sim.threads
    assert buses.stats()["ble:hci0"]["ok"] >= 6
    await driver.aclose()
    assert buses.stats() == {}  # the adapter's bus is released
    assert device._connection is None  # disconnected


async def test_notifications_give_the_latest_value() -> None:
    sim = SimulatedBtle()
    device = sensor(sim)
    cfg = config()
    driver = await ble.open_driver(cfg, Buses(), btle=sim)
    await driver.read(cfg.property("battery"))  # connects and subscribes
    for centi in (2200, 2210, 2225):
        device.set_value("2a6e", struct.pack("<h", centi))
    # Between two notifications the characteristic itself says something else: the latest
    # notification is what counts.
    device.characteristics[TEMP].value = struct.pack("<h", -100)
    assert await driver.read(cfg.property("temperature")) == 22.25
    assert driver.notifications == 3
    await driver.aclose()


async def test_notify_only_characteristic_waits_for_a_notification() -> None:
    sim = SimulatedBtle()
    device = sim.add_device("AA:BB:CC:DD:EE:01")
    device.add_characteristic("2a6e", b"", read=False, notify=True)
    cfg = config()
    driver = await ble.open_driver(cfg, Buses(), btle=sim)
    with pytest.raises(DriverError) as err:
        await driver.read(cfg.property("temperature"))
    assert err.value.reason == "Timeout"

    async def later() -> None:
        await trio.sleep(0.2)
        device.set_value("2a6e", struct.pack("<h", 1999))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await driver.read(cfg.property("temperature")) == 19.99
    await driver.aclose()


async def test_dropped_link_reconnects_after_backoff_and_resubscribes() -> None:
    sim = SimulatedBtle()
    device = sensor(sim)
    cfg = config()
    driver = await ble.open_driver(cfg, Buses(), btle=sim)
    assert await driver.read(cfg.property("battery")) == 87
    device.disconnect()
    with pytest.raises(DriverError) as err:
        await driver.read(cfg.property("battery"))
    assert err.value.reason == "Disconnected"
    # Within the backoff no connect is even tried.
    with pytest.raises(DriverError) as err:
        await driver.read(cfg.property("battery"))
    assert "next attempt" in err.value.message
    assert device.connects == 1
    await trio.sleep(0.1)
    device.characteristics["00002a19-0000-1000-8000-00805f9b34fb"].value = bytes([86])
    assert await driver.read(cfg.property("battery")) == 86
    assert device.connects == 2
    # Notifications were turned on again on the new connection.
    device.set_value("2a6e", struct.pack("<h", 2300))
    assert await driver.read(cfg.property("temperature")) == 23.0
    await driver.aclose()


async def test_absent_device_backs_off_exponentially() -> None:
    sim = SimulatedBtle()
    device = sensor(sim)
    device.present = False
    cfg = config()
    driver = await ble.open_driver(cfg, Buses(), btle=sim)
    attempts = 0
    reasons: set[str] = set()
    with trio.move_on_after(1.0):
        while True:
            try:
                await driver.read(cfg.property("battery"))
            except DriverError as exc:
                reasons.add(exc.reason)
                if "cannot connect" in exc.message:
                    attempts += 1
            await trio.sleep(0.01)
    # 1 s of asking every 10 ms: a handful of connects (backoff 0.05 s doubling to 0.2 s), not 100.
    assert 2 <= attempts <= 20
    assert reasons == {"Disconnected"}
    device.present = True
    await trio.sleep(0.25)
    assert await driver.read(cfg.property("battery")) == 87
    await driver.aclose()


async def test_one_call_at_a_time_per_adapter() -> None:
    sim = SimulatedBtle()
    macs = [f"AA:BB:CC:DD:EE:0{i}" for i in range(1, 5)]
    for mac in macs:
        sensor(sim, mac)
    buses = Buses()
    configs = [config(mac, f"s{i}") for i, mac in enumerate(macs)]
    opened = [await ble.open_driver(c, buses, btle=sim) for c in configs]
    assert len(buses.buses) == 1  # hci0, shared

    async def poll(driver: ble.BleDriver, cfg: DeviceConfig) -> None:
        for _ in range(10):
            assert await driver.read(cfg.property("battery")) == 87

    async with trio.open_nursery() as nursery:
        for driver, cfg in zip(opened, configs, strict=True):
            nursery.start_soon(poll, driver, cfg)
    assert sim.max_concurrent == 1
    for driver in opened:
        await driver.aclose()


async def test_missing_bluepy_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bluepy", None)
    monkeypatch.setitem(sys.modules, "bluepy.btle", None)
    with pytest.raises(DriverError) as err:
        await drivers.open_driver(config(), Buses())
    assert err.value.reason == "Unsupported"
    assert "outpost[ble]" in err.value.message


def test_full_uuid() -> None:
    assert ble.full_uuid("2A19") == "00002a19-0000-1000-8000-00805f9b34fb"
    assert ble.full_uuid("0x2a19") == "00002a19-0000-1000-8000-00805f9b34fb"
    assert ble.full_uuid(TEMP.upper()) == TEMP
