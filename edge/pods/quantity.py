"""Kubernetes resource quantities (``100m``, ``128Mi``, ``1G``, ``0.5``, ``1e3``) as exact values.

``parse_quantity`` reads the text as apimachinery's ``ParseQuantity`` does; ``quantity_value``
and ``quantity_milli`` round as ``Quantity.Value()`` and ``MilliValue()`` do. Pure functions.
"""

from __future__ import annotations

import re
from decimal import MAX_EMAX, MIN_EMIN, ROUND_CEILING, ROUND_UP, Context, Decimal
from typing import Any

_QUANTITY = re.compile(r"([+-]?)([0-9]+\.?[0-9]*|\.[0-9]+)(.*)", re.DOTALL)
_BINARY_SUFFIXES = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL_SUFFIXES = {
    "n": -9,
    "u": -6,
    "m": -3,
    "": 0,
    "k": 3,
    "M": 6,
    "G": 9,
    "T": 12,
    "P": 15,
    "E": 18,
}
_EXPONENT = re.compile(r"[eE]([+-]?[0-9]+)")
INT64_MAX = 2**63 - 1
_INT32 = 2**31
_NANO = Decimal("1e-9")


def parse_quantity(text: str) -> Decimal:
    """The exact value of a Kubernetes quantity (``100m``, ``128Mi``, ``1G``, ``0.5``, ``1e3``).

    Follows apimachinery's ``ParseQuantity``: suffixes n u m k M G T P E, Ki … Ei and decimal
    exponents; values finer than a nano are rounded away from zero (``0.1n`` is ``1n``), and
    binary-suffixed values are capped at 2^63-1 as Kubernetes does. Raises ``ValueError`` with
    the text and what was expected (``TypeError`` if ``text`` is not a string).

    Written here rather than imported: the ``kubernetes`` client is far too large for the edge
    binary, lightkube's parser needs its models package and knows neither ``n``/``u`` nor
    ``E``-exponents, and no small maintained quantity library exists on PyPI.
    """
    if not isinstance(text, str):
        raise TypeError(f"{text!r} is not a quantity: expected a string such as 100m or 128Mi")
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a quantity: expected a number with an optional suffix,"
            " such as 100m, 0.5, 128Mi or 1G"
        )
    sign, number, suffix = match.groups()
    # Enough precision that no step below ever rounds; only the nano rounding is deliberate.
    context = Context(prec=len(number) + 40, Emax=MAX_EMAX, Emin=MIN_EMIN)
    value = Decimal(sign + number)
    if suffix in _BINARY_SUFFIXES:
        value = context.multiply(value, Decimal(2 ** _BINARY_SUFFIXES[suffix]))
    elif suffix in _DECIMAL_SUFFIXES:
        value = value.scaleb(_DECIMAL_SUFFIXES[suffix], context)
    elif (exponent := _EXPONENT.fullmatch(suffix)) is not None:
        power = int(exponent.group(1))
        if not -_INT32 <= power < _INT32:
            raise ValueError(f"{text!r} is not a quantity: its exponent is out of range")
        value = value.scaleb(power, context)
    else:
        raise ValueError(
            f"{text!r} is not a quantity: unknown suffix {suffix!r} (expected one of n, u, m, k,"
            " M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei, or an exponent such as e3)"
        )
    exponent_of_value = value.as_tuple().exponent
    if isinstance(exponent_of_value, int) and exponent_of_value < -9:
        value = value.quantize(_NANO, rounding=ROUND_UP, context=context)
    if suffix in _BINARY_SUFFIXES and abs(value) > INT64_MAX:
        value = Decimal(INT64_MAX).copy_sign(value)
    return value


def manifest_quantity(value: str | int | float) -> Decimal:
    """``parse_quantity`` of a quantity as a manifest may hold it: text, or a JSON number (the
    apiserver accepts both). ``TypeError`` for anything else, ``true`` included."""
    return parse_quantity(_quantity_text(value))


def quantity_value(text: str | int | float) -> int:
    """The quantity rounded up to a whole number, like Kubernetes' ``Quantity.Value()``."""
    return int(manifest_quantity(text).to_integral_value(rounding=ROUND_CEILING))


def quantity_milli(text: str | int | float) -> int:
    """The quantity in thousandths, rounded up, like ``Quantity.MilliValue()`` (millicores)."""
    return ceil_scaled(manifest_quantity(text), 3)


def ceil_scaled(value: Decimal, power: int) -> int:
    """``value`` times 10**``power``, rounded up, exactly (the default decimal context would
    round past 28 digits)."""
    context = Context(prec=len(str(value)) + 10, Emax=MAX_EMAX, Emin=MIN_EMIN)
    return int(value.scaleb(power, context).to_integral_value(rounding=ROUND_CEILING))


def _quantity_text(value: Any) -> str:
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    return value
