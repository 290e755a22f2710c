"""Kubernetes' $(VAR) expansion: defined names expand, $$ escapes, anything else stays."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.pods.expansion import expand


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("$(A)", "a"),
        ("x$(A)y$(B)z", "xaybz"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$a"),
        ("$$", "$"),
        ("$(MISSING)", "$(MISSING)"),
        ("$(A", "$(A"),
        ("$A", "$A"),
        ("a$", "a$"),
        ("$()", "$()"),
        ("$(B)", "b"),
    ],
)
def test_expansion_follows_kubernetes(text: str, result: str) -> None:
    assert expand(text, {"A": "a", "B": "b"}) == result


@given(st.text(alphabet="$()AB ab", max_size=30), st.dictionaries(st.sampled_from("AB"), st.text()))
def test_expansion_never_crashes_and_keeps_text_without_dollars(
    text: str, values: dict[str, str]
) -> None:
    result = expand(text, values)
    if "$" not in text:
        assert result == text


@given(st.text(max_size=40))
def test_doubling_every_dollar_escapes_everything(text: str) -> None:
    assert expand(text.replace("$", "$$"), {"A": "x"}) == text
