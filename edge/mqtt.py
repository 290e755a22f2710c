"""MQTT on trio: paho-mqtt's protocol code with trio driving its socket, and no thread of paho's.

paho offers an "external event loop" API (``socket()``, ``loop_read()``, ``loop_write()``,
``loop_misc()`` and the ``on_socket_*`` callbacks). Here trio waits for the socket with
``trio.lowlevel.wait_readable``/``wait_writable`` and calls those, so paho's callbacks run in
the trio thread and may touch trio objects directly. The one blocking call, the TCP connect (DNS
and the handshake), runs in ``trio.to_thread`` under a timeout.

Two layers:

- ``Session``: one connection, on a fresh paho client (an abandoned attempt cannot disturb the
  next one). ``connect`` returns once the broker has acknowledged the connection and every
  subscription, so nothing published after it is missed. Its owner drives the socket in one of
  two ways: ``serve`` in a task of its own (reading, writing and keeping alive until the
  connection is lost), or from its own calls (``poll``, ``run_until``) for a user that has no
  task, such as a device driver the device manager calls now and then.
- ``MqttClient``: a connection kept up by ``run`` for as long as that task lives: a new session
  after every loss, with the edge's backoff (``edge.backoff``), subscriptions made again on
  every connect. Publishing never blocks and never queues while the broker is away; while it is
  there, at most ``max_queued`` QoS 1 publications wait for their acknowledgement (beyond that
  ``publish`` refuses), so a broker that stops answering cannot make memory grow.

Users: the eventbus and the cloud's telemetry sink (``MqttClient``), the MQTT device driver
(``Session``, driven from its calls). The module depends on paho, trio and ``edge.backoff``
only, so the cloud imports it as it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import trio
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.backoff import Backoff, Retries

log = logging.getLogger("edge.mqtt")

_OK = paho.MQTT_ERR_SUCCESS
# Unacknowledged QoS 1 publications a connection holds at most.
MAX_QUEUED = 10_000
BACKOFF = Backoff(base_s=0.2, cap_s=30.0)
# Reading a socket from a caller's own task yields to other tasks this often, so that a flood
# cannot hog trio.
_DRAIN_BATCH = 256


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` (or ``tcp://``) -> (host, port); the port defaults to 1883.
    ``ValueError`` saying what is wrong otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise ValueError(f"not an MQTT broker URL (mqtt://host:port): {url!r}")
    try:
        return parts.hostname, parts.port or 1883
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None


@dataclass
class Message:
    """A message as it is handed on: paho's fields, copied (paho reuses its objects)."""

    topic: str
    payload: bytes
    retain: bool = False


class MqttError(Exception):
    """The connection could not be made, was refused, or was lost; the message says which."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What a session asks of the broker at ``host:port``.

    ``subscriptions`` are made with ``qos``, which is also the default of ``publish``;
    ``timeout_s`` bounds each step of a connect. ``no_local`` (MQTT 5) keeps the broker from
    echoing this client's own publications back to it, for a user that publishes and
    subscribes the same topics.
    """

    host: str
    port: int
    client_id: str
    subscriptions: tuple[str, ...] = ()
    qos: int = 1
    keepalive: int = 30
    timeout_s: float = 5.0
    mqtt5: bool = False
    no_local: bool = False
    max_queued: int = MAX_QUEUED


class Session:
    """One connection, as ``settings`` say; see the module's docstring.

    ``on_message(Message)`` and ``on_ready()`` are called in the trio thread and must not block;
    ``on_ready`` is called once, when the connection and its subscriptions are acknowledged.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        on_message: Callable[[Message], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_message = on_message
        self.on_ready = on_ready
        self.ready = False
        self.lost = trio.Event()
        self.why = ""
        self._mqtt5 = settings.mqtt5 or settings.no_local
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5 if self._mqtt5 else paho.MQTTv311,
        )
        self._client.connect_timeout = settings.timeout_s
        self._client.max_queued_messages_set(settings.max_queued)
        self._sock: Any = None
        self._refused = ""
        self._subscribing: int | None = None
        self._write_wanted = trio.Event()
        # PUBACKs awaited, and those that came.
        self._awaited: set[int] = set()
        self._acked: set[int] = set()
        # Set (and replaced) whenever one comes, or the connection is lost.
        self._progress = trio.Event()

    # -- connecting ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and subscribe, within ``timeout_s`` for each step; ``MqttError`` if the
        broker cannot be reached, refuses, or does not acknowledge in time."""
        client, settings = self._client, self.settings
        # The connect runs in a worker thread before any of our callbacks are installed, so
        # paho writes the CONNECT packet itself there; from here on only this thread touches
        # the client.
        try:
            with trio.fail_after(settings.timeout_s + 1):
                await trio.to_thread.run_sync(
                    functools.partial(
                        client.connect, settings.host, settings.port, settings.keepalive
                    ),
                    abandon_on_cancel=True,
                )
        except (OSError, trio.TooSlowError) as exc:
            raise MqttError(f"cannot connect: {exc or 'timed out'}") from None
        self._sock = client.socket()
        if self._sock is None:
            raise MqttError("connect left no socket")
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = lambda *_: self._lose("the broker closed the connection")
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = lambda *_: self._write_wanted.set()
        with trio.move_on_after(settings.timeout_s), contextlib.suppress(MqttError):
            await self.run_until(lambda: self.ready)
        if self.ready:
            return
        if self._refused:
            raise MqttError(f"broker refused the connection: {self._refused}")
        if self.lost.is_set():
            raise MqttError(f"connection lost: {self.why}")
        self._lose("no CONNACK/SUBACK")
        raise MqttError(f"no CONNACK/SUBACK in {settings.timeout_s:g}s")

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self._lose(f"refused: {reason}")
            return
        topics, qos = self.settings.subscriptions, self.settings.qos
        if not topics:
            self._ready()
            return
        if self._mqtt5:
            options = SubscribeOptions(qos=qos, noLocal=self.settings.no_local)
            _rc, self._subscribing = self._client.subscribe([(t, options) for t in topics])
        else:
            _rc, self._subscribing = self._client.subscribe([(t, qos) for t in topics])

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, _codes: Any, _props: Any) -> None:
        if mid == self._subscribing:
            self._ready()

    def _ready(self) -> None:
        self.ready = True
        if self.on_ready is not None:
            self.on_ready()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
        if mid in self._awaited:
            self._acked.add(mid)
            self._wake()

    def _on_socket_close(self, _c: Any, _u: Any, sock: Any) -> None:
        # paho closes the socket itself (keepalive expiry, a read error): trio must hear of it
        # first, or a task parked in wait_readable on that fd would never wake.
        _notify_closing(sock)
        self._lose("socket closed")

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            self.why = why
            self.lost.set()
            self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    # -- publishing ----------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int | None = None,
        retain: bool = False,
        *,
        confirm: bool = False,
    ) -> int | None:
        """Hand a publication to paho; its message id, or None when it was refused (the
        connection is lost, or ``max_queued`` are waiting). With ``confirm`` (QoS 1), its
        PUBACK is awaited: see ``acknowledged`` and ``confirmed``."""
        if not self.ready or self.lost.is_set():
            return None
        info = self._client.publish(
            topic, payload, qos=self.settings.qos if qos is None else qos, retain=retain
        )
        if info.rc != _OK:
            return None
        if confirm:
            self._awaited.add(info.mid)
        return info.mid

    def acknowledged(self, mid: int) -> bool:
        """Whether the PUBACK of ``mid`` (published with ``confirm``) came; it is forgotten
        once this says so."""
        if mid in self._acked:
            self._acked.discard(mid)
            self._awaited.discard(mid)
            return True
        return False

    def forget(self, mids: Iterable[int]) -> None:
        """Stop awaiting the PUBACKs of ``mids`` (their waiter gave up)."""
        for mid in mids:
            self._awaited.discard(mid)
            self._acked.discard(mid)

    async def confirmed(self, mids: Collection[int]) -> set[int]:
        """Wait for the PUBACKs of ``mids`` (published with ``confirm``) while ``serve`` runs:
        all of them, unless the connection is lost first. Returns those that came."""
        try:
            while not self.lost.is_set() and not self._acked.issuperset(mids):
                await self._progress.wait()
            return self._acked.intersection(mids)
        finally:
            self.forget(mids)

    # -- driving the socket --------------------------------------------------------------------

    async def serve(self) -> None:
        """Read, write and keep the connection alive from tasks of its own, until the
        connection is lost; then return (``why`` says why)."""
        async with trio.open_nursery() as nursery:
            for pump in (self._read_forever, self._write_forever, self._keep_alive):
                nursery.start_soon(self._until_lost, pump)
            await self.lost.wait()
            nursery.cancel_scope.cancel()

    async def _until_lost(self, pump: Callable[[], Awaitable[None]]) -> None:
        with contextlib.suppress(MqttError):  # it marked the session lost
            await pump()

    async def _read_forever(self) -> None:
        while True:
            await self.receive()

    async def _write_forever(self) -> None:
        while True:
            if not self._client.want_write():
                await self._write_wanted.wait()
                self._write_wanted = trio.Event()
                continue
            await self.flush()

    async def _keep_alive(self) -> None:
        """paho sends PINGREQ and gives up on a silent broker in ``loop_misc``."""
        while True:
            await trio.sleep(min(1.0, self.settings.keepalive / 4))
            self._check(self._client.loop_misc())

    async def run_until(self, done: Callable[[], bool]) -> None:
        """Drive the socket from this task (no ``serve`` running) until ``done()``: send what
        paho has queued, read what the broker sends. ``MqttError`` when the connection is lost;
        bound it with a cancel scope."""
        while not done():
            await self.flush()
            if not done():
                await self.receive()

    async def poll(self) -> None:
        """From a task that drives the socket itself: read what is already waiting (without
        blocking), send what paho has queued, and let it keep the connection alive."""
        self._check(self._client.loop_misc())
        for count in range(1, 1_000_000):
            if not _readable(self._sock):
                break
            self._check(self._client.loop_read())
            if count % _DRAIN_BATCH == 0:
                await trio.lowlevel.checkpoint()
        await self.flush()

    async def receive(self) -> None:
        """Wait until the broker sends something, then read it."""
        await self._wait_for(trio.lowlevel.wait_readable)
        self._check(self._client.loop_read())

    async def flush(self) -> None:
        """Send everything paho has queued."""
        while self._client.want_write():
            await self._wait_for(trio.lowlevel.wait_writable)
            self._check(self._client.loop_write())

    async def _wait_for(self, ready: Callable[[Any], Awaitable[None]]) -> None:
        self._check()
        try:
            await ready(self._sock)
        except (trio.ClosedResourceError, OSError):
            self._lose("socket closed")
        # Lost while waiting (a callback, or the socket closed under us): say so.
        self._check()

    def _check(self, rc: int = _OK) -> None:
        if rc != _OK:
            self._lose(paho.error_string(rc))
        elif not self.lost.is_set() and self._client.socket() is None:
            self._lose("connection closed")
        if self.lost.is_set():
            raise MqttError(f"connection lost: {self.why}")

    def close(self) -> None:
        """Say goodbye if the socket is still there (one non-blocking write), then close it."""
        self._lose("closed")
        client = self._client
        client.on_socket_register_write = None
        client.on_socket_close = None
        if self._sock is not None and self._sock.fileno() >= 0:
            _notify_closing(self._sock)
        if client.socket() is not None:
            with contextlib.suppress(OSError):
                client.disconnect()  # no external-loop callback now: paho writes DISCONNECT
        if client.socket() is not None:
            client._sock_close()  # paho has no public "close now"; this is what disconnect uses


def _notify_closing(sock: Any) -> None:
    """Tell trio a socket is about to be closed, so a task parked on it wakes up."""
    with contextlib.suppress(RuntimeError):  # not in trio (a client garbage-collected late)
        trio.lowlevel.notify_closing(sock)


def _readable(sock: Any) -> bool:
    if sock is None or sock.fileno() < 0:
        return False
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class MqttClient:
    """One MQTT connection, kept up by ``run()`` for as long as that task lives.

    ``subscriptions`` are (re)made on every connect; ``on_message(Message)`` and
    ``on_connect()`` are called in the trio thread and must not block. ``publish`` never blocks
    either: it hands the packet to paho, whose bytes the session's writer sends.
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
        backoff: Backoff = BACKOFF,
        max_queued: int = MAX_QUEUED,
        mqtt5: bool = False,
        no_local: bool = False,
        name: str = "mqtt",
    ) -> None:
        host, port = parse_broker_url(url)
        self.settings = Settings(
            host,
            port,
            client_id or f"outpost-{uuid.uuid4().hex[:12]}",
            tuple(subscriptions),
            qos,
            keepalive,
            connect_timeout,
            mqtt5,
            no_local,
            max_queued,
        )
        self.url = url
        self.on_message = on_message
        self.on_connect = on_connect
        self.backoff = backoff
        self.name = name
        self.connects = 0  # successful connects so far (the first included)
        self._session: Session | None = None
        self._changed = trio.Event()  # set (and replaced) when a session is ready or over

    # -- what users call ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and subscribed: nothing published from now on is missed."""
        session = self._session
        return session is not None and session.ready and not session.lost.is_set()

    async def wait_connected(self) -> None:
        while not self.connected:
            await self._changed.wait()

    def publish(
        self, topic: str, payload: bytes | str, qos: int | None = None, retain: bool = False
    ) -> int | None:
        """Queue a publication; its message id, or None when not connected or ``max_queued``
        are waiting for their acknowledgement (nothing queued)."""
        session = self._session
        return None if session is None else session.publish(topic, payload, qos, retain)

    async def publish_confirmed(
        self, topic: str, payload: bytes | str, retain: bool = False
    ) -> bool:
        """Publish with QoS 1 and wait for the broker's PUBACK: True once it came, False if
        not connected or the connection was lost first. Bound it with a cancel scope."""
        (done,) = await self.publish_all([(topic, payload)], retain=retain)
        return done

    async def publish_all(
        self, messages: Sequence[tuple[str, bytes | str]], retain: bool = False
    ) -> list[bool]:
        """Publish each ``(topic, payload)`` with QoS 1, in order, and wait for the broker's
        PUBACKs; for each, whether it came. One that was refused (not connected, or
        ``max_queued`` waiting) or not acknowledged before the connection was lost is False.
        Bound it with a cancel scope."""
        session = self._session
        if session is None:
            return [False] * len(messages)
        mids = [session.publish(t, payload, 1, retain, confirm=True) for t, payload in messages]
        acked = await session.confirmed({mid for mid in mids if mid is not None})
        return [mid in acked for mid in mids]

    # -- the connection ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve the socket, and reconnect after every loss, forever. ``started`` is
        reported at once: callers do not wait for a broker that may be away."""
        task_status.started()
        retries = Retries(self.backoff)
        while True:
            session = self._session = Session(
                self.settings, on_message=self.on_message, on_ready=self._ready
            )
            try:
                await session.connect()
            except MqttError as exc:
                level = logging.WARNING if retries.failures == 0 else logging.DEBUG
                log.log(
                    level,
                    "mqtt connect failed",
                    extra={
                        "link": self.name,
                        "broker": self.url,
                        "error": str(exc),
                        "failures": retries.failures + 1,
                    },
                )
            else:
                retries.succeeded(trio.current_time())
                await session.serve()
                log.warning(
                    "mqtt connection lost",
                    extra={"link": self.name, "broker": self.url, "why": session.why},
                )
            finally:
                self._session = None
                session.close()
                self._flip()
            await trio.sleep(retries.failed(trio.current_time()))

    def _ready(self) -> None:
        self.connects += 1
        self._flip()
        log.info("mqtt connected", extra={"link": self.name, "broker": self.url})
        if self.on_connect is not None:
            self.on_connect()

    def _flip(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
