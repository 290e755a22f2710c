"""MQTT: devices whose properties are topics (``protocolName: mqtt``).

Each property names a ``topic`` and a ``jsonPath`` into the JSON payload; the latest message on a
topic is the property's current value (retained messages give a value straight after
subscribing). A write publishes the value (QoS 1, waiting for the broker's PUBACK) to
``writeTopic``, or to ``topic`` when there is none: as the bare value when ``jsonPath`` is ``$``,
else as the JSON object the path describes (``$.a.b`` -> ``{"a": {"b": value}}``).

The connection is an ``edge.mqtt.Session``, the one MQTT client of the edge, driven from the
driver's own calls (see below).

What callers may rely on: ``read`` raises ``DriverError("Disconnected")`` while the broker is
away and ``DriverError("Timeout")`` when nothing has been published on the topic yet (after
waiting up to the device's ``timeout``); a value that does not fit the property's type raises
``DriverError("WrongType")``. Messages are never queued: only the latest per topic is kept, and
only from the current connection (after a reconnect a topic has no value until a message comes;
retained messages come at once).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from edge.devices.drivers.base import (
    DISCONNECTED,
    TIMEOUT,
    UNSUPPORTED,
    WRONG_TYPE,
    DriverError,
)
from edge.devices.model import DeviceConfig, PropertyConfig
from edge.devices.values import decode_json, encode_json
from edge.mqtt import Message, MqttError, Session, Settings

log = logging.getLogger("edge.devices.mqtt")


# The driver pulls: it has no task of its own (the device manager calls read and write from the
# device's task, one at a time). Each call first drains what the broker sent since the last one,
# keeping only the latest message per topic, and lets paho send its keepalive; the keepalive is
# set above the longest collect cycle so that a connection between two reads stays up. A lost
# connection is made again by the next call; until it is, calls raise Disconnected, which the
# device twin counts toward "offline" and backs off from (the twin's backoff is the driver's).


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
        self._settings = Settings(
            self.host,
            self.port,
            self.client_id,
            tuple(self.topics),
            qos=0,
            keepalive=self.keepalive,
            timeout_s=self.timeout,
        )
        self.latest: dict[str, Message] = {}
        self.messages = 0  # received since opened
        self.connects = 0
        self._session: Session | None = None
        self._closed = False

    # -- Driver ------------------------------------------------------------------------------

    async def read(self, prop: PropertyConfig) -> Any:
        topic = str(prop.visitor["topic"])
        session = await self._connected()
        await self._io(session.poll)
        if topic not in self.latest:
            with trio.move_on_after(self.timeout):
                await self._io(session.run_until, lambda: topic in self.latest)
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
        session = await self._connected()
        await self._io(session.poll)
        mid = session.publish(topic, payload, qos=1, confirm=True)
        if mid is None:
            self._lost("publish refused")
            raise DriverError(DISCONNECTED, f"{self.url}: publish failed")
        acked = False
        with trio.move_on_after(self.timeout):
            await self._io(session.run_until, lambda: session.acknowledged(mid))
            acked = True
        if not acked:
            session.forget([mid])
            raise DriverError(TIMEOUT, f"{self.url}: no PUBACK for {topic} in {self.timeout:g}s")

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            session.close()

    # -- the connection ------------------------------------------------------------------------

    async def _connected(self) -> Session:
        if self._closed:
            raise DriverError(DISCONNECTED, "the driver is closed")
        if self._session is not None:
            return self._session
        # Messages from an earlier connection are not current: retained ones come again now.
        self.latest.clear()
        session = Session(self._settings, on_message=self._on_message)
        try:
            await session.connect()
        except MqttError as exc:
            session.close()
            raise DriverError(DISCONNECTED, f"{self.url}: {exc}") from None
        self._session = session
        self.connects += 1
        log.info("mqtt device connected", extra={"device": self._device_key, "broker": self.url,
                                                 "topics": len(self.topics)})  # fmt: skip
        return session

    def _on_message(self, message: Message) -> None:
        self.messages += 1
        self.latest[message.topic] = message

    async def _io(self, step: Callable[..., Awaitable[None]], *args: Any) -> None:
        """``step(*args)`` on the session; a lost connection is Disconnected."""
        try:
            await step(*args)
        except MqttError as exc:
            self._lost(str(exc))
            raise DriverError(DISCONNECTED, f"{self.url}: connection lost") from None

    def _lost(self, why: str) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        session.close()
        log.warning("mqtt device connection lost",
                    extra={"device": self._device_key, "broker": self.url, "why": why})  # fmt: skip


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
