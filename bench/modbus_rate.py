"""How many Modbus RTU reads per second one serial bus delivers, against what the wire allows.

Usage: .venv/bin/python bench/modbus_rate.py [--baud 115200] [--slaves 8] [--seconds 5]
       [--registers 1] [--parity N]

The line is the test kit's (``tests/serialkit.py``): a socat PTY pair, a relay that paces every
byte at the baud rate (half duplex), and pymodbus slaves on the far end. On the edge side, the
real driver (``edge.devices.drivers.modbus``): one Modbus RTU driver per slave, all sharing one
bus; each slave has its own trio task reading one input-register property back to back, so the
bus is never idle for want of requests and serves them in turn.

The wire limit counts, per read, the request frame (8 bytes), the answer (5 + 2 per register)
and two inter-frame gaps of 3.5 characters (one before the slave answers, one before the next
request), at ``1 + 8 + parity + 1`` bit times per character. The figures printed say where the
rest of the time goes: the simulator's turnaround, the edge's inter-frame silence, and what is
left (thread hand-offs, PTY and socat hops, Python on both sides).

The last line is ``modbus_rate reads_per_s=… wire_limit_per_s=… ratio=…``. Target: ratio ≥ 0.9.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge.devices.drivers import Buses  # noqa: E402
from edge.devices.drivers.modbus import bits_per_char, open_driver  # noqa: E402
from edge.devices.model import parse_device  # noqa: E402
from tests.serialkit import modbus_line  # noqa: E402

PARITY = {"N": "none", "E": "even", "O": "odd"}


def config(port: str, baud: int, parity: str, slave: int, registers: int):
    model = {"spec": {"properties": [{"name": "v", "type": "string" if registers > 1 else "int"}]}}
    visitor = {"register": "InputRegister", "offset": 0}
    if registers > 1:
        visitor["limit"] = registers
    body = {
        "metadata": {"name": f"slave-{slave}", "namespace": "bench"},
        "spec": {
            "deviceModelRef": {"name": "m"},
            "protocol": {"protocolName": "modbus-rtu", "configData": {
                "serialPort": port, "baudRate": baud, "parity": PARITY[parity],
                "slaveID": slave, "timeout": 0.5}},
            "properties": [{"name": "v", "visitors": {"configData": visitor}}],
        },
    }  # fmt: skip
    return parse_device(body, model)


async def run(args: argparse.Namespace) -> None:
    slaves = tuple(range(1, args.slaves + 1))
    with tempfile.TemporaryDirectory(prefix="modbus-rate-") as tmp:
        async with modbus_line(Path(tmp), baudrate=args.baud, parity=args.parity,
                               slaves=slaves) as far:  # fmt: skip
            for slave in slaves:
                await far.set(slave, "ir", 0, [0x4141] * args.registers)
            buses = Buses()
            configs = [config(far.port, args.baud, args.parity, s, args.registers) for s in slaves]
            drivers = [await open_driver(c, buses) for c in configs]
            counts = [0] * len(slaves)
            measuring = False

            async def poll(i: int) -> None:
                prop = configs[i].property("v")
                while True:
                    await drivers[i].read(prop)
                    if measuring:
                        counts[i] += 1

            async with trio.open_nursery() as nursery:
                for i in range(len(slaves)):
                    nursery.start_soon(poll, i)
                await trio.sleep(1.0)  # warm up: threads, caches
                (bus,) = buses.buses.values()
                before_relay = await far.stats()
                before_busy, before_requests = bus.stats.busy_s, bus.stats.requests
                measuring = True
                start = time.monotonic()
                await trio.sleep(args.seconds)
                measuring = False
                elapsed = time.monotonic() - start
                after_relay = await far.stats()
                busy = bus.stats.busy_s - before_busy
                requests = bus.stats.requests - before_requests
                errors = bus.stats.requests - bus.stats.ok
                nursery.cancel_scope.cancel()
            for driver in drivers:
                await driver.aclose()

    reads = sum(counts)
    rate = reads / elapsed
    char = bits_per_char(8, PARITY[args.parity], 1) / args.baud
    request_bytes, answer_bytes = 8, 5 + 2 * args.registers
    wire_per_read = (request_bytes + answer_bytes + 2 * 3.5) * char
    wire_limit = 1 / wire_per_read
    per_read = elapsed / reads
    frames = sum(after_relay["frames"].values()) - sum(before_relay["frames"].values())
    turnarounds = after_relay["turnarounds"] - before_relay["turnarounds"]
    turnaround = (after_relay["turnaround_s"] - before_relay["turnaround_s"]) / max(turnarounds, 1)
    on_wire = (after_relay["wire_busy_s"] - before_relay["wire_busy_s"]) / max(reads, 1)
    silence = 3.5 * char
    rest = per_read - on_wire - turnaround - silence
    print(
        f"line: {args.baud} baud, 8{args.parity}1 ({char * 1e6:.1f} us a character),"
        f" {args.slaves} slaves, {args.registers} register(s) a read"
    )
    print(
        f"reads: {reads} in {elapsed:.2f} s = {rate:.1f}/s"
        f" ({', '.join(str(c) for c in counts)} per slave); errors: {errors}"
    )
    print(
        f"per read: {per_read * 1e3:.3f} ms; wire limit {wire_per_read * 1e3:.3f} ms"
        f" ({request_bytes}+{answer_bytes} bytes + 2 x 3.5 characters)"
    )
    print(
        f"  frames on the wire:       {on_wire * 1e3:.3f} ms ({frames} requests seen by the relay)"
    )
    print(
        f"  simulator turnaround:     {turnaround * 1e3:.3f} ms"
        f" (pymodbus: request in -> answer out; the wire limit allows 3.5 characters ="
        f" {silence * 1e3:.3f} ms)"
    )
    print(f"  edge inter-frame silence: {silence * 1e3:.3f} ms (3.5 characters)")
    print(
        f"  the rest:                 {rest * 1e3:.3f} ms (thread hand-offs, PTY/socat hops,"
        f" Python on both sides)"
    )
    print(
        f"  bus held per request:     {busy / max(requests, 1) * 1e3:.3f} ms (Bus.run, incl."
        f" the hop into the worker thread)"
    )
    print(
        f"modbus_rate reads_per_s={rate:.1f} wire_limit_per_s={wire_limit:.1f}"
        f" ratio={rate / wire_limit:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--slaves", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--registers", type=int, default=1)
    parser.add_argument("--parity", choices=["N", "E", "O"], default="N")
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
