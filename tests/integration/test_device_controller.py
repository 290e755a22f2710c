"""The device side of the edge controller against the real apiserver, with the edge played by
the test (as in test_edge_controller.py: a real EdgeHub on a real store, no agent).

Checked here: the CRDs install idempotently and take KubeEdge manifests with only the group
changed; a node gets its own Devices and the models they use, desired values included; a
Device whose model is missing still reaches its node and gets a Warning event; twin reports
become DeviceStatus, coalesced and rate-limited (a flood of 30 devices reporting 3 times a
second, KubeEdge's 1300 % CPU case); a node may report only devices bound to it; telemetry
reaches a real mosquitto. The controller runs as the service account of `outpost-cloud rbac`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Event, Namespace
from lightkube.types import PatchType
from prometheus_client import CollectorRegistry, generate_latest

from cloud.devices import Device, DeviceModel, DeviceStatus, crds
from cloud.mirror import controller_metrics as controller_metrics
from cloud.mirror.controller import ControllerSettings
from edge.wire.events import Op
from tests.cluster.controlplane import ControlPlane
from tests.controllerkit import Cloud, agent, start_controller
from tests.mqttkit import Mosquitto, TestClient
from tests.waiting import eventually

pytestmark = pytest.mark.usefixtures("control_plane")


@pytest.fixture
def start_cloud(
    cloud_kube: AsyncClient, tmp_path: Path, nursery: trio.Nursery
) -> Callable[..., Any]:
    async def start(**settings: Any) -> Cloud:
        return await start_controller(
            cloud_kube,
            tmp_path,
            nursery,
            ControllerSettings(lease_renew_interval_s=0.5, event_qps=5.0, **settings),
        )

    return start


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as running:
        yield running


@pytest.fixture
async def namespace(kube: AsyncClient) -> AsyncIterator[str]:
    name = f"dev-{secrets.token_hex(3)}"
    await kube.create(Namespace.from_dict({"metadata": {"name": name}}))
    yield name
    await kube.delete(Namespace, name)


def node_name() -> str:
    return f"dev-{secrets.token_hex(3)}"


# A KubeEdge v1beta1 DeviceModel and Device (its docs' Modbus thermostat), group changed only.
def thermostat_model(name: str = "thermostat") -> dict[str, Any]:
    return {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "DeviceModel",
        "metadata": {"name": name},
        "spec": {
            "protocol": "modbus-rtu",
            "properties": [
                {"name": "temperature", "description": "room temperature", "type": "FLOAT",
                 "accessMode": "ReadOnly", "minimum": "-40", "maximum": "125", "unit": "°C"},
                {"name": "setpoint", "type": "float", "accessMode": "ReadWrite",
                 "minimum": 5, "maximum": 30.5},
            ],
        },
    }  # fmt: skip


def thermostat(name: str, node: str, model: str = "thermostat", setpoint: str = "21") -> dict:
    return {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "Device",
        "metadata": {"name": name, "labels": {"room": "a1"}},
        "spec": {
            "deviceModelRef": {"name": model},
            "nodeName": node,
            "protocol": {
                "protocolName": "modbus-rtu",
                "configData": {"serialPort": "/dev/ttyS0", "baudRate": 9600, "dataBits": 8,
                               "parity": "none", "stopBits": 1, "slaveID": 1},
            },
            "properties": [
                {"name": "temperature", "collectCycle": 1_000_000_000,
                 "reportCycle": 2_000_000_000, "reportToCloud": True, "deadband": 0.5,
                 "visitors": {"protocolName": "modbus-rtu",
                              "configData": {"register": "InputRegister", "offset": 0,
                                             "limit": 1, "scale": 0.1}},
                 "pushMethod": {"mqtt": {"address": "mqtt://127.0.0.1:1883",
                                         "topic": "temp", "qos": 1, "retained": False},
                                "dbMethod": {"influxdb2": {"influxdb2ClientConfig": {
                                    "url": "http://influx:8086", "org": "o", "bucket": "b"}}}}},
                {"name": "setpoint", "desired": {"value": setpoint, "metadata": {"by": "ops"}},
                 "visitors": {"protocolName": "modbus-rtu",
                              "configData": {"register": "HoldingRegister", "offset": 1}}},
            ],
            "methods": [{"name": "set", "description": "set it", "propertyNames": ["setpoint"]}],
        },
    }  # fmt: skip


async def create(kube: AsyncClient, resource: Any, body: dict, namespace: str) -> Any:
    return await kube.create(resource.from_dict(body), namespace=namespace)


def twin(uid: str, temperature: str, state: str = "online") -> dict[str, Any]:
    return {
        "uid": uid,
        "state": state,
        "lastOnlineTime": "2025-01-01T00:00:00Z",
        "twins": [
            {
                "propertyName": "temperature",
                "reported": {"value": temperature, "metadata": {"timestamp": "1", "type": "float"}},
            }
        ],
        "reasons": [],
    }


async def device_status(kube: AsyncClient, name: str, namespace: str) -> dict[str, Any] | None:
    try:
        found = await kube.get(DeviceStatus, name, namespace=namespace)
    except ApiError as exc:
        if exc.status.code == 404:
            return None
        raise
    return found.to_dict()


# -- CRDs --------------------------------------------------------------------------------------


async def test_crds_install_idempotently_and_take_kubeedge_manifests(
    start_cloud: Any, kube: AsyncClient, cloud_kube: AsyncClient, namespace: str,
    control_plane: ControlPlane,
) -> None:  # fmt: skip
    await start_cloud()  # installs them, as the service account
    assert set((await crds.install(cloud_kube)).values()) == {"unchanged"}
    for crd in crds.definitions():
        found = await kube.get(CustomResourceDefinition, crd["metadata"]["name"])
        assert (
            found.metadata.annotations[crds.HASH_ANNOTATION]
            == (crd["metadata"]["annotations"][crds.HASH_ANNOTATION])
        )
    await create(kube, DeviceModel, thermostat_model(), namespace)
    await create(kube, Device, thermostat("t1", "gw-x"), namespace)
    got = (await kube.get(Device, "t1", namespace=namespace)).to_dict()
    prop = got["spec"]["properties"][0]
    assert prop["deadband"] == 0.5
    assert prop["pushMethod"]["dbMethod"]["influxdb2"]["influxdb2ClientConfig"]["org"] == "o"
    assert prop["visitors"]["configData"]["scale"] == 0.1
    model = (await kube.get(DeviceModel, "thermostat", namespace=namespace)).to_dict()
    assert model["spec"]["properties"][0]["minimum"] == "-40"
    assert model["spec"]["properties"][1]["maximum"] == 30.5
    # A field of the wrong type is refused by the schema.
    bad = thermostat("t2", "gw-x")
    bad["spec"]["properties"][0]["collectCycle"] = "often"
    with pytest.raises(ApiError) as refused:
        await create(kube, Device, bad, namespace)
    assert refused.value.status.code == 422
    printed = control_plane.kubectl("get", "devices", "-n", namespace).stdout
    assert printed.split()[:4] == ["NAME", "NODE", "MODEL", "PROTOCOL"]
    assert "gw-x" in printed
    assert "modbus-rtu" in printed


async def test_a_changed_definition_is_upgraded(cloud_kube: AsyncClient, kube: AsyncClient) -> None:
    await crds.install(cloud_kube)
    name = "devicemodels.devices.outpost.io"
    crd = (await kube.get(CustomResourceDefinition, name)).to_dict()
    crd["metadata"]["annotations"][crds.HASH_ANNOTATION] = "an-older-one"
    del crd["metadata"]["managedFields"]
    await kube.replace(CustomResourceDefinition.from_dict(crd))
    outcome = await crds.install(cloud_kube)
    assert outcome[name] == "upgraded"
    assert set(outcome.values()) == {"upgraded", "unchanged"}
    assert set((await crds.install(cloud_kube)).values()) == {"unchanged"}


# -- downstream -------------------------------------------------------------------------------


async def test_a_node_gets_its_devices_and_their_models_only(
    start_cloud: Any, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    cloud = await start_cloud()
    a, b = node_name(), node_name()
    await create(kube, DeviceModel, thermostat_model(), namespace)
    await create(kube, DeviceModel, thermostat_model("meter"), namespace)
    async with (
        agent(cloud, tmp_path / "a.db", a) as edge_a,
        agent(cloud, tmp_path / "b.db", b) as edge_b,
    ):
        await create(kube, Device, thermostat("mine", a), namespace)
        await create(kube, Device, thermostat("theirs", b, model="meter"), namespace)
        dev = f"{namespace}/Device/mine"
        await eventually(lambda: dev in edge_a.keys("Device"), "node A gets its device")
        await eventually(
            lambda: f"{namespace}/DeviceModel/thermostat" in edge_a.keys("DeviceModel"),
            "and its model",
        )
        await eventually(lambda: f"{namespace}/Device/theirs" in edge_b.keys("Device"), "B too")
        assert {k for k in edge_a.keys("Device") if k.startswith(namespace)} == {dev}
        assert {k for k in edge_a.keys("DeviceModel") if k.startswith(namespace)} == {
            f"{namespace}/DeviceModel/thermostat"
        }
        body = edge_a.get(dev)
        assert body["kind"] == "Device"
        assert body["metadata"]["labels"] == {"room": "a1"}
        assert "managedFields" not in body["metadata"]
        assert body["spec"]["properties"][1]["desired"] == {
            "value": "21",
            "metadata": {"by": "ops"},
        }

        # A new desired value goes down in the Device.
        changed = thermostat("mine", a, setpoint="23.5")
        current = await kube.get(Device, "mine", namespace=namespace)
        changed["metadata"]["resourceVersion"] = current.metadata.resourceVersion
        await kube.replace(Device.from_dict(changed), namespace=namespace)
        await eventually(
            lambda: edge_a.get(dev)["spec"]["properties"][1]["desired"]["value"] == "23.5",
            "the desired value reaches the node",
        )

        # Moved to B: it leaves A (with its model, used by nothing else there) and reaches B.
        await kube.patch(
            Device,
            "mine",
            {"spec": {"nodeName": b}},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )
        await eventually(
            lambda: (
                dev not in edge_a.keys("Device")
                and f"{namespace}/DeviceModel/thermostat" not in edge_a.keys("DeviceModel")
            ),
            "the moved device leaves node A",
        )
        await eventually(lambda: dev in edge_b.keys("Device"), "and reaches node B")


async def test_a_device_with_a_missing_model_still_reaches_its_node_and_gets_an_event(
    start_cloud: Any, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    cloud = await start_cloud()
    node = node_name()
    async with agent(cloud, tmp_path / "a.db", node) as edge:
        created = await create(kube, Device, thermostat("orphan", node, "nowhere"), namespace)
        key = f"{namespace}/Device/orphan"
        await eventually(lambda: key in edge.keys("Device"), "the device reaches its node")

        async def warned() -> Any:
            events = [
                e
                async for e in kube.list(Event, namespace=namespace)
                if e.involvedObject.kind == "Device" and e.reason == "ModelNotFound"
            ]
            return events and events[0]

        event = await eventually(warned, "a ModelNotFound event on the device")
        assert event.type == "Warning"
        assert event.involvedObject.uid == created.metadata.uid
        assert event.involvedObject.apiVersion == "devices.outpost.io/v1beta1"
        assert f"{namespace}/nowhere" in event.message
        # The model made later follows the device to its node.
        await create(kube, DeviceModel, thermostat_model("nowhere"), namespace)
        await eventually(
            lambda: f"{namespace}/DeviceModel/nowhere" in edge.keys("DeviceModel"),
            "the model follows once it exists",
        )


# -- upstream --------------------------------------------------------------------------------------


async def test_twins_become_device_status_and_only_for_the_nodes_own_devices(
    start_cloud: Any, kube: AsyncClient, namespace: str, tmp_path: Path, caplog: Any
) -> None:
    cloud = await start_cloud(device_status_interval_s=0.5)
    a, b = node_name(), node_name()
    await create(kube, DeviceModel, thermostat_model(), namespace)
    mine = await create(kube, Device, thermostat("mine", a), namespace)
    theirs = await create(kube, Device, thermostat("theirs", b), namespace)
    async with agent(cloud, tmp_path / "a.db", a) as edge:
        await eventually(lambda: f"{namespace}/Device/mine" in edge.keys("Device"), "arrives")
        refused = cloud.controller.reports.refused
        edge.report(Op.TWIN, f"{namespace}/Device/theirs", twin(theirs.metadata.uid, "99"))
        edge.report(
            Op.TELEMETRY,
            f"{namespace}/Device/theirs",
            {"uid": theirs.metadata.uid, "property": "temperature", "value": 99, "time": 1},
            coalesce_key="t-forged",
        )
        # A stale report (an earlier device of that name) is dropped, not written.
        edge.report(Op.TWIN, f"{namespace}/Device/mine", twin("an-old-uid", "0"), "old")
        edge.report(Op.TWIN, f"{namespace}/Device/mine", twin(mine.metadata.uid, "21.5"))
        status = await eventually(
            lambda: device_status(kube, "mine", namespace), "the DeviceStatus is written"
        )
        assert status["status"]["state"] == "online"
        assert status["status"]["twins"][0]["reported"]["value"] == "21.5"
        owner = status["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"]) == ("Device", mine.metadata.uid)
        await eventually(
            lambda: cloud.controller.reports.refused - refused == 2, "both forged reports refused"
        )
        assert await device_status(kube, "theirs", namespace) is None

        # The device reports a reason: it is in the status for kubectl to show.
        report = twin(mine.metadata.uid, "21.5", state="offline")
        report["reasons"] = [{"property": "temperature", "reason": "Timeout", "message": "no"}]
        edge.report(Op.TWIN, f"{namespace}/Device/mine", report)

        async def offline() -> Any:
            found = await device_status(kube, "mine", namespace)
            return found and found["status"]["state"] == "offline" and found

        status = await eventually(offline, "the new state is written")
        assert status["status"]["reasons"][0]["reason"] == "Timeout"
    refusals = [r for r in caplog.records if r.getMessage() == "report refused"]
    assert {r.key for r in refusals} == {f"{namespace}/Device/theirs"}


async def test_a_flood_of_twin_reports_makes_a_bounded_number_of_writes(
    start_cloud: Any, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    """30 devices reporting 3 times a second for 10 s: 900 reports. KubeEdge wrote each one.
    Here each device is written at most once per 2 s interval, and the last value lands."""
    devices, rate, seconds, interval = 30, 3, 10, 2.0
    cloud = await start_cloud(device_status_interval_s=interval)
    node = node_name()
    await create(kube, DeviceModel, thermostat_model(), namespace)
    uids = {}
    for n in range(devices):
        uids[f"d{n}"] = (
            await create(kube, Device, thermostat(f"d{n}", node), namespace)
        ).metadata.uid

    # Count the apiserver's writes as the apiserver reports them: every change to a
    # DeviceStatus is one watch event.
    writes = {"n": 0}

    async def count_writes() -> None:
        async for change, _obj in kube.watch(DeviceStatus, namespace=namespace):
            if change in ("ADDED", "MODIFIED"):
                writes["n"] += 1

    writer = cloud.controller.device_status
    before = (writer.writes, writer.coalesced, cloud.controller.reports.twins)
    async with agent(cloud, tmp_path / "a.db", node) as edge, trio.open_nursery() as counting:
        await eventually(
            lambda: len([k for k in edge.keys("Device") if k.startswith(namespace)]) == devices,
            "every device reaches the node",
        )
        counting.start_soon(count_writes)
        await trio.sleep(0.5)  # the watch is open (it cannot say so before its first event)
        started = trio.current_time()
        sent = 0
        for tick in range(rate * seconds):
            for n in range(devices):
                # A unique coalesce key: every report goes up (an edge that does not coalesce).
                edge.report(
                    Op.TWIN,
                    f"{namespace}/Device/d{n}",
                    twin(uids[f"d{n}"], f"{tick}.{n}"),
                    coalesce_key=f"flood-{tick}-{n}",
                )
                sent += 1
            await trio.sleep_until(started + (tick + 1) / rate)
        flood_s = trio.current_time() - started

        async def all_latest() -> bool:
            last = rate * seconds - 1
            for n in range(devices):
                found = await device_status(kube, f"d{n}", namespace)
                if not found or found["status"]["twins"][0]["reported"]["value"] != f"{last}.{n}":
                    return False
            return True

        await eventually(all_latest, "every device's last value is written", within=20)
        await trio.sleep(interval + 0.5)  # nothing more comes
        counting.cancel_scope.cancel()
    received = cloud.controller.reports.twins - before[2]
    made = writer.writes - before[0]
    coalesced = writer.coalesced - before[1]
    # Per device: one creation, then at most one write per interval (plus the last one).
    bound = devices * (1 + (flood_s + 20) / interval)
    print(
        f"flood: {sent} twin reports in {flood_s:.1f}s, {received} received by the cloud,"
        f" {made} DeviceStatus writes by the writer, {writes['n']} seen by the apiserver's"
        f" watch, {coalesced} coalesced; bound {bound:.0f}"
    )
    assert received == sent
    assert writes["n"] <= bound
    assert made <= bound
    # Far fewer than one per report (KubeEdge's behaviour), and most coalesced.
    assert writes["n"] < sent / 3
    assert coalesced >= sent / 2
    registry = CollectorRegistry()
    controller_metrics.register(registry, cloud.controller)
    scraped = generate_latest(registry).decode()
    assert f"outpost_device_status_writes_total {float(writer.writes)}" in scraped
    assert "outpost_device_status_coalesced_total" in scraped


async def test_telemetry_goes_to_mqtt(
    start_cloud: Any, kube: AsyncClient, namespace: str, tmp_path: Path, broker: Mosquitto
) -> None:
    cloud = await start_cloud(telemetry_mqtt=broker.url)
    node = node_name()
    await create(kube, DeviceModel, thermostat_model(), namespace)
    mine = await create(kube, Device, thermostat("t1", node), namespace)
    with TestClient(broker) as listener:
        topic = f"outpost/telemetry/{node}/{namespace}/t1"
        await listener.subscribe("outpost/telemetry/#")
        async with agent(cloud, tmp_path / "a.db", node) as edge:
            await eventually(lambda: f"{namespace}/Device/t1" in edge.keys("Device"), "arrives")
            for n in range(20):
                edge.report(
                    Op.TELEMETRY,
                    f"{namespace}/Device/t1",
                    {"uid": mine.metadata.uid, "property": "temperature", "value": 20 + n / 10,
                     "time": 1_700_000_000_000 + n},
                    coalesce_key=f"t{n}",
                )  # fmt: skip
            got = [json.loads((await listener.expect(topic)).payload) for _ in range(20)]
    assert [g["time"] - 1_700_000_000_000 for g in got] == list(range(20))  # all, in order
    assert got[0] == {
        "node": node, "namespace": namespace, "device": "t1", "uid": mine.metadata.uid,
        "property": "temperature", "value": 20.0, "time": 1_700_000_000_000,
    }  # fmt: skip
    await eventually(lambda: cloud.controller.telemetry.published == 20, "publishing is done")
    assert await device_status(kube, "t1", namespace) is None  # never to the CRD


async def test_telemetry_without_a_sink_is_counted_and_dropped(
    start_cloud: Any, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    cloud = await start_cloud()
    node = node_name()
    await create(kube, DeviceModel, thermostat_model(), namespace)
    mine = await create(kube, Device, thermostat("t1", node), namespace)
    async with agent(cloud, tmp_path / "a.db", node) as edge:
        await eventually(lambda: f"{namespace}/Device/t1" in edge.keys("Device"), "arrives")
        for n in range(5):
            edge.report(
                Op.TELEMETRY,
                f"{namespace}/Device/t1",
                {"uid": mine.metadata.uid, "property": "temperature", "value": n, "time": n},
                coalesce_key=f"t{n}",
            )
        await eventually(lambda: cloud.controller.telemetry.dropped == 5, "five dropped")
