"""CRI log lines: formatting, long lines as parts, parsing back, rotation by size."""

from __future__ import annotations

import os
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from edge.pods import logs
from edge.pods.logs import LogFile, format_lines, messages, parse_line

# containerd's max_container_log_line_size: longer lines are split into partial ones.
MAX_LINE = 16 * 1024

WHEN = "2026-11-26T00:00:00.000000000Z"


def test_full_lines_are_tagged_f_and_the_unfinished_rest_is_kept() -> None:
    out, pending = format_lines("stdout", b"one\ntwo\nthr", b"", WHEN)
    assert out == f"{WHEN} stdout F one\n{WHEN} stdout F two\n".encode()
    assert pending == b"thr"
    out, pending = format_lines("stdout", b"ee\n", pending, WHEN)
    assert out == f"{WHEN} stdout F three\n".encode()
    assert pending == b""


def test_a_line_longer_than_the_limit_is_written_in_parts() -> None:
    out, pending = format_lines("stderr", b"x" * (MAX_LINE * 2 + 5) + b"\n", b"", WHEN)
    lines = logs.lines_of(out)
    assert [parse_line(line).partial for line in lines] == [True, True, False]
    [message] = list(messages(out))
    assert message.content == b"x" * (MAX_LINE * 2 + 5)
    assert message.stream == "stderr"
    assert pending == b""


@given(st.lists(st.binary(max_size=3 * MAX_LINE // 2), max_size=6))
def test_whatever_is_written_reads_back_the_same(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    out, pending = b"", b""
    for chunk in chunks:
        lines, pending = format_lines("stdout", chunk, pending, WHEN)
        out += lines
    read = b"\n".join(m.content for m in messages(out))
    complete = data[: len(data) - len(pending)]
    assert read + (b"\n" if complete else b"") == complete


def test_lines_that_are_not_cri_are_skipped() -> None:
    assert parse_line(b"garbage") is None
    assert parse_line(f"{WHEN} stdin F x".encode()) is None


def test_the_file_rotates_by_size_and_keeps_a_bounded_number(tmp_path: Path) -> None:
    path = tmp_path / "c" / "0.log"
    log = LogFile(path, max_bytes=100, max_files=3)
    for i in range(10):
        log.write(f"{i:02d}".encode() * 20)  # 40 bytes
    log.close()
    files = logs.log_files(path)
    assert [p.name for p in files] == ["0.log.2", "0.log.1", "0.log"]
    assert all(p.stat().st_size <= 100 for p in files)
    assert files[-1].read_bytes().startswith(b"08")


async def test_pump_copies_a_pipe_until_it_closes(tmp_path: Path) -> None:
    read, write = os.pipe()
    log = LogFile(tmp_path / "0.log")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(logs.pump, read, "stdout", log)
        os.write(write, b"hello\nworld\nno newline")
        os.close(write)
    log.close()
    found = list(messages((tmp_path / "0.log").read_bytes()))
    assert [m.content for m in found] == [b"hello", b"world", b"no newline"]


def test_a_carriage_return_is_content_not_a_line_break() -> None:
    out, _ = format_lines("stdout", b"progress 10%\rprogress 20%\n", b"", WHEN)
    assert [m.content for m in messages(out)] == [b"progress 10%\rprogress 20%"]
