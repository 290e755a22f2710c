"""Frames survive a round trip exactly, and bad bytes are rejected with a reason, never a crash."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.wire import codec
from edge.wire.codec import ProtocolError, decode, encode
from edge.wire.events import (
    Ack,
    Batch,
    Close,
    Hello,
    Message,
    Op,
    Ping,
    Pong,
    Refuse,
    Welcome,
)

bodies = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip
names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
messages = st.builds(
    Message,
    seq=st.integers(1, 2**40),
    id=st.text(max_size=32),
    op=st.sampled_from(list(Op)),
    key=st.builds(lambda ns, kind, name: f"{ns}/{kind}/{name}", st.just("") | names, names, names),
    rv=st.text(max_size=12),
    body=bodies,
)
frames = st.one_of(
    st.builds(
        Hello,
        node=names,
        versions=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
        received=st.integers(0, 2**40),
        sending_from=st.integers(1, 2**40),
        agent_version=st.text(max_size=10),
        epoch=st.text(max_size=16),
    ),
    st.builds(
        Welcome,
        version=st.integers(1, 9),
        received=st.integers(0, 2**40),
        sending_from=st.integers(1, 2**40),
        heartbeat_s=st.floats(0, 3600),
        max_frame=st.integers(1024, 1 << 24),
        window=st.integers(1, 10_000),
    ),
    st.builds(Refuse, reason=st.text(max_size=50), retry_after_s=st.none() | st.floats(0, 600)),
    st.builds(Batch, ack=st.integers(0, 2**40), messages=st.lists(messages, max_size=5).map(tuple)),
    st.builds(Ack, ack=st.integers(0, 2**40)),
    st.builds(Ping, ack=st.integers(0, 2**40)),
    st.builds(Pong, ack=st.integers(0, 2**40)),
    st.builds(Close, reason=st.text(max_size=50)),
)


@given(frames)
def test_every_frame_round_trips(frame):
    assert decode(encode(frame)) == frame


@given(st.binary(max_size=2048))
def test_random_bytes_never_escape_as_anything_but_a_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        decode(data)


@given(frames, st.data())
def test_corrupted_frames_are_rejected_or_decoded_never_crash(frame, data):
    raw = bytearray(encode(frame))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        decode(bytes(raw))


def test_oversized_frames_are_refused_both_ways():
    big = Batch(0, (Message(1, "m", Op.PUT, "ns/Pod/p", "1", b"x" * 5000),))
    with pytest.raises(ProtocolError, match="exceeds the 4096-byte limit"):
        encode(big, max_frame=4096)
    with pytest.raises(ProtocolError, match="exceeds the 4096-byte limit"):
        decode(encode(big), max_frame=4096)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([], "non-empty array"),
        ({"t": 1}, "non-empty array"),
        ([99, 1], "unknown frame type 99"),
        ([5], "unknown frame type 5 with 0 fields"),
        ([5, -1], "ack must be an integer >= 0"),
        ([5, "1"], "ack must be an integer >= 0"),
        ([1, "n", [], 0, 1, "", "e"], "between 1 and 16 protocol versions"),
        ([1, "n", [1], 0, 1, "", "e" * 65], "store epoch"),
        ([4, 0, [[0, "i", "put", "ns/Pod/p", "", None]]], "seq must be an integer >= 1"),
        ([4, 0, [[1, "i", "explode", "ns/Pod/p", "", None]]], "unknown op 'explode'"),
        ([4, 0, [[1, "i", "put", "Pod/p", "", None]]], "is not namespace/kind/name"),
        ([4, 0, [[1, "i", "put", "ns//p", "", None]]], "is not namespace/kind/name"),
        ([4, 0, [[1, "i", "put"]]], "6-element array"),
        ([4, 0, "nope"], "batch messages must be an array"),
        ([2, 1, 0, 1, -5, 4096, 10], "heartbeat interval must be a non-negative number"),
    ],
)
def test_malformed_frames_name_their_fault(fields, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(msgpack.packb(fields))


def test_truncated_and_trailing_bytes_are_malformed():
    data = encode(Ack(7))
    with pytest.raises(ProtocolError, match="malformed frame"):
        decode(data[:-1])
    with pytest.raises(ProtocolError, match="malformed frame"):
        decode(data + b"\x00")


def test_message_size_matches_its_share_of_a_batch():
    message = Message(3, "id", Op.STATUS, "ns/Pod/p", "9", {"phase": "Running"})
    one = len(encode(Batch(0, (message,))))
    two = len(encode(Batch(0, (message, message))))
    assert two - one == codec.message_size(message)
