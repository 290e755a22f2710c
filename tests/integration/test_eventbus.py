"""The eventbus on a real mosquitto, seen from a KubeEdge-style app: membership, twin updates,
deltas, states, get requests, desired values set by the app, and a broker restart."""

from __future__ import annotations

from pathlib import Path

import trio

from edge.devices.eventbus import DesiredUpdate, EventBus
from edge.devices.manager import INDEX_KEY, state_key
from edge.devices.model import DeviceConfig, parse_device
from edge.store import Store
from edge.store.aio import AsyncStore
from tests import mqttkit
from tests.mqttkit import Mosquitto, TestClient
from tests.waiting import eventually

mosquitto = mqttkit.mosquitto  # the fixture

MODEL = {
    "metadata": {"name": "thermostat", "namespace": "plant"},
    "spec": {
        "protocol": "modbus",
        "properties": [
            {"name": "temperature", "type": "float", "accessMode": "ReadOnly"},
            {"name": "setpoint", "type": "int", "accessMode": "ReadWrite"},
        ],
    },
}
DEV = "$hw/events/device/plant/t1"


def config() -> DeviceConfig:
    def visitor(offset: int) -> dict:
        return {"configData": {"register": "HoldingRegister", "offset": offset}}

    body = {
        "metadata": {"name": "t1", "namespace": "plant", "uid": "uid-t1"},
        "spec": {
            "deviceModelRef": {"name": "thermostat"},
            "protocol": {"protocolName": "modbus-tcp", "configData": {"ip": "127.0.0.1"}},
            "properties": [
                {"name": "temperature", "visitors": visitor(0)},
                {"name": "setpoint", "visitors": visitor(1), "desired": {"value": "21"}},
            ],
        },
    }
    return parse_device(body, MODEL)


def twin_body(temperature: str, setpoint: str, state: str = "online") -> dict:
    return {
        "uid": "uid-t1",
        "state": state,
        "lastOnlineTime": "2026-01-01T00:00:00Z",
        "twins": [
            {
                "propertyName": "temperature",
                "reported": {"value": temperature, "metadata": {"type": "float"}},
            },
            {
                "propertyName": "setpoint",
                "reported": {"value": setpoint, "metadata": {"type": "int"}},
            },
        ],
    }


async def test_app_conversation(mosquitto: Mosquitto) -> None:
    bus = EventBus(mosquitto.url, node="gw-1", desired_buffer=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        with TestClient(mosquitto) as app:
            await app.subscribe("$hw/events/#")
            with trio.fail_after(5):
                await bus.link.wait_connected()
            app.drain()

            bus.set_membership([config()])
            updated = await app.expect_json("$hw/events/node/gw-1/membership/updated")
            assert [d["id"] for d in updated["added_devices"]] == ["plant/t1"]
            delta = await app.expect_json(f"{DEV}/twin/update/delta")
            assert delta["delta"] == {"setpoint": "21"}

            app.publish("$hw/events/node/gw-1/membership/get", {"event_id": "m1"})
            got = await app.expect_json("$hw/events/node/gw-1/membership/get/result")
            assert got["event_id"] == "m1"
            assert got["devices"][0]["name"] == "t1"

            bus.publish_twin("plant", "t1", twin_body("20.5", "21"))
            update = await app.expect_json(f"{DEV}/twin/update")
            assert update["twin"]["temperature"]["actual"]["value"] == "20.5"
            assert (await app.expect_json(f"{DEV}/state/update"))["state"] == "online"

            # The app sets a desired value: answered, handed to the device manager, delta sent,
            # and the bus does not take its own twin/update echo for a request.
            app.publish(
                f"{DEV}/twin/update",
                {
                    "event_id": "u1",
                    "timestamp": 0,
                    "twin": {"setpoint": {"expected": {"value": "25"}}},
                },
            )
            result = await app.expect_json(f"{DEV}/twin/update/result")
            assert result["event_id"] == "u1"
            assert result["twin"]["setpoint"]["expected"]["value"] == "25"
            with trio.fail_after(5):
                assert await bus.desired_updates.receive() == DesiredUpdate(
                    "plant", "t1", "setpoint", "25", "u1"
                )
            delta = await app.expect_json(f"{DEV}/twin/update/delta")
            assert delta["delta"] == {"setpoint": "25"}

            # A bad request gets a KubeEdge-style error answer.
            app.publish(
                f"{DEV}/twin/update",
                {"event_id": "u2", "twin": {"temperature": {"expected": {"value": "99"}}}},
            )
            result = await app.expect_json(f"{DEV}/twin/update/result")
            assert result["code"] == 400
            assert "read-only" in result["reason"]

            app.publish(f"{DEV}/twin/get", {"event_id": "g1"})
            got = await app.expect_json(f"{DEV}/twin/get/result")
            assert got["event_id"] == "g1"
            assert got["twin"]["setpoint"]["expected"]["value"] == "25"
            assert got["twin"]["setpoint"]["actual"]["value"] == "21"

        # The broker goes away: updates meanwhile are dropped, the snapshot after the reconnect
        # carries the latest values.
        mosquitto.stop()
        await eventually(lambda: not bus.connected, "the bus sees the broker go", within=5)
        bus.publish_twin("plant", "t1", twin_body("22.0", "25"))
        bus.publish_twin("plant", "t1", twin_body("22.5", "25"))
        mosquitto.start()
        with TestClient(mosquitto) as app:
            await app.subscribe("$hw/events/#")
            await eventually(lambda: bus.link.connects >= 2, "the bus reconnects", within=10)
            update = await app.expect_json(f"{DEV}/twin/update")
            assert update["twin"]["temperature"]["actual"]["value"] == "22.5"
            assert update["twin"]["setpoint"]["actual"]["value"] == "25"
            assert (await app.expect_json(f"{DEV}/state/update"))["state"] == "online"
            await app.quiet(f"{DEV}/twin/update/delta", 0.3)  # 25 == 25: no delta
        nursery.cancel_scope.cancel()


async def test_desired_backlog_is_refused_not_dropped(mosquitto: Mosquitto) -> None:
    bus = EventBus(mosquitto.url, node="gw-1", desired_buffer=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        with trio.fail_after(5):
            await bus.link.wait_connected()
        bus.set_membership([config()])
        with TestClient(mosquitto) as app:
            await app.subscribe(f"{DEV}/twin/update/result")
            for value in ("22", "23"):
                app.publish(
                    f"{DEV}/twin/update",
                    {"event_id": value, "twin": {"setpoint": {"expected": {"value": value}}}},
                )
            first = await app.expect_json(f"{DEV}/twin/update/result")
            second = await app.expect_json(f"{DEV}/twin/update/result")
            assert "code" not in first
            assert first["event_id"] == "22"
            assert second["code"] == 500
            assert second["event_id"] == "23"
        assert bus.desired_updates.receive_nowait().value == "22"
        nursery.cancel_scope.cancel()


class Devices:
    """What the device manager leaves in the store for the bus (a view per device and their
    index), and the desired values the bus hands on."""

    def __init__(self, aio: AsyncStore) -> None:
        self.aio = aio
        self.desired: list[tuple[str, str, str | None]] = []
        self.keys: list[str] = []

    def set_desired(self, key: str, prop: str, text: str | None) -> None:
        if key not in self.keys:
            raise KeyError(key)
        self.desired.append((key, prop, text))

    async def report(self, value: str) -> None:
        view = {
            "namespace": "plant",
            "name": "t1",
            "uid": "uid-t1",
            "model": "thermostat",
            "protocol": "modbus-tcp",
            "state": "online",
            "lastOnlineTime": "",
            "properties": [
                {
                    "name": "setpoint",
                    "type": "int",
                    "accessMode": "ReadWrite",
                    "value": value,
                    "timestamp": 1,
                    "desired": None,
                }
            ],
        }
        self.keys = ["plant/Device/t1"]
        await self.aio.set_state(INDEX_KEY, self.keys)
        await self.aio.set_state(state_key("plant/Device/t1"), view)

    async def remove(self) -> None:
        self.keys = []
        await self.aio.set_state(INDEX_KEY, self.keys)
        await self.aio.set_state(state_key("plant/Device/t1"), None)


async def test_serve_the_devices_in_the_store(mosquitto: Mosquitto, tmp_path: Path) -> None:
    with Store(tmp_path / "store.db") as store:
        aio = AsyncStore(store)
        devices = Devices(aio)
        bus = EventBus(mosquitto.url, node="gw-1")
        with TestClient(mosquitto) as app:
            await app.subscribe("$hw/events/#")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bus.serve, aio, devices.set_desired)
                with trio.fail_after(5):
                    await bus.link.wait_connected()
                await devices.report("20")
                update = await app.expect_json(f"{DEV}/twin/update")
                assert update["twin"]["setpoint"]["actual"]["value"] == "20"
                app.publish(
                    f"{DEV}/twin/update",
                    {"event_id": "u", "twin": {"setpoint": {"expected": {"value": "22"}}}},
                )
                assert "code" not in await app.expect_json(f"{DEV}/twin/update/result")
                await eventually(lambda: devices.desired, "desired value passed on", within=5)
                assert devices.desired == [("plant/Device/t1", "setpoint", "22")]
                await devices.remove()  # the device leaves the node
                updated = await app.expect_json("$hw/events/node/gw-1/membership/updated")
                if updated["added_devices"]:  # the first one announced the device
                    updated = await app.expect_json("$hw/events/node/gw-1/membership/updated")
                assert [d["id"] for d in updated["removed_devices"]] == ["plant/t1"]
                nursery.cancel_scope.cancel()
        assert aio.feed._subscriptions == []  # the bus stopped following the store
