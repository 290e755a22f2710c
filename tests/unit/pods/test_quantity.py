"""Kubernetes quantities parse to exact values, by apimachinery's rules, and junk is refused."""

from __future__ import annotations

import contextlib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.pods.quantity import parse_quantity, quantity_milli, quantity_value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1", 1),
        ("100m", Decimal("0.1")),
        ("0.5", Decimal("0.5")),
        (".5", Decimal("0.5")),
        ("1.", 1),
        ("+2", 2),
        ("-3", -3),
        ("128Mi", 128 * 2**20),
        ("1Ki", 1024),
        ("1.5Gi", 3 * 2**29),
        ("1G", 10**9),
        ("1k", 1000),
        ("2T", 2 * 10**12),
        ("1P", 10**15),
        ("1E", 10**18),  # exa, not an exponent
        ("1e3", 1000),
        ("1E3", 1000),
        ("5e-3", Decimal("0.005")),
        ("12e+2", 1200),
        ("250u", Decimal("0.00025")),
        ("7n", Decimal("7e-9")),
        ("0.1n", Decimal("1e-9")),  # finer than a nano rounds away from zero
        ("-0.1n", Decimal("-1e-9")),
        ("8Ei", 2**63 - 1),  # binary quantities are capped, as in Kubernetes
        ("18446744073709551616", 2**64),  # decimal ones are not
    ],
)
def test_parses_like_kubernetes(text: str, value: Decimal | int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Mi",
        ".",
        "1K",
        "1mi",
        "1 Mi",
        "1Mi ",
        "one",
        "1e",
        "1e3.5",
        "0x10",
        "1.2.3",
        "--1",
        "\u0661",
    ],
)
def test_refuses_what_is_not_a_quantity(text: str) -> None:
    with pytest.raises(ValueError, match="is not a quantity"):
        parse_quantity(text)


def test_exponent_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="exponent is out of range"):
        parse_quantity("1e99999999999")


def test_value_and_milli_round_up_like_kubernetes() -> None:
    assert quantity_value("100m") == 1
    assert quantity_value("1.5Gi") == 1610612736
    assert quantity_milli("100m") == 100
    assert quantity_milli("0.0001") == 1
    assert quantity_milli("2") == 2000
    assert quantity_milli(2) == 2000  # JSON manifests may carry numbers
    assert quantity_value(0.5) == 1


SUFFIXES = {"": 1, "m": Decimal("0.001"), "k": 1000, "M": 10**6, "G": 10**9, "Ki": 1024}
SUFFIXES |= {"Mi": 2**20, "Gi": 2**30, "T": 10**12}


@given(st.integers(0, 10**9), st.sampled_from(sorted(SUFFIXES)))
def test_integer_times_suffix(number: int, suffix: str) -> None:
    assert parse_quantity(f"{number}{suffix}") == number * SUFFIXES[suffix]


@given(st.text(max_size=30))
def test_never_crashes_on_any_text(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_quantity(text)


@given(
    st.integers(0, 10**9),
    st.integers(0, 10**6),
    st.sampled_from(["", "m", "k", "M", "G", "Ki", "Mi", "Gi"]),
)
def test_agrees_with_lightkube_to_the_milli(whole: int, fraction: int, suffix: str) -> None:
    # lightkube (the cloud side's client) has an independent parser that rounds up to
    # thousandths; ours keeps nanos, so compare at its precision.
    quantity = pytest.importorskip("lightkube.utils.quantity")
    text = f"{whole}.{fraction}{suffix}"
    ours = parse_quantity(text).quantize(Decimal("0.001"), rounding="ROUND_UP")
    assert ours == quantity.parse_quantity(text)
