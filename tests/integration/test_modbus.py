"""The Modbus drivers against real serial lines and a real slave simulator.

Each RTU test gets a socat PTY line paced at its baud rate by the relay in ``tests.serialkit``,
with pymodbus slaves on the far end; the TCP test a pymodbus TCP server on loopback. What the edge
writes is checked on the simulator's side, and what the simulator holds is what the edge reads.
"""

from __future__ import annotations

import math
import statistics
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from edge.devices.drivers import Buses, DriverError
from edge.devices.drivers.modbus import open_driver
from edge.devices.model import DeviceConfig, parse_device
from tests.serialkit import FarEnd, modbus_line, modbus_tcp_server

PARITY_NAME = {"N": "none", "E": "even", "O": "odd"}


def device(far: FarEnd, slave: int, props: dict[str, tuple[str, dict[str, Any]]],
           timeout: float = 0.3, tcp: bool = False) -> DeviceConfig:  # fmt: skip
    """A DeviceConfig parsed from KubeEdge-shaped bodies: ``props`` maps a property name to its
    model type and its visitor configData."""
    if tcp:
        config = {"ip": far.host, "port": far.tcp_port, "slaveID": slave, "timeout": timeout}
        protocol = "modbus-tcp"
    else:
        config = {
            "serialPort": far.port, "baudRate": far.baudrate, "dataBits": far.bytesize,
            "parity": PARITY_NAME[far.parity], "stopBits": far.stopbits, "slaveID": slave,
            "timeout": timeout,
        }  # fmt: skip
        protocol = "modbus-rtu"
    model = {
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"properties": [{"name": n, "type": t} for n, (t, _) in props.items()]},
    }
    body = {
        "metadata": {"name": f"dev-{slave}", "namespace": "default", "uid": f"uid-{slave}"},
        "spec": {
            "deviceModelRef": {"name": "m"},
            "protocol": {"protocolName": protocol, "configData": config},
            "properties": [
                {"name": n, "visitors": {"protocolName": "modbus", "configData": dict(v)}}
                for n, (_, v) in props.items()
            ],
        },
    }
    return parse_device(body, model)


def words(fmt: str, value: Any) -> list[int]:
    data = struct.pack(fmt, value)
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def byteswap(ws: list[int]) -> list[int]:
    return [((w & 0xFF) << 8) | (w >> 8) for w in ws]


# name: (type, visitor, raw words/bits on the simulator, the value the edge reads)
CASES: dict[str, tuple[str, dict[str, Any], list[int], Any]] = {
    "int16": ("int", {"register": "HoldingRegister", "offset": 0}, words(">h", -1234), -1234),
    "uint16": ("int", {"register": "HoldingRegister", "offset": 1, "dataType": "uint16"},
               [65000], 65000),
    "int32": ("int", {"register": "HoldingRegister", "offset": 2, "dataType": "int32"},
              words(">i", -70000), -70000),
    "int32_word_swapped": ("int", {"register": "HoldingRegister", "offset": 4,
                                   "dataType": "int32", "isRegisterSwap": True},
                           words(">i", 123456789)[::-1], 123456789),
    "uint32": ("int", {"register": "HoldingRegister", "offset": 6, "dataType": "uint32"},
               words(">I", 4000000000), 4000000000),
    "float32": ("float", {"register": "HoldingRegister", "offset": 8}, words(">f", 21.5), 21.5),
    "float32_both_swapped": ("float", {"register": "HoldingRegister", "offset": 10,
                                       "isSwap": True, "isRegisterSwap": True},
                             byteswap(words(">f", -3.25))[::-1], -3.25),
    "float64": ("double", {"register": "HoldingRegister", "offset": 12},
                words(">d", math.pi), math.pi),
    "text": ("string", {"register": "HoldingRegister", "offset": 16, "limit": 4},
             words(">8s", b"PUMP-7\0\0"), "PUMP-7"),
    "text_byte_swapped": ("string", {"register": "HoldingRegister", "offset": 20, "limit": 2,
                                     "isSwap": True}, byteswap(words(">4s", b"AB12")), "AB12"),
    "temperature": ("float", {"register": "HoldingRegister", "offset": 30, "scale": 0.1,
                              "add": -40, "dataType": "int16"}, [615], 21.5),
    "input_scaled": ("float", {"register": "InputRegister", "offset": 5, "scale": 0.01,
                                      "dataType": "int16"},
                     words(">h", -150), -1.5),
    "input_uint32_swapped": ("int", {"register": "InputRegister", "offset": 6,
                                     "dataType": "uint32", "isRegisterSwap": True},
                             words(">I", 70000)[::-1], 70000),
    "coil": ("boolean", {"register": "CoilRegister", "offset": 3}, [1], True),
    "coils_as_int": ("int", {"register": "CoilRegister", "offset": 10, "limit": 4},
                     [1, 0, 1, 1], 0b1101),
    "discrete": ("boolean", {"register": "DiscreteInputRegister", "offset": 7}, [1], True),
    "discretes_as_int": ("int", {"register": "DiscreteInputRegister", "offset": 20, "limit": 3},
                         [0, 1, 1], 6),
}  # fmt: skip
TABLE = {"HoldingRegister": "hr", "InputRegister": "ir", "CoilRegister": "co",
         "DiscreteInputRegister": "di"}  # fmt: skip
# What the edge writes, and what then lies on the simulator (registers or bits).
WRITES: dict[str, tuple[Any, list[int]]] = {
    "int16": (-2, words(">h", -2)),
    "uint16": (40000, [40000]),
    "int32": (2**31 - 1, words(">i", 2**31 - 1)),
    "int32_word_swapped": (-5, words(">i", -5)[::-1]),
    "uint32": (1, [0, 1]),
    "float32": (-0.5, words(">f", -0.5)),
    "float32_both_swapped": (1e6, byteswap(words(">f", 1e6))[::-1]),
    "float64": (-1e-3, words(">d", -1e-3)),
    "text": ("OK", words(">8s", b"OK")),
    "text_byte_swapped": ("xy", byteswap(words(">4s", b"xy"))),
    "temperature": (22.3, [623]),
    "coil": (False, [0]),
    "coils_as_int": (0b0110, [0, 1, 1, 0]),
}


async def test_every_table_and_data_type(tmp_path: Path) -> None:
    async with modbus_line(tmp_path, slaves=(1,)) as far:
        for _, visitor, raw, _ in CASES.values():
            await far.set(1, TABLE[visitor["register"]], visitor["offset"], raw)
        buses = Buses()
        props = {name: (t, v) for name, (t, v, _, _) in CASES.items()}
        config = device(far, 1, props)
        driver = await open_driver(config, buses)
        try:
            for name, (_, _, _, expected) in CASES.items():
                got = await driver.read(config.property(name))
                assert got == pytest.approx(expected), name
                assert type(got) is type(expected), name
            for name, (value, raw) in WRITES.items():
                visitor = CASES[name][1]
                await driver.write(config.property(name), value)
                held = await far.get(1, TABLE[visitor["register"]], visitor["offset"], len(raw))
                assert held == raw, f"{name}: the simulator holds {held}, expected {raw}"
                assert await driver.read(config.property(name)) == pytest.approx(value), name
            for name in ("discrete", "input_scaled"):
                with pytest.raises(DriverError) as caught:
                    await driver.write(config.property(name), 1)
                assert caught.value.reason == "Unsupported"
            (stats,) = buses.stats().values()
            assert stats["requests"] == stats["ok"] > 0
        finally:
            await driver.aclose()
        assert buses.stats() == {}, "the last driver closed the bus"


async def test_illegal_address_is_reported_at_once(tmp_path: Path) -> None:
    async with modbus_line(tmp_path, slaves=(1,)) as far:
        buses = Buses()
        config = device(far, 1, {
            "beyond": ("int", {"register": "HoldingRegister", "offset": 5000}),
            "straddling": ("int", {"register": "InputRegister", "offset": 999,
                                   "dataType": "int32"}),
            "coil": ("boolean", {"register": "CoilRegister", "offset": 4000}),
        }, timeout=1.0)  # fmt: skip
        driver = await open_driver(config, buses)
        try:
            for name in ("beyond", "straddling", "coil"):
                start = time.monotonic()
                with pytest.raises(DriverError) as caught:
                    await driver.read(config.property(name))
                assert caught.value.reason == "IllegalAddress", caught.value
                assert time.monotonic() - start < 0.5, "an exception answer is not a timeout"
            with pytest.raises(DriverError) as caught:
                await driver.write(config.property("beyond"), 7)
            assert caught.value.reason == "IllegalAddress"
            stats = next(iter(buses.stats().values()))
            assert stats["errors"] == 4
            assert stats["timeouts"] == stats["crc_errors"] == 0
        finally:
            await driver.aclose()


async def test_a_garbled_crc_is_counted_and_spares_the_other_slaves(tmp_path: Path) -> None:
    async with modbus_line(tmp_path, slaves=(1, 2)) as far:
        await far.set(1, "hr", 0, [11])
        await far.set(2, "hr", 0, [22])
        await far.set_garble(2)
        buses = Buses()
        prop = {"v": ("int", {"register": "HoldingRegister", "offset": 0})}
        one, two = device(far, 1, prop), device(far, 2, prop)
        d1, d2 = await open_driver(one, buses), await open_driver(two, buses)
        try:
            assert len(buses.buses) == 1, "one bus for the two slaves"
            for _ in range(3):
                with pytest.raises(DriverError) as caught:
                    await d2.read(two.property("v"))
                assert caught.value.reason == "CRCError"
                assert "CRC" in caught.value.message
                assert await d1.read(one.property("v")) == 11
            stats = next(iter(buses.stats().values()))
            assert stats["crc_errors"] == 3
            assert stats["ok"] == 3
            assert stats["timeouts"] == 0
            assert (await far.stats())["garbled"] == 3
            await far.set_garble(2, False)
            assert await d2.read(two.property("v")) == 22
        finally:
            await d1.aclose()
            await d2.aclose()


async def test_eight_slaves_one_dead_the_live_ones_keep_their_cycle(tmp_path: Path) -> None:
    """Eight slaves polled every 500 ms on one 19200-baud line; slave 8 never answers and costs
    its 100 ms timeout each time. Nobody backs it off here (the twin would): the bus alone keeps
    the other seven on their cycle, each read late by at most the dead slave's timeout and one
    round of the others' exchanges."""
    cycle, timeout, polls = 0.5, 0.1, 10
    slaves = tuple(range(1, 9))
    async with modbus_line(tmp_path, baudrate=19200, slaves=slaves, dead=(8,)) as far:
        for slave in slaves:
            await far.set(slave, "ir", 0, [slave * 100])
        buses = Buses()
        prop = {"v": ("int", {"register": "InputRegister", "offset": 0})}
        configs = {s: device(far, s, prop, timeout=timeout) for s in slaves}
        drivers = {s: await open_driver(c, buses) for s, c in configs.items()}
        reads: dict[int, list[float]] = {s: [] for s in slaves}
        lateness: dict[int, list[float]] = {s: [] for s in slaves}
        errors: dict[int, list[str]] = {s: [] for s in slaves}

        async def poll(slave: int, first: float) -> None:
            for n in range(polls):
                due = first + n * cycle
                await trio.sleep_until(due)
                try:
                    value = await drivers[slave].read(configs[slave].property("v"))
                    assert value == slave * 100
                    reads[slave].append(trio.current_time())
                    lateness[slave].append(trio.current_time() - due)
                except DriverError as error:
                    errors[slave].append(error.reason)

        try:
            first = trio.current_time() + 0.05
            async with trio.open_nursery() as nursery:
                for slave in slaves:
                    nursery.start_soon(poll, slave, first)
            (stats,) = buses.stats().values()
            relay = await far.stats()
        finally:
            for driver in drivers.values():
                await driver.aclose()

    exchange = (8 + 7) * 10 / 19200 + 3.5 * 10 / 19200  # request, answer, silence
    bound = timeout + 7 * exchange + 0.06
    for slave in slaves[:-1]:
        intervals = [b - a for a, b in zip(reads[slave], reads[slave][1:], strict=False)]
        print(f"slave {slave}: {len(reads[slave])} reads, intervals"
              f" {min(intervals) * 1000:.0f}..{max(intervals) * 1000:.0f} ms"
              f" (mean {statistics.mean(intervals) * 1000:.1f}), late by at most"
              f" {max(lateness[slave]) * 1000:.0f} ms")  # fmt: skip
        assert errors[slave] == []
        assert len(reads[slave]) == polls
        assert max(lateness[slave]) < bound
        assert max(intervals) < cycle + bound
    assert reads[8] == []
    assert errors[8] == ["Timeout"] * polls
    assert stats["timeouts"] == polls, stats
    assert stats["ok"] == 7 * polls
    assert relay["dropped"] == {"8": polls}, "slave 8's requests went out on the wire"


@pytest.mark.parametrize(("baudrate", "parity", "bits"), [(9600, "N", 10), (9600, "E", 11)])
async def test_the_line_runs_at_its_baud_rate(tmp_path: Path, baudrate: int, parity: str,
                                             bits: int) -> None:  # fmt: skip
    """An exchange takes at least its frames' time on the wire: the relay makes the PTY honest."""
    async with modbus_line(tmp_path, baudrate=baudrate, parity=parity, slaves=(3,)) as far:
        await far.set(3, "hr", 0, list(range(10)))
        buses = Buses()
        config = device(far, 3, {"text": ("string", {"register": "HoldingRegister", "offset": 0,
                                                     "limit": 10})})  # fmt: skip
        driver = await open_driver(config, buses)
        try:
            start = time.monotonic()
            for _ in range(5):
                await driver.read(config.property("text"))
            per_read = (time.monotonic() - start) / 5
        finally:
            await driver.aclose()
    wire = (8 + 5 + 2 * 10) * bits / baudrate  # request 8 bytes, answer 5 + 20
    print(
        f"{baudrate} baud, parity {parity}: {per_read * 1000:.1f} ms a read,"
        f" wire {wire * 1000:.1f} ms"
    )
    assert wire <= per_read < wire + 0.015


async def test_modbus_tcp(tmp_path: Path) -> None:
    async with modbus_tcp_server(tmp_path, slaves=(1, 5)) as far:
        await far.set(5, "hr", 10, words(">f", 42.5))
        await far.set(5, "di", 2, [1])
        buses = Buses()
        props = {
            "setpoint": ("float", {"register": "HoldingRegister", "offset": 10}),
            "alarm": ("boolean", {"register": "DiscreteInputRegister", "offset": 2}),
            "relay": ("boolean", {"register": "CoilRegister", "offset": 1}),
            "level": ("int", {"register": "InputRegister", "offset": 0, "scale": 2}),
            "missing": ("int", {"register": "HoldingRegister", "offset": 2000}),
        }
        c5, c1 = device(far, 5, props, tcp=True), device(far, 1, props, tcp=True)
        d5, d1 = await open_driver(c5, buses), await open_driver(c1, buses)
        try:
            assert len(buses.buses) == 1, "one connection for the two unit IDs"
            assert await d5.read(c5.property("setpoint")) == 42.5
            assert await d5.read(c5.property("alarm")) is True
            await d5.write(c5.property("setpoint"), -7.25)
            assert await far.get(5, "hr", 10, 2) == words(">f", -7.25)
            await d5.write(c5.property("relay"), True)
            assert await far.get(5, "co", 1) == [1]
            assert await far.get(1, "co", 1) == [0]
            await far.set(1, "ir", 0, [21])
            assert await d1.read(c1.property("level")) == 42
            with pytest.raises(DriverError) as caught:
                await d5.read(c5.property("missing"))
            assert caught.value.reason == "IllegalAddress"
        finally:
            await d5.aclose()
            await d1.aclose()

    # The server is gone: a clear reason, quickly.
    nobody = device(far, 5, {"x": ("int", {"register": "HoldingRegister", "offset": 0})}, tcp=True)
    driver = await open_driver(nobody, buses)
    try:
        with pytest.raises(DriverError) as caught:
            await driver.read(nobody.property("x"))
        assert caught.value.reason == "Disconnected"
    finally:
        await driver.aclose()
