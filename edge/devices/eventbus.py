"""The eventbus: device twins on the local MQTT broker, in KubeEdge's topics and payloads, so that
apps written for KubeEdge's eventbus (and mapper-style apps) keep working against Outpost.

Topics (``{id}`` is ``{namespace}/{name}``):

===========================================================  ====  ==============================
``$hw/events/device/{id}/twin/update``                         out  reported values that changed
                                                               in   an app sets desired values
``$hw/events/device/{id}/twin/update/result``                  out  the answer to an app's update
``$hw/events/device/{id}/twin/update/delta``                   out  desired values != reported
``$hw/events/device/{id}/twin/get``                            in   an app asks for the twin
``$hw/events/device/{id}/twin/get/result``                     out  ...and gets it
``$hw/events/device/{id}/state/update``                        out  online / offline / unknown
``$hw/events/node/{node}/membership/get``                      in   an app asks for the devices
``$hw/events/node/{node}/membership/get/result``               out  ...and gets them
``$hw/events/node/{node}/membership/updated``                  out  devices added and removed
===========================================================  ====  ==============================

Payloads are KubeEdge's (``edge/pkg/devicetwin/dttype``): every message has ``event_id`` and
``timestamp`` (unix ms); a twin is ``{"expected": {"value", "metadata": {"timestamp"}},
"actual": {...}, "optional": false, "metadata": {"type": "int"}}``; values are strings; an error
answer is ``{"event_id", "timestamp", "code": 400|404|500, "reason"}``. The edge publishes
reported values on ``twin/update`` the way a KubeEdge mapper does (``actual`` only); an app's
``twin/update`` with ``expected`` values is checked (device and property exist, the property is
writable, the value is of its type — all or nothing, like KubeEdge), answered on
``twin/update/result``, and handed to the device manager as ``DesiredUpdate``s, which applies
them as it does desired values from the cloud. ``actual`` values sent by apps are ignored: here
the device drivers own reported values.

Two layers, as elsewhere: ``TwinBook`` is the sans-IO core (membership, twins, what to publish for
each event; tested without a broker), ``EventBus`` the trio shell around an
``edge.mqtt.MqttClient`` (MQTT 5 with no-local subscriptions, so the bus does not hear its own
``twin/update`` messages).

While the broker is away nothing queues: on every (re)connect the bus publishes each device's
current twin, delta and state once, so subscribers catch up with the latest values.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from edge.devices.manager import INDEX_KEY, VIEW_STATE_PREFIX, load_views
from edge.devices.model import DeviceConfig
from edge.devices.values import from_text
from edge.mqtt import Message, MqttClient
from edge.store.aio import AsyncStore
from edge.store.feed import Changes
from edge.wire.keys import split_key

log = logging.getLogger("edge.devices.eventbus")

SetDesired = Callable[[str, str, str | None], None]  # (device key, property, value)

DEVICE_PREFIX = "$hw/events/device/"
NODE_PREFIX = "$hw/events/node/"
TWIN_UPDATE = "/twin/update"
TWIN_UPDATE_RESULT = "/twin/update/result"
TWIN_DELTA = "/twin/update/delta"
TWIN_GET = "/twin/get"
TWIN_GET_RESULT = "/twin/get/result"
STATE_UPDATE = "/state/update"
MEMBERSHIP_GET = "/membership/get"
MEMBERSHIP_GET_RESULT = "/membership/get/result"
MEMBERSHIP_UPDATED = "/membership/updated"

BAD_REQUEST = 400
NOT_FOUND = 404
INTERNAL_ERROR = 500

# The longest twin value an app may set (KubeEdge allows 512 bytes).
MAX_VALUE_LEN = 512


def device_topic(namespace: str, name: str, suffix: str) -> str:
    return f"{DEVICE_PREFIX}{namespace}/{name}{suffix}"


def node_topic(node: str, suffix: str) -> str:
    return f"{NODE_PREFIX}{node}{suffix}"


@dataclass(frozen=True)
class DesiredUpdate:
    """An app set a desired value over the eventbus (already checked against the model)."""

    namespace: str
    name: str
    property: str
    value: str  # twin text, as in Device.spec.properties[].desired.value
    event_id: str = ""


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.payload, separators=(",", ":")).encode()


@dataclass
class _Twin:
    type: str  # KubeEdge's metadata type: the model type in lower case
    writable: bool = True
    expected: str | None = None
    expected_ms: int = 0
    spec_desired: str | None = None  # the Device's desired value, as last seen
    actual: str | None = None
    actual_ms: int = 0

    def message(self, *, expected: bool = True, actual: bool = True) -> dict[str, Any]:
        """The twin as KubeEdge's ``MsgTwin``."""
        out: dict[str, Any] = {}
        if expected and self.expected is not None:
            out["expected"] = _value(self.expected, self.expected_ms)
        if actual and self.actual is not None:
            out["actual"] = _value(self.actual, self.actual_ms)
        out["optional"] = False
        out["metadata"] = {"type": self.type}
        return out


@dataclass
class _Device:
    namespace: str
    name: str
    uid: str = ""
    model: str = ""
    protocol: str = ""
    description: str = ""
    state: str = "unknown"
    last_online: str = ""
    twins: dict[str, _Twin] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def message(self, *, twin: bool) -> dict[str, Any]:
        """The device as KubeEdge's ``Device`` (membership messages)."""
        attributes = {
            key: {"value": value, "optional": False, "metadata": {"type": "string"}}
            for key, value in (
                ("namespace", self.namespace),
                ("uid", self.uid),
                ("model", self.model),
                ("protocol", self.protocol),
            )
            if value
        }
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "state": self.state,
            "last_online": self.last_online,
            "attributes": attributes,
        }
        if twin:
            out["twin"] = {key: t.message() for key, t in self.twins.items()}
        return out

    def delta(self) -> dict[str, str]:
        return {
            key: t.expected
            for key, t in self.twins.items()
            if t.expected not in (None, "") and t.expected != t.actual
        }


def _value(value: str, ms: int) -> dict[str, Any]:
    out: dict[str, Any] = {"value": value}
    if ms:
        out["metadata"] = {"timestamp": ms}
    return out


def _base(event_id: str | None, now_ms: int) -> dict[str, Any]:
    return {
        "event_id": event_id if event_id is not None else str(uuid.uuid4()),
        "timestamp": now_ms,
    }


def _error(event_id: str, now_ms: int, code: int, reason: str) -> dict[str, Any]:
    return {**_base(event_id, now_ms), "code": code, "reason": reason}


class TwinBook:
    """What the eventbus knows (the node's devices, their twins) and what it says about it.

    Every method takes the time (unix ms) and returns the messages to publish; nothing here does
    I/O. ``handle`` also returns the desired values apps set, for the device manager.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.devices: dict[tuple[str, str], _Device] = {}
        self._published_delta: dict[tuple[str, str], dict[str, str]] = {}

    # -- from the device manager -----------------------------------------------------------

    def set_membership(self, configs: Iterable[DeviceConfig], now_ms: int) -> list[Outgoing]:
        """The node's devices are now ``configs``: ``membership/updated`` when that adds or
        removes any; a changed desired value in a Device's spec becomes the expected value."""
        out: list[Outgoing] = []
        wanted: dict[tuple[str, str], DeviceConfig] = {(c.namespace, c.name): c for c in configs}
        added: list[_Device] = []
        removed = [self.devices.pop(key) for key in list(self.devices) if key not in wanted]
        for key, config in wanted.items():
            device = self.devices.get(key)
            is_new = device is None
            if device is None:
                device = self.devices[key] = _Device(config.namespace, config.name)
                added.append(device)
            device.uid, device.model, device.protocol = config.uid, config.model, config.protocol
            device.description = f"{config.protocol} device of model {config.model}"
            twins: dict[str, _Twin] = {}
            for prop in config.properties:
                twin = device.twins.get(prop.name) or _Twin(type=prop.type.lower())
                twin.type, twin.writable = prop.type.lower(), prop.writable
                if prop.desired != twin.spec_desired:
                    twin.spec_desired = prop.desired
                    if prop.desired is not None:
                        twin.expected, twin.expected_ms = prop.desired, now_ms
                twins[prop.name] = twin
            device.twins = twins
            if not is_new:  # a new device's delta follows its membership/updated
                out += self._delta(device, now_ms)
        for device in removed:
            self._published_delta.pop((device.namespace, device.name), None)
        if added or removed:
            out.append(
                Outgoing(
                    node_topic(self.node, MEMBERSHIP_UPDATED),
                    {
                        **_base(None, now_ms),
                        "added_devices": [d.message(twin=True) for d in added],
                        "removed_devices": [d.message(twin=False) for d in removed],
                    },
                )
            )
        for device in added:
            out += self._delta(device, now_ms)
        return out

    def update_twin(
        self, namespace: str, name: str, body: dict[str, Any], now_ms: int
    ) -> list[Outgoing]:
        """A TWIN report body (``{"state", "lastOnlineTime", "twins": [{"propertyName",
        "reported": {"value", "metadata": {"timestamp", "type"}}, ...}]}``): reported values that
        changed go out on ``twin/update``, a changed state on ``state/update``, and the delta
        when it changed."""
        device = self.devices.get((namespace, name))
        if device is None:  # reported before set_membership named it: learn it from the body
            device = self.devices[(namespace, name)] = _Device(
                namespace, name, uid=str(body.get("uid") or "")
            )
        out: list[Outgoing] = []
        changed: dict[str, dict[str, Any]] = {}
        for entry in body.get("twins") or []:
            if not isinstance(entry, dict) or not entry.get("propertyName"):
                continue
            key = str(entry["propertyName"])
            reported = entry.get("reported") or {}
            metadata = reported.get("metadata") or {}
            twin = device.twins.get(key)
            if twin is None:
                twin = device.twins[key] = _Twin(type=str(metadata.get("type") or "string").lower())
            value = reported.get("value")
            if value is None or value == "":
                continue
            value = str(value)
            if value != twin.actual:
                twin.actual = value
                twin.actual_ms = _ms(metadata.get("timestamp")) or now_ms
                changed[key] = twin.message(expected=False)
        if changed:
            out.append(
                Outgoing(
                    device_topic(namespace, name, TWIN_UPDATE),
                    {**_base(None, now_ms), "twin": changed},
                )
            )
        state = str(body.get("state") or "")
        if state:
            out += self.update_state(
                namespace, name, state, str(body.get("lastOnlineTime") or ""), now_ms
            )
        if changed:
            out += self._delta(device, now_ms)
        return out

    def update_view(self, view: dict[str, Any], now_ms: int) -> list[Outgoing]:
        """A device view from the device manager (``DeviceTwin.view()``: ``namespace``,
        ``name``, ``state``, ``properties[]{name, type, accessMode, value, timestamp,
        desired}``). Local apps get the latest reading (``value``), not only what passed the
        deadband to the cloud; ``desired`` is the expected value. A device seen for the first
        time joins the membership."""
        namespace, name = str(view.get("namespace") or ""), str(view.get("name") or "")
        if not namespace or not name:
            return []
        out: list[Outgoing] = []
        device = self.devices.get((namespace, name))
        if device is None:
            device = self.devices[(namespace, name)] = _Device(namespace, name)
            out.append(self._membership_updated([device], [], now_ms))
        device.uid = str(view.get("uid") or device.uid)
        device.model = str(view.get("model") or device.model)
        device.protocol = str(view.get("protocol") or device.protocol)
        device.description = f"{device.protocol} device of model {device.model}"
        changed: dict[str, dict[str, Any]] = {}
        expected_changed = False
        for entry in view.get("properties") or []:
            key = str(entry.get("name") or "")
            if not key:
                continue
            twin = device.twins.get(key) or _Twin(type="string")
            device.twins[key] = twin
            twin.type = str(entry.get("type") or twin.type).lower()
            twin.writable = entry.get("accessMode", "ReadWrite") == "ReadWrite"
            desired = entry.get("desired")
            if desired not in (None, "") and str(desired) != twin.expected:
                twin.expected, twin.expected_ms = str(desired), now_ms
                expected_changed = True
            value = entry.get("value")
            if value not in (None, "") and str(value) != twin.actual:
                twin.actual = str(value)
                twin.actual_ms = _ms(entry.get("timestamp")) or now_ms
                changed[key] = twin.message(expected=False)
        if changed:
            payload = {**_base(None, now_ms), "twin": changed}
            out.append(Outgoing(device_topic(namespace, name, TWIN_UPDATE), payload))
        state = str(view.get("state") or "")
        if state:
            last_online = str(view.get("lastOnlineTime") or "")
            out += self.update_state(namespace, name, state, last_online, now_ms)
        if changed or expected_changed:
            out += self._delta(device, now_ms)
        return out

    def keep_only(self, keys: Iterable[tuple[str, str]], now_ms: int) -> list[Outgoing]:
        """Devices not among ``keys`` (namespace, name) have left the node."""
        wanted = set(keys)
        removed = [self.devices.pop(k) for k in list(self.devices) if k not in wanted]
        for device in removed:
            self._published_delta.pop((device.namespace, device.name), None)
        return [self._membership_updated([], removed, now_ms)] if removed else []

    def _membership_updated(
        self, added: list[_Device], removed: list[_Device], now_ms: int
    ) -> Outgoing:
        payload = {
            **_base(None, now_ms),
            "added_devices": [d.message(twin=True) for d in added],
            "removed_devices": [d.message(twin=False) for d in removed],
        }
        return Outgoing(node_topic(self.node, MEMBERSHIP_UPDATED), payload)

    def update_state(
        self, namespace: str, name: str, state: str, last_online: str, now_ms: int
    ) -> list[Outgoing]:
        device = self.devices.get((namespace, name))
        if device is None:
            return []
        if last_online:
            device.last_online = last_online
        if state == device.state:
            return []
        device.state = state
        return [
            Outgoing(
                device_topic(namespace, name, STATE_UPDATE), {**_base(None, now_ms), "state": state}
            )
        ]

    def snapshot(self, now_ms: int) -> list[Outgoing]:
        """Everything current, once: what a subscriber that just (re)connected needs."""
        out: list[Outgoing] = []
        for device in self.devices.values():
            twin = {k: t.message(expected=False) for k, t in device.twins.items() if t.actual}
            if twin:
                out.append(
                    Outgoing(
                        device_topic(device.namespace, device.name, TWIN_UPDATE),
                        {**_base(None, now_ms), "twin": twin},
                    )
                )
            out.append(
                Outgoing(
                    device_topic(device.namespace, device.name, STATE_UPDATE),
                    {**_base(None, now_ms), "state": device.state},
                )
            )
            self._published_delta.pop((device.namespace, device.name), None)
            out += self._delta(device, now_ms)
        return out

    def _delta(self, device: _Device, now_ms: int) -> list[Outgoing]:
        """``twin/update/delta`` when the delta is not empty and differs from the last one sent
        (KubeEdge sends it after every update; repeating an unchanged one helps nobody)."""
        key = (device.namespace, device.name)
        delta = device.delta()
        if delta == self._published_delta.get(key, {}):
            return []
        self._published_delta[key] = delta
        if not delta:
            return []
        twin = {k: t.message() for k, t in device.twins.items() if t.expected not in (None, "")}
        return [
            Outgoing(
                device_topic(device.namespace, device.name, TWIN_DELTA),
                {**_base(None, now_ms), "twin": twin, "delta": delta},
            )
        ]

    # -- from apps -----------------------------------------------------------------------------

    def handle(
        self, topic: str, payload: bytes, now_ms: int, *, capacity: int = 1 << 30
    ) -> tuple[list[Outgoing], list[DesiredUpdate]]:
        """An app's request. ``capacity``: how many desired updates the device manager can take
        now; an update needing more is refused (500) rather than half applied."""
        if topic == node_topic(self.node, MEMBERSHIP_GET):
            return self._membership_get(payload, now_ms), []
        if not topic.startswith(DEVICE_PREFIX):
            return [], []
        rest = topic[len(DEVICE_PREFIX) :].split("/")
        if len(rest) < 4 or rest[2] != "twin":
            return [], []
        namespace, name, action = rest[0], rest[1], "/" + "/".join(rest[2:])
        if action == TWIN_GET:
            return self._twin_get(namespace, name, payload, now_ms), []
        if action == TWIN_UPDATE:
            return self._twin_update(namespace, name, payload, now_ms, capacity)
        return [], []

    def _membership_get(self, payload: bytes, now_ms: int) -> list[Outgoing]:
        topic = node_topic(self.node, MEMBERSHIP_GET_RESULT)
        request, problem = _parse(payload)
        event_id = str(request.get("event_id") or "")
        if problem:
            return [Outgoing(topic, _error(event_id, now_ms, BAD_REQUEST, problem))]
        devices = [d.message(twin=False) for _, d in sorted(self.devices.items())]
        return [Outgoing(topic, {**_base(event_id, now_ms), "devices": devices})]

    def _twin_get(self, namespace: str, name: str, payload: bytes, now_ms: int) -> list[Outgoing]:
        topic = device_topic(namespace, name, TWIN_GET_RESULT)
        request, problem = _parse(payload)
        event_id = str(request.get("event_id") or "")
        if problem:
            return [Outgoing(topic, _error(event_id, now_ms, BAD_REQUEST, problem))]
        device = self.devices.get((namespace, name))
        if device is None:
            reason = f"Device {namespace}/{name} not found while getting twin"
            return [Outgoing(topic, _error(event_id, now_ms, NOT_FOUND, reason))]
        twin = {key: t.message() for key, t in device.twins.items()}
        return [Outgoing(topic, {**_base(event_id, now_ms), "twin": twin})]

    def _twin_update(
        self, namespace: str, name: str, payload: bytes, now_ms: int, capacity: int
    ) -> tuple[list[Outgoing], list[DesiredUpdate]]:
        topic = device_topic(namespace, name, TWIN_UPDATE_RESULT)
        request, problem = _parse(payload)
        event_id = str(request.get("event_id") or "")

        def fail(code: int, reason: str) -> tuple[list[Outgoing], list[DesiredUpdate]]:
            log.info(
                "eventbus twin update refused",
                extra={"device": f"{namespace}/{name}", "code": code, "reason": reason},
            )
            return [Outgoing(topic, _error(event_id, now_ms, code, reason))], []

        if problem:
            return fail(BAD_REQUEST, problem)
        twins = request.get("twin")
        if not isinstance(twins, dict) or not twins:
            return fail(BAD_REQUEST, "Update twin error, the update request body not have key:twin")
        device = self.devices.get((namespace, name))
        if device is None:
            return fail(NOT_FOUND, "Update rejected due to the device is not existed")
        updates: list[tuple[str, _Twin, str]] = []
        for key, msg in twins.items():
            if not isinstance(msg, dict):
                return fail(BAD_REQUEST, f"twin {key}: deleting a twin is not supported here")
            expected = msg.get("expected")
            if expected is None:
                continue  # "actual" from an app: the drivers own reported values
            value = expected.get("value") if isinstance(expected, dict) else None
            if not isinstance(value, str | int | float | bool) or value == "":
                return fail(BAD_REQUEST, f"twin {key}: expected.value must be a non-empty string")
            text = _text(value)
            twin = device.twins.get(key)
            if twin is None:
                return fail(
                    BAD_REQUEST,
                    f"twin {key}: device {namespace}/{name} has no such"
                    f" property (it has: {', '.join(sorted(device.twins)) or 'none'})",
                )
            if not twin.writable:
                return fail(BAD_REQUEST, f"twin {key}: the property is read-only")
            if len(text) > MAX_VALUE_LEN:
                return fail(BAD_REQUEST, f"twin {key}: the value is over {MAX_VALUE_LEN} bytes")
            try:
                from_text(text, twin.type.upper())
            except ValueError as exc:
                return fail(BAD_REQUEST, f"twin {key}: {exc}")
            updates.append((key, twin, text))
        if not updates:
            return fail(
                BAD_REQUEST,
                "no expected values to set (actual values come from the device's driver here)",
            )
        if len(updates) > capacity:
            return fail(
                INTERNAL_ERROR,
                "busy: the device manager has not taken the earlier desired values yet; try again",
            )
        result: dict[str, Any] = {}
        desired: list[DesiredUpdate] = []
        for key, twin, text in updates:
            twin.expected, twin.expected_ms = text, now_ms
            result[key] = twin.message(actual=False)
            desired.append(DesiredUpdate(namespace, name, key, text, event_id))
        out = [Outgoing(topic, {**_base(event_id, now_ms), "twin": result})]
        out += self._delta(device, now_ms)
        return out, desired


def _parse(payload: bytes) -> tuple[dict[str, Any], str]:
    """A request's JSON object (an empty payload counts as ``{}``), or a problem to answer."""
    if not payload.strip():
        return {}, ""
    try:
        request = json.loads(payload)
    except ValueError:
        return {}, "Unmarshal update request body failed, Please check the request"
    if not isinstance(request, dict):
        return {}, "the request must be a JSON object"
    return request, ""


def _text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _ms(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class EventBus:
    """The eventbus on the local broker, for the device manager to feed and to read from.

    ::

        bus = EventBus("mqtt://127.0.0.1:1883", node="gw-17")
        nursery.start_soon(bus.run)
        bus.set_membership(configs)          # whenever the node's devices change
        bus.publish_twin(ns, name, body)     # with every TWIN body (as often as you like)
        async for update in bus.desired_updates:
            ...                              # apply like a desired value from the cloud

    ``set_membership``/``publish_twin``/``publish_state`` never block and never raise for a
    broker problem: while the broker is away their messages are dropped, and a snapshot of the
    current state goes out when it is back. ``desired_updates`` is bounded (``desired_buffer``);
    when it is full, apps' updates are refused with code 500 and nothing is lost silently.
    """

    def __init__(
        self, broker_url: str, node: str, *, client_id: str = "", desired_buffer: int = 64
    ) -> None:
        self.node = node
        self.book = TwinBook(node)
        self._desired_send, self.desired_updates = trio.open_memory_channel[DesiredUpdate](
            desired_buffer
        )
        self._desired_buffer = desired_buffer
        self.published = 0
        self.dropped = 0
        self.link = MqttClient(
            broker_url,
            client_id=client_id or f"outpost-eventbus-{node}-{uuid.uuid4().hex[:6]}",
            subscriptions=[
                f"{DEVICE_PREFIX}+/+{TWIN_UPDATE}",
                f"{DEVICE_PREFIX}+/+{TWIN_GET}",
                node_topic(node, MEMBERSHIP_GET),
            ],
            on_message=self._on_message,
            on_connect=self._on_connect,
            mqtt5=True,
            no_local=True,
            name="eventbus",
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the bus on the broker until cancelled."""
        await self.link.run(task_status=task_status)

    async def serve(self, aio: AsyncStore, set_desired: SetDesired) -> None:
        """Run the bus for the node's devices: it follows their views in the store (the device
        manager saves one whenever a twin reports) and publishes them, devices that leave the
        store's index leave the membership, and desired values from apps go to
        ``set_desired(key, property, value)``."""
        with aio.feed.subscribe() as feed:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run)
                nursery.start_soon(self._apply_desired, set_desired)
                async for changes in feed:
                    await self._follow(aio, changes)

    async def _follow(self, aio: AsyncStore, changes: Changes) -> None:
        if changes.everything:
            views = await aio.run(load_views, aio.store)
        else:
            keys = sorted(changes.states(VIEW_STATE_PREFIX))
            # One trip to the store's thread for all of them: a twin report changes one or two.
            found = (
                await aio.run(lambda: [aio.store.get_state(key) for key in keys]) if keys else []
            )
            views = [view for view in found if view is not None]
        for view in views:
            self.on_view(view)
        if changes.state_changed(INDEX_KEY):
            index = await aio.get_state(INDEX_KEY, []) or []
            members = [split_key(key) for key in index]
            self._send(self.book.keep_only([(ns, name) for ns, _, name in members], now_ms()))

    async def _apply_desired(self, set_desired: SetDesired) -> None:
        async for update in self.desired_updates:
            key = f"{update.namespace}/Device/{update.name}"
            try:
                set_desired(key, update.property, update.value)
            except KeyError:  # the device left meanwhile
                log.info("desired value for a device that left", extra={"device": key})

    def on_view(self, view: dict[str, Any]) -> None:
        """Publish what changed in a device's view (``DeviceTwin.view``)."""
        self._send(self.book.update_view(view, now_ms()))

    @property
    def connected(self) -> bool:
        return self.link.connected

    def set_membership(self, configs: Iterable[DeviceConfig]) -> None:
        self._send(self.book.set_membership(configs, now_ms()))

    def publish_twin(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self._send(self.book.update_twin(namespace, name, body, now_ms()))

    def publish_state(self, namespace: str, name: str, state: str, last_online: str = "") -> None:
        self._send(self.book.update_state(namespace, name, state, last_online, now_ms()))

    # -- the link's callbacks (trio thread, must not block) ------------------------------------

    def _on_connect(self) -> None:
        self._send(self.book.snapshot(now_ms()))

    def _on_message(self, message: Message) -> None:
        stats = self._desired_send.statistics()
        free = stats.max_buffer_size - stats.current_buffer_used + stats.tasks_waiting_receive
        out, desired = self.book.handle(message.topic, message.payload, now_ms(), capacity=free)
        for update in desired:
            self._desired_send.send_nowait(update)
            log.info(
                "desired value from an app",
                extra={
                    "device": f"{update.namespace}/{update.name}",
                    "property": update.property,
                    "value": update.value,
                },
            )
        self._send(out)

    def _send(self, messages: list[Outgoing]) -> None:
        for message in messages:
            if self.link.publish(message.topic, message.encode()) is None:
                self.dropped += 1  # the broker is away: the snapshot on reconnect covers it
            else:
                self.published += 1
