"""The RTU line of ``edge.devices.drivers.modbus`` against a scripted slave: framing is
minimalmodbus's, but timing, short and exception answers and the error reasons are ours."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import minimalmodbus
import pytest
import serial

from edge.devices.drivers.base import DriverError
from edge.devices.drivers.modbus import (
    SerialLine,
    _Instrument,
    _rtu_error,
    bits_per_char,
    frame_time,
)


def crc16(data: bytes) -> bytes:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return struct.pack("<H", crc)


def frame(body: bytes) -> bytes:
    return body + crc16(body)


class ScriptedPort:
    """Stands in for ``serial.Serial``: each request written is answered by ``respond`` (bytes
    that become readable at once, or nothing)."""

    def __init__(self, respond: Callable[[bytes], bytes]) -> None:
        self.respond = respond
        self.ours, self.theirs = socket.socketpair()
        self.requests: list[tuple[float, bytes]] = []
        self.port = "/dev/scripted"
        self.is_open = True

    def fileno(self) -> int:
        return self.ours.fileno()

    def reset_input_buffer(self) -> None:
        self.ours.setblocking(False)
        try:
            while self.ours.recv(4096):
                pass
        except BlockingIOError:
            pass
        finally:
            self.ours.setblocking(True)

    def write(self, data: bytes) -> int:
        self.requests.append((time.monotonic(), data))
        answer = self.respond(data)
        if answer:
            self.theirs.sendall(answer)
        return len(data)

    def flush(self) -> None:
        pass

    def open(self) -> None:
        self.is_open = True

    def read(self, size: int) -> bytes:
        raise AssertionError("the line reads the port itself, by its deadline")

    def close(self) -> None:
        self.is_open = False
        self.ours.close()
        self.theirs.close()


def line_with(
    respond: Callable[[bytes], bytes], baudrate: int = 115200
) -> tuple[SerialLine, ScriptedPort]:
    line = SerialLine("/dev/scripted", baudrate, 8, "none", 1, None)
    port = ScriptedPort(respond)
    line.serial = port  # type: ignore[assignment]
    return line, port


def instrument(line: SerialLine, slave: int = 7, timeout: float = 0.2) -> _Instrument:
    inst = _Instrument.__new__(_Instrument)
    minimalmodbus.Instrument.__init__(inst, line.serial, slave)  # type: ignore[arg-type]
    inst.line = line
    inst.timeout = timeout
    return inst


def registers_answer(values: list[int]) -> Callable[[bytes], bytes]:
    def respond(request: bytes) -> bytes:
        data = b"".join(struct.pack(">H", v) for v in values)
        return frame(bytes([request[0], request[1], len(data)]) + data)

    return respond


def test_character_and_frame_times() -> None:
    assert bits_per_char(8, "none", 1) == 10
    assert bits_per_char(8, "even", 1) == 11
    assert bits_per_char(7, "odd", 2) == 11
    assert frame_time(8, 9600) == pytest.approx(8 * 10 / 9600)
    line = SerialLine("/dev/x", 19200, 8, "even", 1, None)
    assert line.silent_s == pytest.approx(3.5 * 11 / 19200)
    assert SerialLine("/dev/x", 115200, 8, "none", 1, 0.00175).silent_s == 0.00175


def test_a_read_goes_out_as_one_rtu_frame_and_its_answer_is_parsed() -> None:
    line, port = line_with(registers_answer([0x1234, 0xFFFF]))
    assert instrument(line).read_registers(0x10, 2, functioncode=4) == [0x1234, 0xFFFF]
    (_, request), = port.requests  # fmt: skip
    assert request == frame(bytes([7, 4, 0x00, 0x10, 0x00, 0x02]))


def test_the_line_keeps_three_and_a_half_characters_of_silence_between_frames() -> None:
    line, port = line_with(registers_answer([1]), baudrate=1200)  # 29 ms of silence
    inst = instrument(line)
    inst.read_registers(0, 1)
    answered = time.monotonic()
    inst.read_registers(0, 1)
    second_sent = port.requests[1][0]
    assert second_sent - answered >= line.silent_s * 0.95
    assert line.silent_s == pytest.approx(3.5 * 10 / 1200)


def test_an_exception_answer_is_read_at_once_and_named() -> None:
    line, _ = line_with(lambda req: frame(bytes([req[0], req[1] | 0x80, 2])))
    start = time.monotonic()
    with pytest.raises(minimalmodbus.IllegalRequestError) as caught:
        instrument(line, timeout=1.0).read_registers(500, 1)
    assert time.monotonic() - start < 0.5, "did not wait out the timeout"
    error = _rtu_error(caught.value, 7, 1.0)
    assert error.reason == "IllegalAddress"
    assert "slave 7" in error.message


@pytest.mark.parametrize(
    ("code", "reason"),
    [(1, "IllegalFunction"), (3, "IllegalValue"), (4, "DeviceError"), (6, "DeviceBusy")],
)
def test_slave_exception_codes(code: int, reason: str) -> None:
    line, _ = line_with(lambda req: frame(bytes([req[0], req[1] | 0x80, code])))
    with pytest.raises(minimalmodbus.ModbusException) as caught:
        instrument(line).read_registers(0, 1)
    assert _rtu_error(caught.value, 7, 0.2).reason == reason


def test_a_garbled_crc_is_a_crc_error() -> None:
    def garbled(request: bytes) -> bytes:
        good = registers_answer([42])(request)
        return good[:-1] + bytes([good[-1] ^ 0xFF])

    line, _ = line_with(garbled)
    with pytest.raises(minimalmodbus.InvalidResponseError) as caught:
        instrument(line).read_registers(0, 1)
    error = _rtu_error(caught.value, 7, 0.2)
    assert error.reason == "CRCError"
    assert error.device_level


def test_silence_is_a_timeout_after_the_timeout() -> None:
    line, _ = line_with(lambda req: b"")
    start = time.monotonic()
    with pytest.raises(minimalmodbus.NoResponseError) as caught:
        instrument(line, timeout=0.1).read_registers(0, 1)
    assert 0.1 <= time.monotonic() - start < 0.3
    error = _rtu_error(caught.value, 7, 0.1)
    assert error.reason == "Timeout"
    assert "0.1 s" in error.message


def test_an_answer_cut_short_is_a_timeout_not_a_crc_error() -> None:
    line, _ = line_with(lambda req: registers_answer([1, 2])(req)[:4])
    with pytest.raises(minimalmodbus.NoResponseError) as caught:
        instrument(line, timeout=0.05).read_registers(0, 2)
    error = _rtu_error(caught.value, 7, 0.05)
    assert error.reason == "Timeout"
    assert "4 of 9 bytes" in error.message


def test_a_late_answer_is_not_taken_for_the_next_one() -> None:
    answers = iter([b"", registers_answer([5])])
    stale = frame(bytes([7, 3, 2, 0, 99]))

    def respond(request: bytes) -> bytes:
        current = next(answers)
        return current(request) if callable(current) else current

    line, port = line_with(respond)
    inst = instrument(line, timeout=0.05)
    with pytest.raises(minimalmodbus.NoResponseError):
        inst.read_registers(0, 1)
    port.theirs.sendall(stale)  # the slow slave answers after all
    time.sleep(0.01)
    assert inst.read_registers(0, 1) == [5]


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (serial.SerialException("device reports readiness to read but returned no data"),
         "Disconnected"),
        (OSError(5, "Input/output error"), "Disconnected"),
        (ValueError("registeraddress out of range"), "WrongType"),
        (DriverError("Disconnected", "cannot open /dev/ttyUSB9"), "Disconnected"),
    ],
)  # fmt: skip
def test_library_errors_become_driver_errors(exc: Exception, reason: str) -> None:
    assert _rtu_error(exc, 3, 0.5).reason == reason
