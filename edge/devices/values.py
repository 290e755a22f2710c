"""Turning what a device sends into typed values and back: registers, bits, bytes, JSON, text.

Sans-IO and shared by every driver. The functions take the property's configuration: a
``PropertyConfig`` (preferred: it knows the model type), or a bare visitor mapping (then the
model type is taken from ``visitor["type"]`` when present, else from the data type).

Conventions (Modbus):

- A register is a 16-bit word sent high byte first. ``isSwap`` swaps the two bytes of every
  word; ``isRegisterSwap`` reverses the order of the words (low word first), for the devices
  that store 32- and 64-bit values that way. Both apply to strings too (two characters a word).
- ``value = raw * scale + add``; writing sends ``(value - add) / scale``, rounded to the nearest
  whole number for integer data types. Arithmetic noise (``215 * 0.1``) is rounded away so that
  a value reads back as written; float32 values are rounded to the 7 digits they carry.
- The result has the model type: ``INT`` -> int, ``FLOAT``/``DOUBLE`` -> float, ``BOOLEAN`` ->
  bool, ``STRING`` -> str.

Errors are ``ValueError`` (wrong length, out of range for the data type, text that is not of the
type), with a message naming what was wrong.

Twin values travel as text, as in KubeEdge: ``to_text``/``from_text`` convert, and
``within_deadband`` decides whether a change is worth reporting.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

_STRUCT = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
    "float64": ">d",
}
_DATA_TYPE_FOR = {"INT": "int16", "FLOAT": "float32", "DOUBLE": "float64", "STRING": "string"}
_TYPE_FOR = {
    "int16": "INT",
    "uint16": "INT",
    "int32": "INT",
    "uint32": "INT",
    "float32": "FLOAT",
    "float64": "DOUBLE",
    "string": "STRING",
    "bool": "BOOLEAN",
}
_INTEGER_FORMATS = set("bBhHiIlLqQnN")
_TRUE = {"1", "t", "true", "yes", "on"}
_FALSE = {"0", "f", "false", "no", "off"}


def _unpack_cfg(cfg: Any) -> tuple[Mapping[str, Any], str]:
    """The visitor mapping and the model type of ``cfg``."""
    visitor = getattr(cfg, "visitor", None)
    if visitor is not None:
        return visitor, cfg.type
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a PropertyConfig or a visitor mapping, got {type(cfg)}")
    type_ = cfg.get("type")
    if not type_:
        data_type = str(cfg.get("dataType") or "int16").lower()
        type_ = _TYPE_FOR.get(data_type, "INT")
    return cfg, str(type_).upper()


def _data_type(visitor: Mapping[str, Any], type_: str) -> str:
    data_type = visitor.get("dataType")
    if data_type:
        return str(data_type).lower()
    return _DATA_TYPE_FOR.get(type_, "bool")


def _clean(number: float, digits: int = 12) -> float:
    """``number`` without the noise of binary arithmetic (``21.500000000000004`` -> 21.5)."""
    if number == 0 or not math.isfinite(number):
        return number
    return float(f"{number:.{digits}g}")


def _scaled(raw: float, visitor: Mapping[str, Any]) -> float:
    scale = visitor.get("scale", 1)
    add = visitor.get("add", 0)
    if scale == 1 and add == 0:
        return raw
    return _clean(raw * scale + add)


def _unscaled(value: float, visitor: Mapping[str, Any]) -> float:
    scale = visitor.get("scale", 1)
    add = visitor.get("add", 0)
    if scale == 1 and add == 0:
        return value
    return _clean((value - add) / scale)


def coerce(value: Any, type_: str) -> Any:
    """``value`` (a number, bool or string from a device) as a value of model type ``type_``."""
    type_ = type_.upper()
    if isinstance(value, str) and type_ != "STRING":
        return from_text(value, type_)
    if type_ == "STRING":
        return value if isinstance(value, str) else to_text(value, _type_of(value))
    if type_ == "BOOLEAN":
        if isinstance(value, bool | int | float):
            return bool(value)
    elif type_ == "INT":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return round(value)
    elif type_ in ("FLOAT", "DOUBLE") and isinstance(value, int | float):
        return float(value)
    raise ValueError(f"{value!r} is not a valid {type_.lower()} value")


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "INT"
    return "DOUBLE"


# -- Modbus registers ------------------------------------------------------------------------


def _swap(words: list[int], visitor: Mapping[str, Any]) -> list[int]:
    if visitor.get("isSwap"):
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    if visitor.get("isRegisterSwap"):
        words = words[::-1]
    return words


def register_count(cfg: Any) -> int:
    """How many registers (or bits) a property takes: its ``limit``, else its data type's."""
    visitor, type_ = _unpack_cfg(cfg)
    if "limit" in visitor:
        return int(visitor["limit"])
    data_type = _data_type(visitor, type_)
    return {"int32": 2, "uint32": 2, "float32": 2, "float64": 4}.get(data_type, 1)


def decode_registers(words: list[int], cfg: Any) -> Any:
    """The value held in ``words`` (16-bit registers as read, in order)."""
    visitor, type_ = _unpack_cfg(cfg)
    data_type = _data_type(visitor, type_)
    expected = register_count(cfg)
    if len(words) != expected:
        raise ValueError(f"expected {expected} register(s), got {len(words)}")
    if any(not 0 <= w <= 0xFFFF for w in words):
        raise ValueError(f"registers must be 16-bit words, got {words}")
    words = _swap(list(words), visitor)
    data = b"".join(w.to_bytes(2, "big") for w in words)
    if data_type == "string":
        return data.rstrip(b"\x00").decode("utf-8", errors="replace")
    if data_type == "bool":
        return coerce(any(words), type_)
    fmt = _STRUCT.get(data_type)
    if fmt is None:
        raise ValueError(f"unknown dataType {data_type!r}")
    if struct.calcsize(fmt) != len(data):
        raise ValueError(f"{data_type} takes {struct.calcsize(fmt) // 2} register(s)")
    (raw,) = struct.unpack(fmt, data)
    if data_type == "float32":
        raw = _clean(raw, 7)
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ValueError(f"the device sent {raw} ({data_type})")
    return coerce(_scaled(raw, visitor), type_)


def encode_registers(value: Any, cfg: Any) -> list[int]:
    """The registers to write for ``value`` (of the model type, or text)."""
    visitor, type_ = _unpack_cfg(cfg)
    data_type = _data_type(visitor, type_)
    count = register_count(cfg)
    if isinstance(value, str) and data_type != "string":
        value = from_text(value, type_)
    if data_type == "string":
        data = str(value).encode()
        if len(data) > 2 * count:
            raise ValueError(f"{value!r} is longer than {2 * count} bytes ({count} registers)")
        data = data.ljust(2 * count, b"\x00")
        words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    elif data_type == "bool":
        words = [1 if value else 0]
    else:
        fmt = _STRUCT.get(data_type)
        if fmt is None:
            raise ValueError(f"unknown dataType {data_type!r}")
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{value!r} is not a number")
        raw = _unscaled(value, visitor)
        if data_type.startswith(("int", "uint")):
            raw = round(raw)
            bits = 16 if data_type.endswith("16") else 32
            low, high = (
                (0, 2**bits - 1)
                if data_type.startswith("u")
                else (
                    -(2 ** (bits - 1)),
                    2 ** (bits - 1) - 1,
                )
            )
            if not low <= raw <= high:
                raise ValueError(
                    f"{value!r} is {raw} in the register, outside {data_type} ({low}..{high})"
                )
        elif data_type == "float32" and abs(raw) > 3.4028234663852886e38:
            raise ValueError(f"{value!r} does not fit a float32")
        data = struct.pack(fmt, raw)
        words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if len(words) != count:
        raise ValueError(f"{data_type} takes {len(words)} register(s), limit says {count}")
    # Swapping is its own inverse (both the byte and the word swap).
    return _swap(words, visitor)


def decode_bits(bits: list[bool], cfg: Any) -> Any:
    """The value of coils or discrete inputs: one bit is a bool (or 0/1 for an INT property);
    several make a whole number, the first bit the least significant (then scale and add)."""
    visitor, type_ = _unpack_cfg(cfg)
    expected = int(visitor.get("limit", 1))
    if len(bits) != expected:
        raise ValueError(f"expected {expected} bit(s), got {len(bits)}")
    if type_ == "BOOLEAN":
        return bool(bits[0])
    number = sum(1 << i for i, bit in enumerate(bits) if bit)
    return coerce(_scaled(number, visitor), type_)


def encode_bits(value: Any, cfg: Any) -> list[bool]:
    """The bits to write for ``value``; the inverse of ``decode_bits``."""
    visitor, type_ = _unpack_cfg(cfg)
    count = int(visitor.get("limit", 1))
    if isinstance(value, str):
        value = from_text(value, type_)
    if type_ == "BOOLEAN" or isinstance(value, bool):
        if count != 1:
            raise ValueError("a boolean is one bit")
        return [bool(value)]
    raw = round(_unscaled(value, visitor))
    if not 0 <= raw < 2**count:
        raise ValueError(f"{value!r} is {raw}, which does not fit {count} bit(s)")
    return [bool(raw >> i & 1) for i in range(count)]


# -- BLE characteristics ---------------------------------------------------------------------


def decode_bytes(data: bytes, cfg: Any) -> Any:
    """The value of a characteristic: ``dataFormat`` ``utf8`` or a ``struct`` format whose first
    field is the value (then scale and add)."""
    visitor, type_ = _unpack_cfg(cfg)
    fmt = str(visitor.get("dataFormat") or "utf8")
    if fmt == "utf8":
        return coerce(bytes(data).rstrip(b"\x00").decode("utf-8", errors="replace"), "STRING")
    try:
        size = struct.calcsize(fmt)
        if len(data) < size:
            raise ValueError(f"expected {size} bytes for {fmt!r}, got {len(data)}")
        raw = struct.unpack_from(fmt, bytes(data))[0]
    except struct.error as exc:
        raise ValueError(f"cannot unpack {bytes(data).hex()} as {fmt!r}: {exc}") from None
    if isinstance(raw, bytes):
        raw = raw.rstrip(b"\x00").decode("utf-8", errors="replace")
        return coerce(raw, type_)
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ValueError(f"the device sent {raw}")
    if fmt.lstrip("<>!=@")[-1:] == "f":
        raw = _clean(raw, 7)
    if isinstance(raw, bool):
        return coerce(raw, type_)
    return coerce(_scaled(raw, visitor), type_)


def encode_bytes(value: Any, cfg: Any) -> bytes:
    """The bytes to write for ``value``; the inverse of ``decode_bytes``."""
    visitor, type_ = _unpack_cfg(cfg)
    fmt = str(visitor.get("dataFormat") or "utf8")
    if fmt == "utf8":
        return str(value).encode()
    if isinstance(value, str):
        value = from_text(value, type_)
    code = fmt.lstrip("<>!=@").lstrip("0123456789")[:1]
    if code == "?":
        raw: Any = bool(value)
    else:
        raw = _unscaled(value, visitor)
        if code in _INTEGER_FORMATS:
            raw = round(raw)
    try:
        return struct.pack(fmt, raw)
    except struct.error as exc:
        raise ValueError(f"cannot pack {value!r} as {fmt!r}: {exc}") from None


# -- JSON paths (MQTT) -----------------------------------------------------------------------

_TOKEN = re.compile(r"\.([A-Za-z_$][\w$-]*)|\[(\d+)\]|\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]")


def parse_json_path(path: str) -> list[str | int]:
    """The steps of a JSON path like ``$.a.b[0]['c d']``: names and list indices. ``$`` alone
    is the whole document."""
    if not path.startswith("$"):
        raise ValueError(f"jsonPath {path!r} must start with $")
    steps: list[str | int] = []
    pos = 1
    while pos < len(path):
        match = _TOKEN.match(path, pos)
        if match is None:
            raise ValueError(f"jsonPath {path!r}: cannot read {path[pos:]!r}")
        name, index, quoted, dquoted = match.groups()
        if index is not None:
            steps.append(int(index))
        else:
            steps.append(name if name is not None else quoted if quoted is not None else dquoted)
        pos = match.end()
    return steps


def json_path_get(document: Any, path: str) -> Any:
    """The value at ``path`` in ``document``; ``LookupError`` when it is not there."""
    value = document
    for step in parse_json_path(path):
        if isinstance(step, int):
            if not isinstance(value, list) or step >= len(value):
                raise LookupError(f"{path}: no item {step}")
        elif not isinstance(value, dict) or step not in value:
            raise LookupError(f"{path}: no key {step!r}")
        value = value[step]
    return value


def json_path_build(path: str, value: Any) -> Any:
    """A document holding ``value`` at ``path`` (and nothing else): what a write publishes."""
    document = value
    for step in reversed(parse_json_path(path)):
        if isinstance(step, int):
            items: list[Any] = [None] * (step + 1)
            items[step] = document
            document = items
        else:
            document = {step: document}
    return document


def decode_json(payload: bytes | str, cfg: Any) -> Any:
    """The value at the visitor's ``jsonPath`` in a JSON payload (a bare payload that is not
    JSON is taken as text when the path is ``$``)."""
    visitor, type_ = _unpack_cfg(cfg)
    path = str(visitor.get("jsonPath") or "$")
    text = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else payload
    try:
        document = json.loads(text)
    except ValueError:
        if path != "$":
            raise ValueError(f"the payload is not JSON: {text[:80]!r}") from None
        document = text.strip()
    found = json_path_get(document, path)
    if isinstance(found, dict | list) or found is None:
        if type_ == "STRING":
            return json.dumps(found, sort_keys=True)
        raise ValueError(f"{path} holds {json.dumps(found)[:80]}, not a {type_.lower()}")
    return coerce(found, type_)


def encode_json(value: Any, cfg: Any) -> bytes:
    """The payload a write publishes: the value at the visitor's ``jsonPath``."""
    visitor, type_ = _unpack_cfg(cfg)
    if isinstance(value, str) and type_ != "STRING":
        value = from_text(value, type_)
    return json.dumps(json_path_build(str(visitor.get("jsonPath") or "$"), value)).encode()


# -- twin text -------------------------------------------------------------------------------


def to_text(value: Any, type_: str) -> str:
    """A value as the text a twin carries: ``21``, ``21.5``, ``true``, or the string itself."""
    type_ = type_.upper()
    if type_ == "BOOLEAN":
        return "true" if value else "false"
    if type_ == "INT":
        return str(int(value))
    if type_ in ("FLOAT", "DOUBLE"):
        text = repr(float(value))
        return text.removesuffix(".0")
    return str(value)


def from_text(text: str, type_: str) -> Any:
    """The typed value of twin text (``ValueError`` when it is not of the type)."""
    type_ = type_.upper()
    if type_ == "STRING":
        return text
    stripped = text.strip()
    if type_ == "BOOLEAN":
        lowered = stripped.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean (true or false)")
    try:
        number = float(stripped)
    except ValueError:
        raise ValueError(f"{text!r} is not a {type_.lower()} value") from None
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a finite number")
    if type_ == "INT":
        try:
            return int(stripped)
        except ValueError:
            if number != int(number):
                raise ValueError(f"{text!r} is not a whole number") from None
            return int(number)
    if type_ in ("FLOAT", "DOUBLE"):
        return number
    raise ValueError(f"unknown type {type_!r}")


def within_deadband(old: Any, new: Any, deadband: float) -> bool:
    """Whether ``new`` is close enough to ``old`` not to be reported: numbers within
    ``deadband`` of each other (inclusive; 0 means only an unchanged value), anything else only
    when equal. Nothing is within the deadband of no value (``old`` None)."""
    if old is None:
        return False
    if isinstance(old, bool) or isinstance(new, bool):
        return old == new
    if isinstance(old, int | float) and isinstance(new, int | float):
        return abs(new - old) <= deadband
    return old == new


def same_value(written: Any, read: Any, cfg: Any) -> bool:
    """Whether a value read back matches the one written, allowing for what the device can hold:
    half a scale step for integer registers, float32's precision, and rounding noise."""
    visitor, type_ = _unpack_cfg(cfg)
    if type_ in ("STRING", "BOOLEAN") or isinstance(written, bool) or isinstance(read, bool):
        return written == read
    if not isinstance(written, int | float) or not isinstance(read, int | float):
        return written == read
    tolerance = max(1e-9, 1e-6 * abs(written))
    fmt = str(visitor.get("dataFormat") or "")
    if fmt:
        integral = fmt.lstrip("<>!=@")[-1:] in _INTEGER_FORMATS
    else:
        integral = _data_type(visitor, type_).startswith(("int", "uint", "bool"))
    if integral:
        tolerance = max(tolerance, abs(float(visitor.get("scale", 1))) / 2)
    if type_ == "INT":
        tolerance = max(tolerance, 0.5)
    return abs(written - read) <= tolerance
