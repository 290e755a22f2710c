"""Device drivers, one module per protocol, and the registry of shared buses.

``open_driver(device, buses)`` builds the driver for a ``DeviceConfig`` by its protocol:
``modbus-rtu`` and ``modbus-tcp`` (``drivers.modbus``), ``ble`` (``drivers.ble``) and ``mqtt``
(``drivers.mqtt``). Each protocol module is imported only when a device needs it, so a missing
optional library (bluepy, say) makes only that protocol's devices fail, with
``DriverError("Unsupported")`` saying what is missing.

Every protocol module provides ``async def open_driver(device, buses) -> Driver``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import trio

from edge.devices.drivers.base import UNSUPPORTED, Bus, BusStats, Driver, DriverError
from edge.devices.model import DeviceConfig

__all__ = ["Bus", "BusStats", "Buses", "Driver", "DriverError", "open_driver"]

log = logging.getLogger("edge.devices")

_MODULES = {
    "modbus-rtu": "edge.devices.drivers.modbus",
    "modbus-tcp": "edge.devices.drivers.modbus",
    "ble": "edge.devices.drivers.ble",
    "mqtt": "edge.devices.drivers.mqtt",
}


class Buses:
    """Hands out one shared ``Bus`` per physical bus, by name: the serial port's path
    (``/dev/ttyUSB0``), ``host:port`` for TCP, or any name a driver chooses for what it shares
    (an MQTT broker's URL, a BLE adapter).

    A driver calls ``acquire`` when it opens and ``release`` when it closes; the last release
    closes the bus's resource and forgets it.
    """

    def __init__(self) -> None:
        self.buses: dict[str, Bus] = {}

    def acquire(self, name: str) -> Bus:
        bus = self.buses.get(name)
        if bus is None:
            bus = self.buses[name] = Bus(name)
        bus.users += 1
        return bus

    async def release(self, bus: Bus) -> None:
        bus.users -= 1
        if bus.users > 0 or self.buses.get(bus.name) is not bus:
            return
        del self.buses[bus.name]
        resource, close = bus.resource, bus.close_resource
        bus.resource = bus.close_resource = None
        if resource is not None and close is not None:
            with trio.CancelScope(shield=True):
                try:
                    await bus.run(close, resource)
                except Exception as exc:  # a port that vanished cannot be closed cleanly
                    log.warning("cannot close bus", extra={"bus": bus.name, "error": str(exc)})

    def stats(self) -> dict[str, dict[str, Any]]:
        """Every open bus's counters, by name."""
        return {name: bus.stats.as_dict() for name, bus in sorted(self.buses.items())}


async def open_driver(device: DeviceConfig, buses: Buses) -> Driver:
    """The driver of ``device``; raises ``DriverError`` when it cannot be opened (``Unsupported``
    when its protocol's library is missing)."""
    module_name = _MODULES.get(device.protocol)
    if module_name is None:
        raise DriverError(UNSUPPORTED, f"no driver for protocol {device.protocol!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DriverError(
            UNSUPPORTED,
            f"the {device.protocol} driver cannot be loaded on this gateway: {exc}",
        ) from exc
    return await module.open_driver(device, buses)
