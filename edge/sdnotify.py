"""systemd's readiness protocol (``sd_notify``): ``READY=1``, ``WATCHDOG=1``, ``STATUS=…``,
``STOPPING=1``, each a datagram to the socket named by ``$NOTIFY_SOCKET``.

Written here rather than taken from a library (``sdnotify``, ``systemd-python``) because the
protocol is one ``sendto`` on an ``AF_UNIX`` datagram socket, and the edge binary carries every
dependency it has.

What callers may rely on:

- Without ``$NOTIFY_SOCKET`` (not started by systemd, or not ``Type=notify``) every method is a
  no-op, so the agent runs the same from a shell, a test or another init system.
- Sending never blocks and never raises: a full or vanished socket loses that one message, which
  is what systemd's own ``sd_notify`` does too. Readiness is then judged by the unit's timeouts.
- ``Notifier.from_environ`` *removes* ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
  from the environment (like ``sd_notify(unset_environment=1)``). Children must not inherit
  them: ``runc start`` with ``NOTIFY_SOCKET`` set bind-mounts a socket into the container and
  waits for *the container* to send ``READY=1``, which hangs every pod start.
- The watchdog is fed by a trio task (``feed_watchdog``) at half of ``$WATCHDOG_USEC``, so the
  pings stop when the trio loop stops running tasks (a blocking call, a busy loop) and systemd
  restarts the agent. A hung task elsewhere does not stop them: only the loop itself is watched.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

import trio

log = logging.getLogger("edge.sdnotify")


def _address(value: str) -> str | bytes | None:
    """The socket address ``$NOTIFY_SOCKET`` names: a path, or ``@name`` for Linux's abstract
    namespace. Other forms (``vsock:…``, systemd 254 and later) are not supported: None."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


@dataclass(frozen=True)
class Notifier:
    """Where to notify systemd (``address``) and how often to feed its watchdog."""

    address: str | bytes | None = None
    # Microseconds between WATCHDOG=1 deadlines (WatchdogSec=); None when the watchdog is off.
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """Read (and by default remove) systemd's variables from ``environ`` (``os.environ``).

        ``WATCHDOG_PID`` names the process systemd expects pings from, its main process. It is
        honoured when it is this process or its parent: a onefile binary runs the program as a
        child of a small bootstrap process, which is the unit's main process.
        """
        env = os.environ if environ is None else environ
        get = env.pop if unset else env.get
        raw_socket = get("NOTIFY_SOCKET", None) or ""
        raw_usec = get("WATCHDOG_USEC", None) or ""
        raw_pid = get("WATCHDOG_PID", None) or ""
        address = _address(raw_socket) if raw_socket else None
        if raw_socket and address is None:
            log.warning("NOTIFY_SOCKET not supported, not notifying", extra={"socket": raw_socket})
        usec: int | None = None
        if address is not None and raw_usec.isdigit() and int(raw_usec) > 0:
            usec = int(raw_usec)
            if raw_pid.isdigit() and int(raw_pid) not in (os.getpid(), os.getppid()):
                usec = None  # the watchdog is another process's
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of ``WatchdogSec``, as systemd recommends."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True when it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            log.debug("systemd notification lost", extra={"error": exc})
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: systemd moves the unit to active and starts what waits on it."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        """The agent is shutting down: systemd shows the unit as deactivating."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def feed_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` at half the watchdog's interval, forever; returns at once when
        the watchdog is off. Run it in the agent's nursery."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await trio.sleep(interval)
