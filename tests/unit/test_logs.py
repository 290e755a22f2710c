"""Structured logs: one logfmt line per record that a machine can split back into fields."""

from __future__ import annotations

import logging
import shlex
import sys

import pytest

from edge.logs import LogfmtFormatter, configure


def _format(msg: str, *args: object, exc_info=None, **extra: object) -> str:
    record = logging.LogRecord("edge.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return LogfmtFormatter().format(record)


def _fields(line: str) -> dict[str, str]:
    # logfmt with double quotes splits like a POSIX shell line.
    return dict(part.split("=", 1) for part in shlex.split(line))


def test_fields_are_key_value_pairs_in_a_stable_order():
    line = _format("pod %s started", "web", pod="ns/web", restarts=2)
    assert list(_fields(line)) == ["ts", "level", "logger", "msg", "pod", "restarts"]
    fields = _fields(line)
    assert fields["level"] == "warning"
    assert fields["logger"] == "edge.test"
    assert fields["msg"] == "pod web started"
    assert fields["restarts"] == "2"
    assert fields["ts"].endswith("Z")


@pytest.mark.parametrize("value", ['say "hi"', "a=b", "two words", "", "back\\slash"])
def test_values_that_would_break_parsing_are_quoted(value):
    assert _fields(_format("m", detail=value))["detail"] == value


def test_newlines_never_split_a_record():
    line = _format("first\nsecond", detail="x\ny")
    assert "\n" not in line


def _fail() -> None:
    raise ValueError("boom")


def test_exceptions_stay_on_the_same_line():
    try:
        _fail()
    except ValueError:
        line = _format("failed", exc_info=sys.exc_info())
    assert "\n" not in line
    assert "ValueError: boom" in line


def test_configure_writes_to_stderr_at_the_chosen_level(capsys):
    configure("warning")
    logging.getLogger("edge.x").info("hidden")
    logging.getLogger("edge.x").warning("shown", extra={"k": "v"})
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "msg=shown k=v" in err
