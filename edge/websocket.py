"""The edge↔cloud session's WebSocket binding, shared by the edge's hub client
(``edge.hub.client``) and the cloud's hub (``cloud.hub``).

Where a session is opened (``CONNECT_PATH``), the close codes, how a session's end is told to
the peer, what the headers of a refused handshake say, and how a nursery of session tasks
reports why it ended. The frames themselves are ``edge.wire``'s, which stays sans-IO; this
module owns the little that needs the socket. It imports nothing of the cloud: the edge binary
stands alone.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from edge.wire.connection import Connection

CONNECT_PATH = "/v1/connect"
NORMAL_CLOSURE = 1000
PROTOCOL_ERROR = 1002


def websocket_url(cloud_url: str) -> str:
    """Where an edge connects, for a cloud at ``cloud_url`` (``https://host:port``)."""
    parts = urlsplit(cloud_url)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, CONNECT_PATH, "", ""))


def header(exc: ConnectionRejected, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in a refused handshake, if it has one."""
    for key, value in exc.headers or ():
        if key.lower() == name:
            return value
    return None


def retry_after_header(exc: ConnectionRejected) -> float | None:
    """The seconds a refusal's ``Retry-After`` asks the edge to stay away, if it says."""
    value = header(exc, b"retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def close_session(ws: WebSocketConnection, conn: Connection, code: int, reason: str) -> None:
    """Tell the peer why (a Close frame, then the WebSocket close), within a second, even
    while being cancelled; a peer already gone is fine."""
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await ws.send_message(conn.close(reason))
            await ws.aclose(code=code, reason=reason[:120])
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def unwrap(group: BaseExceptionGroup, *preferred: type[BaseException]) -> BaseException:
    """The one exception that explains why a nursery of session tasks ended.

    When one task fails, trio cancels its siblings, so the group holds the failure plus
    cancellations. The first leaf of a ``preferred`` type wins, in the order given; a group with
    none of them (a bug, or a cancellation from outside) is returned unchanged.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for kind in preferred:
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group
