"""What every device driver provides, how it fails, and the shared bus it talks over.

A driver talks to one device. ``read`` returns a value of the property's model type (decoded with
``edge.devices.values``); ``write`` writes one; both raise ``DriverError`` for anything the
device or the line did wrong, never a library's own exception. The device manager calls a
driver's methods one at a time, from one task per device.

Devices that share a physical line (a serial port with many slave IDs, one Modbus TCP gateway)
share one ``Bus``: its worker serves one request at a time, in a worker thread (the libraries
block), so requests never interleave on the wire. A slow or silent device delays the others only
by its own timeout; the device twin backs it off so that it stops asking often.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import trio

from edge.devices.model import PropertyConfig

T = TypeVar("T")

# DriverError reasons. A device-level one says the device did not answer properly: the twin
# counts it toward "offline" and backs the whole device off. The others concern one property.
TIMEOUT = "Timeout"
CRC_ERROR = "CRCError"
ILLEGAL_ADDRESS = "IllegalAddress"
DISCONNECTED = "Disconnected"
UNSUPPORTED = "Unsupported"
WRONG_TYPE = "WrongType"
DEVICE_LEVEL_REASONS = frozenset({TIMEOUT, CRC_ERROR, DISCONNECTED, "DeviceError"})


class DriverError(Exception):
    """A request to a device failed. ``reason`` is one CamelCase word (``Timeout``,
    ``CRCError``, ``IllegalAddress``, ``Disconnected``, ``Unsupported``, ``WrongType``, ...)
    shown in DeviceStatus ``reasons``; the message says what happened, for a person."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    @property
    def device_level(self) -> bool:
        """Whether the device as a whole failed to answer (rather than one property)."""
        return self.reason in DEVICE_LEVEL_REASONS


class Driver(Protocol):
    async def read(self, prop: PropertyConfig) -> Any:
        """The property's current value, of its model type."""
        ...

    async def write(self, prop: PropertyConfig, value: Any) -> None:
        """Write ``value`` (of the property's model type) to the device."""
        ...

    async def aclose(self) -> None:
        """Release what the driver holds (its share of the bus). Idempotent."""
        ...


@dataclass
class BusStats:
    """Counters of one bus since the agent started; drivers bump them, benchmarks and
    ``outpost device ls`` read them."""

    requests: int = 0
    ok: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    errors: int = 0
    busy_s: float = 0.0  # time requests held the bus
    last_error: str = ""

    def count(self, error: DriverError | None) -> None:
        """Count one finished request, good (``None``) or failed."""
        self.requests += 1
        if error is None:
            self.ok += 1
            return
        if error.reason == TIMEOUT:
            self.timeouts += 1
        elif error.reason == CRC_ERROR:
            self.crc_errors += 1
        else:
            self.errors += 1
        self.last_error = str(error)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Bus:
    """One physical bus: a serial port, or a TCP endpoint. Get one from ``Buses.acquire``.

    ``run`` serves requests strictly one at a time in a worker thread. ``resource`` is for the
    driver that owns the line's handle (an open ``serial.Serial``, a pymodbus client): drivers
    of the same bus share it, and ``close_resource`` (set along with it) closes it when the last
    driver lets go of the bus.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = BusStats()
        self.limiter = trio.CapacityLimiter(1)
        self.resource: Any = None
        self.close_resource: Callable[[Any], None] | None = None
        self.users = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in this bus's worker thread, after every earlier request finished.

        Cancellation waits for a request already on the wire to end (its own timeout bounds
        that), so the line is never left mid-frame.
        """
        async with self.limiter:
            start = time.monotonic()
            try:
                return await trio.to_thread.run_sync(fn, *args)
            finally:
                self.stats.busy_s += time.monotonic() - start

    def __repr__(self) -> str:
        return f"Bus({self.name!r}, users={self.users})"
