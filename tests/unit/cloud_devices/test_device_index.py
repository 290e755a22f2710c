"""Devices in the edge index: a node holds the Devices bound to it and the DeviceModels they
refer to (only while one of its devices does), models before devices; a device moved to another
node leaves the first; a device whose model is missing still goes to its node."""

from __future__ import annotations

from typing import Any

from cloud.devices import API_VERSION
from cloud.hub.streams import SourceObject
from cloud.mirror.edge_index import EdgeIndex

NS = "ns"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.held: dict[str, dict[str, SourceObject]] = {}

    def __call__(self, node: str, obj: SourceObject, deleted: bool) -> None:
        self.calls.append((node, obj.key, deleted))
        if deleted:
            self.held.get(node, {}).pop(obj.uid, None)
        else:
            self.held.setdefault(node, {})[obj.uid] = obj

    def keys(self, node: str) -> set[str]:
        return {obj.key for obj in self.held.get(node, {}).values()}

    def take(self) -> list[tuple[str, str, bool]]:
        calls, self.calls = self.calls, []
        return calls


def device(name: str, node: str, model: str = "thermo", rv: str = "1", **spec: Any) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "Device",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"nodeName": node, "deviceModelRef": {"name": model}, **spec},
        "status": {"twins": []},
    }


def model(name: str, rv: str = "1") -> dict:
    return {
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-m-{name}", "resourceVersion": rv},
        "spec": {"protocol": "modbus-rtu", "properties": [{"name": "t", "type": "FLOAT"}]},
    }


def test_a_node_gets_its_devices_and_their_models_models_first() -> None:
    rec = Recorder()
    index = EdgeIndex(rec)
    index.put_object("DeviceModel", model("thermo"))
    index.put_object("DeviceModel", model("unused"))
    assert rec.take() == []
    index.put_device(device("t1", "a"))
    assert rec.take() == [("a", "ns/DeviceModel/thermo", False), ("a", "ns/Device/t1", False)]
    index.put_device(device("t2", "b"))
    assert rec.keys("b") == {"ns/DeviceModel/thermo", "ns/Device/t2"}
    body = index.device(NS, "t1").obj.body  # type: ignore[union-attr]
    assert body["kind"] == "Device"
    assert body["apiVersion"] == API_VERSION
    assert set(body["metadata"]) == {"name", "namespace", "uid"}
    assert "status" not in body
    model_body = rec.held["a"]["uid-m-thermo"].body
    assert model_body["kind"] == "DeviceModel"
    assert model_body["spec"]["protocol"] == "modbus-rtu"


def test_desired_values_go_down_and_a_status_only_change_does_not() -> None:
    rec = Recorder()
    index = EdgeIndex(rec)
    index.put_object("DeviceModel", model("thermo"))
    props = [{"name": "setpoint", "desired": {"value": "21"}}]
    index.put_device(device("t1", "a", properties=props))
    rec.take()
    changed = device("t1", "a", rv="2", properties=props)
    changed["status"] = {"twins": [{"propertyName": "setpoint"}]}
    index.put_device(changed)
    assert rec.take() == []
    props = [{"name": "setpoint", "desired": {"value": "23"}}]
    index.put_device(device("t1", "a", rv="3", properties=props))
    assert rec.take() == [("a", "ns/Device/t1", False)]
    sent = rec.held["a"]["uid-t1"].body["spec"]["properties"][0]["desired"]["value"]
    assert sent == "23"


def test_a_model_leaves_a_node_with_its_last_device_and_model_changes_follow() -> None:
    rec = Recorder()
    index = EdgeIndex(rec)
    index.put_object("DeviceModel", model("thermo"))
    index.put_device(device("t1", "a"))
    index.put_device(device("t2", "a"))
    rec.take()
    index.put_object("DeviceModel", model("thermo", rv="2") | {"spec": {"protocol": "ble"}})
    assert rec.take() == [("a", "ns/DeviceModel/thermo", False)]
    index.remove_device("uid-t1")
    assert rec.take() == [("a", "ns/Device/t1", True)]
    index.remove_device("uid-t2")
    assert set(rec.take()) == {("a", "ns/Device/t2", True), ("a", "ns/DeviceModel/thermo", True)}
    assert rec.keys("a") == set()


def test_a_device_moved_to_another_node_leaves_the_first() -> None:
    rec = Recorder()
    index = EdgeIndex(rec)
    index.put_object("DeviceModel", model("thermo"))
    index.put_device(device("t1", "a"))
    rec.take()
    index.put_device(device("t1", "b", rv="2"))
    assert rec.keys("a") == set()
    assert rec.keys("b") == {"ns/DeviceModel/thermo", "ns/Device/t1"}
    assert index.device(NS, "t1").node == "b"  # type: ignore[union-attr]
    index.put_device(device("t1", "", rv="3"))  # unbound: no node's
    assert rec.keys("b") == set()
    assert index.device(NS, "t1") is None


def test_a_device_switching_models_takes_the_new_one_and_drops_the_old() -> None:
    rec = Recorder()
    index = EdgeIndex(rec)
    index.put_object("DeviceModel", model("thermo"))
    index.put_object("DeviceModel", model("meter"))
    index.put_device(device("t1", "a"))
    index.put_device(device("t1", "a", model="meter", rv="2"))
    assert rec.keys("a") == {"ns/DeviceModel/meter", "ns/Device/t1"}


def test_a_device_whose_model_is_missing_still_reaches_its_node() -> None:
    rec = Recorder()
    index = EdgeIndex(rec)
    entry = index.put_device(device("t1", "a", model="nowhere"))
    assert entry is not None
    assert index.missing_model(entry)
    assert rec.keys("a") == {"ns/Device/t1"}
    # The model made later follows it there.
    index.put_object("DeviceModel", model("nowhere"))
    assert not index.missing_model(entry)
    assert rec.keys("a") == {"ns/Device/t1", "ns/DeviceModel/nowhere"}
    assert [d.name for d in index.devices_using(NS, "nowhere")] == ["t1"]
    no_ref = index.put_device(device("t2", "a", model=""))
    assert no_ref is not None
    assert index.missing_model(no_ref)
