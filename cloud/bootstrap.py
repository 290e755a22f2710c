"""The cloud's half of ``outpost join``: hand out the CA, and trade tokens for node certificates.

The hub routes two WebSocket paths here. A joining gateway has no client certificate yet, so
the hub must accept TLS without one on these two paths:

- ``/v1/ca`` → ``serve_ca``: one binary message, the CA certificate PEM. Anyone may read it; the
  edge trusts it only because its hash matches the one in the token.
- ``/v1/join`` → ``serve_join``: one msgpack map ``{"node": str, "token": str, "csr": bytes}``
  in; one msgpack map ``{"cert": bytes}`` or ``{"error": str}`` out.

Both close the connection when done. A join request is a few hundred bytes; the hub should
serve these paths with ``max_message_size`` no larger than ``MAX_JOIN_REQUEST_BYTES`` so that a
larger one is never buffered at all.
"""

from __future__ import annotations

import contextlib
import logging

import httpx2
import msgpack
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from trio_websocket import ConnectionClosed, WebSocketConnection

from cloud import pki
from edge.identity import IdentityError, parse_token

log = logging.getLogger(__name__)

MAX_JOIN_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT_S = 30.0
# Node names are at most 253 characters; anything longer in a log line is an attacker's filler.
_LOGGED_CHARS = 253


async def serve_ca(ws: WebSocketConnection, ca: pki.CertificateAuthority) -> None:
    """Send the CA certificate PEM as one message, then close."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send_message(ca.cert_pem)
    await ws.aclose()


def _parse_request(message: str | bytes) -> tuple[str, str, bytes]:
    """(node, token, csr) from a join request; JoinRefused says what is wrong with it."""
    if not isinstance(message, bytes):
        raise pki.JoinRefused("the join request must be a binary msgpack message, not text")
    if len(message) > MAX_JOIN_REQUEST_BYTES:
        raise pki.JoinRefused(
            f"the join request has {len(message)} bytes; at most {MAX_JOIN_REQUEST_BYTES}"
            " are accepted"
        )
    try:
        request = msgpack.unpackb(message, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise pki.JoinRefused(f"the join request is not valid msgpack: {exc}") from exc
    if not (
        isinstance(request, dict)
        and isinstance(request.get("node"), str)
        and isinstance(request.get("token"), str)
        and isinstance(request.get("csr"), bytes)
    ):
        raise pki.JoinRefused(
            "the join request must be a map of node (string), token (string) and csr (bytes)"
        )
    return request["node"], request["token"], request["csr"]


def _token_id(token: str) -> str:
    try:
        return parse_token(token).id
    except IdentityError:
        return "(malformed)"


async def serve_join(
    ws: WebSocketConnection, kube: AsyncClient, ca: pki.CertificateAuthority
) -> None:
    """Answer one join request with a node certificate or the reason it is refused, then close.

    Refusals and failures are logged; none is raised, so a misbehaving gateway cannot take
    down the hub's handler.
    """
    fields: dict[str, object] = {"remote": str(ws.remote)}
    with trio.move_on_after(REQUEST_TIMEOUT_S) as waited:
        try:
            message = await ws.get_message()
        except ConnectionClosed:
            log.info("join abandoned before a request", extra=fields)
            return
    if waited.cancelled_caught:
        log.warning(
            "join refused",
            extra={**fields, "reason": f"no request within {REQUEST_TIMEOUT_S:g} s"},
        )
        await ws.aclose(1008, "no join request in time")
        return

    try:
        node, token, csr = _parse_request(message)
        fields.update(node=node[:_LOGGED_CHARS], token_id=_token_id(token))
        cert = await pki.redeem_token(kube, ca, token, csr, node)
    except pki.JoinRefused as exc:
        log.warning("join refused", extra={**fields, "reason": exc.reason})
        reply: dict[str, object] = {"error": exc.reason}
    except (httpx2.TransportError, ApiError) as exc:
        log.error("join failed: Kubernetes did not answer", extra={**fields, "error": str(exc)})
        reply = {"error": "the cloud cannot reach Kubernetes right now: try again in a minute"}
    else:
        log.info("node joined", extra=fields)
        reply = {"cert": cert}
    with contextlib.suppress(ConnectionClosed):
        await ws.send_message(msgpack.packb(reply, use_bin_type=True))
    await ws.aclose()
