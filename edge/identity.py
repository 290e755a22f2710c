"""This gateway's identity: the key, certificate and pinned CA with which it reaches its cloud.

``outpost join`` makes it once, from a bootstrap token that ``outpost-cloud token create NODE``
printed. A token reads ``OPT1.<ca-hash>.<id>.<secret>``:

- ``OPT1``: the format's version;
- ``<ca-hash>``: 64 lower-case hex digits, the SHA-256 of the DER of the cloud's CA certificate.
  The edge fetches the CA over a connection it cannot yet verify and trusts it only if this hash
  matches, so the token is all a person carries to the gateway;
- ``<id>``: 6 lower-case letters or digits naming the token; not secret, it appears in logs;
- ``<secret>``: 16 to 128 lower-case letters or digits proving that the holder was given it.

The join exchange, over WebSockets under the cloud URL: read the CA PEM from ``/v1/ca``; check
its hash; then, over TLS that verifies the cloud against that CA, send one msgpack map
``{"node", "token", "csr"}`` to ``/v1/join`` and receive ``{"cert": pem}`` or
``{"error": reason}``. The private key is made here and never leaves this machine: only the
certificate signing request does.

The identity lives in ``<data_dir>/identity/`` (mode 0700): ``node.key`` (0600), ``node.crt``
and ``ca.crt``. The node name is the certificate's common name, so it is not stored twice.

Nothing here imports the cloud: the cloud imports the token format and the CA hash from here.
Keys and certificates are handled by OpenSSL through ``edge.openssl``, not the ``cryptography``
package, which would not fit the binary's size budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import msgpack
import trio
import trio_websocket

from edge import openssl
from edge.openssl import Certificate, OpenSSLError, PrivateKey

TOKEN_VERSION = "OPT1"
IDENTITY_DIR = "identity"
CA_PATH = "/v1/ca"
JOIN_PATH = "/v1/join"
NODE_ORGANIZATION = "outpost:nodes"
"""The organization (O) every node certificate carries: it tells a node's certificate from any
other the cloud's CA signs."""
# X.509 bounds a common name to 64 characters, and the node certificate carries the node name
# as its common name; Kubernetes would allow 253.
MAX_NODE_NAME = 64
# A CA certificate or a signed node certificate is a few kilobytes; anything far larger is not
# one, and must not be buffered.
MAX_REPLY_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 15.0
EXCHANGE_TIMEOUT_S = 30.0

_HEX_HASH = re.compile(r"[0-9a-f]{64}")
_TOKEN_ID = re.compile(r"[a-z0-9]{6}")
_TOKEN_SECRET = re.compile(r"[a-z0-9]{16,128}")
_TOKEN_VERSION = re.compile(r"OPT[0-9]{1,3}")


class IdentityError(Exception):
    """This gateway cannot get or use its identity; the message says why and what to do."""


@dataclass(frozen=True)
class Token:
    """A parsed bootstrap token. Its ``repr`` leaves the secret out, so it is safe to log."""

    ca_hash: str
    id: str
    secret: str = field(repr=False)

    @property
    def text(self) -> str:
        """The token as a person copies it."""
        return f"{TOKEN_VERSION}.{self.ca_hash}.{self.id}.{self.secret}"


@dataclass(frozen=True)
class Identity:
    """Where this node's identity is kept, and the node name its certificate carries."""

    node: str
    key_path: Path
    cert_path: Path
    ca_path: Path


def parse_token(text: str) -> Token:
    """Parse a bootstrap token; the errors never repeat the secret."""
    parts = text.strip().split(".")
    if parts[0] != TOKEN_VERSION:
        if _TOKEN_VERSION.fullmatch(parts[0]):
            raise IdentityError(
                f"bootstrap token version {parts[0]} is not supported, only {TOKEN_VERSION}:"
                " upgrade outpost on this gateway"
            )
        raise IdentityError(
            f"the bootstrap token does not start with {TOKEN_VERSION}.: copy the whole line that"
            " `outpost-cloud token create` printed"
        )
    if len(parts) != 4:
        raise IdentityError(
            f"the bootstrap token has {len(parts)} dot-separated parts, not 4"
            f" ({TOKEN_VERSION}.<ca-hash>.<id>.<secret>): copy the whole line that"
            " `outpost-cloud token create` printed"
        )
    _, ca_hash, token_id, secret = parts
    if not _HEX_HASH.fullmatch(ca_hash):
        raise IdentityError(
            "the bootstrap token's CA hash is not 64 lower-case hex digits: the token is damaged"
        )
    if not _TOKEN_ID.fullmatch(token_id):
        raise IdentityError(
            "the bootstrap token's id is not 6 lower-case letters or digits: the token is damaged"
        )
    if not _TOKEN_SECRET.fullmatch(secret):
        raise IdentityError(
            f"the secret part of bootstrap token {token_id} is not 16 to 128 lower-case letters"
            " or digits: the token is damaged or cut short"
        )
    return Token(ca_hash=ca_hash, id=token_id, secret=secret)


def ca_hash(cert: bytes) -> str:
    """The hash a bootstrap token pins a CA by: hex SHA-256 of the certificate's DER.

    ``cert`` is the certificate as DER, or as PEM holding exactly that one certificate.
    """
    if cert.lstrip().startswith(b"-----BEGIN"):
        cert = _one_certificate(cert, "the CA certificate").der
    return hashlib.sha256(cert).hexdigest()


def generate_key() -> PrivateKey:
    """A new node key (EC P-256)."""
    try:
        return openssl.generate_p256_key()
    except OpenSSLError as exc:
        raise IdentityError(f"cannot make this gateway's key: {exc}") from exc


def make_csr(key: PrivateKey, node: str) -> bytes:
    """A PEM certificate signing request for ``node``, signed by ``key``."""
    if not 0 < len(node) <= MAX_NODE_NAME:
        raise IdentityError(
            f"node name {node!r} has {len(node)} characters; node certificates carry it as"
            f" their common name, which X.509 limits to {MAX_NODE_NAME}: pick a shorter name"
        )
    try:
        return openssl.make_csr(key, node)
    except OpenSSLError as exc:
        raise IdentityError(f"cannot make a certificate request for node {node!r}: {exc}") from exc


def _one_certificate(pem: bytes, what: str) -> Certificate:
    try:
        certs = openssl.read_certificates(pem)
    except OpenSSLError as exc:
        raise IdentityError(f"{what} is not a PEM certificate: {exc}") from exc
    if not certs:
        raise IdentityError(f"{what} is not a PEM certificate: no BEGIN CERTIFICATE block found")
    if len(certs) != 1:
        raise IdentityError(f"{what} holds {len(certs)} certificates, not 1")
    return certs[0]


def check_ca(ca_pem: bytes, expected_hash: str) -> Certificate:
    """The CA certificate in ``ca_pem``, if its hash is the one a bootstrap token pinned."""
    cert = _one_certificate(ca_pem, "the CA the cloud sent")
    actual = ca_hash(cert.der)
    if actual != expected_hash:
        raise IdentityError(
            f"the cloud presented a CA with hash {actual}, but the token pins {expected_hash}:"
            " the token is for another cloud (check --cloud), or something between this"
            " gateway and the cloud is intercepting the connection"
        )
    if not cert.is_ca:
        raise IdentityError(
            "the certificate the token pins is not a CA certificate: recreate the token with"
            " `outpost-cloud token create`"
        )
    return cert


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new, whole.

    The temporary file is created exclusively with ``mode`` so a key is never readable by
    others, not even for a moment.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        # The umask may have narrowed ``mode``; the file must have exactly it.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _identity_paths(data_dir: Path) -> tuple[Path, Path, Path]:
    directory = data_dir / IDENTITY_DIR
    return directory / "node.key", directory / "node.crt", directory / "ca.crt"


def prepare_identity_dir(data_dir: Path) -> Path:
    """Create ``<data_dir>/identity`` (0700) and check it is writable.

    ``join`` calls this before spending the token, so a read-only disk fails the join early
    rather than losing a certificate the cloud has already issued.
    """
    directory = data_dir / IDENTITY_DIR
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create the identity folder {directory}: {exc}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise IdentityError(f"cannot write to the identity folder {directory}: check its owner")
    return directory


def save_identity(data_dir: Path, key: PrivateKey, cert_pem: bytes, ca_pem: bytes) -> Identity:
    """Write the identity under ``data_dir``, replacing any previous one."""
    cert = _one_certificate(cert_pem, "the node certificate")
    node = _common_name(cert)
    directory = prepare_identity_dir(data_dir)
    key_path, cert_path, ca_path = _identity_paths(data_dir)
    try:
        # The certificate goes last: until it is replaced, an interrupted save leaves a key that
        # does not match it, which load_identity reports rather than using.
        _write_atomically(key_path, key.pem, 0o600)
        _write_atomically(ca_path, ca_pem, 0o644)
        _write_atomically(cert_path, cert_pem, 0o644)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise IdentityError(f"cannot save the identity in {directory}: {exc}") from exc
    return Identity(node=node, key_path=key_path, cert_path=cert_path, ca_path=ca_path)


def node_of(subject: str, common_names: Sequence[str], organizations: Sequence[str]) -> str:
    """The one rule, for the edge and the cloud alike, that maps a certificate to the node it
    was issued to: its subject holds O=``NODE_ORGANIZATION`` and exactly one CN, the node's
    name. ``IdentityError`` otherwise. It reads names only: the certificate must have been
    verified against the cloud's CA already."""
    if len(common_names) != 1:
        raise IdentityError(
            f"certificate {subject!r} has no single name (CN), so it is not a node certificate"
        )
    if NODE_ORGANIZATION not in organizations:
        raise IdentityError(
            f"certificate {subject!r} is not a node certificate (O={NODE_ORGANIZATION} and one CN)"
        )
    return common_names[0]


def _common_name(cert: Certificate) -> str:
    return node_of(cert.subject, cert.common_names, cert.organizations)


def load_identity(data_dir: Path) -> Identity | None:
    """The identity saved under ``data_dir``, or None if this gateway has not joined."""
    key_path, cert_path, ca_path = _identity_paths(data_dir)
    paths = (key_path, cert_path, ca_path)
    present = [p for p in paths if p.exists()]
    if not present:
        return None
    if len(present) != len(paths):
        missing = ", ".join(p.name for p in paths if p not in present)
        raise IdentityError(
            f"the identity in {key_path.parent} is incomplete (missing {missing}):"
            " run `outpost join` again"
        )
    try:
        cert = _one_certificate(cert_path.read_bytes(), str(cert_path))
        _one_certificate(ca_path.read_bytes(), str(ca_path))
        key = openssl.load_private_key(key_path.read_bytes())
        matches = openssl.key_matches(cert, key)
    except (OSError, OpenSSLError) as exc:
        raise IdentityError(f"cannot read the identity in {key_path.parent}: {exc}") from exc
    if not matches:
        raise IdentityError(
            f"{key_path} does not belong to {cert_path} (a join was interrupted):"
            " run `outpost join` again"
        )
    return Identity(
        node=_common_name(cert), key_path=key_path, cert_path=cert_path, ca_path=ca_path
    )


def client_ssl_context(identity: Identity) -> ssl.SSLContext:
    """TLS for reaching the cloud: trusts only the pinned CA, checks the cloud's host name and
    presents the node certificate."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=identity.ca_path)
        context.load_cert_chain(identity.cert_path, identity.key_path)
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(
            f"cannot use the identity in {identity.key_path.parent}: {exc}"
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _cloud_address(url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of an ``https://`` cloud URL."""
    parts = urlsplit(url)
    try:
        port = parts.port or 443
    except ValueError as exc:
        raise IdentityError(f"{url!r} has an invalid port: {exc}") from exc
    if parts.scheme != "https" or not parts.hostname:
        raise IdentityError(f"{url!r} is not an https:// URL of an outpost-cloud")
    return parts.hostname, port, parts.path.rstrip("/")


def _unverified_context() -> ssl.SSLContext:
    # Safe only because what is read over it, the CA, is checked against the token's hash.
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _connection_failure(exc: BaseException) -> str:
    """What went wrong connecting, from the innermost exception that says anything."""
    if isinstance(exc, trio_websocket.ConnectionClosed) and exc.reason is not None:
        said = f": {exc.reason.reason}" if exc.reason.reason else ""
        return f"the connection closed ({exc.reason.code} {exc.reason.name}{said})"
    while not str(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


async def _check_tls(url: str, host: str, port: int, context: ssl.SSLContext) -> None:
    """Complete a TLS handshake with the cloud, or say why it cannot be done.

    trio-websocket reports a failed TLS handshake only as a ConnectionTimeout once its connect
    timeout has passed, hiding the reason (most often a certificate that does not name the host
    in --cloud); a handshake of our own first finds it at once.
    """
    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise IdentityError(
                f"the cloud at {url} presented a certificate that does not verify"
                f" ({cause.verify_message.rstrip('.')}): if the cloud is reached by another name"
                " than the one in --cloud, add that name to its serving certificate"
                " (outpost-cloud serve --tls-san)"
            ) from exc
        raise IdentityError(
            f"TLS with {url} failed ({cause or exc}): is it an outpost-cloud?"
        ) from exc
    finally:
        await trio.aclose_forcefully(stream)


async def _exchange(
    url: str, host: str, port: int, resource: str, context: ssl.SSLContext, request: bytes | None
) -> bytes:
    """Open a WebSocket, send ``request`` if any, and return the one message that answers."""
    try:
        with trio.fail_after(EXCHANGE_TIMEOUT_S):
            await _check_tls(url, host, port, context)
            async with trio_websocket.open_websocket(
                host,
                port,
                resource,
                use_ssl=context,
                max_message_size=MAX_REPLY_BYTES,
                connect_timeout=CONNECT_TIMEOUT_S,
            ) as ws:
                if request is not None:
                    await ws.send_message(request)
                reply = await ws.get_message()
    except trio.TooSlowError as exc:
        raise IdentityError(
            f"the cloud at {url} did not answer on {resource} within"
            f" {math.ceil(EXCHANGE_TIMEOUT_S)} s"
        ) from exc
    except trio_websocket.ConnectionRejected as exc:
        raise IdentityError(
            f"the server at {url} refused {resource} (HTTP {exc.status_code}): is it an"
            " outpost-cloud?"
        ) from exc
    except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError) as exc:
        raise IdentityError(
            f"cannot reach the outpost-cloud at {url} ({resource}): {_connection_failure(exc)}"
        ) from exc
    return reply.encode() if isinstance(reply, str) else reply


def _check_certificate(cert_pem: bytes, ca: Certificate, key: PrivateKey, node: str) -> None:
    cert = _one_certificate(cert_pem, "the certificate the cloud issued")
    try:
        issued = openssl.is_issued_by(cert, ca)
        matches = openssl.key_matches(cert, key)
    except OpenSSLError as exc:
        raise IdentityError(f"cannot check the certificate the cloud issued: {exc}") from exc
    if not issued:
        raise IdentityError(
            "the certificate the cloud issued is not signed by its CA: its issuer name or"
            f" signature does not match the CA {ca.subject!r}"
        )
    if not matches or _common_name(cert) != node:
        raise IdentityError(f"the certificate the cloud issued is not for this key and node {node}")


async def join(url: str, token: str, node: str, data_dir: Path) -> Identity:
    """Trade a bootstrap token for a node certificate, and save the identity in ``data_dir``."""
    parsed = parse_token(token)
    host, port, prefix = _cloud_address(url)
    prepare_identity_dir(data_dir)
    key = generate_key()
    csr = make_csr(key, node)

    ca_pem = await _exchange(url, host, port, prefix + CA_PATH, _unverified_context(), None)
    ca = check_ca(ca_pem, parsed.ca_hash)

    request = msgpack.packb({"node": node, "token": parsed.text, "csr": csr}, use_bin_type=True)
    raw = await _exchange(url, host, port, prefix + JOIN_PATH, _pinned_context(ca_pem), request)
    try:
        reply = msgpack.unpackb(raw, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IdentityError(f"the cloud at {url} sent an unreadable join reply: {exc}") from exc
    if isinstance(reply, dict) and isinstance(reply.get("error"), str):
        raise IdentityError(f"the cloud at {url} refused to join node {node}: {reply['error']}")
    if not isinstance(reply, dict) or not isinstance(reply.get("cert"), bytes):
        raise IdentityError(f"the cloud at {url} sent a join reply with neither cert nor error")
    cert_pem = reply["cert"]
    _check_certificate(cert_pem, ca, key, node)
    return await trio.to_thread.run_sync(save_identity, data_dir, key, cert_pem, ca_pem)
