"""Modbus drivers: RTU over a serial line (minimalmodbus on pyserial) and Modbus TCP (pymodbus's
synchronous client). Both run their blocking I/O in the bus's worker thread, one request at a
time (``Bus.run``), so every slave on a line takes its turn and frames never interleave.

What a caller may rely on:

- ``read(prop)`` returns the property's value of its model type; ``write(prop, value)`` writes
  one. The four tables are served: coils (function codes 1, 5, 15), discrete inputs (2), holding
  registers (3, 6, 16) and input registers (4). Byte order (``isSwap``), word order
  (``isRegisterSwap``), data types, ``scale`` and ``add`` are ``edge.devices.values``'s.
- Every failure is a ``DriverError`` with a reason: ``Timeout`` (no answer, or an answer cut
  short, within the device's ``timeout``), ``CRCError`` (an answer that fails its checksum),
  ``IllegalAddress`` / ``IllegalFunction`` / ``IllegalValue`` (the slave's exception codes 2, 1,
  3), ``DeviceBusy``, ``DeviceError`` (other slave exceptions), ``InvalidResponse``,
  ``Disconnected`` (the port or connection is gone; it is reopened on the next request),
  ``WrongType`` (a value that does not fit the property), ``Unsupported``.
- Each request is counted in the bus's ``BusStats`` (timeouts and CRC errors apart).
- A silent slave holds the line for its own timeout and no longer: requests are served in turn
  (a ``trio.CapacityLimiter(1)`` is FIFO), and backing off a dead device is the twin's job.

Serial line details. All the slaves of a port share one ``serial.Serial`` (minimalmodbus would
otherwise keep one per port name behind our back, and close/open races would follow). The line
keeps its own inter-frame silence instead of minimalmodbus's: 3.5 character times measured with
the line's real character length (start bit, data bits, parity, stop bits), counted from the end
of the previous answer. minimalmodbus assumes 11-bit characters and never waits less than
1.75 ms, which at 115200 baud is more than the whole exchange; a slave that needs the Modbus
specification's fixed 1.75 ms above 19200 baud gets it with ``configData.silentInterval: 0.00175``
(seconds). An exception answer (5 bytes) is recognised as soon as it arrives rather than after
waiting out the timeout for the longer normal answer.
"""

from __future__ import annotations

import logging
import os
import select
import termios
import time
from collections.abc import Callable
from typing import Any

import minimalmodbus
import serial

from edge.devices import values
from edge.devices.drivers.base import (
    CRC_ERROR,
    DISCONNECTED,
    ILLEGAL_ADDRESS,
    TIMEOUT,
    UNSUPPORTED,
    WRONG_TYPE,
    Bus,
    DriverError,
)
from edge.devices.model import (
    BIT_REGISTERS,
    COIL,
    DISCRETE_INPUT,
    HOLDING,
    INPUT,
    DeviceConfig,
    PropertyConfig,
)

log = logging.getLogger("edge.devices.modbus")

_READ_FC = {COIL: 1, DISCRETE_INPUT: 2, HOLDING: 3, INPUT: 4}
_PARITY = {"none": serial.PARITY_NONE, "even": serial.PARITY_EVEN, "odd": serial.PARITY_ODD}
# Modbus exception codes (the slave's answer) and the reason each is reported with.
_EXCEPTION_REASON = {
    1: "IllegalFunction",
    2: ILLEGAL_ADDRESS,
    3: "IllegalValue",
    4: "DeviceError",
    5: "DeviceBusy",  # acknowledge: accepted, still working
    6: "DeviceBusy",
    10: "DeviceError",  # gateway path unavailable
    11: TIMEOUT,  # gateway target device failed to respond
}


def frame_time(n_bytes: int, baudrate: int, bits_per_char: int = 10) -> float:
    """Seconds ``n_bytes`` occupy on a serial line."""
    return n_bytes * bits_per_char / baudrate


def bits_per_char(data_bits: int = 8, parity: str = "none", stop_bits: int = 1) -> int:
    """Bit times of one character: start bit, data bits, parity bit (if any), stop bits."""
    return 1 + data_bits + (0 if parity == "none" else 1) + stop_bits


# --------------------------------------------------------------------------------------------
# RTU: the shared line (runs in the bus's worker thread only)
# --------------------------------------------------------------------------------------------


class _ShortAnswer(minimalmodbus.NoResponseError):
    """Some bytes came back, then nothing until the timeout."""


class SerialLine:
    """One open serial port and its timing, shared by every slave on it.

    Only ever touched from the bus's worker, one request at a time.
    """

    def __init__(self, port: str, baudrate: int, data_bits: int, parity: str, stop_bits: int,
                 silent_s: float | None) -> None:  # fmt: skip
        self.port = port
        self.settings = (baudrate, data_bits, parity, stop_bits)
        self.char_s = bits_per_char(data_bits, parity, stop_bits) / baudrate
        self.silent_s = 3.5 * self.char_s if silent_s is None else silent_s
        self.quiet_until = 0.0  # monotonic time before which nothing may be sent
        self.serial: serial.Serial | None = None

    def open(self) -> serial.Serial:
        if self.serial is None or not self.serial.is_open:
            baudrate, data_bits, parity, stop_bits = self.settings
            try:
                self.serial = serial.Serial(
                    port=self.port, baudrate=baudrate, bytesize=data_bits,
                    parity=_PARITY[parity], stopbits=stop_bits, timeout=0.5, write_timeout=2.0,
                )  # fmt: skip
            except (serial.SerialException, OSError) as exc:
                self.serial = None
                raise DriverError(DISCONNECTED, f"cannot open {self.port}: {exc}") from exc
        return self.serial

    def close(self) -> None:
        if self.serial is not None:
            try:
                self.serial.close()
            finally:
                self.serial = None

    def transact(self, request: bytes, expected: int, timeout: float) -> bytes:
        """Send one request frame and read its answer (``expected`` bytes for a normal one)."""
        port = self.open()
        port.reset_input_buffer()  # a late answer to an earlier, timed-out request
        wait = self.quiet_until - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        port.write(request)
        if expected == 0:  # broadcast: nobody answers
            port.flush()
            self.quiet_until = time.monotonic() + self.silent_s
            return b""
        deadline = time.monotonic() + timeout
        # Address, function code and one more byte tell a normal answer from an exception.
        answer = self._read(port, min(3, expected), deadline)
        if len(answer) == 3:
            rest = 2 if answer[1] & 0x80 else expected - 3
            if rest > 0:
                answer += self._read(port, rest, deadline)
        self.quiet_until = time.monotonic() + self.silent_s
        if not answer:
            raise minimalmodbus.NoResponseError(f"no answer within {timeout} s")
        is_exception = len(answer) >= 2 and answer[1] & 0x80
        if len(answer) < (5 if is_exception else expected):
            raise _ShortAnswer(f"an answer cut short: {len(answer)} of {expected} bytes")
        return answer

    @staticmethod
    def _read(port: serial.Serial, size: int, deadline: float) -> bytes:
        """Up to ``size`` bytes, by ``deadline``. (pyserial's own ``read`` would need its
        timeout changed per device, and every change rewrites the termios settings.)"""
        fd = port.fileno()
        data = bytearray()
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise serial.SerialException(f"{port.port} returned no data: unplugged?")
            data += chunk
        return bytes(data)


class _Instrument(minimalmodbus.Instrument):
    """A minimalmodbus instrument whose exchanges go through a shared ``SerialLine``: framing,
    CRC and answer parsing are minimalmodbus's, the line's timing and buffers are ours."""

    def __init__(self, line: SerialLine, slave: int) -> None:
        super().__init__(line.open(), slave)
        self.line = line
        self.timeout = 0.5

    def _communicate(self, request: bytes, number_of_bytes_to_read: int) -> bytes:
        return self.line.transact(request, number_of_bytes_to_read, self.timeout)


def _rtu_error(exc: BaseException, slave: int, timeout: float) -> DriverError:
    """The DriverError for what minimalmodbus or pyserial raised."""
    if isinstance(exc, DriverError):
        return exc
    who = f"slave {slave}"
    if isinstance(exc, _ShortAnswer):
        return DriverError(TIMEOUT, f"{who}: {exc}")
    if isinstance(exc, minimalmodbus.NoResponseError):
        return DriverError(TIMEOUT, f"{who} did not answer within {timeout:g} s")
    if isinstance(exc, minimalmodbus.InvalidResponseError):
        if "checksum" in str(exc).lower():
            return DriverError(CRC_ERROR, f"{who}: the answer failed its CRC check")
        return DriverError("InvalidResponse", f"{who}: {exc}")
    if isinstance(exc, minimalmodbus.SlaveDeviceBusyError):
        return DriverError("DeviceBusy", f"{who} is busy")
    if isinstance(exc, minimalmodbus.IllegalRequestError):
        text = str(exc).lower()
        if "address" in text:
            return DriverError(
                ILLEGAL_ADDRESS, f"{who} has no such register (illegal data address)"
            )
        if "function" in text:
            return DriverError("IllegalFunction", f"{who} does not support this function code")
        return DriverError("IllegalValue", f"{who} refused the value (illegal data value)")
    if isinstance(exc, minimalmodbus.SlaveReportedException):
        return DriverError("DeviceError", f"{who}: {exc}")
    if isinstance(exc, serial.SerialException | OSError | termios.error):
        return DriverError(DISCONNECTED, f"serial port: {exc}")
    if isinstance(exc, ValueError | TypeError):
        return DriverError(WRONG_TYPE, f"{who}: {exc}")
    return DriverError("DeviceError", f"{who}: {exc!r}")


class ModbusRtuDriver:
    """One slave on a shared serial line."""

    def __init__(self, device: DeviceConfig, bus: Bus, buses: Any) -> None:
        config = device.protocol_config
        self.device = device
        self.bus = bus
        self.slave = int(config.get("slaveID", 1))
        self.timeout = float(config.get("timeout", 0.5))
        self._buses = buses
        self._instrument: _Instrument | None = None
        self._closed = False

    # The worker side: everything here runs inside ``Bus.run``.

    def _line(self) -> SerialLine:
        return self.bus.resource

    def _call(self, action: Callable[[_Instrument], Any]) -> Any:
        line = self._line()
        try:
            if self._instrument is None or self._instrument.serial is not line.serial:
                self._instrument = _Instrument(line, self.slave)
            self._instrument.timeout = self.timeout
            return action(self._instrument)
        except Exception as exc:
            error = _rtu_error(exc, self.slave, self.timeout)
            if error.reason == DISCONNECTED:
                line.close()  # reopened by the next request
                self._instrument = None
            raise error from exc

    async def _request(self, action: Callable[[_Instrument], Any]) -> Any:
        if self._closed:
            raise DriverError(DISCONNECTED, "the driver is closed")
        try:
            result = await self.bus.run(self._call, action)
        except DriverError as error:
            self.bus.stats.count(error)
            raise
        self.bus.stats.count(None)
        return result

    async def read(self, prop: PropertyConfig) -> Any:
        register, offset, count = _address(prop)
        fc = _READ_FC[register]
        if register in BIT_REGISTERS:
            bits = await self._request(lambda i: i.read_bits(offset, count, functioncode=fc))
            return _decode(values.decode_bits, [bool(b) for b in bits], prop)
        words = await self._request(lambda i: i.read_registers(offset, count, functioncode=fc))
        return _decode(values.decode_registers, words, prop)

    async def write(self, prop: PropertyConfig, value: Any) -> None:
        register, offset, _ = _address(prop)
        if register == COIL:
            bits = _encode(values.encode_bits, value, prop)
            if len(bits) == 1:
                await self._request(lambda i: i.write_bit(offset, int(bits[0]), functioncode=5))
            else:
                await self._request(lambda i: i.write_bits(offset, [int(b) for b in bits]))
        elif register == HOLDING:
            words = _encode(values.encode_registers, value, prop)
            if len(words) == 1:
                await self._request(lambda i: i.write_register(offset, words[0], functioncode=6))
            else:
                await self._request(lambda i: i.write_registers(offset, words))
        else:
            raise DriverError(UNSUPPORTED, f"{prop.name}: a {register} cannot be written")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._buses.release(self.bus)


def _address(prop: PropertyConfig) -> tuple[str, int, int]:
    visitor = prop.visitor
    register = visitor.get("register")
    if register not in _READ_FC:
        raise DriverError(UNSUPPORTED, f"{prop.name}: no Modbus register kind {register!r}")
    return register, int(visitor.get("offset", 0)), values.register_count(prop)


def _decode(fn: Callable[[Any, Any], Any], raw: Any, prop: PropertyConfig) -> Any:
    try:
        return fn(raw, prop)
    except ValueError as exc:
        raise DriverError(WRONG_TYPE, f"{prop.name}: {exc}") from exc


def _encode(fn: Callable[[Any, Any], Any], value: Any, prop: PropertyConfig) -> Any:
    try:
        return fn(value, prop)
    except (ValueError, TypeError) as exc:
        raise DriverError(WRONG_TYPE, f"{prop.name}: {exc}") from exc


def _attach_line(bus: Bus, device: DeviceConfig, port: str) -> SerialLine:
    """The bus's line, made on first use; a device may not ask the line for other settings."""
    config = device.protocol_config
    settings = (
        int(config.get("baudRate", 9600)),
        int(config.get("dataBits", 8)),
        str(config.get("parity", "none")),
        int(config.get("stopBits", 1)),
    )
    if bus.resource is None:
        silent = config.get("silentInterval")
        bus.resource = SerialLine(port, *settings, None if silent is None else float(silent))
        bus.close_resource = SerialLine.close
    elif bus.resource.settings != settings:
        raise DriverError(
            "BusConflict",
            f"{port} is already open at {bus.resource.settings} (baud, data bits, parity,"
            f" stop bits); {device.namespace}/{device.name} asks for {settings}",
        )
    return bus.resource


def _port_path(device: DeviceConfig) -> str:
    """The serial port, symlinks resolved: two names of one port are one bus."""
    return os.path.realpath(str(device.protocol_config["serialPort"]))


async def open_rtu(device: DeviceConfig, buses: Any) -> ModbusRtuDriver:
    port = _port_path(device)
    bus = buses.acquire(f"serial:{port}")
    try:
        line = _attach_line(bus, device, port)
        await bus.run(line.open)
    except BaseException:
        await buses.release(bus)
        raise
    return ModbusRtuDriver(device, bus, buses)


# --------------------------------------------------------------------------------------------
# TCP
# --------------------------------------------------------------------------------------------


class ModbusTcpDriver:
    """One unit ID behind a Modbus TCP endpoint; the endpoint's connection is shared."""

    def __init__(self, device: DeviceConfig, bus: Bus, buses: Any) -> None:
        config = device.protocol_config
        self.device = device
        self.bus = bus
        self.slave = int(config.get("slaveID", 1))
        self.timeout = float(config.get("timeout", 0.5))
        self._buses = buses
        self._closed = False

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        from pymodbus.exceptions import ConnectionException, ModbusIOException

        client = self.bus.resource
        who = f"unit {self.slave} at {self.bus.name.removeprefix('tcp:')}"
        try:
            if not client.connected and not client.connect():
                raise DriverError(DISCONNECTED, f"cannot connect to {who}")
            response = getattr(client, name)(*args, device_id=self.slave, **kwargs)
        except ConnectionException as exc:
            client.close()
            raise DriverError(DISCONNECTED, f"{who}: {exc}") from exc
        except ModbusIOException as exc:
            client.close()  # a late answer must not be taken for the next request's
            raise DriverError(TIMEOUT, f"{who} did not answer within {self.timeout:g} s") from exc
        except (OSError, ValueError) as exc:
            client.close()
            raise DriverError(DISCONNECTED, f"{who}: {exc}") from exc
        if response.isError():
            code = getattr(response, "exception_code", None)
            reason = _EXCEPTION_REASON.get(code, "DeviceError")
            raise DriverError(reason, f"{who} answered exception code {code} ({reason})")
        return response

    async def _request(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise DriverError(DISCONNECTED, "the driver is closed")
        try:
            result = await self.bus.run(lambda: self._call(name, *args, **kwargs))
        except DriverError as error:
            self.bus.stats.count(error)
            raise
        self.bus.stats.count(None)
        return result

    async def read(self, prop: PropertyConfig) -> Any:
        register, offset, count = _address(prop)
        if register in BIT_REGISTERS:
            name = "read_coils" if register == COIL else "read_discrete_inputs"
            response = await self._request(name, offset, count=count)
            return _decode(values.decode_bits, [bool(b) for b in response.bits[:count]], prop)
        name = "read_holding_registers" if register == HOLDING else "read_input_registers"
        response = await self._request(name, offset, count=count)
        return _decode(values.decode_registers, list(response.registers), prop)

    async def write(self, prop: PropertyConfig, value: Any) -> None:
        register, offset, _ = _address(prop)
        if register == COIL:
            bits = _encode(values.encode_bits, value, prop)
            if len(bits) == 1:
                await self._request("write_coil", offset, bits[0])
            else:
                await self._request("write_coils", offset, bits)
        elif register == HOLDING:
            words = _encode(values.encode_registers, value, prop)
            if len(words) == 1:
                await self._request("write_register", offset, words[0])
            else:
                await self._request("write_registers", offset, words)
        else:
            raise DriverError(UNSUPPORTED, f"{prop.name}: a {register} cannot be written")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._buses.release(self.bus)


async def open_tcp(device: DeviceConfig, buses: Any) -> ModbusTcpDriver:
    try:
        from pymodbus.client import ModbusTcpClient
    except ImportError as exc:
        raise DriverError(UNSUPPORTED, f"modbus-tcp needs pymodbus: {exc}") from exc
    config = device.protocol_config
    host, port = str(config["ip"]), int(config.get("port", 502))
    timeout = float(config.get("timeout", 0.5))
    bus = buses.acquire(f"tcp:{host}:{port}")
    if bus.resource is None:
        bus.resource = ModbusTcpClient(host, port=port, timeout=timeout, retries=0)
        bus.close_resource = lambda client: client.close()
    return ModbusTcpDriver(device, bus, buses)


async def open_driver(device: DeviceConfig, buses: Any) -> ModbusRtuDriver | ModbusTcpDriver:
    if device.protocol == "modbus-rtu":
        return await open_rtu(device, buses)
    if device.protocol == "modbus-tcp":
        return await open_tcp(device, buses)
    raise DriverError(UNSUPPORTED, f"not a Modbus protocol: {device.protocol!r}")
