"""Buses: one worker per physical bus, strict turn-taking, counters, lazy protocol imports."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import trio

from edge.devices.drivers import Buses, open_driver
from edge.devices.drivers.base import DriverError
from edge.devices.model import DeviceConfig


async def test_a_bus_serves_one_request_at_a_time_across_its_users() -> None:
    buses = Buses()
    a, b = buses.acquire("/dev/ttyS0"), buses.acquire("/dev/ttyS0")
    other = buses.acquire("10.0.0.5:502")
    assert a is b
    assert other is not a
    active, peak = 0, 0
    lock = threading.Lock()

    def request() -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(a.run, request)
            nursery.start_soon(b.run, request)
    assert peak == 1
    assert a.stats.busy_s >= 0.2
    closed = []
    a.resource, a.close_resource = "port", closed.append
    await buses.release(a)
    assert closed == []  # b still uses it
    await buses.release(b)
    assert closed == ["port"]
    assert "/dev/ttyS0" not in buses.buses
    assert list(buses.stats()) == ["10.0.0.5:502"]


def test_driver_errors_and_stats() -> None:
    buses = Buses()
    bus = buses.acquire("x")
    bus.stats.count(None)
    bus.stats.count(DriverError("Timeout", "slave 3 did not answer within 0.5 s"))
    bus.stats.count(DriverError("CRCError", "bad CRC"))
    bus.stats.count(DriverError("IllegalAddress"))
    stats = bus.stats.as_dict()
    assert {k: stats[k] for k in ("requests", "ok", "timeouts", "crc_errors", "errors")} == {
        "requests": 4,
        "ok": 1,
        "timeouts": 1,
        "crc_errors": 1,
        "errors": 1,
    }
    assert stats["last_error"] == "IllegalAddress: IllegalAddress"
    assert DriverError("Timeout").device_level
    assert not DriverError("IllegalAddress").device_level


def config(protocol: str) -> DeviceConfig:
    return DeviceConfig("ns", "d", "u", protocol, {}, [])


async def test_a_protocol_whose_library_is_missing_is_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "edge.devices.drivers.ble", None)  # import fails
    with pytest.raises(DriverError) as info:
        await open_driver(config("ble"), Buses())
    assert info.value.reason == "Unsupported"
    assert "ble" in info.value.message
    with pytest.raises(DriverError) as info:
        await open_driver(config("zigbee"), Buses())
    assert info.value.reason == "Unsupported"
