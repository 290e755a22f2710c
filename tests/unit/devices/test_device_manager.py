"""DeviceManager against a real store, with an in-test driver (the real ones have their own
tests): loading, reporting, failing devices, desired values, changes and removals."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.lowlevel
import trio.testing

from edge.devices.drivers import Buses
from edge.devices.drivers.base import DriverError
from edge.devices.manager import INDEX_KEY, DeviceManager, load_views, state_key
from edge.devices.model import DeviceConfig, PropertyConfig
from edge.hub.link import LINK_STATE_KEY
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.wire.events import Message, Op

T = TypeVar("T")


def model(name: str = "thermostat") -> dict[str, Any]:
    return {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "DeviceModel",
        "metadata": {"name": name, "namespace": "plant"},
        "spec": {
            "protocol": "modbus",
            "properties": [
                {"name": "temperature", "type": "float", "accessMode": "ReadOnly"},
                {"name": "setpoint", "type": "float", "accessMode": "ReadWrite"},
            ],
        },
    }


def device(name: str, slave: int = 1, desired: str | None = None, node: str = "gw") -> dict:
    setpoint: dict[str, Any] = {
        "name": "setpoint",
        "visitors": {"configData": {"register": "HoldingRegister", "offset": 1, "scale": 0.5}},
    }
    if desired is not None:
        setpoint["desired"] = {"value": desired}
    return {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "Device",
        "metadata": {"name": name, "namespace": "plant", "uid": f"uid-{name}"},
        "spec": {
            "deviceModelRef": {"name": "thermostat"},
            "nodeName": node,
            "protocol": {
                "protocolName": "modbus-tcp",
                "configData": {"ip": "127.0.0.1", "port": 5020, "slaveID": slave},
            },
            "properties": [
                {
                    "name": "temperature",
                    "visitors": {
                        "configData": {"register": "InputRegister", "offset": 0, "scale": 0.1}
                    },
                },
                setpoint,
            ],
        },
    }


class Devices:
    """In-test devices by slave ID, and the drivers opened for them."""

    def __init__(self) -> None:
        self.values: dict[int, dict[str, Any]] = {}
        self.dead: set[int] = set()
        self.refuse_open: str | None = None
        self.opened: list[tuple[str, int]] = []
        self.closed: list[tuple[str, int]] = []
        self.writes: list[tuple[str, str, Any]] = []

    async def open(self, config: DeviceConfig, buses: Buses) -> FakeDriver:
        await trio.lowlevel.checkpoint()
        if self.refuse_open:
            raise DriverError("Disconnected", self.refuse_open)
        self.opened.append((config.name, config.protocol_config["slaveID"]))
        return FakeDriver(self, config)


class FakeDriver:
    def __init__(self, devices: Devices, config: DeviceConfig) -> None:
        self.devices = devices
        self.config = config
        self.slave = config.protocol_config["slaveID"]

    async def read(self, prop: PropertyConfig) -> Any:
        await trio.sleep(0.01)
        if self.slave in self.devices.dead:
            await trio.sleep(0.5)
            raise DriverError("Timeout", f"slave {self.slave} did not answer")
        return self.devices.values.setdefault(self.slave, {}).get(prop.name, 0.0)

    async def write(self, prop: PropertyConfig, value: Any) -> None:
        await trio.sleep(0.01)
        self.devices.writes.append((self.config.name, prop.name, value))
        self.devices.values.setdefault(self.slave, {})[prop.name] = value

    async def aclose(self) -> None:
        self.devices.closed.append((self.config.name, self.slave))


class InlineStore(AsyncStore):
    """The real store, called on the trio thread: virtual time (autojump) must not run on
    while a worker thread commits."""

    async def _execute(self, call: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint()
        return call()


class Harness:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.aio = InlineStore(store)
        self.seq = itertools.count(store.hwm + 1)
        self.reports: list[tuple[Op, str, dict[str, Any], str | None]] = []
        self.devices = Devices()
        self.manager = DeviceManager(
            self.aio, "gw", self.report, open_driver=self.devices.open, resync_s=3600
        )

    async def report(self, op: Op, key: str, body: dict[str, Any], coalesce: str | None) -> None:
        self.reports.append((op, key, body, coalesce))
        await self.aio.run(self.store.report, op, key, body, "", coalesce)

    async def put(self, *objects: dict[str, Any], delete: bool = False) -> None:
        messages = []
        for obj in objects:
            meta = obj["metadata"]
            key = f"{meta['namespace']}/{obj['kind']}/{meta['name']}"
            op = Op.DELETE if delete else Op.PUT
            messages.append(Message(next(self.seq), "id", op, key, "", None if delete else obj))
        await self.aio.run(self.store.apply_batch, messages)  # the manager follows the feed

    def twins(self, key: str) -> list[dict[str, Any]]:
        return [body for op, k, body, _ in self.reports if op == Op.TWIN and k == key]

    def last_twin(self, key: str) -> dict[str, Any]:
        return self.twins(key)[-1]


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    with Store(tmp_path / "store.db") as store:
        harness = Harness(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.manager.run)
            yield harness
            nursery.cancel_scope.cancel()


def reported(body: dict[str, Any], prop: str) -> str | None:
    for twin in body["twins"]:
        if twin["propertyName"] == prop:
            return twin.get("reported", {}).get("value")
    return None


async def test_devices_report_and_a_device_without_its_model_says_why(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    h.devices.values[1] = {"temperature": 21.5, "setpoint": 20.0}
    await h.put(device("t1", 1), device("t2", 2))
    await trio.sleep(5)
    for key in ("plant/Device/t1", "plant/Device/t2"):
        body = h.last_twin(key)
        assert body["state"] == "unknown"
        assert body["twins"] == []
        assert body["reasons"][0]["reason"] == "ModelNotFound"
        assert "plant/thermostat" in body["reasons"][0]["message"]
    assert len(h.twins("plant/Device/t1")) == 1  # said once, not on every resync
    assert h.devices.opened == []

    await h.put(model())
    await trio.sleep(3)
    t1 = h.last_twin("plant/Device/t1")
    assert t1["state"] == "online"
    assert t1["reasons"] == []
    assert reported(t1, "temperature") == "21.5"
    assert reported(h.last_twin("plant/Device/t2"), "temperature") == "0"
    assert sorted(h.devices.opened) == [("t1", 1), ("t2", 2)]

    # TWIN coalesces per device (default key); each TELEMETRY has a key of its own.
    twin_keys = {c for op, _, _, c in h.reports if op == Op.TWIN}
    telemetry_keys = [c for op, _, _, c in h.reports if op == Op.TELEMETRY]
    assert twin_keys == {None}
    assert len(telemetry_keys) == len(set(telemetry_keys)) >= 4
    _, entries = h.store.outbox_size()
    assert entries == 2 + len(telemetry_keys)  # one TWIN per device in the outbox

    # The CLI's view of it, from the store alone.
    assert h.store.get_state(INDEX_KEY) == ["plant/Device/t1", "plant/Device/t2"]
    views = load_views(h.store)
    assert [(v["name"], v["state"]) for v in views] == [("t1", "online"), ("t2", "online")]
    props = {p["name"]: p["value"] for p in views[0]["properties"]}
    assert props == {"temperature": "21.5", "setpoint": "20"}


async def test_a_bad_device_does_not_stop_the_others(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    bad = device("bad", 3)
    bad["spec"]["properties"][0]["visitors"]["configData"]["offset"] = 70000
    await h.put(model(), device("good", 1), bad)
    await trio.sleep(3)
    reasons = h.last_twin("plant/Device/bad")["reasons"]
    assert [(r["property"], r["reason"]) for r in reasons] == [("temperature", "InvalidAddress")]
    assert h.last_twin("plant/Device/good")["state"] == "online"
    view = h.store.get_state(state_key("plant/Device/bad"))
    assert view["state"] == "unknown"
    assert view["reasons"] == reasons
    # Fixed: it starts.
    await h.put(device("bad", 3))
    await trio.sleep(3)
    assert h.last_twin("plant/Device/bad")["state"] == "online"


async def test_desired_values_are_written_without_reopening_the_device(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    await h.put(model(), device("t1", 1, desired="21.5"))
    await trio.sleep(2)
    assert h.devices.writes == [("t1", "setpoint", 21.5)]
    twin = h.last_twin("plant/Device/t1")
    (setpoint,) = [t for t in twin["twins"] if t["propertyName"] == "setpoint"]
    assert setpoint["observedDesired"]["value"] == "21.5"
    assert setpoint["reported"]["value"] == "21.5"

    await h.put(device("t1", 1, desired="23"))
    await trio.sleep(2)
    assert h.devices.writes[-1] == ("t1", "setpoint", 23.0)
    assert h.devices.opened == [("t1", 1)]  # same driver
    twin = h.last_twin("plant/Device/t1")
    (setpoint,) = [t for t in twin["twins"] if t["propertyName"] == "setpoint"]
    assert setpoint["observedDesired"]["value"] == "23"

    # Set locally (the eventbus): written at once.
    h.manager.set_desired("plant/Device/t1", "setpoint", "24.5")
    await trio.sleep(1)
    assert h.devices.writes[-1] == ("t1", "setpoint", 24.5)


async def test_changed_and_removed_devices(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    await h.put(model(), device("t1", 1), device("t2", 2))
    await trio.sleep(2)
    await h.put(device("t1", 5))  # another slave: a new driver, once the old one is closed
    await trio.sleep(2)
    assert h.devices.opened[-1] == ("t1", 5)
    assert ("t1", 1) in h.devices.closed
    await h.put(device("t2", 2), delete=True)
    await trio.sleep(2)
    assert ("t2", 2) in h.devices.closed
    assert h.store.get_state(INDEX_KEY) == ["plant/Device/t1"]
    assert h.store.get_state(state_key("plant/Device/t2")) is None
    assert "plant/Device/t2" not in h.manager.views()
    # A device for another node is not ours.
    await h.put(device("t3", 3, node="elsewhere"))
    await trio.sleep(2)
    assert "plant/Device/t3" not in h.manager.views()


async def test_a_dead_device_goes_offline_and_is_backed_off(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    h.devices.dead.add(2)
    await h.put(model(), device("live", 1), device("dead", 2))
    await trio.sleep(300)
    dead = h.last_twin("plant/Device/dead")
    assert dead["state"] == "offline"
    assert dead["reasons"][0]["reason"] == "Timeout"
    live_readings = [
        b for op, k, b, _ in h.reports if op == Op.TELEMETRY and k == "plant/Device/live"
    ]
    assert len(live_readings) >= 2  # values were collected (only changes become telemetry)
    assert h.manager.views()["plant/Device/live"]["state"] == "online"


async def test_a_driver_that_cannot_open_is_retried_with_backoff(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    h.devices.refuse_open = "/dev/ttyUSB7: no such device"
    await h.put(model(), device("t1", 1))
    await trio.sleep(60)
    body = h.last_twin("plant/Device/t1")
    assert body["state"] == "offline"
    assert body["reasons"] == [
        {"property": "", "reason": "Disconnected", "message": "/dev/ttyUSB7: no such device"}
    ]
    h.devices.refuse_open = None
    await trio.sleep(31)
    assert h.last_twin("plant/Device/t1")["state"] == "online"


async def test_report_again_and_views_saved_with_each_twin_report(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[tuple[str, str]] = []

    async def follow() -> None:
        # What the eventbus does: the views saved in the store, through the change feed.
        with h.aio.feed.subscribe() as feed:
            async for changes in feed:
                for key in changes.states("device/"):
                    seen.append((key, h.store.get_state(key)["state"]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await h.put(model(), device("t1", 1))
        await trio.sleep(2)
        assert ("device/plant/t1", "online") in seen
        count = len(h.twins("plant/Device/t1"))
        h.manager.report_again()
        await trio.sleep(0.5)
        assert len(h.twins("plant/Device/t1")) == count + 1
        nursery.cancel_scope.cancel()


async def test_devices_report_again_when_the_link_comes_back(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    await h.put(model(), device("t1", 1))
    await trio.sleep(2)
    count = len(h.twins("plant/Device/t1"))
    await h.aio.set_state(LINK_STATE_KEY, {"online": False, "since": 0.0, "reason": "cut"})
    await trio.sleep(0.5)
    assert len(h.twins("plant/Device/t1")) == count  # going offline says nothing
    await h.aio.set_state(LINK_STATE_KEY, {"online": True, "since": 1.0, "reason": "up"})
    await trio.sleep(0.5)
    assert len(h.twins("plant/Device/t1")) == count + 1
