"""Serial Modbus lines for tests: socat PTY pairs, a relay that paces bytes at the baud rate, and a
pymodbus slave simulator on the far end.

::

    driver ── PTY pair "line" ──── relay (paced at the baud rate) ──── PTY ──── pymodbus RTU
    (port)    socat                                                                slave simulator

A PTY has no baud rate: bytes cross it as fast as the kernel moves them. The relay makes the line
honest. Every chunk it forwards, in either direction, occupies the wire for ``len(chunk)`` character
times (``1 + data bits + parity bit + stop bits`` bit times each: 10 for 8N1, 11 with parity) and
is handed on only once its last character would have arrived. The wire is half duplex, like RS-485:
one timeline for both directions, so a request sent while a response is still on the wire waits.

The relay and the simulator run in a child process (``python -m tests.serialkit``) so that their
timing does not depend on the test's own event loop and threads. The test drives the simulator
through :class:`FarEnd`, over a Unix socket (JSON lines):

- program and read back registers and bits of every slave (``set`` / ``get``), so a test checks a
  value the edge wrote on the simulator's side;
- ``set_dead(slave)``: the relay carries that slave's requests on the wire and then drops them, so
  the slave never answers (so is any slave ID the simulator does not have);
- ``set_garble(slave)``: that slave's responses leave the simulator with a corrupted CRC;
- ``stats()``: what the relay saw (frames per slave, dropped, the simulator's turnaround time).

:func:`modbus_line` starts the whole chain and :func:`modbus_tcp_server` a pymodbus Modbus TCP
server on loopback (same control API); both are async context managers that stop every process they
started, bounded in time, whatever happens in the test.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tests.waiting import eventually

REPO = Path(__file__).resolve().parent.parent

#: Table names the control API takes, and the function code each is read with.
TABLES = {"co": 1, "di": 2, "hr": 3, "ir": 4}

#: Addresses 0..TABLE_SIZE-1 exist in every table of every simulated slave; beyond them the
#: simulator answers "illegal data address".
TABLE_SIZE = 1000


def bits_per_char(bytesize: int = 8, parity: str = "N", stopbits: int = 1) -> int:
    """Bit times one character occupies on the wire: start bit, data bits, parity bit, stop bits."""
    return 1 + bytesize + (0 if parity.upper() == "N" else 1) + stopbits


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Test side (trio)
# --------------------------------------------------------------------------------------------


class FarEnd:
    """The test's handle on a running simulator (RTU behind the relay, or TCP)."""

    def __init__(self, control_path: Path, *, port: str = "", host: str = "", tcp_port: int = 0,
                 baudrate: int = 0, parity: str = "N", bytesize: int = 8, stopbits: int = 1,
                 slaves: tuple[int, ...] = ()) -> None:  # fmt: skip
        self.port = port  #: the PTY a driver opens (RTU)
        self.host = host  #: TCP
        self.tcp_port = tcp_port
        self.baudrate = baudrate
        self.parity = parity
        self.bytesize = bytesize
        self.stopbits = stopbits
        self.slaves = slaves
        self._control_path = control_path
        self._stream: trio.SocketStream | None = None
        self._buffer = b""
        self._lock = trio.Lock()

    @property
    def char_time(self) -> float:
        """Seconds one character occupies on the wire."""
        return bits_per_char(self.bytesize, self.parity, self.stopbits) / self.baudrate

    async def _call(self, **request: Any) -> dict[str, Any]:
        async with self._lock:
            with trio.fail_after(5):
                if self._stream is None:
                    self._stream = await trio.open_unix_socket(str(self._control_path))
                await self._stream.send_all(json.dumps(request).encode() + b"\n")
                while b"\n" not in self._buffer:
                    chunk = await self._stream.receive_some(65536)
                    if not chunk:
                        raise AssertionError("the simulator closed its control socket")
                    self._buffer += chunk
                line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise AssertionError(f"simulator refused {request}: {reply['error']}")
        return reply

    async def set(
        self, slave: int, table: str, address: int, values: list[int] | list[bool]
    ) -> None:
        """Write registers (``hr``, ``ir``: 16-bit words) or bits (``co``, ``di``)."""
        await self._call(op="set", slave=slave, table=table, address=address, values=list(values))

    async def get(self, slave: int, table: str, address: int, count: int = 1) -> list[int]:
        """Read back what the simulator holds (bits come back as 0/1)."""
        reply = await self._call(op="get", slave=slave, table=table, address=address, count=count)
        return [int(v) for v in reply["values"]]

    async def set_dead(self, slave: int, dead: bool = True) -> None:
        await self._call(op="dead", slave=slave, on=dead)

    async def set_garble(self, slave: int, garble: bool = True) -> None:
        await self._call(op="garble", slave=slave, on=garble)

    async def stats(self) -> dict[str, Any]:
        return (await self._call(op="stats"))["stats"]

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None


async def _stop(process: trio.Process) -> None:
    """Terminate a process we started and reap it, within a few seconds whatever happens."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(3):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def _log_says(log: Path, text: bytes) -> bool:
    return text in log.read_bytes()


def _died(process: trio.Process, log: Path, what: str) -> None:
    if process.returncode is not None:
        raise AssertionError(f"{what} exited:\n{log.read_text(errors='replace')}")


def _prepare(directory: Path, *stale: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.unlink(missing_ok=True)


async def _wait_ready(process: trio.Process, log: Path) -> None:
    """Wait for the far end's "ready" line in its log (it says why when it fails)."""

    def ready() -> bool:
        _died(process, log, "the simulator")
        return _log_says(log, b"ready\n")

    await eventually(ready, "the simulator says it is ready", within=20, interval=0.02)


async def _start_socat(a: Path, b: Path, log: Path) -> trio.Process:
    """A socat PTY pair whose two ends are reachable as symlinks ``a`` and ``b``."""
    _prepare(a.parent, a, b)
    with open(log, "wb") as out:  # noqa: ASYNC230 - a local file, opened once
        process = await trio.lowlevel.open_process(
            ["socat", "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def transferring() -> bool:
            _died(process, log, "socat")
            return _log_says(log, b"starting data transfer loop")

        await eventually(transferring, "socat links the two ends", within=5, interval=0.01)
    except BaseException:
        await _stop(process)
        raise
    return process


@asynccontextmanager
async def modbus_line(directory: Path, *, baudrate: int = 115200, parity: str = "N",
                      bytesize: int = 8, stopbits: int = 1, slaves: tuple[int, ...] = (1,),
                      dead: tuple[int, ...] = ()) -> AsyncIterator[FarEnd]:  # fmt: skip
    """A paced serial line with simulated slaves ``slaves`` on its far end.

    The driver opens ``far_end.port``. Slave IDs in ``dead`` (or not in ``slaves``) never answer.
    Each slave has :data:`TABLE_SIZE` coils, discrete inputs, holding and input registers, all zero.
    """
    port, relay_line = directory / "line", directory / "relay-line"
    control, log = directory / "control.sock", directory / "far-end.log"
    _prepare(directory, control)
    line_socat = await _start_socat(port, relay_line, directory / "socat-line.log")
    try:
        with open(log, "wb") as out:  # noqa: ASYNC230 - a local file, opened once
            far = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.serialkit", "rtu", "--line", str(relay_line),
                 "--control", str(control), "--baudrate", str(baudrate), "--parity", parity,
                 "--bytesize", str(bytesize), "--stopbits", str(stopbits),
                 "--slaves", ",".join(map(str, slaves)), "--dead", ",".join(map(str, dead))],
                cwd=REPO, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            await _wait_ready(far, log)
            handle = FarEnd(
                control, port=str(port), baudrate=baudrate, parity=parity, bytesize=bytesize,
                stopbits=stopbits, slaves=tuple(slaves),
            )  # fmt: skip
            try:
                yield handle
            finally:
                await handle.aclose()
        finally:
            await _stop(far)
    finally:
        await _stop(line_socat)


@asynccontextmanager
async def modbus_tcp_server(
    directory: Path, *, slaves: tuple[int, ...] = (1,)
) -> AsyncIterator[FarEnd]:
    """A pymodbus Modbus TCP server on loopback serving ``slaves`` (same tables as the RTU ones)."""
    control, log = directory / "control-tcp.sock", directory / "far-end-tcp.log"
    _prepare(directory, control)
    tcp_port = free_port()
    with open(log, "wb") as out:  # noqa: ASYNC230 - a local file, opened once
        far = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.serialkit", "tcp", "--tcp-port", str(tcp_port),
             "--control", str(control), "--slaves", ",".join(map(str, slaves))],
            cwd=REPO, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await _wait_ready(far, log)
        handle = FarEnd(control, host="127.0.0.1", tcp_port=tcp_port, slaves=tuple(slaves))
        try:
            yield handle
        finally:
            await handle.aclose()
    finally:
        await _stop(far)


# --------------------------------------------------------------------------------------------
# Far end (child process: asyncio, because pymodbus's server is asyncio)
# --------------------------------------------------------------------------------------------


@dataclass
class _RelayStats:
    frames: dict[int, int]
    dropped: dict[int, int]
    bytes_to_slaves: int = 0
    bytes_to_master: int = 0
    wire_busy_s: float = 0.0
    turnaround_s: float = 0.0  # summed: request handed to the simulator -> its response read
    turnarounds: int = 0
    max_turnaround_s: float = 0.0


class _Relay:
    """Forwards bytes between the line and the simulator at the pace of the wire (one thread)."""

    def __init__(self, line_fd: int, sim_fd: int, char_time: float, known: set[int],
                 dead: set[int]) -> None:  # fmt: skip
        self.line_fd, self.sim_fd = line_fd, sim_fd
        self.char_time = char_time
        self.known, self.dead = known, dead
        self.stats = _RelayStats(frames={}, dropped={})
        self.stopping = False
        self._wire_free = 0.0
        self._last_rx = {line_fd: 0.0, sim_fd: 0.0}
        self._frame_slave = {line_fd: -1, sim_fd: -1}
        self._handed_at: float | None = None

    def _carry(self, chunk: bytes) -> float:
        """Occupy the wire for ``chunk``; return when its last character has arrived."""
        start = max(time.monotonic(), self._wire_free)
        done = start + len(chunk) * self.char_time
        self.stats.wire_busy_s += done - start
        self._wire_free = done
        while (left := done - time.monotonic()) > 0:
            time.sleep(left)
        return done

    def run(self) -> None:
        fds = [self.line_fd, self.sim_fd]
        while not self.stopping:
            ready, _, _ = select.select(fds, [], [], 0.2)
            for fd in ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    continue
                if not chunk:
                    continue
                now = time.monotonic()
                # RTU frames are delimited by silence: 1.5 character times or more starts a new one.
                if now - self._last_rx[fd] > 1.5 * self.char_time or self._frame_slave[fd] < 0:
                    self._frame_slave[fd] = chunk[0]
                    new_frame = True
                else:
                    new_frame = False
                slave = self._frame_slave[fd]
                if fd == self.line_fd:
                    if new_frame:
                        self.stats.frames[slave] = self.stats.frames.get(slave, 0) + 1
                    self.stats.bytes_to_slaves += len(chunk)
                    self._carry(chunk)
                    self._last_rx[fd] = time.monotonic()
                    if slave in self.dead or slave not in self.known:
                        if new_frame:
                            self.stats.dropped[slave] = self.stats.dropped.get(slave, 0) + 1
                        continue
                    os.write(self.sim_fd, chunk)
                    self._handed_at = time.monotonic()
                else:
                    if new_frame and self._handed_at is not None:
                        turnaround = now - self._handed_at
                        self.stats.turnaround_s += turnaround
                        self.stats.turnarounds += 1
                        self.stats.max_turnaround_s = max(self.stats.max_turnaround_s, turnaround)
                        self._handed_at = None
                    self.stats.bytes_to_master += len(chunk)
                    self._carry(chunk)
                    self._last_rx[fd] = time.monotonic()
                    os.write(self.line_fd, chunk)


def _raw_open(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


def _sim_device(slave: int) -> Any:
    from pymodbus.simulator import DataType, SimData, SimDevice

    def bits() -> list[Any]:
        return [SimData(0, count=TABLE_SIZE, values=False, datatype=DataType.BITS)]

    def words() -> list[Any]:
        return [SimData(0, count=TABLE_SIZE, values=0, datatype=DataType.REGISTERS)]

    return SimDevice(id=slave, simdata=(bits(), bits(), words(), words()))


def _ids(text: str) -> set[int]:
    return {int(x) for x in text.split(",") if x}


async def _far_end(args: argparse.Namespace) -> None:
    import asyncio
    import logging

    from pymodbus.server import ModbusSerialServer, ModbusTcpServer

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    slaves = _ids(args.slaves)
    garble: set[int] = set()
    garbled = {"frames": 0}

    def trace_packet(sending: bool, data: bytes) -> bytes:
        if sending and data and data[0] in garble:
            garbled["frames"] += 1
            return data[:-1] + bytes([data[-1] ^ 0x5A])
        return data

    devices = [_sim_device(s) for s in sorted(slaves)]
    relay: _Relay | None = None
    if args.mode == "rtu":
        # The simulator's side of the relay is a PTY of the relay's own: no second socat hop.
        sim_master, sim_slave = os.openpty()
        tty.setraw(sim_slave)
        server: Any = ModbusSerialServer(
            # A PTY carries bytes, not bits: parity and stop bits are the relay's to time (some
            # kernels refuse parity settings on a PTY).
            devices, port=os.ttyname(sim_slave), baudrate=args.baudrate, trace_packet=trace_packet,
        )  # fmt: skip
        char_time = bits_per_char(args.bytesize, args.parity, args.stopbits) / args.baudrate
        relay = _Relay(_raw_open(args.line), sim_master, char_time, slaves,
                       _ids(args.dead))  # fmt: skip
        threading.Thread(target=relay.run, name="relay", daemon=True).start()
    else:
        server = ModbusTcpServer(devices, address=("127.0.0.1", args.tcp_port),
                                 trace_packet=trace_packet)  # fmt: skip
    await server.serve_forever(background=True)
    if args.mode == "tcp":  # the listener is up once connect works
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", args.tcp_port), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.02)

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op in ("set", "get"):
            slave, fc = request["slave"], TABLES[request["table"]]
            if slave not in slaves:
                return {"error": f"no slave {slave}"}
            if op == "set":
                values = request["values"]
                if fc in (1, 2):
                    values = [bool(v) for v in values]
                result = await server.context.async_setValues(slave, fc, request["address"], values)
                return {"error": str(result)} if result else {"ok": True}
            got = await server.context.async_getValues(
                slave, fc, request["address"], request["count"]
            )
            if not isinstance(got, list):
                return {"error": str(got)}
            return {"values": [int(v) for v in got]}
        if op == "dead" and relay is not None:
            if request["on"]:
                relay.dead = relay.dead | {request["slave"]}
            else:
                relay.dead = relay.dead - {request["slave"]}
            return {"ok": True}
        if op == "garble":
            (garble.add if request["on"] else garble.discard)(request["slave"])
            return {"ok": True}
        if op == "stats":
            stats: dict[str, Any] = {"garbled": garbled["frames"]}
            if relay is not None:
                stats.update(relay.stats.__dict__)
            return {"stats": stats}
        return {"error": f"unknown op {op!r}"}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            try:
                reply = await handle(json.loads(line))
            except Exception as exc:  # a bad request gets an answer, never a dead simulator
                reply = {"error": repr(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()

    control = await asyncio.start_unix_server(serve, args.control)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # The parent holds our stdin; when it goes away (even killed), so do we.
    loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 1024) or stop.set())
    print("ready", flush=True)
    await stop.wait()
    if relay is not None:
        relay.stopping = True
    control.close()
    await server.shutdown()


def main(argv: list[str] | None = None) -> None:
    import asyncio

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["rtu", "tcp"])
    parser.add_argument("--line")
    parser.add_argument("--control", required=True)
    parser.add_argument("--baudrate", type=int, default=115200)
    parser.add_argument("--parity", default="N")
    parser.add_argument("--bytesize", type=int, default=8)
    parser.add_argument("--stopbits", type=int, default=1)
    parser.add_argument("--slaves", default="1")
    parser.add_argument("--dead", default="")
    parser.add_argument("--tcp-port", type=int, default=0)
    asyncio.run(_far_end(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
