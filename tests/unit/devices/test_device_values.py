"""values: registers, bits, bytes, JSON and twin text to typed values and back."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.devices.model import PropertyConfig
from edge.devices.values import (
    decode_bits,
    decode_bytes,
    decode_json,
    decode_registers,
    encode_bits,
    encode_bytes,
    encode_json,
    encode_registers,
    from_text,
    json_path_build,
    json_path_get,
    parse_json_path,
    register_count,
    same_value,
    to_text,
    within_deadband,
)


def prop(type_: str = "INT", **visitor: object) -> PropertyConfig:
    return PropertyConfig(name="p", type=type_, visitor=dict(visitor))


def test_word_and_byte_order_of_a_float32() -> None:
    # 21.5 as float32 is 0x41AC0000: high word 0x41AC first, each word high byte first.
    plain = prop("FLOAT", dataType="float32")
    assert encode_registers(21.5, plain) == [0x41AC, 0x0000]
    assert decode_registers([0x41AC, 0x0000], plain) == 21.5
    words = prop("FLOAT", dataType="float32", isRegisterSwap=True)
    assert encode_registers(21.5, words) == [0x0000, 0x41AC]
    assert decode_registers([0x0000, 0x41AC], words) == 21.5
    both = prop("FLOAT", dataType="float32", isRegisterSwap=True, isSwap=True)
    assert encode_registers(21.5, both) == [0x0000, 0xAC41]
    assert decode_registers([0x0000, 0xAC41], both) == 21.5


def test_integers_signed_and_unsigned_with_scale_and_add() -> None:
    assert decode_registers([0xFFFF], prop(dataType="int16")) == -1
    assert decode_registers([0xFFFF], prop(dataType="uint16")) == 65535
    assert decode_registers([0x0001, 0x0000], prop(dataType="uint32")) == 65536
    assert decode_registers([0xFFFF, 0xFFFE], prop(dataType="int32")) == -2
    temperature = prop("FLOAT", dataType="int16", scale=0.1, add=-40)
    assert decode_registers([615], temperature) == 21.5  # 615 * 0.1 - 40, without noise
    assert encode_registers(21.5, temperature) == [615]
    assert encode_registers("21.5", temperature) == [615]
    assert decode_registers([0x1234], prop(dataType="int16", isSwap=True)) == 0x3412
    assert register_count(prop(dataType="float64")) == 4


def test_float64_and_bool_and_string_registers() -> None:
    f64 = prop("DOUBLE", dataType="float64")
    words = encode_registers(math.pi, f64)
    assert len(words) == 4
    assert decode_registers(words, f64) == math.pi
    flag = prop("BOOLEAN", dataType="bool")
    assert decode_registers([0], flag) is False
    assert decode_registers([7], flag) is True
    assert encode_registers(True, flag) == [1]
    text = prop("STRING", dataType="string", limit=3)
    assert encode_registers("abc", text) == [0x6162, 0x6300, 0x0000]
    assert decode_registers([0x6162, 0x6300, 0x0000], text) == "abc"
    swapped = prop("STRING", dataType="string", limit=2, isSwap=True)
    assert decode_registers([0x6261, 0x0063], swapped) == "abc"
    with pytest.raises(ValueError, match="longer"):
        encode_registers("abcdefg", text)


def test_out_of_range_and_malformed_values_are_value_errors() -> None:
    with pytest.raises(ValueError, match="outside int16"):
        encode_registers(40000, prop(dataType="int16"))
    with pytest.raises(ValueError, match="outside uint16"):
        encode_registers(-1, prop(dataType="uint16"))
    with pytest.raises(ValueError, match="outside int16"):
        encode_registers(4000, prop("FLOAT", dataType="int16", scale=0.1))
    with pytest.raises(ValueError, match="expected 2 register"):
        decode_registers([1], prop(dataType="int32"))
    with pytest.raises(ValueError, match="16-bit"):
        decode_registers([70000], prop(dataType="int16"))
    with pytest.raises(ValueError, match="not a float"):
        encode_registers("warm", prop("FLOAT", dataType="float32"))
    with pytest.raises(ValueError, match="nan"):
        decode_registers([0x7FC0, 0], prop("FLOAT", dataType="float32"))


INTEGER_TYPES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


@given(
    st.sampled_from(sorted(INTEGER_TYPES)),
    st.data(),
    st.booleans(),
    st.booleans(),
)
def test_integer_round_trip(data_type: str, data: st.DataObject, swap: bool, wswap: bool) -> None:
    low, high = INTEGER_TYPES[data_type]
    value = data.draw(st.integers(low, high))
    cfg = prop(dataType=data_type, isSwap=swap, isRegisterSwap=wswap)
    words = encode_registers(value, cfg)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert decode_registers(words, cfg) == value


@given(
    st.integers(-(2**15), 2**15 - 1),
    st.sampled_from([0.1, 0.01, 0.5, 2.0, 10.0]),
    st.sampled_from([0.0, -40.0, 273.15]),
)
def test_scaled_values_read_back_as_written(raw: int, scale: float, add: float) -> None:
    cfg = prop("DOUBLE", dataType="int16", scale=scale, add=add)
    value = decode_registers([raw & 0xFFFF], cfg)
    assert encode_registers(value, cfg) == [raw & 0xFFFF]
    assert same_value(value, decode_registers(encode_registers(value, cfg), cfg), cfg)


@given(st.floats(allow_nan=False, allow_infinity=False, width=64), st.booleans(), st.booleans())
def test_float64_round_trip(value: float, swap: bool, wswap: bool) -> None:
    cfg = prop("DOUBLE", dataType="float64", isSwap=swap, isRegisterSwap=wswap)
    assert decode_registers(encode_registers(value, cfg), cfg) == value


@given(st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_float32_round_trip_within_its_precision(value: float) -> None:
    cfg = prop("FLOAT", dataType="float32")
    back = decode_registers(encode_registers(value, cfg), cfg)
    assert same_value(value, back, cfg)


@given(st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=8))
def test_string_round_trip(text: str) -> None:
    cfg = prop("STRING", dataType="string", limit=4)
    assert decode_registers(encode_registers(text, cfg), cfg) == text


def test_bits() -> None:
    flag = prop("BOOLEAN", register="CoilRegister", limit=1)
    assert decode_bits([True], flag) is True
    assert encode_bits(False, flag) == [False]
    assert encode_bits("true", flag) == [True]
    nibble = prop("INT", register="DiscreteInputRegister", limit=4)
    assert decode_bits([True, False, True, False], nibble) == 5
    assert encode_bits(5, nibble) == [True, False, True, False]
    with pytest.raises(ValueError, match="does not fit"):
        encode_bits(16, nibble)
    with pytest.raises(ValueError, match="expected 4 bit"):
        decode_bits([True], nibble)


def test_ble_bytes() -> None:
    temperature = prop("FLOAT", dataFormat="<h", scale=0.01)
    assert decode_bytes(struct.pack("<h", 2150), temperature) == 21.5
    assert encode_bytes(21.5, temperature) == struct.pack("<h", 2150)
    name = prop("STRING", dataFormat="utf8")
    assert decode_bytes(b"pump\x00", name) == "pump"
    assert encode_bytes("pump", name) == b"pump"
    level = prop("FLOAT", dataFormat="<f")
    assert decode_bytes(struct.pack("<f", 0.1), level) == 0.1
    on = prop("BOOLEAN", dataFormat="?")
    assert decode_bytes(b"\x01", on) is True
    assert encode_bytes(False, on) == b"\x00"
    with pytest.raises(ValueError, match="expected 2 bytes"):
        decode_bytes(b"\x01", temperature)
    with pytest.raises(ValueError, match="cannot pack"):
        encode_bytes(1e9, temperature)


def test_json_paths() -> None:
    assert parse_json_path("$") == []
    assert parse_json_path("$.a.b[2]['c d'][\"e\"]") == ["a", "b", 2, "c d", "e"]
    for bad in ("a.b", "$.", "$[x]", "$..a"):
        with pytest.raises(ValueError, match="jsonPath"):
            parse_json_path(bad)
    doc = {"a": {"b": [1, {"c": 2.5}]}}
    assert json_path_get(doc, "$.a.b[1].c") == 2.5
    assert json_path_get(doc, "$") is doc
    with pytest.raises(LookupError):
        json_path_get(doc, "$.a.x")
    with pytest.raises(LookupError):
        json_path_get(doc, "$.a.b[5]")
    assert json_path_build("$.a.b", 3) == {"a": {"b": 3}}
    assert json_path_build("$.a[1]", 3) == {"a": [None, 3]}
    assert json_path_build("$", "x") == "x"


def test_json_payloads() -> None:
    cfg = prop("FLOAT", jsonPath="$.sensor.t")
    assert decode_json(b'{"sensor": {"t": 21}}', cfg) == 21.0
    assert decode_json(b'{"sensor": {"t": "21.5"}}', cfg) == 21.5
    assert encode_json(21.5, cfg) == b'{"sensor": {"t": 21.5}}'
    assert encode_json("22", cfg) == b'{"sensor": {"t": 22.0}}'
    assert decode_json(b"21.5", prop("FLOAT", jsonPath="$")) == 21.5
    assert decode_json(b"on", prop("STRING", jsonPath="$")) == "on"
    assert decode_json(b'{"x": {"y": 1}}', prop("STRING", jsonPath="$.x")) == '{"y": 1}'
    with pytest.raises(ValueError, match="not JSON"):
        decode_json(b"garbage", cfg)
    with pytest.raises(LookupError):
        decode_json(b'{"sensor": {}}', cfg)
    with pytest.raises(ValueError, match="not a float"):
        decode_json(b'{"sensor": {"t": {"v": 1}}}', cfg)
    assert decode_json(b'{"on": true}', prop("BOOLEAN", jsonPath="$.on")) is True
    assert decode_json(b'{"n": 3.0}', prop("INT", jsonPath="$.n")) == 3


def test_text() -> None:
    assert to_text(21, "INT") == "21"
    assert to_text(21.0, "FLOAT") == "21"
    assert to_text(21.5, "double") == "21.5"
    assert to_text(True, "BOOLEAN") == "true"
    assert to_text("x", "STRING") == "x"
    assert from_text("21", "INT") == 21
    assert from_text("21.0", "INT") == 21
    assert from_text(" 21.5 ", "FLOAT") == 21.5
    assert from_text("True", "BOOLEAN") is True
    assert from_text("0", "boolean") is False
    assert from_text(" x ", "STRING") == " x "
    for text, type_ in (
        ("21.5", "INT"),
        ("warm", "FLOAT"),
        ("maybe", "BOOLEAN"),
        ("inf", "DOUBLE"),
    ):
        with pytest.raises(ValueError, match="not"):
            from_text(text, type_)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_text_round_trips(value: float) -> None:
    assert from_text(to_text(value, "DOUBLE"), "DOUBLE") == value


@given(st.integers())
def test_int_text_round_trips(value: int) -> None:
    assert from_text(to_text(value, "INT"), "INT") == value


def test_deadband() -> None:
    assert not within_deadband(None, 1.0, 5)
    assert within_deadband(1.0, 1.0, 0)
    assert not within_deadband(1.0, 1.1, 0)
    assert within_deadband(20.0, 20.2, 0.2)
    assert not within_deadband(20.0, 20.3, 0.2)
    assert within_deadband(20.0, 19.8, 0.2)
    assert within_deadband("a", "a", 10)
    assert not within_deadband("a", "b", 10)
    assert not within_deadband(True, False, 10)
    assert within_deadband(True, True, 0)


def test_read_back_tolerance_follows_what_the_register_holds() -> None:
    scaled = prop("FLOAT", dataType="int16", scale=0.5)
    assert same_value(21.3, 21.5, scaled)  # the register holds halves
    assert not same_value(21.0, 21.5, scaled)
    f32 = prop("FLOAT", dataType="float32")
    assert same_value(0.1, 0.10000000149011612, f32)
    assert not same_value(0.1, 0.2, f32)
    assert same_value("a", "a", prop("STRING", dataType="string", limit=1))
    assert not same_value(True, False, prop("BOOLEAN", dataType="bool"))
