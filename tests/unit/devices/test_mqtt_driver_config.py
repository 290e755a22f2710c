"""The MQTT driver's configuration (no broker needed): broker URLs, the topics it subscribes,
its keepalive against the collect cycles, and the registry's entry point."""

from __future__ import annotations

import pytest

from edge.devices import drivers
from edge.devices.drivers import Buses
from edge.devices.drivers.base import DriverError
from edge.devices.drivers.mqtt import MqttDriver
from edge.devices.model import DeviceConfig, parse_device
from edge.mqtt import parse_broker_url

MODEL = {
    "metadata": {"name": "m", "namespace": "default"},
    "spec": {
        "protocol": "mqtt",
        "properties": [
            {"name": "a", "type": "int"},
            {"name": "b", "type": "float"},
            {"name": "c", "type": "int"},
        ],
    },
}


def config(collect_ns: int = 1_000_000_000, client_id: str = "") -> DeviceConfig:
    visitors = {
        "a": {"topic": "x/1", "jsonPath": "$.a"},
        "b": {"topic": "x/1", "jsonPath": "$.b"},
        "c": {"topic": "x/2", "writeTopic": "x/2/set"},
    }
    body = {
        "metadata": {"name": "d", "namespace": "ns", "uid": "u"},
        "spec": {
            "deviceModelRef": {"name": "m"},
            "protocol": {
                "protocolName": "mqtt",
                "configData": {"broker": "mqtt://10.0.0.5:1884", "clientID": client_id},
            },
            "properties": [
                {"name": n, "visitors": {"configData": v}, "collectCycle": collect_ns}
                for n, v in visitors.items()
            ],
        },
    }
    return parse_device(body, MODEL)


def test_parse_broker_url() -> None:
    assert parse_broker_url("mqtt://127.0.0.1:1883") == ("127.0.0.1", 1883)
    assert parse_broker_url("tcp://broker.local") == ("broker.local", 1883)
    with pytest.raises(ValueError, match="mqtt://"):
        parse_broker_url("http://x:80")


def test_driver_subscribes_each_topic_once() -> None:
    driver = MqttDriver(config())
    assert driver.topics == ["x/1", "x/2"]
    assert (driver.host, driver.port) == ("10.0.0.5", 1884)
    assert driver.client_id.startswith("outpost-ns-d-")
    assert MqttDriver(config(client_id="meter-7")).client_id == "meter-7"


def test_keepalive_outlasts_the_longest_collect_cycle() -> None:
    # The driver has no task of its own: it pings from read(), so the keepalive must be longer
    # than the time between two reads.
    assert MqttDriver(config(1_000_000_000)).keepalive == 30
    assert MqttDriver(config(120 * 1_000_000_000)).keepalive == 245


async def test_registry_opens_mqtt_devices_without_a_broker() -> None:
    driver = await drivers.open_driver(config(), Buses())
    assert isinstance(driver, MqttDriver)
    await driver.aclose()
    with pytest.raises(DriverError) as err:
        await driver.read(config().property("a"))
    assert err.value.reason == "Disconnected"
