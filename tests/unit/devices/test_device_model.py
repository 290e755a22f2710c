"""parse_device: Device + DeviceModel bodies into the configuration the edge runs, and the
clear reasons for what it refuses."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from edge.devices.model import DeviceConfigError, parse_device


def thermostat_model() -> dict[str, Any]:
    return {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "DeviceModel",
        "metadata": {"name": "thermostat", "namespace": "plant"},
        "spec": {
            "protocol": "modbus",
            "properties": [
                {"name": "temperature", "type": "float", "accessMode": "ReadOnly", "unit": "C"},
                {
                    "name": "setpoint",
                    "type": "FLOAT",
                    "accessMode": "ReadWrite",
                    "minimum": "5",
                    "maximum": 30,
                },
                {"name": "label", "type": "string", "accessMode": "ReadOnly"},
                {"name": "heating", "type": "boolean", "accessMode": "ReadWrite"},
            ],
        },
    }


def thermostat(**protocol: Any) -> dict[str, Any]:
    return {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "Device",
        "metadata": {"name": "t1", "namespace": "plant", "uid": "u-1"},
        "spec": {
            "deviceModelRef": {"name": "thermostat"},
            "nodeName": "gw-17",
            "protocol": {
                "protocolName": "modbus-rtu",
                "configData": protocol or {"serialPort": "/dev/ttyUSB0", "slaveID": 3},
            },
            "properties": [
                {
                    "name": "temperature",
                    "collectCycle": 500_000_000,
                    "reportCycle": 2_000_000_000,
                    "deadband": 0.2,
                    "visitors": {
                        "protocolName": "modbus-rtu",
                        "configData": {
                            "register": "InputRegister",
                            "offset": 0,
                            "dataType": "int16",
                            "scale": 0.1,
                        },
                    },
                },
                {
                    "name": "setpoint",
                    "desired": {"value": "21.5"},
                    "visitors": {
                        "configData": {"register": "HoldingRegister", "offset": 10, "scale": 0.5}
                    },
                },
                {
                    "name": "label",
                    "reportToCloud": False,
                    "visitors": {
                        "configData": {"register": "HoldingRegister", "offset": 20, "limit": 4}
                    },
                },
                {"name": "heating", "visitors": {"configData": {"register": "CoilRegister"}}},
            ],
        },
    }


def test_a_thermostat_parses_with_defaults_filled_in() -> None:
    config = parse_device(thermostat(), thermostat_model())
    assert (config.namespace, config.name, config.uid, config.key) == (
        "plant",
        "t1",
        "u-1",
        "plant/Device/t1",
    )
    assert config.protocol == "modbus-rtu"
    assert config.protocol_config == {
        "serialPort": "/dev/ttyUSB0",
        "slaveID": 3,
        "baudRate": 9600,
        "dataBits": 8,
        "parity": "none",
        "stopBits": 1,
        "timeout": 0.5,
    }
    temperature, setpoint, label, heating = config.properties
    assert temperature.type == "FLOAT"
    assert temperature.access_mode == "ReadOnly"
    assert not temperature.writable
    assert (temperature.collect_s, temperature.report_s, temperature.deadband) == (0.5, 2.0, 0.2)
    assert temperature.unit == "C"
    assert temperature.visitor == {
        "register": "InputRegister",
        "offset": 0,
        "limit": 1,
        "dataType": "int16",
        "scale": 0.1,
        "add": 0.0,
        "isSwap": False,
        "isRegisterSwap": False,
    }
    assert temperature.desired is None
    assert setpoint.desired == "21.5"
    assert setpoint.writable
    assert (setpoint.minimum, setpoint.maximum) == (5.0, 30.0)
    assert setpoint.visitor["dataType"] == "float32"
    assert setpoint.visitor["limit"] == 2
    assert (setpoint.collect_s, setpoint.report_s) == (1.0, 1.0)
    assert label.visitor["dataType"] == "string"
    assert not label.report_to_cloud
    assert heating.visitor["dataType"] == "bool"
    assert heating.writable
    assert config.property("setpoint") is setpoint
    assert config.without_desired().property("setpoint").desired is None


def test_kubeedge_modbus_protocol_name_picks_rtu_or_tcp() -> None:
    device = thermostat()
    device["spec"]["protocol"] = {"protocolName": "modbus", "configData": {"ip": "10.0.0.5"}}
    config = parse_device(device, thermostat_model())
    assert config.protocol == "modbus-tcp"
    assert config.protocol_config == {"ip": "10.0.0.5", "port": 502, "slaveID": 1, "timeout": 0.5}


def error(device: dict[str, Any], model: dict[str, Any] | None = None) -> DeviceConfigError:
    with pytest.raises(DeviceConfigError) as info:
        parse_device(device, thermostat_model() if model is None else model)
    return info.value


def test_a_missing_model_says_which() -> None:
    with pytest.raises(DeviceConfigError) as info:
        parse_device(thermostat(), None)
    assert info.value.reason == "ModelNotFound"
    assert "plant/thermostat" in info.value.message
    device = thermostat()
    del device["spec"]["deviceModelRef"]
    assert error(device).reason == "ModelNotFound"


def with_visitor(name: str, **config: Any) -> dict[str, Any]:
    device = thermostat()
    for prop in device["spec"]["properties"]:
        if prop["name"] == name:
            prop["visitors"]["configData"] = config
    return device


@pytest.mark.parametrize(
    ("name", "visitor", "reason"),
    [
        ("temperature", {"register": "InputRegister", "offset": 70000}, "InvalidAddress"),
        ("temperature", {"register": "InputRegister", "offset": -1}, "InvalidAddress"),
        ("temperature", {"register": "InputRegister", "offset": 1.5}, "InvalidAddress"),
        ("temperature", {"register": "Nope", "offset": 1}, "InvalidAddress"),
        ("setpoint", {"register": "HoldingRegister", "offset": 65535}, "InvalidAddress"),
        ("temperature", {"register": "InputRegister", "dataType": "int8"}, "WrongType"),
        ("label", {"register": "HoldingRegister", "dataType": "int16"}, "WrongType"),
        ("label", {"register": "HoldingRegister"}, "InvalidProperty"),
        ("temperature", {"register": "CoilRegister"}, "WrongType"),
        ("temperature", {"register": "InputRegister", "scale": 0}, "InvalidProperty"),
        ("temperature", {"register": "InputRegister", "scale": "x"}, "InvalidProperty"),
        ("temperature", {"register": "InputRegister", "limit": 3}, "InvalidProperty"),
        ("heating", {"register": "CoilRegister", "limit": 2}, "InvalidProperty"),
        ("temperature", {"register": "InputRegister", "isSwap": "maybe"}, "InvalidProperty"),
    ],
)
def test_bad_visitors_get_a_reason_naming_the_property(
    name: str, visitor: dict[str, Any], reason: str
) -> None:
    exc = error(with_visitor(name, **visitor))
    assert (exc.reason, exc.property) == (reason, name)
    assert name in exc.message


def test_register_aliases_and_word_sized_int() -> None:
    model = thermostat_model()
    model["spec"]["properties"].append({"name": "count", "type": "int"})
    device = thermostat()
    device["spec"]["properties"].append(
        {"name": "count", "visitors": {"configData": {"register": "holding", "limit": 2}}}
    )
    prop = parse_device(device, model).property("count")
    assert (prop.visitor["register"], prop.visitor["dataType"]) == ("HoldingRegister", "int32")


@pytest.mark.parametrize(
    ("type_", "limit", "data_type"),
    [("float", 1, "int16"), ("float", 2, "float32"), ("double", 4, "float64"),
     ("double", None, "float64"), ("float", None, "float32"), ("int", None, "int16")],
)  # fmt: skip
def test_kubeedge_visitors_without_a_data_type(
    type_: str, limit: int | None, data_type: str
) -> None:
    model = thermostat_model()
    model["spec"]["properties"].append({"name": "x", "type": type_})
    device = thermostat()
    visitor: dict[str, Any] = {"register": "HoldingRegister", "offset": 100, "scale": 0.1}
    if limit is not None:
        visitor["limit"] = limit
    device["spec"]["properties"].append({"name": "x", "visitors": {"configData": visitor}})
    assert parse_device(device, model).property("x").visitor["dataType"] == data_type


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d["spec"]["protocol"].update(protocolName="zigbee"), "UnsupportedProtocol"),
        (lambda d: d["spec"]["protocol"].update(protocolName=""), "UnsupportedProtocol"),
        (lambda d: d["spec"]["protocol"]["configData"].update(slaveID=0), "InvalidAddress"),
        (lambda d: d["spec"]["protocol"]["configData"].update(slaveID=248), "InvalidAddress"),
        (lambda d: d["spec"]["protocol"]["configData"].pop("serialPort"), "InvalidAddress"),
        (
            lambda d: d["spec"]["protocol"]["configData"].update(parity="mark"),
            "InvalidProtocolConfig",
        ),
        (lambda d: d["spec"]["protocol"]["configData"].update(timeout=0), "InvalidProtocolConfig"),
        (lambda d: d["spec"]["properties"].append({"name": "humidity"}), "InvalidProperty"),
        (lambda d: d["spec"]["properties"].append(d["spec"]["properties"][0]), "InvalidProperty"),
        (lambda d: d["spec"]["properties"][0].update(collectCycle=-1), "InvalidProperty"),
        (lambda d: d["spec"]["properties"][0].update(deadband=-1), "InvalidProperty"),
        (lambda d: d["spec"]["properties"][0].pop("visitors"), "InvalidProperty"),
    ],
)
def test_bad_devices(change: Any, reason: str) -> None:
    device = thermostat()
    change(device)
    assert error(device).reason == reason


def test_bad_models() -> None:
    model = thermostat_model()
    model["spec"]["properties"][0]["type"] = "complex"
    assert error(thermostat(), model).reason == "WrongType"
    model = thermostat_model()
    model["spec"]["protocol"] = "ble"
    assert error(thermostat(), model).reason == "UnsupportedProtocol"
    model = thermostat_model()
    model["spec"]["properties"][1]["minimum"] = 40
    assert error(thermostat(), model).reason == "InvalidProperty"
    model = thermostat_model()
    model["spec"]["properties"][1]["accessMode"] = "WriteOnly"
    assert error(thermostat(), model).reason == "InvalidProperty"


def test_cycles_are_nanoseconds_with_a_floor() -> None:
    device = thermostat()
    device["spec"]["properties"][0]["collectCycle"] = 1000  # 1 µs: too fast for any bus
    prop = parse_device(device, thermostat_model()).properties[0]
    assert prop.collect_s == 0.01


def test_ble_and_mqtt_devices() -> None:
    model = {
        "metadata": {"name": "m"},
        "spec": {
            "properties": [
                {"name": "t", "type": "float"},
                {"name": "name", "type": "string"},
            ]
        },
    }
    ble = {
        "metadata": {"name": "b", "namespace": "x"},
        "spec": {
            "deviceModelRef": {"name": "m"},
            "protocol": {"protocolName": "ble", "configData": {"macAddress": "aa:bb:cc:dd:ee:ff"}},
            "properties": [
                {
                    "name": "t",
                    "visitors": {
                        "configData": {
                            "characteristicUUID": "2A6E",
                            "dataFormat": "<h",
                            "scale": 0.01,
                            "notify": True,
                        }
                    },
                },
                {
                    "name": "name",
                    "visitors": {
                        "configData": {"characteristicUUID": "00002a00-0000-1000-8000-00805f9b34fb"}
                    },
                },
            ],
        },
    }
    config = parse_device(ble, model)
    assert config.protocol_config["macAddress"] == "AA:BB:CC:DD:EE:FF"
    assert config.properties[0].visitor == {
        "characteristicUUID": "2a6e",
        "dataFormat": "<h",
        "scale": 0.01,
        "add": 0.0,
        "notify": True,
    }
    assert config.properties[1].visitor["dataFormat"] == "utf8"
    bad = copy.deepcopy(ble)
    bad["spec"]["properties"][0]["visitors"]["configData"]["characteristicUUID"] = "xyz"
    assert error(bad, model).reason == "InvalidAddress"
    bad = copy.deepcopy(ble)
    bad["spec"]["properties"][0]["visitors"]["configData"]["dataFormat"] = "<Z"
    assert error(bad, model).reason == "InvalidProperty"
    bad = copy.deepcopy(ble)
    bad["spec"]["protocol"]["configData"]["macAddress"] = "nope"
    assert error(bad, model).reason == "InvalidAddress"

    mqtt = {
        "metadata": {"name": "q"},
        "spec": {
            "deviceModelRef": {"name": "m"},
            "protocol": {
                "protocolName": "mqtt",
                "configData": {"broker": "mqtt://127.0.0.1:18830"},
            },
            "properties": [
                {
                    "name": "t",
                    "visitors": {"configData": {"topic": "plant/t", "jsonPath": "$.a.b[0]"}},
                }
            ],
        },
    }
    config = parse_device(mqtt, model)
    assert config.namespace == "default"
    assert config.protocol_config["host"] == "127.0.0.1"
    assert config.protocol_config["port"] == 18830
    assert config.properties[0].visitor["writeTopic"] == ""
    bad = copy.deepcopy(mqtt)
    bad["spec"]["properties"][0]["visitors"]["configData"]["topic"] = "plant/#"
    assert error(bad, model).reason == "InvalidAddress"
    bad = copy.deepcopy(mqtt)
    bad["spec"]["properties"][0]["visitors"]["configData"]["jsonPath"] = "a.b"
    assert error(bad, model).reason == "InvalidProperty"
    bad = copy.deepcopy(mqtt)
    bad["spec"]["protocol"]["configData"]["broker"] = "http://x"
    assert error(bad, model).reason == "InvalidAddress"
