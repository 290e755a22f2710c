"""The CRD definitions (names, printer columns, KubeEdge's fields) and the telemetry shapes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cloud.cli import cli
from cloud.devices import crds
from cloud.devices.telemetry import Reading
from edge.mqtt import parse_broker_url


def by_kind() -> dict[str, dict]:
    return {crd["spec"]["names"]["kind"]: crd for crd in crds.definitions()}


def test_three_namespaced_v1beta1_kinds_under_outposts_group() -> None:
    defs = by_kind()
    assert set(defs) == {"Device", "DeviceModel", "DeviceStatus"}
    for kind, crd in defs.items():
        assert crd["spec"]["group"] == "devices.outpost.io"
        assert crd["spec"]["scope"] == "Namespaced"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.devices.outpost.io"
        assert [v["name"] for v in crd["spec"]["versions"]] == ["v1beta1"], kind
        assert crd["metadata"]["annotations"][crds.HASH_ANNOTATION]
    columns = {
        kind: [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
        for kind, crd in defs.items()
    }
    assert "Node" in columns["Device"]
    assert "State" in columns["DeviceStatus"]
    assert "status" in defs["DeviceStatus"]["spec"]["versions"][0]["subresources"]


def test_the_schemas_carry_kubeedges_field_names() -> None:
    defs = by_kind()

    def props(kind: str, *path: str) -> dict:
        node = defs[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for part in path:
            node = node["properties"][part]
            if node.get("type") == "array":
                node = node["items"]
        return node["properties"]

    assert {"deviceModelRef", "nodeName", "protocol", "properties", "methods"} <= set(
        props("Device", "spec")
    )
    assert {
        "name", "desired", "visitors", "collectCycle", "reportCycle", "reportToCloud",
        "pushMethod", "deadband",
    } <= set(props("Device", "spec", "properties"))  # fmt: skip
    assert {"protocolName", "configData"} <= set(props("Device", "spec", "protocol"))
    assert {"name", "type", "accessMode", "minimum", "maximum", "unit"} <= set(
        props("DeviceModel", "spec", "properties")
    )
    assert {"twins", "state", "lastOnlineTime", "reasons"} <= set(props("DeviceStatus", "status"))
    assert {"propertyName", "reported", "observedDesired"} <= set(
        props("DeviceStatus", "status", "twins")
    )


def test_the_hash_changes_with_the_definition_only() -> None:
    first = [c["metadata"]["annotations"][crds.HASH_ANNOTATION] for c in crds.definitions()]
    again = [c["metadata"]["annotations"][crds.HASH_ANNOTATION] for c in crds.definitions()]
    assert first == again
    assert len(set(first)) == 3


def test_install_crds_print_is_the_yaml() -> None:
    result = CliRunner().invoke(cli, ["install-crds", "--print"])
    assert result.exit_code == 0, result.output
    assert result.output.count("kind: CustomResourceDefinition") == 3


def test_telemetry_mqtt_must_be_an_mqtt_url() -> None:
    result = CliRunner().invoke(cli, ["serve", "--telemetry-mqtt", "http://x"])
    assert result.exit_code == 2
    assert "mqtt://" in result.output
    assert parse_broker_url("mqtt://broker") == ("broker", 1883)
    assert parse_broker_url("mqtt://127.0.0.1:18830") == ("127.0.0.1", 18830)
    for bad in ("broker:1883", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ValueError, match=r"mqtt:|port"):
            parse_broker_url(bad)


def test_a_reading_names_its_node_namespace_and_device() -> None:
    reading = Reading("gw-1", "plant", "thermo", {"uid": "u", "property": "t", "value": 21.5,
                                                  "time": 1700000000000, "extra": 1})  # fmt: skip
    assert reading.topic == "outpost/telemetry/gw-1/plant/thermo"
    assert json.loads(reading.payload()) == {
        "node": "gw-1", "namespace": "plant", "device": "thermo", "uid": "u",
        "property": "t", "value": 21.5, "time": 1700000000000,
    }  # fmt: skip
