"""edge.sdnotify against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from edge.sdnotify import Notifier


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[socket.socket]:
    """A bound datagram socket, as systemd's notify socket; ``NOTIFY_SOCKET`` is its path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.setblocking(False)
        yield sock


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False


def test_messages_reach_a_path_socket(systemd: socket.socket) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.getsockname()})
    assert notifier.ready("running, 3 pods adopted")
    assert notifier.watchdog()
    assert notifier.status("cloud offline")
    assert notifier.stopping()
    assert received(systemd) == [
        "READY=1\nSTATUS=running, 3 pods adopted",
        "WATCHDOG=1",
        "STATUS=cloud offline",
        "STOPPING=1",
    ]


def test_messages_reach_an_abstract_socket() -> None:
    name = f"outpost-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.address == b"\0" + name.encode()
        assert notifier.ready()
        assert received(sock) == ["READY=1"]


def test_the_variables_leave_the_environment_so_children_do_not_inherit_them() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "PATH": "/bin"}
    env["WATCHDOG_PID"] = str(os.getpid())
    notifier = Notifier.from_environ(env)
    assert env == {"PATH": "/bin"}
    assert notifier.address == "/run/systemd/notify"
    assert notifier.watchdog_interval == 15.0
    kept = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    Notifier.from_environ(kept, unset=False)
    assert kept == {"NOTIFY_SOCKET": "/run/systemd/notify"}


def test_the_real_environment_is_cleared_for_subprocesses(
    monkeypatch: pytest.MonkeyPatch, systemd: socket.socket
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    notifier = Notifier.from_environ()
    assert notifier.watchdog_interval == 1.0
    assert "NOTIFY_SOCKET" not in os.environ
    child = os.popen("env").read()  # what runc would inherit
    assert "NOTIFY_SOCKET" not in child
    assert "WATCHDOG_USEC" not in child


@pytest.mark.parametrize(
    ("pid", "watched"),
    [
        (None, True),  # no WATCHDOG_PID: ours
        (os.getpid(), True),
        (os.getppid(), True),  # a onefile bootstrap is the unit's main process
        (1, False),  # another process's watchdog
    ],
)
def test_watchdog_pid_decides_whose_watchdog_it_is(pid: int | None, watched: bool) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "4000000"}
    if pid is not None:
        env["WATCHDOG_PID"] = str(pid)
    assert (Notifier.from_environ(env).watchdog_interval == 2.0) is watched


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_no_usable_watchdog_usec_means_no_watchdog(usec: str) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": usec}
    assert Notifier.from_environ(env).watchdog_interval is None


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_unsupported_addresses_turn_notifications_off(value: str) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready() is False


def test_a_missing_socket_loses_the_message_without_raising(tmp_path: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.ready() is False


def test_a_full_socket_never_blocks(systemd: socket.socket) -> None:
    """Nobody reads: the socket's queue fills, and later messages are dropped at once."""
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.getsockname()})
    start = time.monotonic()
    sent = [notifier.watchdog() for _ in range(5000)]
    assert time.monotonic() - start < 2
    assert sent[0]
    assert not all(sent)


async def test_feed_watchdog_pings_at_half_the_interval(
    systemd: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    notifier = Notifier(systemd.getsockname(), watchdog_usec=10_000_000)  # WatchdogSec=10s
    with trio.move_on_after(16):  # pings at 0, 5, 10 and 15 s
        await notifier.feed_watchdog()
    assert received(systemd) == ["WATCHDOG=1"] * 4


async def test_feed_watchdog_returns_at_once_when_the_watchdog_is_off(
    systemd: socket.socket,
) -> None:
    with trio.fail_after(1):
        await Notifier(systemd.getsockname()).feed_watchdog()
    assert received(systemd) == []


async def test_a_blocked_trio_loop_stops_the_pings(systemd: socket.socket) -> None:
    """What the watchdog is for: nothing is sent while the loop cannot run the task."""
    notifier = Notifier(systemd.getsockname(), watchdog_usec=100_000)  # a ping every 50 ms
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.feed_watchdog)
        await trio.sleep(0.3)
        assert len(received(systemd)) >= 3
        time.sleep(0.5)  # noqa: ASYNC251 -- the hung loop, on purpose
        assert received(systemd) == []  # ten deadlines passed without a ping
        await trio.sleep(0.2)
        assert len(received(systemd)) >= 2  # the loop runs again: so do the pings
        nursery.cancel_scope.cancel()
