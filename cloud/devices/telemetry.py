"""Where device telemetry goes: an MQTT broker, or nowhere (counted).

Telemetry is the high-rate history of readings (``Op.TELEMETRY``, one report per reading that
passed its deadband); it never goes to the Kubernetes API. With ``--telemetry-mqtt
mqtt://host:port`` each reading is published with QoS 1 to
``outpost/telemetry/<node>/<namespace>/<device>`` as JSON ``{"node", "namespace", "device",
"uid", "property", "value", "time"}`` (``time`` in unix milliseconds, as the edge read it).
Without it readings are counted and dropped.

A batch of readings is acknowledged to the edge once the broker has acknowledged them (PUBACK);
if the connection drops while they are in flight, those not acknowledged are published again
after the reconnect. While the broker is unreachable nothing is published and ``publish``
waits, so the reports stay unacknowledged in the edge's outbox, which drops telemetry first when
over its budget: backpressure ends at the edge, within its disk budget. Readings beyond
``max_queued`` waiting for the broker's acknowledgement are dropped (and counted).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from edge.backoff import Backoff
from edge.mqtt import MqttClient

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


class MqttTelemetry:
    """Publishes readings to an MQTT broker with the edge's MQTT client (``edge.mqtt``: paho
    driven from trio, no thread of paho's), reconnecting with backoff from 1 s up to 30 s."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str = "",
        max_queued: int = 10_000,
        ack_timeout_s: float = 10.0,
    ) -> None:
        self.url = url
        self.published = 0
        self.dropped = 0
        self.ack_timeout_s = ack_timeout_s
        self.client = MqttClient(
            url,
            client_id=client_id,
            max_queued=max_queued,
            backoff=Backoff(base_s=1.0, cap_s=30.0),
            name="telemetry",
        )

    @property
    def connected(self) -> bool:
        return self.client.connected

    async def run(self) -> None:
        log.info("telemetry to MQTT", extra={"broker": self.url})
        await self.client.run()

    async def publish(self, readings: Sequence[Reading]) -> None:
        pending = list(readings)
        waited = False
        while pending:
            if not self.client.connected:
                if not waited:
                    log.warning(
                        "MQTT broker unreachable, telemetry waits", extra={"broker": self.url}
                    )
                    waited = True
                await self.client.wait_connected()
            # Each try publishes in order; what a lost connection left unacknowledged goes again
            # on the next one (at least once), what has not been acknowledged in time counts as
            # sent (the connection still holds it).
            done = [True] * len(pending)
            with trio.move_on_after(self.ack_timeout_s):
                done = await self.client.publish_all([(r.topic, r.payload()) for r in pending])
            if self.client.connected:
                lost = done.count(False)
                self.published += len(pending) - lost
                self.dropped += lost
                if lost:
                    log.warning("telemetry lost: the queue is full", extra={"readings": lost})
                return
            self.published += done.count(True)
            pending = [r for r, ok in zip(pending, done, strict=True) if not ok]
