"""BLE on a real adapter: the same driver as in production, with bluepy and a real peripheral.

Runs only where all of this holds, and is skipped saying which one does not:

- the kernel has a Bluetooth adapter (``/sys/class/bluetooth/hci*``);
- bluepy is installed (``pip install 'outpost[ble]'``);
- ``OUTPOST_BLE_MAC`` names a peripheral in range. ``OUTPOST_BLE_UUID`` (default ``2a19``, the
  standard Battery Level) and ``OUTPOST_BLE_FORMAT`` (default ``<B``) say what to read;
  ``OUTPOST_BLE_ADAPTER`` picks the adapter (default 0).

Machines without Bluetooth run the same driver against ``tests/ble_sim.py`` (the unit tests in
``tests/unit/devices/test_ble_driver.py``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import trio

from edge.devices.drivers import Buses, ble
from edge.devices.model import parse_device

ADAPTERS = sorted(p.name for p in Path("/sys/class/bluetooth").glob("hci*"))
MAC = os.environ.get("OUTPOST_BLE_MAC", "")

pytestmark = [
    pytest.mark.skipif(not ADAPTERS, reason="no Bluetooth adapter (/sys/class/bluetooth/hci*)"),
    pytest.mark.skipif(
        importlib.util.find_spec("bluepy") is None,
        reason="bluepy is not installed (pip install 'outpost[ble]')",
    ),
    pytest.mark.skipif(not MAC, reason="OUTPOST_BLE_MAC does not name a BLE peripheral in range"),
]


def config():
    model = {
        "metadata": {"name": "hw", "namespace": "default"},
        "spec": {
            "protocol": "ble",
            "properties": [{"name": "value", "type": "int", "accessMode": "ReadOnly"}],
        },
    }
    visitor = {
        "characteristicUUID": os.environ.get("OUTPOST_BLE_UUID", "2a19"),
        "dataFormat": os.environ.get("OUTPOST_BLE_FORMAT", "<B"),
    }
    device = {
        "metadata": {"name": "hw-ble", "namespace": "default", "uid": "hw"},
        "spec": {
            "deviceModelRef": {"name": "hw"},
            "protocol": {
                "protocolName": "ble",
                "configData": {
                    "macAddress": MAC,
                    "adapter": int(os.environ.get("OUTPOST_BLE_ADAPTER", "0")),
                    "timeout": 10,
                },
            },
            "properties": [{"name": "value", "visitors": {"configData": visitor}}],
        },
    }
    return parse_device(device, model)


async def test_read_real_characteristic() -> None:
    cfg = config()
    driver = await ble.open_driver(cfg, Buses())
    try:
        with trio.fail_after(60):
            first = await driver.read(cfg.property("value"))
            second = await driver.read(cfg.property("value"))
        assert isinstance(first, int)
        assert isinstance(second, int)
        assert driver.connects == 1  # the connection is kept between reads
    finally:
        await driver.aclose()
