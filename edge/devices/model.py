"""Device and DeviceModel objects, checked and turned into the configuration the edge runs.

Sans-IO: ``parse_device`` takes the two bodies (as the cloud sends them, or as read from a
manifest) and returns a ``DeviceConfig``, or raises ``DeviceConfigError`` with a ``reason`` the
DeviceStatus shows (``ModelNotFound``, ``InvalidProperty``, ``InvalidAddress``,
``UnsupportedProtocol``, ``WrongType``, ``InvalidProtocolConfig``) and a message a person can act
on. The bodies are field-compatible with KubeEdge's ``devices.kubeedge.io/v1beta1``.

What callers may rely on:

- ``DeviceConfig.protocol`` is one of ``PROTOCOLS``; ``protocol_config`` has every default
  filled in (so drivers read keys without ``.get``). KubeEdge's ``modbus`` is accepted and
  becomes ``modbus-rtu`` (with ``serialPort``) or ``modbus-tcp`` (with ``ip``).
- ``PropertyConfig.type`` is upper case (``INT``, ``FLOAT``, ``DOUBLE``, ``STRING``,
  ``BOOLEAN``); ``visitor`` is the visitor's ``configData`` with this protocol's defaults
  filled in and numbers normalised (a Modbus visitor always has ``register``, ``offset``,
  ``limit``, ``scale``, ``add``, ``isSwap``, ``isRegisterSwap`` and ``dataType``; without a
  ``dataType``, as in KubeEdge's manifests, the model type and ``limit`` decide it: a FLOAT in one
  register is a scaled int16, in two a float32).
- Cycles are seconds (the objects carry nanoseconds, like KubeEdge), never below
  ``MIN_CYCLE_S``. ``desired`` is the desired value's text, or None when none is set.
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

PROTOCOLS = ("modbus-rtu", "modbus-tcp", "ble", "mqtt")
TYPES = ("INT", "FLOAT", "DOUBLE", "STRING", "BOOLEAN")
ACCESS_MODES = ("ReadWrite", "ReadOnly")

COIL = "CoilRegister"
DISCRETE_INPUT = "DiscreteInputRegister"
HOLDING = "HoldingRegister"
INPUT = "InputRegister"
REGISTERS = (COIL, DISCRETE_INPUT, HOLDING, INPUT)
BIT_REGISTERS = (COIL, DISCRETE_INPUT)
WRITABLE_REGISTERS = (COIL, HOLDING)

# Register data types and how many 16-bit registers each takes (string: ``limit`` of them).
DATA_TYPES = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "float64": 4,
    "string": None,
    "bool": 1,
}
_DEFAULT_DATA_TYPE = {
    "INT": "int16",
    "FLOAT": "float32",
    "DOUBLE": "float64",
    "STRING": "string",
    "BOOLEAN": "bool",
}
# Which register data types can carry a value of each model type.
_COMPATIBLE = {
    "INT": {"int16", "uint16", "int32", "uint32", "float32", "float64", "bool"},
    "FLOAT": {"int16", "uint16", "int32", "uint32", "float32", "float64"},
    "DOUBLE": {"int16", "uint16", "int32", "uint32", "float32", "float64"},
    "STRING": {"string"},
    "BOOLEAN": {"bool", "int16", "uint16"},
}

DEFAULT_COLLECT_S = 1.0
DEFAULT_REPORT_S = 1.0
MIN_CYCLE_S = 0.01
DEFAULT_TIMEOUT_S = 0.5

_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_SHORT_UUID = re.compile(r"(0x)?[0-9A-Fa-f]{4}")


class DeviceConfigError(Exception):
    """A Device (or its model) the edge cannot run, and why.

    ``reason`` is a short CamelCase word for DeviceStatus ``reasons[].reason``; ``property``
    names the property at fault, or is "" when the device as a whole is.
    """

    def __init__(self, reason: str, message: str, property: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.property = property

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass(frozen=True)
class PropertyConfig:
    """One property of a device, its model's description merged with the device's visitor."""

    name: str
    type: str
    access_mode: str = "ReadWrite"
    minimum: float | None = None
    maximum: float | None = None
    unit: str = ""
    visitor: dict[str, Any] = field(default_factory=dict)
    collect_s: float = DEFAULT_COLLECT_S
    report_s: float = DEFAULT_REPORT_S
    report_to_cloud: bool = True
    deadband: float = 0.0
    desired: str | None = None
    # Extensions beyond the design's list, kept for the eventbus and ``outpost device get``.
    description: str = ""
    push_method: dict[str, Any] | None = None

    @property
    def writable(self) -> bool:
        """Whether a desired value may be written: the model allows it, and (Modbus) the
        register kind can be written at all."""
        if self.access_mode != "ReadWrite":
            return False
        register = self.visitor.get("register")
        return register is None or register in WRITABLE_REGISTERS


@dataclass(frozen=True)
class DeviceConfig:
    namespace: str
    name: str
    uid: str
    protocol: str
    protocol_config: dict[str, Any]
    properties: list[PropertyConfig]
    model: str = ""
    methods: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The store and wire key, ``ns/Device/name``."""
        return f"{self.namespace}/Device/{self.name}"

    def property(self, name: str) -> PropertyConfig:
        for prop in self.properties:
            if prop.name == name:
                return prop
        raise KeyError(name)

    def without_desired(self) -> DeviceConfig:
        """The same configuration with no desired values: two devices equal under this differ
        only in what should be written, which needs no new driver."""
        from dataclasses import replace

        return replace(self, properties=[replace(p, desired=None) for p in self.properties])


def device_model_name(device_body: dict[str, Any]) -> str:
    """The model a Device names (``spec.deviceModelRef.name``), or ""."""
    ref = (device_body.get("spec") or {}).get("deviceModelRef") or {}
    return str(ref.get("name") or "") if isinstance(ref, dict) else ""


def parse_device(device_body: dict[str, Any], model_body: dict[str, Any] | None) -> DeviceConfig:
    """The configuration of a Device, given the DeviceModel it names (None when that model is
    not here); raises ``DeviceConfigError``."""
    if not isinstance(device_body, dict):
        raise DeviceConfigError("InvalidDevice", "the Device is not an object")
    meta = device_body.get("metadata") or {}
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "default")
    uid = str(meta.get("uid") or "")
    spec = device_body.get("spec") or {}
    if not isinstance(spec, dict):
        raise DeviceConfigError("InvalidDevice", "spec is not an object")
    model_name = device_model_name(device_body)
    if not model_name:
        raise DeviceConfigError("ModelNotFound", "spec.deviceModelRef.name is not set")
    if model_body is None:
        raise DeviceConfigError(
            "ModelNotFound",
            f"DeviceModel {namespace}/{model_name} does not exist (or has not reached this node)",
        )
    model_spec = model_body.get("spec") or {}
    protocol_spec = spec.get("protocol") or {}
    if not isinstance(protocol_spec, dict):
        raise DeviceConfigError("UnsupportedProtocol", "spec.protocol is not an object")
    protocol_config = protocol_spec.get("configData") or {}
    if not isinstance(protocol_config, dict):
        raise DeviceConfigError(
            "InvalidProtocolConfig", "spec.protocol.configData is not an object"
        )
    protocol = _protocol_name(str(protocol_spec.get("protocolName") or ""), protocol_config)
    model_protocol = str(model_spec.get("protocol") or "")
    if model_protocol and _family(model_protocol) != _family(protocol):
        raise DeviceConfigError(
            "UnsupportedProtocol",
            f"the Device speaks {protocol} but its DeviceModel {model_name} says {model_protocol}",
        )
    config = _PROTOCOL_CONFIG[protocol](dict(protocol_config))

    model_props: dict[str, dict[str, Any]] = {}
    for entry in model_spec.get("properties") or []:
        if isinstance(entry, dict) and entry.get("name"):
            model_props[str(entry["name"])] = entry
    properties: list[PropertyConfig] = []
    seen: set[str] = set()
    for entry in spec.get("properties") or []:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise DeviceConfigError("InvalidProperty", "a property without a name")
        prop_name = str(entry["name"])
        if prop_name in seen:
            raise DeviceConfigError(
                "InvalidProperty", f"property {prop_name} is listed twice", prop_name
            )
        seen.add(prop_name)
        model_prop = model_props.get(prop_name)
        if model_prop is None:
            raise DeviceConfigError(
                "InvalidProperty",
                f"property {prop_name} is not in DeviceModel {model_name}"
                f" (it has: {', '.join(sorted(model_props)) or 'none'})",
                prop_name,
            )
        properties.append(_property(protocol, entry, model_prop))
    methods = [m for m in spec.get("methods") or [] if isinstance(m, dict)]
    return DeviceConfig(
        namespace=namespace,
        name=name,
        uid=uid,
        protocol=protocol,
        protocol_config=config,
        properties=properties,
        model=model_name,
        methods=methods,
    )


# -- protocols -------------------------------------------------------------------------------


def _family(protocol: str) -> str:
    protocol = protocol.lower()
    return "modbus" if protocol.startswith("modbus") else protocol


def _protocol_name(name: str, config: dict[str, Any]) -> str:
    lowered = name.lower()
    if lowered == "modbus":  # KubeEdge's name for both
        return "modbus-rtu" if "serialPort" in config else "modbus-tcp"
    if lowered in PROTOCOLS:
        return lowered
    raise DeviceConfigError(
        "UnsupportedProtocol",
        f"protocol {name!r} is not supported here (supported: {', '.join(PROTOCOLS)})"
        if name
        else "spec.protocol.protocolName is not set",
    )


def _number(value: Any, what: str, reason: str = "InvalidProperty", prop: str = "") -> float:
    if isinstance(value, bool):
        raise DeviceConfigError(reason, f"{what} must be a number, got {value!r}", prop)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DeviceConfigError(reason, f"{what} must be a number, got {value!r}", prop) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise DeviceConfigError(reason, f"{what} must be a finite number, got {value!r}", prop)
    return number


def _integer(
    value: Any, what: str, low: int, high: int, reason: str = "InvalidAddress", prop: str = ""
) -> int:
    number = _number(value, what, reason, prop)
    if number != int(number) or not low <= number <= high:
        raise DeviceConfigError(
            reason, f"{what} must be a whole number from {low} to {high}, got {value!r}", prop
        )
    return int(number)


def _flag(value: Any, what: str, prop: str = "") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DeviceConfigError("InvalidProperty", f"{what} must be true or false, got {value!r}", prop)


def _timeout(config: dict[str, Any]) -> float:
    timeout = _number(config.get("timeout", DEFAULT_TIMEOUT_S), "timeout", "InvalidProtocolConfig")
    if timeout <= 0:
        raise DeviceConfigError("InvalidProtocolConfig", f"timeout must be positive, got {timeout}")
    return timeout


def _modbus_rtu(config: dict[str, Any]) -> dict[str, Any]:
    port = config.get("serialPort")
    if not port or not isinstance(port, str):
        raise DeviceConfigError("InvalidAddress", "modbus-rtu needs configData.serialPort")
    parity = str(config.get("parity", "none")).lower()
    parity = {"n": "none", "e": "even", "o": "odd"}.get(parity, parity)
    if parity not in ("none", "even", "odd"):
        raise DeviceConfigError(
            "InvalidProtocolConfig", f"parity must be none, even or odd, got {parity!r}"
        )
    baud = _integer(
        config.get("baudRate", 9600), "baudRate", 50, 4_000_000, "InvalidProtocolConfig"
    )
    data_bits = _integer(config.get("dataBits", 8), "dataBits", 5, 8, "InvalidProtocolConfig")
    stop_bits = _integer(config.get("stopBits", 1), "stopBits", 1, 2, "InvalidProtocolConfig")
    config.update(
        serialPort=port,
        baudRate=baud,
        dataBits=data_bits,
        parity=parity,
        stopBits=stop_bits,
        slaveID=_integer(config.get("slaveID", 1), "slaveID", 1, 247),
        timeout=_timeout(config),
    )
    return config


def _modbus_tcp(config: dict[str, Any]) -> dict[str, Any]:
    host = config.get("ip")
    if not host or not isinstance(host, str):
        raise DeviceConfigError("InvalidAddress", "modbus-tcp needs configData.ip")
    config.update(
        ip=host,
        port=_integer(config.get("port", 502), "port", 1, 65535),
        slaveID=_integer(config.get("slaveID", 1), "slaveID", 0, 255),
        timeout=_timeout(config),
    )
    return config


def _ble(config: dict[str, Any]) -> dict[str, Any]:
    mac = config.get("macAddress")
    if not isinstance(mac, str) or not _MAC.fullmatch(mac):
        raise DeviceConfigError(
            "InvalidAddress", f"ble needs configData.macAddress like AA:BB:CC:DD:EE:FF, got {mac!r}"
        )
    config["macAddress"] = mac.upper()
    return config


def _mqtt(config: dict[str, Any]) -> dict[str, Any]:
    from edge.mqtt import parse_broker_url

    broker = config.get("broker")
    problem = f"got {broker!r}"
    if isinstance(broker, str):
        try:
            host, port = parse_broker_url(broker)
        except ValueError as exc:
            problem = str(exc)
        else:
            config.update(broker=broker, host=host, port=port)
            config.setdefault("clientID", "")
            return config
    raise DeviceConfigError(
        "InvalidAddress", f"mqtt needs configData.broker like mqtt://host:1883: {problem}"
    )


_PROTOCOL_CONFIG = {
    "modbus-rtu": _modbus_rtu,
    "modbus-tcp": _modbus_tcp,
    "ble": _ble,
    "mqtt": _mqtt,
}


# -- properties ------------------------------------------------------------------------------


def _cycle(value: Any, what: str, default: float, prop: str) -> float:
    if value in (None, "", 0):
        return default
    ns = _number(value, what, "InvalidProperty", prop)
    if ns < 0:
        raise DeviceConfigError(
            "InvalidProperty", f"{what} must not be negative, got {value}", prop
        )
    return max(MIN_CYCLE_S, ns / 1e9)


def _property(protocol: str, entry: dict[str, Any], model_prop: dict[str, Any]) -> PropertyConfig:
    name = str(entry["name"])
    type_ = str(model_prop.get("type") or "").upper()
    if type_ not in TYPES:
        raise DeviceConfigError(
            "WrongType",
            f"property {name}: type {model_prop.get('type')!r} is not one of"
            f" {', '.join(t.lower() for t in TYPES)}",
            name,
        )
    access = str(model_prop.get("accessMode") or "ReadWrite")
    access = {"readwrite": "ReadWrite", "readonly": "ReadOnly"}.get(access.lower(), access)
    if access not in ACCESS_MODES:
        raise DeviceConfigError(
            "InvalidProperty", f"property {name}: accessMode must be ReadWrite or ReadOnly", name
        )
    minimum = model_prop.get("minimum")
    maximum = model_prop.get("maximum")
    minimum = None if minimum in (None, "") else _number(minimum, f"{name}.minimum", prop=name)
    maximum = None if maximum in (None, "") else _number(maximum, f"{name}.maximum", prop=name)
    if minimum is not None and maximum is not None and minimum > maximum:
        raise DeviceConfigError(
            "InvalidProperty", f"property {name}: minimum {minimum} exceeds maximum {maximum}", name
        )
    visitors = entry.get("visitors") or {}
    visitor = visitors.get("configData") if isinstance(visitors, dict) else None
    if not isinstance(visitor, dict):
        raise DeviceConfigError(
            "InvalidProperty", f"property {name}: visitors.configData is missing", name
        )
    visitor = _VISITORS[protocol](dict(visitor), type_, name)
    deadband = entry.get("deadband")
    deadband = 0.0 if deadband in (None, "") else _number(deadband, f"{name}.deadband", prop=name)
    if deadband < 0:
        raise DeviceConfigError("InvalidProperty", f"property {name}: deadband is negative", name)
    desired = entry.get("desired") or {}
    desired_value = desired.get("value") if isinstance(desired, dict) else None
    report_to_cloud = entry.get("reportToCloud")
    push = entry.get("pushMethod")
    return PropertyConfig(
        name=name,
        type=type_,
        access_mode=access,
        minimum=minimum,
        maximum=maximum,
        unit=str(model_prop.get("unit") or ""),
        visitor=visitor,
        collect_s=_cycle(
            entry.get("collectCycle"), f"{name}.collectCycle", DEFAULT_COLLECT_S, name
        ),
        report_s=_cycle(entry.get("reportCycle"), f"{name}.reportCycle", DEFAULT_REPORT_S, name),
        report_to_cloud=True if report_to_cloud is None else _flag(report_to_cloud, name, name),
        deadband=deadband,
        desired=None if desired_value in (None, "") else str(desired_value),
        description=str(model_prop.get("description") or ""),
        push_method=push if isinstance(push, dict) and push else None,
    )


def _modbus_visitor(visitor: dict[str, Any], type_: str, name: str) -> dict[str, Any]:
    register = visitor.get("register")
    aliases = {r.lower(): r for r in REGISTERS} | {
        r.lower().removesuffix("register"): r for r in REGISTERS
    }
    register = aliases.get(str(register).lower()) if register is not None else None
    if register is None:
        raise DeviceConfigError(
            "InvalidAddress",
            f"property {name}: register must be one of {', '.join(REGISTERS)},"
            f" got {visitor.get('register')!r}",
            name,
        )
    offset = _integer(visitor.get("offset", 0), f"{name}: offset", 0, 65535, prop=name)
    if register in BIT_REGISTERS:
        data_type = str(visitor.get("dataType") or "bool").lower()
        if data_type != "bool" or type_ not in ("BOOLEAN", "INT"):
            raise DeviceConfigError(
                "WrongType",
                f"property {name}: a {register} holds bits; its type must be boolean (or int),"
                f" got {type_.lower()}/{data_type}",
                name,
            )
        limit = _integer(visitor.get("limit", 1), f"{name}: limit", 1, 2000, prop=name)
        if type_ == "BOOLEAN" and limit != 1:
            raise DeviceConfigError(
                "InvalidProperty", f"property {name}: a boolean reads exactly one bit", name
            )
    else:
        data_type = str(visitor.get("dataType") or _default_data_type(type_, visitor)).lower()
        if data_type not in DATA_TYPES:
            raise DeviceConfigError(
                "WrongType",
                f"property {name}: dataType {data_type!r} is not one of {', '.join(DATA_TYPES)}",
                name,
            )
        if data_type not in _COMPATIBLE[type_]:
            raise DeviceConfigError(
                "WrongType",
                f"property {name}: a {type_.lower()} value cannot be read as {data_type}",
                name,
            )
        size = DATA_TYPES[data_type]
        if size is None:
            if "limit" not in visitor:
                raise DeviceConfigError(
                    "InvalidProperty",
                    f"property {name}: a string needs limit (registers, two characters each)",
                    name,
                )
            limit = _integer(visitor["limit"], f"{name}: limit", 1, 125, prop=name)
        else:
            limit = _integer(visitor.get("limit", size), f"{name}: limit", 1, 125, prop=name)
            if limit != size:
                raise DeviceConfigError(
                    "InvalidProperty",
                    f"property {name}: {data_type} takes {size} register(s), limit says {limit}",
                    name,
                )
    if offset + limit - 1 > 65535:
        raise DeviceConfigError(
            "InvalidAddress",
            f"property {name}: registers {offset}..{offset + limit - 1} run past 65535",
            name,
        )
    scale = _number(visitor.get("scale", 1), f"{name}: scale", prop=name)
    if scale == 0:
        raise DeviceConfigError("InvalidProperty", f"property {name}: scale must not be 0", name)
    visitor.update(
        register=register,
        offset=offset,
        limit=limit,
        dataType=data_type,
        scale=scale,
        add=_number(visitor.get("add", 0), f"{name}: add", prop=name),
        isSwap=_flag(visitor.get("isSwap", False), f"{name}: isSwap", name),
        isRegisterSwap=_flag(visitor.get("isRegisterSwap", False), f"{name}: isRegisterSwap", name),
    )
    return visitor


def _default_data_type(type_: str, visitor: dict[str, Any]) -> str:
    """KubeEdge's mappers have no dataType: the model type and the register count say it (a
    FLOAT in one register is a scaled int16). Without a limit, the model type alone does."""
    limit = visitor.get("limit")
    by_limit = {
        "INT": {1: "int16", 2: "int32"},
        "FLOAT": {1: "int16", 2: "float32", 4: "float64"},
        "DOUBLE": {1: "int16", 2: "float32", 4: "float64"},
    }.get(type_, {})
    if limit is not None and not isinstance(limit, bool):
        try:
            return by_limit.get(int(limit), _DEFAULT_DATA_TYPE[type_])
        except (TypeError, ValueError):
            pass
    return _DEFAULT_DATA_TYPE[type_]


def _ble_visitor(visitor: dict[str, Any], type_: str, name: str) -> dict[str, Any]:
    characteristic = str(visitor.get("characteristicUUID") or "")
    try:
        if _SHORT_UUID.fullmatch(characteristic):
            characteristic = characteristic.lower().removeprefix("0x")
        else:
            characteristic = str(uuid.UUID(characteristic))
    except ValueError:
        raise DeviceConfigError(
            "InvalidAddress",
            f"property {name}: characteristicUUID {characteristic!r} is not a UUID",
            name,
        ) from None
    fmt = str(visitor.get("dataFormat") or ("utf8" if type_ == "STRING" else ""))
    if not fmt:
        raise DeviceConfigError(
            "InvalidProperty",
            f"property {name}: dataFormat is needed (a struct format like '<h', or 'utf8')",
            name,
        )
    if fmt == "utf8":
        if type_ != "STRING":
            raise DeviceConfigError(
                "WrongType", f"property {name}: utf8 data holds a string, not {type_.lower()}", name
            )
    else:
        try:
            struct.calcsize(fmt)
        except struct.error as exc:
            raise DeviceConfigError(
                "InvalidProperty", f"property {name}: dataFormat {fmt!r}: {exc}", name
            ) from None
        if type_ == "STRING":
            raise DeviceConfigError(
                "WrongType", f"property {name}: a string needs dataFormat utf8", name
            )
    scale = _number(visitor.get("scale", 1), f"{name}: scale", prop=name)
    if scale == 0:
        raise DeviceConfigError("InvalidProperty", f"property {name}: scale must not be 0", name)
    visitor.update(
        characteristicUUID=characteristic,
        dataFormat=fmt,
        scale=scale,
        add=_number(visitor.get("add", 0), f"{name}: add", prop=name),
        notify=_flag(visitor.get("notify", False), f"{name}: notify", name),
    )
    return visitor


def _mqtt_visitor(visitor: dict[str, Any], type_: str, name: str) -> dict[str, Any]:
    from edge.devices.values import parse_json_path

    topic = visitor.get("topic")
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
        raise DeviceConfigError(
            "InvalidAddress", f"property {name}: topic must be a topic without wildcards", name
        )
    path = str(visitor.get("jsonPath") or "$")
    try:
        parse_json_path(path)
    except ValueError as exc:
        raise DeviceConfigError("InvalidProperty", f"property {name}: {exc}", name) from None
    write_topic = visitor.get("writeTopic") or ""
    if write_topic and ("+" in write_topic or "#" in write_topic):
        raise DeviceConfigError(
            "InvalidAddress", f"property {name}: writeTopic must not have wildcards", name
        )
    visitor.update(topic=topic, jsonPath=path, writeTopic=write_topic)
    return visitor


_VISITORS = {
    "modbus-rtu": _modbus_visitor,
    "modbus-tcp": _modbus_visitor,
    "ble": _ble_visitor,
    "mqtt": _mqtt_visitor,
}
