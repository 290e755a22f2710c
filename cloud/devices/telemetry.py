"""Where device telemetry goes: an MQTT broker, or nowhere (counted).

Telemetry is the high-rate history of readings (``Op.TELEMETRY``, one report per reading that
passed its deadband); it never goes to the Kubernetes API. With ``--telemetry-mqtt
mqtt://host:port`` each reading is published with QoS 1 to
``outpost/telemetry/<node>/<namespace>/<device>`` as JSON ``{"node", "namespace", "device",
"uid", "property", "value", "time"}`` (``time`` in unix milliseconds, as the edge read it).
Without it readings are counted and dropped.

A batch of readings is acknowledged to the edge once the broker has acknowledged them (PUBACK),
or, if the connection drops while they are in flight, once paho holds them to resend after it
reconnects (bounded by ``max_queued``). While the broker is unreachable nothing is published
and ``publish`` waits, so the reports stay unacknowledged in the edge's outbox, which drops
telemetry first when over its budget: backpressure ends at the edge, within its disk budget.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio

log = logging.getLogger("cloud.devices.telemetry")

TOPIC_PREFIX = "outpost/telemetry"


@dataclass(frozen=True)
class Reading:
    node: str
    namespace: str
    device: str
    body: dict[str, Any]

    @property
    def topic(self) -> str:
        return f"{TOPIC_PREFIX}/{self.node}/{self.namespace}/{self.device}"

    def payload(self) -> bytes:
        body = self.body
        return json.dumps(
            {
                "node": self.node,
                "namespace": self.namespace,
                "device": self.device,
                "uid": body.get("uid"),
                "property": body.get("property"),
                "value": body.get("value"),
                "time": body.get("time"),
            },
            separators=(",", ":"),
            default=str,
        ).encode()


class TelemetrySink(Protocol):
    published: int
    dropped: int

    async def publish(self, readings: Sequence[Reading]) -> None: ...

    async def run(self) -> None: ...


class DropTelemetry:
    """No sink configured: readings are counted and dropped."""

    def __init__(self) -> None:
        self.published = 0
        self.dropped = 0

    async def publish(self, readings: Sequence[Reading]) -> None:
        self.dropped += len(readings)

    async def run(self) -> None:
        await trio.sleep_forever()


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` -> (host, port); ValueError with a readable reason otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError(f"{url!r} is not mqtt://HOST[:PORT]")
    try:
        port = parts.port or 1883
    except ValueError as exc:
        raise ValueError(f"{url!r} has an invalid port") from exc
    return parts.hostname, port


class MqttTelemetry:
    """Publishes readings to an MQTT broker with paho-mqtt.

    paho is a blocking library. Its network loop runs in the thread paho itself starts
    (``loop_start``): it owns the socket, reconnects with backoff, and touches nothing of ours
    but a ``threading.Event`` (connected or not). Our calls into paho (publish, which takes
    its locks, and the wait for the broker's acknowledgements) run in ``trio.to_thread`` with
    a limiter of one — one worker for the one connection, as a serial bus has one — so the trio
    loop never blocks, and a cancelled wait only abandons a thread that returns within its
    timeout.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str = "",
        max_queued: int = 10_000,
        ack_timeout_s: float = 10.0,
    ) -> None:
        import paho.mqtt.client as mqtt

        self.host, self.port = parse_mqtt_url(url)
        self.url = url
        self.published = 0
        self.dropped = 0
        self.ack_timeout_s = ack_timeout_s
        self._connected = threading.Event()
        self._limiter = trio.CapacityLimiter(1)
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
        )
        self._client.max_queued_messages_set(max_queued)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

    # Called in paho's thread.
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def run(self) -> None:
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()
        log.info("telemetry to MQTT", extra={"broker": self.url})
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await trio.to_thread.run_sync(self._stop, abandon_on_cancel=True)

    def _stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    async def publish(self, readings: Sequence[Reading]) -> None:
        if not readings:
            return
        waited = False
        while not self._connected.is_set():
            if not waited:
                log.warning("MQTT broker unreachable, telemetry waits", extra={"broker": self.url})
                waited = True
            await trio.sleep(0.2)
        lost = await trio.to_thread.run_sync(
            self._publish, readings, limiter=self._limiter, abandon_on_cancel=True
        )
        self.published += len(readings) - lost
        self.dropped += lost
        if lost:
            log.warning("telemetry lost: paho's queue is full", extra={"readings": lost})

    def _publish(self, readings: Sequence[Reading]) -> int:
        """Publish and wait for the broker's acknowledgements; returns how many were lost."""
        import paho.mqtt.client as mqtt

        infos = [self._client.publish(r.topic, r.payload(), qos=1) for r in readings]
        end = time.monotonic() + self.ack_timeout_s
        lost = 0
        for info in infos:
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                lost += 1
            elif info.rc == mqtt.MQTT_ERR_SUCCESS:
                # RuntimeError: disconnected meanwhile; paho sends it again once reconnected.
                with contextlib.suppress(RuntimeError):
                    info.wait_for_publish(timeout=max(0.0, end - time.monotonic()))
            # else not connected just now: paho holds it and sends it once reconnected
        return lost
