"""BLE: GATT characteristics by UUID, over bluepy.

bluepy is an optional extra (``pip install 'outpost[ble]'``) imported when the first BLE device is
opened; without it a BLE device fails with ``DriverError("Unsupported")`` saying so, and nothing
else is affected.

bluepy blocks (it talks to its ``bluepy-helper`` process over a pipe), so every bluepy call runs in
``trio.to_thread`` through the adapter's ``Bus`` (``ble:hci<N>``): one call at a time per adapter,
as the adapter itself serves one GATT request at a time, and a slow device holds up the others
only for its own call.

Per device (``protocol.configData``): ``macAddress``, and optionally ``adapter`` (the N of
``hciN``, default 0) and ``addrType`` (``public``, the default, or ``random``). Per property
(``visitors.configData``): ``characteristicUUID``, ``dataFormat`` (a ``struct`` format such as
``<h``, or ``utf8``), ``scale``, ``add`` and ``notify``. A property with ``notify: true`` is
subscribed to (its CCCD written) on every connect; its value is the latest notification, read
from bluepy's queue at each ``read`` (``waitForNotifications(0)``), so no task of its own is
needed; before the first notification it is read directly when the characteristic allows it.

A connection that fails or drops is made again at the next call, but not before a backoff
(``BACKOFF``: exponential from 0.5 s, capped at 30 s, with full jitter, started over once a
connection stayed up for 30 s) has passed since the last failure; calls in between fail at once
with ``Disconnected``.

``btle``: the boundary to bluepy. It is the ``bluepy.btle`` module by default; a stand-in with
the same surface (``Peripheral(mac, addrType, iface)``, ``DefaultDelegate``, ``BTLEException``,
``BTLEDisconnectError``, ``BTLEGattError``) may be passed instead — ``tests/ble_sim.py`` is one,
a GATT peripheral simulator. The device manager takes it with
``functools.partial(ble.open_driver, btle=...)`` as its ``open_driver``.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

import trio

from edge.backoff import Backoff, Retries
from edge.devices.drivers.base import (
    DISCONNECTED,
    ILLEGAL_ADDRESS,
    TIMEOUT,
    UNSUPPORTED,
    WRONG_TYPE,
    Bus,
    DriverError,
)
from edge.devices.model import DeviceConfig, PropertyConfig
from edge.devices.values import decode_bytes, encode_bytes

log = logging.getLogger("edge.devices.ble")

BACKOFF = Backoff(base_s=0.5, cap_s=30.0, stable_s=30.0)
DEFAULT_TIMEOUT_S = 2.0
CCCD_UUID = 0x2902  # Client Characteristic Configuration: b"\x01\x00" turns notifications on
ENABLE_NOTIFY = b"\x01\x00"
# Notifications taken from bluepy's queue per read, at most (a flood must not hold the adapter).
MAX_DRAIN = 256

BLUEPY_MISSING = "BLE needs bluepy, which is not installed: install outpost[ble]"


def load_bluepy() -> Any:
    """``bluepy.btle``, or ``DriverError("Unsupported")`` when bluepy is not installed."""
    try:
        return importlib.import_module("bluepy.btle")
    except ImportError:
        raise DriverError(UNSUPPORTED, BLUEPY_MISSING) from None


def full_uuid(text: str) -> str:
    """A characteristic UUID in its 128-bit form: ``2a19`` -> ``00002a19-0000-1000-8000-...``
    (the Bluetooth base UUID), as bluepy expands short ones."""
    text = text.lower().removeprefix("0x").replace("-", "")
    if len(text) <= 8:
        text = text.rjust(8, "0") + "00001000800000805f9b34fb"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class BleDriver:
    """The Driver of one BLE device: one GATT connection, made and remade as needed."""

    def __init__(self, device: DeviceConfig, bus: Bus, buses: Any, btle: Any) -> None:
        config = device.protocol_config
        self.device = device
        self.key = f"{device.namespace}/{device.name}"
        self.mac = str(config["macAddress"])
        self.adapter = int(config.get("adapter", 0) or 0)
        self.addr_type = str(config.get("addrType") or "public").lower()
        self.timeout = float(config.get("timeout") or DEFAULT_TIMEOUT_S)
        self.bus = bus
        self._buses = buses
        self._btle = btle
        self._peripheral: Any = None
        self._stale: Any = None  # a peripheral whose connection was lost, to disconnect
        self._chars: dict[str, Any] = {}  # full UUID -> bluepy Characteristic
        self._notified: dict[int, bytes] = {}  # value handle -> latest notification
        self._retries = Retries(BACKOFF)
        self._next_attempt = 0.0
        self._closed = False
        self.connects = 0
        self.notifications = 0

    # -- Driver ------------------------------------------------------------------------------

    async def read(self, prop: PropertyConfig) -> Any:
        char = await self._characteristic(prop)
        if prop.visitor.get("notify"):
            data = await self._latest_notification(char)
        else:
            data = await self._call(char.read)
        try:
            return decode_bytes(data, prop)
        except ValueError as exc:
            raise DriverError(WRONG_TYPE, f"{prop.name}: {exc}") from None

    async def write(self, prop: PropertyConfig, value: Any) -> None:
        try:
            data = encode_bytes(value, prop)
        except ValueError as exc:
            raise DriverError(WRONG_TYPE, f"{prop.name}: {exc}") from None
        char = await self._characteristic(prop)
        await self._call(char.write, data, True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        peripheral, self._peripheral = self._peripheral, None
        if peripheral is not None:
            with trio.CancelScope(shield=True):
                try:
                    await self.bus.run(peripheral.disconnect)
                except Exception as exc:  # already gone: nothing to release
                    log.debug(
                        "ble disconnect failed", extra={"device": self.key, "error": str(exc)}
                    )
        if self._buses is not None:
            await self._buses.release(self.bus)

    # -- internals ---------------------------------------------------------------------------

    async def _latest_notification(self, char: Any) -> bytes:
        handle = char.getHandle()
        await self._call(self._drain)
        if handle in self._notified:
            return self._notified[handle]
        if char.supportsRead():
            return await self._call(char.read)
        with trio.move_on_after(self.timeout):
            while handle not in self._notified:
                # Short waits, so that the adapter is free for other devices in between.
                await self._call(self._wait_notification, 0.05)
        if handle not in self._notified:
            raise DriverError(TIMEOUT, f"no notification from {char.uuid} in {self.timeout:g}s")
        return self._notified[handle]

    def _drain(self) -> None:  # worker thread
        for _ in range(MAX_DRAIN):
            if self._peripheral is None or not self._peripheral.waitForNotifications(0):
                return

    def _wait_notification(self, seconds: float) -> None:  # worker thread
        if self._peripheral is not None:
            self._peripheral.waitForNotifications(seconds)

    def _on_notification(self, handle: int, data: bytes) -> None:  # worker thread (bluepy's)
        self._notified[handle] = bytes(data)
        self.notifications += 1

    async def _characteristic(self, prop: PropertyConfig) -> Any:
        await self._ensure_connected()
        uuid = full_uuid(str(prop.visitor["characteristicUUID"]))
        char = self._chars.get(uuid)
        if char is None:
            found = await self._call(self._peripheral.getCharacteristics, 1, 0xFFFF, uuid)
            if not found:
                raise DriverError(ILLEGAL_ADDRESS, f"{self.mac} has no characteristic {uuid}")
            char = self._chars[uuid] = found[0]
        return char

    async def _ensure_connected(self) -> None:
        if self._closed:
            raise DriverError(DISCONNECTED, "the driver is closed")
        if self._peripheral is not None:
            return
        wait = self._next_attempt - time.monotonic()
        if wait > 0:
            raise DriverError(
                DISCONNECTED, f"{self.mac}: not connected; next attempt in {wait:.1f}s"
            )
        if self._stale is not None:
            stale, self._stale = self._stale, None
            try:
                await self.bus.run(stale.disconnect)
            except Exception as exc:  # it is gone either way
                log.debug("ble disconnect failed", extra={"device": self.key, "error": str(exc)})
        try:
            peripheral = await self.bus.run(self._connect)
        except self._btle.BTLEException as exc:
            self._failed()
            raise DriverError(DISCONNECTED, f"cannot connect to {self.mac}: {_text(exc)}") from None
        self._peripheral, self._chars, self._notified = peripheral, {}, {}
        try:
            await self._subscribe()
        except DriverError:
            self._failed()
            raise
        self._retries.succeeded(time.monotonic())
        self.connects += 1
        log.info("ble device connected", extra={"device": self.key, "mac": self.mac})

    def _connect(self) -> Any:  # worker thread
        btle = self._btle
        delegate_base = btle.DefaultDelegate
        driver = self

        class Delegate(delegate_base):  # type: ignore[misc, valid-type]
            def handleNotification(self, cHandle: int, data: bytes) -> None:
                driver._on_notification(cHandle, data)

        peripheral = btle.Peripheral(self.mac, self.addr_type, self.adapter)
        peripheral.withDelegate(Delegate())
        return peripheral

    async def _subscribe(self) -> None:
        """Turn notifications on for every ``notify`` property (again after each connect)."""
        for prop in self.device.properties:
            if not prop.visitor.get("notify"):
                continue
            char = await self._characteristic(prop)
            descriptors = await self._call(char.getDescriptors, CCCD_UUID)
            if not descriptors:
                raise DriverError(UNSUPPORTED, f"{prop.name}: {char.uuid} cannot notify (no CCCD)")
            await self._call(descriptors[0].write, ENABLE_NOTIFY, True)

    async def _call(self, fn: Any, *args: Any) -> Any:
        """A bluepy call on the adapter's worker; bluepy's errors become DriverErrors."""
        btle = self._btle
        try:
            result = await self.bus.run(fn, *args)
        except btle.BTLEDisconnectError as exc:
            self._lost(exc)
            error = DriverError(DISCONNECTED, f"{self.mac}: {_text(exc)}")
        except btle.BTLEGattError as exc:
            error = DriverError("GattError", f"{self.mac}: {_text(exc)}")
        except btle.BTLEException as exc:  # the helper died, a timeout: start over
            self._lost(exc)
            error = DriverError(DISCONNECTED, f"{self.mac}: {_text(exc)}")
        else:
            self.bus.stats.count(None)
            return result
        self.bus.stats.count(error)
        raise error

    def _lost(self, exc: BaseException) -> None:
        if self._peripheral is None:
            return
        log.warning("ble connection lost", extra={"device": self.key, "error": _text(exc)})
        self._stale = self._peripheral  # its bluepy-helper is stopped before the next connect
        self._failed()

    def _failed(self) -> None:
        self._peripheral = None
        now = time.monotonic()
        self._next_attempt = now + self._retries.failed(now)


def _text(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


async def open_ble(device: DeviceConfig, buses: Any, *, btle: Any = None) -> BleDriver:
    """The driver of a BLE device; it connects on first use. ``btle`` (see the module
    docstring) defaults to bluepy, raising ``DriverError("Unsupported")`` when missing."""
    if device.protocol != "ble":
        raise DriverError(UNSUPPORTED, f"{device.protocol} is not ble")
    btle = btle if btle is not None else load_bluepy()
    adapter = int(device.protocol_config.get("adapter", 0) or 0)
    name = f"ble:hci{adapter}"
    bus = buses.acquire(name) if buses is not None else Bus(name)
    return BleDriver(device, bus, buses, btle)


async def open_driver(device: DeviceConfig, buses: Any, *, btle: Any = None) -> BleDriver:
    """The entry point ``edge.devices.drivers.open_driver`` calls."""
    return await open_ble(device, buses, btle=btle)
