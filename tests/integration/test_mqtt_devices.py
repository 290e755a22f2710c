"""MQTT devices against a real mosquitto: the driver reads the latest message of a topic at a
JSON path, writes publish, a broker that goes away and comes back is reconnected to; and the
trio-driven ``MqttClient`` the eventbus uses keeps its subscriptions across a broker restart."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from edge.backoff import Backoff
from edge.devices.drivers.base import DriverError
from edge.devices.drivers.mqtt import open_mqtt
from edge.devices.model import DeviceConfig, parse_device
from edge.mqtt import Message, MqttClient
from tests import mqttkit
from tests.mqttkit import Mosquitto, TestClient
from tests.waiting import eventually

mosquitto = mqttkit.mosquitto  # the fixture

MODEL = {
    "metadata": {"name": "meter", "namespace": "default"},
    "spec": {
        "protocol": "mqtt",
        "properties": [
            {"name": "temperature", "type": "float", "accessMode": "ReadOnly"},
            {"name": "setpoint", "type": "int", "accessMode": "ReadWrite"},
            {"name": "label", "type": "string", "accessMode": "ReadWrite"},
        ],
    },
}


def device(broker: Mosquitto, **visitors: dict[str, Any]) -> DeviceConfig:
    defaults = {
        "temperature": {"topic": "plant/meter1/state", "jsonPath": "$.sensors.temp"},
        "setpoint": {"topic": "plant/meter1/state", "jsonPath": "$.setpoint",
                     "writeTopic": "plant/meter1/set"},
        "label": {"topic": "plant/meter1/label"},
    }  # fmt: skip
    defaults.update(visitors)
    body = {
        "metadata": {"name": "meter1", "namespace": "default", "uid": "u-1"},
        "spec": {
            "deviceModelRef": {"name": "meter"},
            "protocol": {"protocolName": "mqtt", "configData": {"broker": broker.url,
                                                                "timeout": 1}},
            "properties": [
                {"name": name, "visitors": {"protocolName": "mqtt", "configData": cfg},
                 "collectCycle": 100_000_000}
                for name, cfg in defaults.items()
            ],
        },
    }  # fmt: skip
    return parse_device(body, MODEL)


async def test_reads_latest_message_at_json_path(mosquitto: Mosquitto) -> None:
    config = device(mosquitto)
    driver = await open_mqtt(config)
    with TestClient(mosquitto) as app:
        app.publish("plant/meter1/state", {"sensors": {"temp": 21.5}, "setpoint": 20}, retain=True)
        # A retained message is there the moment the driver subscribes.
        assert await driver.read(config.property("temperature")) == 21.5
        assert await driver.read(config.property("setpoint")) == 20
        # The broker hands each message to its subscribers in turn, the driver (subscribed
        # first) before this client: once this client has the last reading, so has the driver.
        await app.subscribe("plant/meter1/state")
        for temp in (22.0, 22.5, 23.0):
            app.publish("plant/meter1/state", {"sensors": {"temp": temp}, "setpoint": 20})
        while (await app.expect_json("plant/meter1/state"))["sensors"]["temp"] != 23.0:
            pass
        # Only the latest counts; the ones before it are not queued up.
        assert await driver.read(config.property("temperature")) == 23.0
        # A topic never heard from is waited for by read() itself.
        app.publish("plant/meter1/label", "boiler room")
        assert await driver.read(config.property("label")) == "boiler room"
    await driver.aclose()


async def test_nothing_published_is_a_timeout(mosquitto: Mosquitto) -> None:
    config = device(mosquitto)
    driver = await open_mqtt(config)
    with trio.fail_after(5), pytest.raises(DriverError) as err:
        await driver.read(config.property("temperature"))
    assert err.value.reason == "Timeout"
    assert "plant/meter1/state" in err.value.message
    await driver.aclose()


async def test_payload_of_wrong_shape_is_wrong_type(mosquitto: Mosquitto) -> None:
    config = device(mosquitto)
    driver = await open_mqtt(config)
    with TestClient(mosquitto) as app:
        app.publish("plant/meter1/state", {"sensors": {"temp": "hot"}}, retain=True)
        with pytest.raises(DriverError) as err:
            await driver.read(config.property("temperature"))
        assert err.value.reason == "WrongType"
        with pytest.raises(DriverError) as err:
            await driver.read(config.property("setpoint"))  # $.setpoint is missing
        assert err.value.reason == "WrongType"
    await driver.aclose()


async def test_write_publishes_to_write_topic(mosquitto: Mosquitto) -> None:
    config = device(mosquitto)
    driver = await open_mqtt(config)
    with TestClient(mosquitto) as app:
        await app.subscribe("plant/meter1/#")
        await driver.write(config.property("setpoint"), 25)
        msg = await app.expect("plant/meter1/set")
        assert json.loads(msg.payload) == {"setpoint": 25}
        # Without writeTopic a write goes to the topic itself, and reads back.
        await driver.write(config.property("label"), "attic")
        msg = await app.expect("plant/meter1/label")
        assert json.loads(msg.payload) == "attic"
        assert await driver.read(config.property("label")) == "attic"
    await driver.aclose()


async def test_broker_away_is_disconnected_then_reconnects(mosquitto: Mosquitto) -> None:
    config = device(mosquitto)
    driver = await open_mqtt(config)
    with TestClient(mosquitto) as app:
        app.publish("plant/meter1/state", {"sensors": {"temp": 19.0}, "setpoint": 18}, retain=True)
    assert await driver.read(config.property("temperature")) == 19.0
    mosquitto.stop()
    with trio.fail_after(5), pytest.raises(DriverError) as err:
        await driver.read(config.property("temperature"))
    assert err.value.reason == "Disconnected"
    with trio.fail_after(5), pytest.raises(DriverError) as err:
        await driver.read(config.property("temperature"))
    assert err.value.reason == "Disconnected"  # refused while the broker is away
    mosquitto.start()
    with TestClient(mosquitto) as app:
        app.publish("plant/meter1/state", {"sensors": {"temp": 20.5}, "setpoint": 18}, retain=True)
    assert await driver.read(config.property("temperature")) == 20.5
    assert driver.connects == 2
    await driver.aclose()


async def test_link_resubscribes_after_broker_restart(mosquitto: Mosquitto) -> None:
    received: list[Message] = []
    link = MqttClient(mosquitto.url, subscriptions=["a/#"], on_message=received.append,
                      backoff=Backoff(0.05, 0.2), mqtt5=True, no_local=True)  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.fail_after(5):
            await link.wait_connected()
        with TestClient(mosquitto) as app:
            await app.subscribe("b/#")
            app.publish("a/1", "one")
            # Our own publications are not echoed back (MQTT 5 no-local)...
            with trio.fail_after(5):
                assert await link.publish_confirmed("a/2", b"mine")
            assert link.publish("b/x", b"hello") is not None
            assert (await app.expect("b/x")).payload == b"hello"
        await eventually(lambda: received, "the message on a/1 arrives", within=5)
        assert [(m.topic, m.payload) for m in received] == [("a/1", b"one")]

        mosquitto.stop()
        await eventually(lambda: not link.connected, "the link sees the broker go", within=5)
        assert link.publish("b/x", b"lost") is None  # not queued while away
        mosquitto.start()
        with trio.fail_after(10):
            await link.wait_connected()
        with TestClient(mosquitto) as app:
            app.publish("a/3", "three")
            await eventually(lambda: len(received) >= 2, "the message on a/3 arrives", within=5)
        assert received[-1].payload == b"three"
        assert link.connects == 2
        nursery.cancel_scope.cancel()
