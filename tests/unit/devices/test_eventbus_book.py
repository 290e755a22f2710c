"""The eventbus's sans-IO core: KubeEdge topics and payloads for membership, twins, deltas,
states, and apps' get/update requests."""

from __future__ import annotations

import json
from typing import Any

from edge.devices.eventbus import DesiredUpdate, Outgoing, TwinBook
from edge.devices.model import DeviceConfig, parse_device

T0 = 1_700_000_000_000

MODEL = {
    "metadata": {"name": "thermostat", "namespace": "plant"},
    "spec": {
        "protocol": "mqtt",
        "properties": [
            {"name": "temperature", "type": "float", "accessMode": "ReadOnly"},
            {"name": "setpoint", "type": "int", "accessMode": "ReadWrite"},
        ],
    },
}


def config(name: str = "t1", setpoint: str | None = "21") -> DeviceConfig:
    props = [
        {
            "name": "temperature",
            "visitors": {"configData": {"topic": f"{name}/state", "jsonPath": "$.t"}},
        },
        {
            "name": "setpoint",
            "visitors": {"configData": {"topic": f"{name}/state", "jsonPath": "$.sp"}},
            **({"desired": {"value": setpoint}} if setpoint is not None else {}),
        },
    ]
    body = {
        "metadata": {"name": name, "namespace": "plant", "uid": f"uid-{name}"},
        "spec": {
            "deviceModelRef": {"name": "thermostat"},
            "protocol": {"protocolName": "mqtt", "configData": {"broker": "mqtt://b:1883"}},
            "properties": props,
        },
    }
    return parse_device(body, MODEL)


def twin_body(temperature: str | None, setpoint: str | None, state: str = "online") -> dict:
    twins = []
    for prop, value, type_ in (
        ("temperature", temperature, "float"),
        ("setpoint", setpoint, "int"),
    ):
        if value is not None:
            twins.append(
                {
                    "propertyName": prop,
                    "reported": {
                        "value": value,
                        "metadata": {"timestamp": str(T0 - 5), "type": type_},
                    },
                }
            )
    return {
        "uid": "uid-t1",
        "state": state,
        "lastOnlineTime": "2026-01-01T00:00:00Z",
        "twins": twins,
        "reasons": [],
    }


def by_topic(out: list[Outgoing]) -> dict[str, dict[str, Any]]:
    topics = [o.topic for o in out]
    assert len(topics) == len(set(topics)), topics
    return {o.topic: o.payload for o in out}


DEV = "$hw/events/device/plant/t1"


def test_membership_updated_lists_added_devices_with_their_twins() -> None:
    book = TwinBook("gw-1")
    out = by_topic(book.set_membership([config()], T0))
    updated = out["$hw/events/node/gw-1/membership/updated"]
    assert updated["timestamp"] == T0
    assert updated["event_id"]
    assert updated["removed_devices"] == []
    [device] = updated["added_devices"]
    assert device["id"] == "plant/t1"
    assert device["name"] == "t1"
    assert device["state"] == "unknown"
    assert device["attributes"]["model"] == {
        "value": "thermostat",
        "optional": False,
        "metadata": {"type": "string"},
    }
    assert device["twin"] == {
        "temperature": {"optional": False, "metadata": {"type": "float"}},
        "setpoint": {
            "expected": {"value": "21", "metadata": {"timestamp": T0}},
            "optional": False,
            "metadata": {"type": "int"},
        },
    }
    # The spec's desired value is not reported yet: that is a delta.
    delta = out[f"{DEV}/twin/update/delta"]
    assert delta["delta"] == {"setpoint": "21"}
    assert set(delta["twin"]) == {"setpoint"}

    # The same membership again says nothing; removing a device says so.
    assert book.set_membership([config()], T0 + 1) == []
    out = by_topic(book.set_membership([], T0 + 2))
    updated = out["$hw/events/node/gw-1/membership/updated"]
    assert updated["added_devices"] == []
    assert [d["id"] for d in updated["removed_devices"]] == ["plant/t1"]
    assert "twin" not in updated["removed_devices"][0]


def test_reported_changes_go_out_once_as_mapper_style_twin_updates() -> None:
    book = TwinBook("gw-1")
    book.set_membership([config()], T0)
    out = by_topic(book.update_twin("plant", "t1", twin_body("20.5", "19"), T0 + 10))
    update = out[f"{DEV}/twin/update"]
    assert update["twin"] == {
        "temperature": {
            "actual": {"value": "20.5", "metadata": {"timestamp": T0 - 5}},
            "optional": False,
            "metadata": {"type": "float"},
        },
        "setpoint": {
            "actual": {"value": "19", "metadata": {"timestamp": T0 - 5}},
            "optional": False,
            "metadata": {"type": "int"},
        },
    }
    assert out[f"{DEV}/state/update"]["state"] == "online"
    # The delta did not change (still setpoint 21 != 19): not repeated.
    assert f"{DEV}/twin/update/delta" not in out

    # Nothing changed: nothing goes out.
    assert book.update_twin("plant", "t1", twin_body("20.5", "19"), T0 + 20) == []
    # Only what changed goes out.
    out = by_topic(book.update_twin("plant", "t1", twin_body("20.7", "19"), T0 + 30))
    assert set(out[f"{DEV}/twin/update"]["twin"]) == {"temperature"}
    # The setpoint reaches its desired value: the delta is now empty and is not sent.
    out = by_topic(book.update_twin("plant", "t1", twin_body("20.7", "21"), T0 + 40))
    assert set(out) == {f"{DEV}/twin/update"}
    # Offline is a state change.
    out = by_topic(book.update_twin("plant", "t1", twin_body("20.7", "21", "offline"), T0 + 50))
    assert out == {
        f"{DEV}/state/update": {
            "event_id": out[f"{DEV}/state/update"]["event_id"],
            "timestamp": T0 + 50,
            "state": "offline",
        }
    }


def test_a_new_desired_value_in_the_spec_is_a_new_delta() -> None:
    book = TwinBook("gw-1")
    book.set_membership([config(setpoint="21")], T0)
    book.update_twin("plant", "t1", twin_body("20", "21"), T0 + 1)
    out = by_topic(book.set_membership([config(setpoint="23")], T0 + 2))
    assert out[f"{DEV}/twin/update/delta"]["delta"] == {"setpoint": "23"}
    assert out[f"{DEV}/twin/update/delta"]["twin"]["setpoint"]["expected"]["value"] == "23"


def test_twin_get_returns_expected_and_actual() -> None:
    book = TwinBook("gw-1")
    book.set_membership([config()], T0)
    book.update_twin("plant", "t1", twin_body("20.5", "19"), T0 + 1)
    out, desired = book.handle(f"{DEV}/twin/get", b'{"event_id": "e-1"}', T0 + 2)
    assert desired == []
    [result] = out
    assert result.topic == f"{DEV}/twin/get/result"
    assert result.payload["event_id"] == "e-1"
    assert result.payload["twin"]["setpoint"] == {
        "expected": {"value": "21", "metadata": {"timestamp": T0}},
        "actual": {"value": "19", "metadata": {"timestamp": T0 - 5}},
        "optional": False,
        "metadata": {"type": "int"},
    }
    # Unknown device: 404, as KubeEdge answers.
    [result] = book.handle("$hw/events/device/plant/nope/twin/get", b'{"event_id":"e-2"}', T0)[0]
    assert result.topic == "$hw/events/device/plant/nope/twin/get/result"
    assert result.payload["code"] == 404
    assert result.payload["event_id"] == "e-2"
    assert "plant/nope" in result.payload["reason"]
    # An empty payload is a request without an event id.
    [result] = book.handle(f"{DEV}/twin/get", b"", T0)[0]
    assert result.payload["event_id"] == ""
    assert "twin" in result.payload


def test_app_sets_a_desired_value() -> None:
    book = TwinBook("gw-1")
    book.set_membership([config()], T0)
    book.update_twin("plant", "t1", twin_body("20", "21"), T0 + 1)
    request = {
        "event_id": "e-9",
        "timestamp": T0,
        "twin": {"setpoint": {"expected": {"value": "25"}, "metadata": {"type": "int"}}},
    }
    out, desired = book.handle(f"{DEV}/twin/update", json.dumps(request).encode(), T0 + 5)
    assert desired == [DesiredUpdate("plant", "t1", "setpoint", "25", "e-9")]
    out = by_topic(out)
    result = out[f"{DEV}/twin/update/result"]
    assert result["event_id"] == "e-9"
    assert result["twin"] == {
        "setpoint": {
            "expected": {"value": "25", "metadata": {"timestamp": T0 + 5}},
            "optional": False,
            "metadata": {"type": "int"},
        }
    }
    assert out[f"{DEV}/twin/update/delta"]["delta"] == {"setpoint": "25"}
    # A twin/get now shows the new expected value.
    [got] = book.handle(f"{DEV}/twin/get", b"{}", T0 + 6)[0]
    assert got.payload["twin"]["setpoint"]["expected"]["value"] == "25"


def result_of(book: TwinBook, twin: Any, device: str = DEV, **kw: Any) -> dict[str, Any]:
    payload = json.dumps({"event_id": "e", "twin": twin}).encode()
    out, desired = book.handle(f"{device}/twin/update", payload, T0, **kw)
    assert desired == []
    [result] = out
    assert result.topic == f"{device}/twin/update/result"
    return result.payload


def test_bad_updates_are_refused_whole_with_a_reason() -> None:
    book = TwinBook("gw-1")
    book.set_membership([config()], T0)
    assert result_of(book, {"temperature": {"expected": {"value": "30"}}})["code"] == 400
    assert "read-only" in result_of(book, {"temperature": {"expected": {"value": "30"}}})["reason"]
    bad_type = result_of(book, {"setpoint": {"expected": {"value": "warm"}}})
    assert bad_type["code"] == 400
    assert "warm" in bad_type["reason"]
    unknown = result_of(book, {"humidity": {"expected": {"value": "1"}}})
    assert unknown["code"] == 400
    assert "humidity" in unknown["reason"]
    assert result_of(book, {"setpoint": None})["code"] == 400  # KubeEdge's "delete": not here
    assert result_of(book, {})["code"] == 400
    assert result_of(book, {"setpoint": {"actual": {"value": "3"}}})["code"] == 400
    missing = result_of(
        book, {"setpoint": {"expected": {"value": "1"}}}, device="$hw/events/device/plant/ghost"
    )
    assert missing["code"] == 404
    # One bad property spoils the lot: the good one is not applied either.
    mixed = result_of(
        book,
        {"setpoint": {"expected": {"value": "24"}}, "temperature": {"expected": {"value": "1"}}},
    )
    assert mixed["code"] == 400
    [got] = book.handle(f"{DEV}/twin/get", b"{}", T0)[0]
    assert got.payload["twin"]["setpoint"]["expected"]["value"] == "21"
    # Not JSON.
    [out] = book.handle(f"{DEV}/twin/update", b"{nope", T0)[0]
    assert out.payload["code"] == 400
    # The device manager cannot take more now: 500, nothing applied.
    busy = result_of(book, {"setpoint": {"expected": {"value": "24"}}}, capacity=0)
    assert busy["code"] == 500
    assert "busy" in busy["reason"]


def test_membership_get() -> None:
    book = TwinBook("gw-1")
    book.set_membership([config("t2"), config("t1")], T0)
    book.update_twin("plant", "t1", twin_body("20", "21"), T0)
    [out] = book.handle("$hw/events/node/gw-1/membership/get", b'{"event_id":"m"}', T0)[0]
    assert out.topic == "$hw/events/node/gw-1/membership/get/result"
    assert out.payload["event_id"] == "m"
    assert [(d["id"], d["state"]) for d in out.payload["devices"]] == [
        ("plant/t1", "online"),
        ("plant/t2", "unknown"),
    ]
    assert out.payload["devices"][0]["last_online"] == "2026-01-01T00:00:00Z"
    # Another node's topic, and topics the bus does not serve, are ignored.
    assert book.handle("$hw/events/node/gw-2/membership/get", b"{}", T0) == ([], [])
    assert book.handle(f"{DEV}/twin/update/result", b"{}", T0) == ([], [])
    assert book.handle(f"{DEV}/state/update", b"{}", T0) == ([], [])


def test_snapshot_repeats_the_current_state() -> None:
    book = TwinBook("gw-1")
    book.set_membership([config()], T0)
    book.update_twin("plant", "t1", twin_body("20", "19"), T0)
    out = by_topic(book.snapshot(T0 + 100))
    assert set(out[f"{DEV}/twin/update"]["twin"]) == {"temperature", "setpoint"}
    assert out[f"{DEV}/state/update"]["state"] == "online"
    assert out[f"{DEV}/twin/update/delta"]["delta"] == {"setpoint": "21"}


def view(value: str | None, desired: str | None = "21", state: str = "online") -> dict[str, Any]:
    """A device view as ``DeviceTwin.view()`` makes it (the fields the eventbus reads)."""
    return {
        "namespace": "plant",
        "name": "t1",
        "uid": "uid-t1",
        "model": "thermostat",
        "protocol": "mqtt",
        "state": state,
        "lastOnlineTime": "",
        "properties": [
            {
                "name": "temperature",
                "type": "float",
                "accessMode": "ReadOnly",
                "value": value,
                "timestamp": T0,
                "desired": None,
            },
            {
                "name": "setpoint",
                "type": "int",
                "accessMode": "ReadWrite",
                "value": "19",
                "timestamp": T0,
                "desired": desired,
            },
        ],
    }


def test_manager_views_drive_membership_twins_and_deltas() -> None:
    book = TwinBook("gw-1")
    out = by_topic(book.update_view(view("20.5"), T0))
    added = out["$hw/events/node/gw-1/membership/updated"]["added_devices"]
    assert [d["id"] for d in added] == ["plant/t1"]
    assert out[f"{DEV}/twin/update"]["twin"]["temperature"]["actual"]["value"] == "20.5"
    assert out[f"{DEV}/state/update"]["state"] == "online"
    assert out[f"{DEV}/twin/update/delta"]["delta"] == {"setpoint": "21"}
    assert book.update_view(view("20.5"), T0 + 1) == []
    out = by_topic(book.update_view(view("20.5", desired="25"), T0 + 2))
    assert set(out) == {f"{DEV}/twin/update/delta"}
    assert out[f"{DEV}/twin/update/delta"]["delta"] == {"setpoint": "25"}
    # The view's accessMode decides what apps may set.
    refused = result_of(book, {"temperature": {"expected": {"value": "1"}}})
    assert refused["code"] == 400
    assert book.keep_only([("plant", "t1")], T0) == []
    out = by_topic(book.keep_only([], T0 + 3))
    removed = out["$hw/events/node/gw-1/membership/updated"]["removed_devices"]
    assert [d["id"] for d in removed] == ["plant/t1"]
