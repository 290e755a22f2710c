"""Frames to bytes and back: msgpack, with a size limit and strict validation.

msgpack rather than JSON or protobuf: it is compact, carries Kubernetes objects (nested maps)
without a schema compiler, its C extension is fast, and the edge binary already needs it for the
store. A frame is a msgpack array whose first element is the frame type; the layout of each
type is fixed by position, so a frame costs no field names.

``decode`` never trusts its input: anything that is not exactly a known frame raises
``ProtocolError`` with a reason a person can read, and nothing else escapes it.
"""

from __future__ import annotations

from typing import Any

import msgpack

from edge.wire.events import (
    Ack,
    Batch,
    Close,
    Frame,
    Hello,
    Message,
    Op,
    Ping,
    Pong,
    Refuse,
    Welcome,
)

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DEFAULT_MAX_FRAME = 1 << 20

_HELLO, _WELCOME, _REFUSE, _BATCH, _ACK, _PING, _PONG, _CLOSE = range(1, 9)
_OPS = {op.value: op for op in Op}


class ProtocolError(Exception):
    """The peer broke the protocol; ``reason`` says how, for the log and the Close frame."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _message(m: Message) -> list[Any]:
    return [m.seq, m.id, m.op.value, m.key, m.rv, m.body]


def _fields(frame: Frame) -> list[Any]:
    match frame:
        case Hello(node, versions, received, sending_from, agent_version, epoch):
            return [_HELLO, node, list(versions), received, sending_from, agent_version, epoch]
        case Welcome(version, received, sending_from, heartbeat_s, max_frame, window):
            return [_WELCOME, version, received, sending_from, heartbeat_s, max_frame, window]
        case Refuse(reason, retry_after_s):
            return [_REFUSE, reason, retry_after_s]
        case Batch(ack, messages):
            return [_BATCH, ack, [_message(m) for m in messages]]
        case Ack(ack):
            return [_ACK, ack]
        case Ping(ack):
            return [_PING, ack]
        case Pong(ack):
            return [_PONG, ack]
        case Close(reason):
            return [_CLOSE, reason]
    raise TypeError(f"not a frame: {frame!r}")


def encode(frame: Frame, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialize ``frame``; a frame larger than ``max_frame`` raises ``ProtocolError``."""
    data = msgpack.packb(_fields(frame), use_bin_type=True)
    if len(data) > max_frame:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the {max_frame}-byte limit")
    return data


def message_size(message: Message) -> int:
    """Bytes ``message`` adds to a Batch frame, so senders can fill frames without overflow."""
    return len(msgpack.packb(_message(message), use_bin_type=True))


# -- decoding -------------------------------------------------------------------------------


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise ProtocolError(f"{what} must be an integer >= {minimum}, got {value!r:.40}")
    return value


def _str(value: Any, what: str, limit: int = 4096) -> str:
    if type(value) is not str or len(value) > limit:
        raise ProtocolError(f"{what} must be a string of at most {limit} characters")
    return value


def _float(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not 0 <= value < 1e9:
        raise ProtocolError(f"{what} must be a non-negative number, got {value!r:.40}")
    return float(value)


def _decode_message(raw: Any) -> Message:
    if type(raw) is not list or len(raw) != 6:
        raise ProtocolError("a sync message must be a 6-element array")
    seq, msg_id, op, key, rv, body = raw
    op_value = _str(op, "op", 32)
    if op_value not in _OPS:
        raise ProtocolError(f"unknown op {op_value!r}")
    key = _str(key, "key", 512)
    if key.count("/") != 2 or not all(key.split("/")[1:]):
        raise ProtocolError(f"key {key[:80]!r} is not namespace/kind/name")
    return Message(
        seq=_int(seq, "seq", 1),
        id=_str(msg_id, "message id", 128),
        op=_OPS[op_value],
        key=key,
        rv=_str(rv, "resource version", 128),
        body=body,
    )


def _decode(fields: list[Any]) -> Frame:
    kind, *rest = fields
    n = len(rest)
    if kind == _HELLO and n == 6:
        node, versions, received, sending_from, agent_version, epoch = rest
        if type(versions) is not list or not 0 < len(versions) <= 16:
            raise ProtocolError("hello must list between 1 and 16 protocol versions")
        return Hello(
            node=_str(node, "node name", 253),
            versions=tuple(_int(v, "protocol version", 1) for v in versions),
            received=_int(received, "received"),
            sending_from=_int(sending_from, "sending from", 1),
            agent_version=_str(agent_version, "agent version", 128),
            epoch=_str(epoch, "store epoch", 64),
        )
    if kind == _WELCOME and n == 6:
        version, received, sending_from, heartbeat_s, max_frame, window = rest
        return Welcome(
            version=_int(version, "protocol version", 1),
            received=_int(received, "received"),
            sending_from=_int(sending_from, "sending from", 1),
            heartbeat_s=_float(heartbeat_s, "heartbeat interval"),
            max_frame=_int(max_frame, "max frame", 1024),
            window=_int(window, "window", 1),
        )
    if kind == _REFUSE and n == 2:
        reason, retry_after = rest
        return Refuse(
            reason=_str(reason, "reason"),
            retry_after_s=None if retry_after is None else _float(retry_after, "retry-after"),
        )
    if kind == _BATCH and n == 2:
        ack, messages = rest
        if type(messages) is not list:
            raise ProtocolError("batch messages must be an array")
        return Batch(ack=_int(ack, "ack"), messages=tuple(_decode_message(m) for m in messages))
    if kind in (_ACK, _PING, _PONG) and n == 1:
        cls = {_ACK: Ack, _PING: Ping, _PONG: Pong}[kind]
        return cls(_int(rest[0], "ack"))
    if kind == _CLOSE and n == 1:
        return Close(_str(rest[0], "reason"))
    raise ProtocolError(f"unknown frame type {kind!r:.20} with {n} fields")


def decode(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> Frame:
    """Parse one frame; anything malformed, oversized or unknown raises ``ProtocolError``."""
    if len(data) > max_frame:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the {max_frame}-byte limit")
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
    # msgpack reports bad input as ValueError subclasses (ExtraData, FormatError, StackError,
    # bad UTF-8) and TypeError (an unhashable map key).
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"malformed frame: {type(exc).__name__}: {exc}"[:200]) from None
    if type(fields) is not list or not fields:
        raise ProtocolError("a frame must be a non-empty array")
    return _decode(fields)
