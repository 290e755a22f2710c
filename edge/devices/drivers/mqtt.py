"""MQTT: devices whose properties are topics, and the trio-driven MQTT client the eventbus uses too.

Two layers:

- ``MqttLink``: one paho-mqtt client whose socket is driven by trio itself. paho offers an
  "external event loop" API (``socket()``, ``loop_read()``, ``loop_write()``, ``loop_misc()``
  and the ``on_socket_*`` callbacks); a link waits for readability and writability with
  ``trio.lowlevel.wait_readable``/``wait_writable`` and calls those. So there is no network
  thread at all: paho's callbacks (``on_message``, ``on_connect``) run in the trio thread and
  may touch trio objects directly. The one blocking call, the TCP connect (DNS and the
  handshake), runs in ``trio.to_thread`` under a timeout, with a fresh paho client per attempt,
  so an abandoned attempt cannot disturb the next one. A lost connection is retried forever
  with full-jitter exponential backoff; subscriptions are made again on every connect.

- ``MqttDriver`` (``open_mqtt``): the Driver for ``protocolName: mqtt``. Each property names a
  ``topic`` and a ``jsonPath`` into the JSON payload; the latest message on a topic is the
  property's current value (retained messages give a value straight after subscribing). A write
  publishes the value (QoS 1, waiting for the broker's PUBACK) to ``writeTopic``, or to
  ``topic`` when there is none: as the bare value when ``jsonPath`` is ``$``, else as the JSON
  object the path describes (``$.a.b`` -> ``{"a": {"b": value}}``).

What callers may rely on: ``read`` raises ``DriverError("Disconnected")`` while the broker is
away and ``DriverError("Timeout")`` when nothing has been published on the topic yet (after
waiting up to the device's ``timeout``); a value that does not fit the property's type raises
``DriverError("WrongType")``. Messages are never queued: only the latest per topic is kept, and
only from the current connection (after a reconnect a topic has no value until a message comes;
retained messages come at once).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import select
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import trio
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.devices.drivers.base import (
    DISCONNECTED,
    TIMEOUT,
    UNSUPPORTED,
    WRONG_TYPE,
    DriverError,
)
from edge.devices.model import DeviceConfig, PropertyConfig
from edge.devices.values import decode_json, encode_json

log = logging.getLogger("edge.devices.mqtt")

_OK = paho.MQTT_ERR_SUCCESS


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` (or ``tcp://``) -> (host, port); the port defaults to 1883."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise ValueError(f"not an MQTT broker URL (mqtt://host:port): {url!r}")
    return parts.hostname, parts.port or 1883


@dataclass
class Message:
    """A message as the link hands it on: paho's fields, copied (paho reuses its objects)."""

    topic: str
    payload: bytes
    retain: bool = False


class MqttLink:
    """One MQTT connection, kept up by ``run()`` for as long as that task lives.

    ``subscriptions`` are (re)made on every connect; ``on_message(Message)`` and
    ``on_connect()`` are called in the trio thread and must not block. ``publish`` never blocks
    either: it hands the packet to paho, whose bytes the writer task sends.

    ``no_local`` (MQTT 5) keeps the broker from echoing this client's own publications back to
    it — the eventbus publishes and subscribes the same topics.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str = "",
        subscriptions: Iterable[str] = (),
        on_message: Callable[[Message], None] | None = None,
        on_connect: Callable[[], None] | None = None,
        qos: int = 1,
        keepalive: int = 30,
        connect_timeout: float = 5.0,
        backoff: tuple[float, float] = (0.2, 30.0),
        mqtt5: bool = False,
        no_local: bool = False,
        name: str = "mqtt",
    ) -> None:
        self.host, self.port = parse_broker_url(url)
        self.url = url
        self.client_id = client_id or f"outpost-{uuid.uuid4().hex[:12]}"
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.on_connect = on_connect
        self.qos = qos
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.backoff = backoff
        self.mqtt5 = mqtt5 or no_local
        self.no_local = no_local
        self.name = name
        self.connects = 0  # successful connects so far (the first included)
        self._client: paho.Client | None = None
        self._connected = False
        self._changed = trio.Event()  # set (and replaced) whenever ``connected`` flips
        self._write_wanted = trio.Event()
        self._published: dict[int, trio.Event] = {}  # PUBACKs awaited, by message id
        self._acked: set[int] = set()

    # -- what users call ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    async def wait_connected(self) -> None:
        while not self._connected:
            await self._changed.wait()

    def publish(self, topic: str, payload: bytes | str, qos: int | None = None,
                retain: bool = False) -> int | None:  # fmt: skip
        """Queue a publication; its message id, or None when not connected (nothing queued)."""
        client = self._client
        if not self._connected or client is None:
            return None
        info = client.publish(topic, payload, qos=self.qos if qos is None else qos, retain=retain)
        if info.rc != _OK:
            return None
        return info.mid

    async def publish_confirmed(self, topic: str, payload: bytes | str,
                                retain: bool = False) -> bool:  # fmt: skip
        """Publish with QoS 1 and wait for the broker's PUBACK: True once it came, False if
        not connected or the connection was lost first. Bound it with a cancel scope."""
        mid = self.publish(topic, payload, qos=1, retain=retain)
        if mid is None:
            return False
        # No checkpoint since publish(): the PUBACK cannot have been read yet.
        done = self._published[mid] = trio.Event()
        try:
            await done.wait()
        finally:
            self._published.pop(mid, None)
            acked = mid in self._acked
            self._acked.discard(mid)
        return acked

    # -- the connection ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve the socket, and reconnect after every loss, forever. ``started`` is
        reported at once: callers do not wait for a broker that may be away."""
        task_status.started()
        low, high = self.backoff
        delay = low
        failures = 0
        while True:
            try:
                await self._session()
            except (OSError, trio.TooSlowError, _Refused) as exc:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "mqtt connect failed",
                        extra={"link": self.name, "broker": self.url, "error": str(exc) or
                               type(exc).__name__, "failures": failures})  # fmt: skip
            else:
                # The session ran and then the connection was lost: start over quickly.
                failures, delay = 0, low
            await trio.sleep(random.uniform(0, delay))
            delay = min(high, delay * 2)

    async def _session(self) -> None:
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if self.mqtt5 else paho.MQTTv311,
        )
        client.connect_timeout = self.connect_timeout
        # The connect runs in a worker thread before any of our callbacks are installed, so
        # paho writes the CONNECT packet itself there; from here on only this thread touches
        # the client.
        with trio.fail_after(self.connect_timeout + 1):
            await trio.to_thread.run_sync(
                functools.partial(client.connect, self.host, self.port, self.keepalive),
                abandon_on_cancel=True,
            )
        sock = client.socket()
        if sock is None:
            raise OSError("connect left no socket")
        lost = trio.Event()
        refused: list[str] = []
        subscribing: list[int] = []

        def on_connect(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
            if reason.is_failure:
                refused.append(str(reason))
                lost.set()
                return
            if not self.subscriptions:
                ready()
                return
            options = SubscribeOptions(qos=self.qos, noLocal=self.no_local)
            if self.mqtt5:
                _rc, mid = client.subscribe([(t, options) for t in self.subscriptions])
            else:
                _rc, mid = client.subscribe([(t, self.qos) for t in self.subscriptions])
            subscribing.append(mid)

        def on_subscribe(_c: Any, _u: Any, mid: int, _codes: Any, _props: Any) -> None:
            if subscribing and mid == subscribing[0]:
                ready()

        def ready() -> None:
            # "Connected" means subscribed too: nothing published after it is missed.
            self.connects += 1
            self._set_connected(True)
            log.info("mqtt connected", extra={"link": self.name, "broker": self.url})
            if self.on_connect is not None:
                self.on_connect()

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            if self.on_message is not None:
                self.on_message(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

        def on_publish(_c: Any, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
            if mid in self._published:
                self._acked.add(mid)
                self._published[mid].set()

        def on_disconnect(*_args: Any) -> None:
            lost.set()

        def on_socket_close(_c: Any, _u: Any, closing: Any) -> None:
            # paho closes the socket itself (keepalive expiry, a read error): trio must hear of
            # it first, or a task parked in wait_readable on that fd would never wake.
            _notify_closing(closing)
            lost.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.on_publish = on_publish
        client.on_disconnect = on_disconnect
        client.on_socket_close = on_socket_close
        client.on_socket_register_write = lambda *_: self._write_wanted.set()
        self._client = client
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, client, sock, lost)
                nursery.start_soon(self._writer, client, sock, lost)
                nursery.start_soon(self._ticker, client, lost)
                await lost.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._client = None
            was_connected = self._connected
            self._set_connected(False)
            for event in self._published.values():
                event.set()  # wake the waiters: not acknowledged
            self._published.clear()
            _close(client)
            if was_connected:
                log.warning("mqtt connection lost", extra={"link": self.name, "broker": self.url})
        if refused:
            raise _Refused(f"broker refused the connection: {refused[0]}")

    async def _reader(self, client: paho.Client, sock: Any, lost: trio.Event) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
            except (trio.ClosedResourceError, OSError):
                lost.set()
                return
            if client.loop_read() != _OK or client.socket() is None:
                lost.set()
                return

    async def _writer(self, client: paho.Client, sock: Any, lost: trio.Event) -> None:
        while True:
            if not client.want_write():
                await self._write_wanted.wait()
                self._write_wanted = trio.Event()
                continue
            try:
                await trio.lowlevel.wait_writable(sock)
            except (trio.ClosedResourceError, OSError):
                lost.set()
                return
            if client.loop_write() != _OK or client.socket() is None:
                lost.set()
                return

    async def _ticker(self, client: paho.Client, lost: trio.Event) -> None:
        """Keepalive: paho sends PINGREQ and gives up on a silent broker in ``loop_misc``."""
        while True:
            await trio.sleep(min(1.0, self.keepalive / 4))
            if client.loop_misc() != _OK or client.socket() is None:
                lost.set()
                return

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            self._changed.set()
            self._changed = trio.Event()


class _Refused(Exception):
    pass


def _notify_closing(sock: Any) -> None:
    """Tell trio a socket paho is about to close, so a task parked on it wakes up."""
    with contextlib.suppress(RuntimeError):  # not in trio (a client garbage-collected late)
        trio.lowlevel.notify_closing(sock)


def _close(client: paho.Client) -> None:
    """Say goodbye if the socket is still there (one non-blocking write), then close it."""
    client.on_socket_register_write = None
    client.on_socket_close = None
    if client.socket() is not None:
        with contextlib.suppress(OSError):
            client.disconnect()  # no external-loop callback now: paho writes DISCONNECT at once
    if client.socket() is not None:
        client._sock_close()  # paho has no public "close now"; this is what disconnect uses


# -- the device driver ---------------------------------------------------------------------------
#
# The driver pulls: it has no task of its own (the device manager calls read and write from the
# device's task, one at a time). Each call first drains what the broker sent since the last one,
# keeping only the latest message per topic, and lets paho send its keepalive; the keepalive is
# set above the longest collect cycle so that a connection between two reads stays up. A lost
# connection is made again by the next call; until it is, calls raise Disconnected, which the
# device twin counts toward "offline" and backs off from.

# Reading the socket in a call yields to other tasks this often, so that a flood cannot hog trio.
_DRAIN_BATCH = 256


class MqttDriver:
    """The Driver of one ``protocolName: mqtt`` device: one MQTT connection of its own."""

    def __init__(self, device: DeviceConfig, *, timeout: float | None = None) -> None:
        config = device.protocol_config
        self.device = device
        self._device_key = f"{device.namespace}/{device.name}"
        self.host = str(config["host"])
        self.port = int(config["port"])
        self.url = str(config["broker"])
        self.client_id = str(config.get("clientID") or "") or (
            f"outpost-{device.namespace}-{device.name}-{uuid.uuid4().hex[:6]}"
        )
        self.timeout = float(timeout or config.get("timeout") or 2.0)
        longest = max((p.collect_s for p in device.properties), default=1.0)
        self.keepalive = int(min(65535, max(30, math.ceil(longest * 2 + 5))))
        self.topics = sorted({str(p.visitor["topic"]) for p in device.properties})
        self.latest: dict[str, Message] = {}
        self.messages = 0  # received since opened
        self.connects = 0
        self._client: paho.Client | None = None
        self._sock: Any = None
        self._ready = False  # CONNACK and SUBACK seen
        self._acked: set[int] = set()
        self._closed = False

    # -- Driver ------------------------------------------------------------------------------

    async def read(self, prop: PropertyConfig) -> Any:
        topic = str(prop.visitor["topic"])
        await self._ensure_connected()
        await self._drain()
        if topic not in self.latest:
            with trio.move_on_after(self.timeout):
                while topic not in self.latest:
                    await self._wait_and_read()
        message = self.latest.get(topic)
        if message is None:
            raise DriverError(
                TIMEOUT, f"nothing published on {topic} within {self.timeout:g}s of subscribing"
            )
        try:
            return decode_json(message.payload, prop)
        except (ValueError, LookupError) as exc:
            raise DriverError(WRONG_TYPE, f"{topic} {prop.visitor['jsonPath']}: {exc}") from None

    async def write(self, prop: PropertyConfig, value: Any) -> None:
        topic = str(prop.visitor.get("writeTopic") or prop.visitor["topic"])
        try:
            payload = encode_json(value, prop)
        except ValueError as exc:
            raise DriverError(WRONG_TYPE, f"{prop.name}: {exc}") from None
        await self._ensure_connected()
        await self._drain()
        client = self._client
        assert client is not None
        info = client.publish(topic, payload, qos=1)
        if info.rc != _OK:
            self._lost(f"publish failed: {paho.error_string(info.rc)}")
            raise DriverError(DISCONNECTED, f"{self.url}: publish failed")
        with trio.move_on_after(self.timeout):
            while info.mid not in self._acked:
                await self._flush()
                if info.mid not in self._acked:
                    await self._wait_and_read()
        if info.mid not in self._acked:
            raise DriverError(TIMEOUT, f"{self.url}: no PUBACK for {topic} in {self.timeout:g}s")
        self._acked.discard(info.mid)

    async def aclose(self) -> None:
        self._closed = True
        if self._client is not None:
            client, self._client = self._client, None
            self._forget_socket()
            _close(client)

    # -- the connection ------------------------------------------------------------------------

    async def _ensure_connected(self) -> None:
        if self._closed:
            raise DriverError(DISCONNECTED, "the driver is closed")
        if self._client is not None and self._ready:
            return
        if self._client is not None:  # half-way (no CONNACK yet): start over
            self._lost("connect did not finish")
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho.MQTTv311)  # fmt: skip
        client.connect_timeout = self.timeout
        try:
            with trio.fail_after(self.timeout + 1):
                await trio.to_thread.run_sync(
                    functools.partial(client.connect, self.host, self.port, self.keepalive),
                    abandon_on_cancel=True,
                )
        except (OSError, trio.TooSlowError) as exc:
            raise DriverError(
                DISCONNECTED, f"cannot connect to {self.url}: {exc or 'timed out'}"
            ) from None
        subscribed: list[int] = []
        refused: list[str] = []

        def on_connect(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
            if reason.is_failure:
                refused.append(str(reason))
                return
            _rc, mid = client.subscribe([(t, 0) for t in self.topics])
            subscribed.append(mid)

        def on_subscribe(_c: Any, _u: Any, mid: int, _codes: Any, _props: Any) -> None:
            if subscribed and mid == subscribed[0]:
                self._ready = True

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            self.messages += 1
            self.latest[msg.topic] = Message(msg.topic, bytes(msg.payload), bool(msg.retain))

        def on_publish(_c: Any, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
            self._acked.add(mid)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.on_publish = on_publish
        client.on_socket_close = lambda _c, _u, sock: _notify_closing(sock)
        # Writes are flushed by this driver (``_flush``), never behind its back.
        client.on_socket_register_write = lambda *_: None
        self._client, self._sock, self._ready = client, client.socket(), False
        # Messages from an earlier connection are not current: retained ones come again now.
        self.latest.clear()
        with trio.move_on_after(self.timeout):
            while not self._ready and not refused and self._client is not None:
                await self._flush()
                await self._wait_and_read()
        if not self._ready:
            why = f"refused: {refused[0]}" if refused else f"no CONNACK/SUBACK in {self.timeout:g}s"
            self._lost(why)
            raise DriverError(DISCONNECTED, f"{self.url}: {why}")
        self.connects += 1
        log.info("mqtt device connected", extra={"device": self._device_key, "broker": self.url,
                                                 "topics": len(self.topics)})  # fmt: skip

    async def _wait_and_read(self) -> None:
        """Wait for the broker to send something, then read it (raises Disconnected)."""
        if self._client is None:
            raise DriverError(DISCONNECTED, f"{self.url}: connection lost")
        try:
            await trio.lowlevel.wait_readable(self._sock)
        except (trio.ClosedResourceError, OSError):
            self._lost("socket closed")
            raise DriverError(DISCONNECTED, f"{self.url}: connection lost") from None
        self._check(self._client.loop_read())

    async def _drain(self) -> None:
        """Read everything already waiting (non-blocking), send what paho has queued, and let
        it keep the connection alive."""
        client = self._client
        assert client is not None
        self._check(client.loop_misc())
        for count in range(1, 1_000_000):
            if not _readable(self._sock):
                break
            self._check(client.loop_read())
            if count % _DRAIN_BATCH == 0:
                await trio.lowlevel.checkpoint()
        await self._flush()

    async def _flush(self) -> None:
        while self._client is not None and self._client.want_write():
            try:
                await trio.lowlevel.wait_writable(self._sock)
            except (trio.ClosedResourceError, OSError):
                self._lost("socket closed")
                raise DriverError(DISCONNECTED, f"{self.url}: connection lost") from None
            self._check(self._client.loop_write())

    def _check(self, rc: int) -> None:
        if rc != _OK or self._client is None or self._client.socket() is None:
            self._lost(paho.error_string(rc) if rc != _OK else "connection closed")
            raise DriverError(DISCONNECTED, f"{self.url}: connection lost")

    def _lost(self, why: str) -> None:
        client = self._client
        if client is None:
            return
        self._client = None
        self._ready = False
        self._acked.clear()
        self._forget_socket()
        _close(client)
        log.warning("mqtt device connection lost",
                    extra={"device": self._device_key, "broker": self.url, "why": why})  # fmt: skip

    def _forget_socket(self) -> None:
        if self._sock is not None and self._sock.fileno() >= 0:
            _notify_closing(self._sock)
        self._sock = None


def _readable(sock: Any) -> bool:
    if sock is None or sock.fileno() < 0:
        return False
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


async def open_mqtt(device: DeviceConfig, buses: Any = None) -> MqttDriver:
    """The driver for an MQTT device. It connects on first use, so a broker that is away does
    not stop the device from being set up (its reads say Disconnected until it is back).
    ``buses`` is unused: every MQTT device has a connection of its own."""
    if device.protocol != "mqtt":
        raise DriverError(UNSUPPORTED, f"{device.protocol} is not mqtt")
    return MqttDriver(device)


async def open_driver(device: DeviceConfig, buses: Any = None) -> MqttDriver:
    """The entry point ``edge.devices.drivers.open_driver`` calls."""
    return await open_mqtt(device, buses)
