"""A GATT peripheral SIMULATOR at the bluepy boundary, for machines without Bluetooth.

It is not bluepy and talks to no radio: it implements the part of ``bluepy.btle`` that
``edge.devices.drivers.ble`` uses, over simulated devices held in memory, so the driver's own code
(threads through the adapter's bus, UUID lookup, notifications, reconnects and backoff) runs
unchanged. Hand it to the driver as its ``btle`` parameter::

    sim = SimulatedBtle()
    thermo = sim.add_device("AA:BB:CC:DD:EE:01")
    thermo.add_characteristic("2a6e", b"\\x34\\x08", read=True, notify=True)
    driver = await ble.open_driver(config, buses, btle=sim)

The surface: ``sim.Peripheral(mac, addrType, iface)`` connects (or raises
``BTLEDisconnectError`` like bluepy when the device is absent or refuses); a peripheral has
``getCharacteristics(startHnd, endHnd, uuid)``, ``withDelegate``/``setDelegate``,
``waitForNotifications(timeout)``, ``writeCharacteristic`` and ``disconnect``; a characteristic
has ``uuid``, ``getHandle()``, ``valHandle``, ``read()``, ``write(data, withResponse)``,
``supportsRead()``, ``propertiesToString()`` and ``getDescriptors(forUUID)`` (the CCCD, whose
``write(b"\\x01\\x00")`` turns notifications on). Exceptions are ``sim.BTLEException`` and its
subclasses ``BTLEDisconnectError`` and ``BTLEGattError``.

The test side: ``device.set_value(uuid, data)`` changes a value (and notifies subscribers),
``device.disconnect()`` drops the connection (the next call raises ``BTLEDisconnectError``),
``device.present = False`` makes it unreachable, ``device.refuse_connects = n`` fails the next n
connects; ``device.writes`` records what was written, ``device.connects`` counts connects.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from edge.devices.drivers.ble import full_uuid

CCCD = full_uuid("2902")


class BTLEException(Exception):
    pass


class BTLEDisconnectError(BTLEException):
    pass


class BTLEGattError(BTLEException):
    pass


class DefaultDelegate:
    def handleNotification(self, cHandle: int, data: bytes) -> None:
        pass


@dataclass
class SimCharacteristicDef:
    """A characteristic of a simulated device (the device's side)."""

    uuid: str
    handle: int
    value: bytes
    read: bool = True
    write: bool = False
    notify: bool = False


@dataclass
class SimDevice:
    """A simulated BLE peripheral in range of the simulated adapter."""

    mac: str
    sim: SimulatedBtle
    characteristics: dict[str, SimCharacteristicDef] = field(default_factory=dict)
    present: bool = True
    refuse_connects: int = 0
    connects: int = 0
    writes: list[tuple[str, bytes]] = field(default_factory=list)
    _next_handle: int = 0x10
    _connection: _Peripheral | None = None

    def add_characteristic(
        self,
        uuid: str,
        value: bytes = b"",
        *,
        read: bool = True,
        write: bool = False,
        notify: bool = False,
    ) -> SimCharacteristicDef:
        char = SimCharacteristicDef(
            full_uuid(uuid), self._next_handle, bytes(value), read, write, notify
        )
        self._next_handle += 3  # declaration, value, CCCD
        self.characteristics[char.uuid] = char
        return char

    def set_value(self, uuid: str, value: bytes) -> None:
        """The device's value changes; a connected, subscribed central is notified."""
        with self.sim.lock:
            char = self.characteristics[full_uuid(uuid)]
            char.value = bytes(value)
            connection = self._connection
            if connection is not None and char.handle in connection.subscribed:
                connection.queue.append((char.handle, char.value))
                self.sim.changed.notify_all()

    def disconnect(self) -> None:
        """The link drops (out of range, device reset): the central's next call fails."""
        with self.sim.lock:
            if self._connection is not None:
                self._connection.dropped = True
                self._connection = None
                self.sim.changed.notify_all()


class SimulatedBtle:
    """The stand-in for the ``bluepy.btle`` module: a simulated adapter and its devices."""

    BTLEException = BTLEException
    BTLEDisconnectError = BTLEDisconnectError
    BTLEGattError = BTLEGattError
    DefaultDelegate = DefaultDelegate
    ADDR_TYPE_PUBLIC = "public"
    ADDR_TYPE_RANDOM = "random"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.devices: dict[str, SimDevice] = {}
        self.threads: set[str] = set()  # names of the threads that made calls (not the test's)
        self.concurrent = 0
        self.max_concurrent = 0  # calls in progress at once, at most: the adapter serialises

    def add_device(self, mac: str) -> SimDevice:
        device = self.devices[mac.upper()] = SimDevice(mac.upper(), self)
        return device

    def Peripheral(self, deviceAddr: str, addrType: str = "public", iface: int | None = None):
        with self._call():
            device = self.devices.get(deviceAddr.upper())
            if device is None or not device.present:
                raise BTLEDisconnectError(
                    f"Failed to connect to peripheral {deviceAddr}, addr type: {addrType}"
                )
            if device.refuse_connects > 0:
                device.refuse_connects -= 1
                raise BTLEDisconnectError(f"Failed to connect to peripheral {deviceAddr}")
            if device._connection is not None:
                device._connection.dropped = True
            connection = device._connection = _Peripheral(self, device)
            device.connects += 1
            return connection

    def _call(self) -> _CallGuard:
        return _CallGuard(self)


class _CallGuard:
    def __init__(self, sim: SimulatedBtle) -> None:
        self.sim = sim

    def __enter__(self) -> None:
        with self.sim.lock:
            self.sim.threads.add(threading.current_thread().name)
            self.sim.concurrent += 1
            self.sim.max_concurrent = max(self.sim.max_concurrent, self.sim.concurrent)

    def __exit__(self, *exc: object) -> None:
        with self.sim.lock:
            self.sim.concurrent -= 1


class _Peripheral:
    """One connection from the central to a simulated device (bluepy's ``Peripheral``)."""

    def __init__(self, sim: SimulatedBtle, device: SimDevice) -> None:
        self.sim = sim
        self.device = device
        self.addr = device.mac
        self.delegate: DefaultDelegate = DefaultDelegate()
        self.subscribed: set[int] = set()
        self.queue: list[tuple[int, bytes]] = []
        self.dropped = False
        self.closed = False

    def _check(self) -> None:
        if self.closed:
            raise BTLEDisconnectError("Not connected")
        if self.dropped or not self.device.present:
            raise BTLEDisconnectError("Device disconnected")

    def withDelegate(self, delegate: DefaultDelegate) -> _Peripheral:
        self.delegate = delegate
        return self

    setDelegate = withDelegate

    def getCharacteristics(
        self,
        startHnd: int = 1,
        endHnd: int = 0xFFFF,
        uuid: str | None = None,
    ) -> list[_Characteristic]:
        with self.sim._call():
            self._check()
            return [
                _Characteristic(self, char)
                for char in self.device.characteristics.values()
                if (uuid is None or full_uuid(str(uuid)) == char.uuid)
                and startHnd <= char.handle <= endHnd
            ]

    def writeCharacteristic(self, handle: int, val: bytes, withResponse: bool = False) -> None:
        with self.sim._call():
            self._check()
            for char in self.device.characteristics.values():
                if handle == char.handle + 1:  # the CCCD follows the value
                    _write_cccd(self, char, val)
                    return
                if handle == char.handle:
                    _write_value(self, char, val)
                    return
            raise BTLEGattError(f"Invalid handle {handle}")

    def waitForNotifications(self, timeout: float) -> bool:
        with self.sim._call():
            with self.sim.changed:
                self._check()
                if not self.queue and timeout > 0:
                    self.sim.changed.wait(timeout)
                    self._check()
                if not self.queue:
                    return False
                handle, data = self.queue.pop(0)
            self.delegate.handleNotification(handle, data)
            return True

    def disconnect(self) -> None:
        with self.sim.lock:
            self.closed = True
            if self.device._connection is self:
                self.device._connection = None


class _Descriptor:
    def __init__(self, peripheral: _Peripheral, char: SimCharacteristicDef) -> None:
        self.peripheral = peripheral
        self.char = char
        self.uuid = CCCD
        self.handle = char.handle + 1

    def write(self, val: bytes, withResponse: bool = False) -> None:
        with self.peripheral.sim._call():
            self.peripheral._check()
            _write_cccd(self.peripheral, self.char, val)


class _Characteristic:
    def __init__(self, peripheral: _Peripheral, char: SimCharacteristicDef) -> None:
        self.peripheral = peripheral
        self.char = char
        self.uuid = char.uuid
        self.valHandle = char.handle

    def getHandle(self) -> int:
        return self.char.handle

    def supportsRead(self) -> bool:
        return self.char.read

    def propertiesToString(self) -> str:
        names = [("READ", self.char.read), ("WRITE", self.char.write), ("NOTIFY", self.char.notify)]
        return " ".join(name for name, on in names if on)

    def read(self) -> bytes:
        with self.peripheral.sim._call():
            self.peripheral._check()
            if not self.char.read:
                raise BTLEGattError("Read not permitted")
            return self.char.value

    def write(self, val: bytes, withResponse: bool = False) -> None:
        with self.peripheral.sim._call():
            self.peripheral._check()
            _write_value(self.peripheral, self.char, val)

    def getDescriptors(self, forUUID: int | str | None = None, hndEnd: int = 0xFFFF):
        with self.peripheral.sim._call():
            self.peripheral._check()
            if not self.char.notify:
                return []
            if forUUID is not None and full_uuid(_hex(forUUID)) != CCCD:
                return []
            return [_Descriptor(self.peripheral, self.char)]


def _hex(value: int | str) -> str:
    return f"{value:04x}" if isinstance(value, int) else str(value)


def _write_value(peripheral: _Peripheral, char: SimCharacteristicDef, val: bytes) -> None:
    if not char.write:
        raise BTLEGattError("Write not permitted")
    with peripheral.sim.lock:
        char.value = bytes(val)
        peripheral.device.writes.append((char.uuid, bytes(val)))


def _write_cccd(peripheral: _Peripheral, char: SimCharacteristicDef, val: bytes) -> None:
    if not char.notify:
        raise BTLEGattError("Notify not permitted")
    with peripheral.sim.lock:
        if bytes(val)[:1] == b"\x01":
            peripheral.subscribed.add(char.handle)
        else:
            peripheral.subscribed.discard(char.handle)
