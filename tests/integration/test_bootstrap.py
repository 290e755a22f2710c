"""Joining a gateway, end to end: tokens kept in the real apiserver, the join exchange over real
TLS WebSockets on loopback, and the certificate used in a real mTLS handshake."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import ssl
import stat
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import msgpack
import outcome
import pytest
import trio
import trio_websocket
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret

from cloud import bootstrap, pki
from cloud.cli import cli as cloud_cli
from cloud.cli import validate_ttl
from edge import datadir, identity
from edge.identity import CA_PATH, JOIN_PATH, IdentityError
from tests.cluster.controlplane import ControlPlane
from tests.processes import VENV_BIN

pytestmark = pytest.mark.cluster

TTL = dt.timedelta(minutes=10)


@dataclass
class Cloud:
    """The join endpoints of a cloud, served on loopback, and the join requests they received."""

    url: str
    ca: pki.CertificateAuthority
    join_requests: list[bytes | str] = field(default_factory=list)


class _Recording:
    """A WebSocket connection that keeps a copy of every message it receives."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, into: list[bytes | str]) -> None:
        self._ws = ws
        self._into = into

    async def get_message(self) -> bytes | str:
        message = await self._ws.get_message()
        self._into.append(message)
        return message

    def __getattr__(self, name: str):
        return getattr(self._ws, name)


class _ReadersMeet:
    """A Kubernetes client whose first ``count`` gets all wait until each has its answer, so
    concurrent callers are sure to have read the same state before any of them acts on it."""

    def __init__(self, kube: AsyncClient, count: int) -> None:
        self._kube = kube
        self._count = count
        self._all_read = trio.Event()

    async def get(self, *args, **kwargs):
        result = await outcome.acapture(self._kube.get, *args, **kwargs)
        self._count -= 1
        if self._count == 0:
            self._all_read.set()
        await self._all_read.wait()
        return result.unwrap()

    def __getattr__(self, name: str):
        return getattr(self._kube, name)


def _write_pair(folder: Path, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture
async def cloud(kube: AsyncClient, nursery: trio.Nursery, tmp_path: Path) -> Cloud:
    ca = await pki.load_or_create_ca(kube)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(
        *_write_pair(tmp_path / "cloud", *ca.issue_server_cert(["127.0.0.1", "localhost"]))
    )
    requests: list[bytes | str] = []

    async def route(request: trio_websocket.WebSocketRequest) -> None:
        if request.path == CA_PATH:
            await bootstrap.serve_ca(await request.accept(), ca)
        elif request.path == JOIN_PATH:
            await bootstrap.serve_join(_Recording(await request.accept(), requests), kube, ca)
        else:
            await request.reject(404)

    server = await nursery.start(
        partial(trio_websocket.serve_websocket, route, "127.0.0.1", 0, context)
    )
    return Cloud(url=f"https://127.0.0.1:{server.port}", ca=ca, join_requests=requests)


async def _token_exists(kube: AsyncClient, token: str) -> bool:
    name = pki.TOKEN_SECRET_PREFIX + identity.parse_token(token).id
    try:
        await kube.get(Secret, name, namespace=pki.NAMESPACE)
    except ApiError as exc:
        if exc.status.code == 404:
            return False
        raise
    return True


def _names(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [a.value for a in cert.subject.get_attributes_for_oid(oid)]


async def test_a_gateway_joins_with_a_certificate_for_its_node(
    kube: AsyncClient, cloud: Cloud, tmp_path: Path
):
    token = await pki.create_token(kube, cloud.ca, "gw-join", TTL)

    saved = await identity.join(cloud.url, token, "gw-join", tmp_path / "edge")

    assert saved == identity.load_identity(tmp_path / "edge")
    assert saved.node == "gw-join"
    cert = x509.load_pem_x509_certificate(saved.cert_path.read_bytes())
    assert _names(cert, NameOID.COMMON_NAME) == ["gw-join"]
    assert _names(cert, NameOID.ORGANIZATION_NAME) == [pki.NODE_ORGANIZATION]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=360)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(cloud.ca.cert_pem))
    assert saved.ca_path.read_bytes() == cloud.ca.cert_pem
    assert stat.S_IMODE(saved.key_path.stat().st_mode) == 0o600

    # The cloud saw a CSR over the node's key, and nothing of the private key itself.
    [raw] = cloud.join_requests
    request = msgpack.unpackb(raw)
    assert set(request) == {"node", "token", "csr"}
    key = serialization.load_pem_private_key(saved.key_path.read_bytes(), password=None)
    assert x509.load_pem_x509_csr(request["csr"]).public_key() == key.public_key()
    assert key.private_numbers().private_value.to_bytes(32, "big") not in raw
    assert b"PRIVATE KEY" not in raw
    assert not await _token_exists(kube, token)


async def test_a_used_token_is_refused(kube: AsyncClient, cloud: Cloud, tmp_path: Path):
    token = await pki.create_token(kube, cloud.ca, "gw-reuse", TTL)
    await identity.join(cloud.url, token, "gw-reuse", tmp_path / "first")

    with pytest.raises(IdentityError, match="was already used") as refused:
        await identity.join(cloud.url, token, "gw-reuse", tmp_path / "second")
    assert f"the cloud at {cloud.url} refused to join node gw-reuse" in str(refused.value)
    assert identity.load_identity(tmp_path / "second") is None


async def test_an_expired_token_is_refused_and_removed(
    kube: AsyncClient, cloud: Cloud, tmp_path: Path
):
    token = await pki.create_token(kube, cloud.ca, "gw-late", dt.timedelta(seconds=1))
    await trio.sleep(1.5)

    with pytest.raises(IdentityError, match=r"token [a-z0-9]{6} expired at 20\d\d-"):
        await identity.join(cloud.url, token, "gw-late", tmp_path / "edge")
    assert not await _token_exists(kube, token)


async def test_expired_tokens_are_swept_when_a_token_is_created(kube: AsyncClient, cloud: Cloud):
    stale = await pki.create_token(kube, cloud.ca, "gw-stale", dt.timedelta(seconds=1))
    await trio.sleep(1.5)
    fresh = await pki.create_token(kube, cloud.ca, "gw-fresh", TTL)
    assert not await _token_exists(kube, stale)
    assert await _token_exists(kube, fresh)


async def test_a_token_for_another_node_is_refused_and_stays_usable(
    kube: AsyncClient, cloud: Cloud, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    token = await pki.create_token(kube, cloud.ca, "gw-a", TTL)

    with (
        caplog.at_level(logging.INFO, logger="cloud"),
        pytest.raises(IdentityError, match="is bound to node gw-a, not gw-b"),
    ):
        await identity.join(cloud.url, token, "gw-b", tmp_path / "b")
    [refusal] = [r for r in caplog.records if r.getMessage() == "join refused"]
    assert refusal.node == "gw-b"
    assert refusal.token_id == identity.parse_token(token).id
    assert "bound to node gw-a" in refusal.reason
    assert identity.load_identity(tmp_path / "b") is None

    saved = await identity.join(cloud.url, token, "gw-a", tmp_path / "a")
    assert saved.node == "gw-a"


async def test_a_token_pinning_another_ca_is_refused_before_anything_is_sent(
    kube: AsyncClient, cloud: Cloud, tmp_path: Path
):
    token = identity.parse_token(await pki.create_token(kube, cloud.ca, "gw-pin", TTL))
    other = pki.CertificateAuthority.generate()
    forged = identity.Token(ca_hash=other.ca_hash, id=token.id, secret=token.secret).text

    with pytest.raises(IdentityError, match=f"but the token pins {other.ca_hash}"):
        await identity.join(cloud.url, forged, "gw-pin", tmp_path / "edge")

    assert cloud.join_requests == []
    assert await _token_exists(kube, token.text)
    assert identity.load_identity(tmp_path / "edge") is None


async def test_the_cloud_refuses_a_token_made_for_another_ca(kube: AsyncClient, cloud: Cloud):
    other = pki.CertificateAuthority.generate()
    token = await pki.create_token(kube, other, "gw-other", TTL)
    csr = identity.make_csr(identity.generate_key(), "gw-other")
    with pytest.raises(pki.TokenRefused, match="was made by another cloud or for a replaced CA"):
        await pki.redeem_token(kube, cloud.ca, token, csr, "gw-other")


async def test_a_wrong_secret_is_refused_as_unknown(kube: AsyncClient, cloud: Cloud):
    token = identity.parse_token(await pki.create_token(kube, cloud.ca, "gw-guess", TTL))
    guess = identity.Token(ca_hash=token.ca_hash, id=token.id, secret="x" * 24).text
    csr = identity.make_csr(identity.generate_key(), "gw-guess")
    with pytest.raises(pki.TokenRefused, match="is unknown or was already used"):
        await pki.redeem_token(kube, cloud.ca, guess, csr, "gw-guess")
    assert await _token_exists(kube, token.text)


async def test_the_token_secret_holds_only_a_hash_of_the_secret(kube: AsyncClient, cloud: Cloud):
    token = identity.parse_token(await pki.create_token(kube, cloud.ca, "gw-hash", TTL))
    stored = await kube.get(Secret, pki.TOKEN_SECRET_PREFIX + token.id, namespace=pki.NAMESPACE)
    assert stored.type == pki.TOKEN_SECRET_TYPE
    assert set(stored.data) == {"node", "expires", "secret-sha256"}
    assert token.secret not in str(stored.to_dict())


async def test_of_concurrent_redeemers_of_one_token_exactly_one_wins(
    kube: AsyncClient, cloud: Cloud
):
    token = await pki.create_token(kube, cloud.ca, "gw-race", TTL)
    racers = 3
    meet = _ReadersMeet(kube, racers)
    results: list[bytes | pki.TokenRefused] = []

    async def redeem() -> None:
        csr = identity.make_csr(identity.generate_key(), "gw-race")
        try:
            results.append(await pki.redeem_token(meet, cloud.ca, token, csr, "gw-race"))
        except pki.TokenRefused as exc:
            results.append(exc)

    async with trio.open_nursery() as racing:
        for _ in range(racers):
            racing.start_soon(redeem)

    certs = [r for r in results if isinstance(r, bytes)]
    refusals = [r for r in results if isinstance(r, pki.TokenRefused)]
    assert len(certs) == 1
    assert len(refusals) == racers - 1
    assert all("was already used" in r.reason for r in refusals)


async def test_a_token_secret_replaced_after_it_was_read_is_not_spent(
    kube: AsyncClient, cloud: Cloud
):
    """Deletion is conditional on the uid and version that were read, not just the name."""
    token = await pki.create_token(kube, cloud.ca, "gw-aba", TTL)
    name = pki.TOKEN_SECRET_PREFIX + identity.parse_token(token).id

    class ReplacedAfterRead:
        async def get(self, *args, **kwargs):
            read = await kube.get(*args, **kwargs)
            await kube.delete(Secret, name, namespace=pki.NAMESPACE)
            await kube.create(
                Secret(
                    metadata=ObjectMeta(name=name, namespace=pki.NAMESPACE),
                    type=read.type,
                    data=read.data,
                )
            )
            return read

        def __getattr__(self, attr: str):
            return getattr(kube, attr)

    csr = identity.make_csr(identity.generate_key(), "gw-aba")
    with pytest.raises(pki.TokenRefused, match="was already used"):
        await pki.redeem_token(ReplacedAfterRead(), cloud.ca, token, csr, "gw-aba")
    assert await _token_exists(kube, token)


async def test_replicas_starting_together_share_one_ca(
    kube: AsyncClient, caplog: pytest.LogCaptureFixture
):
    try:
        await kube.delete(Secret, pki.CA_SECRET, namespace=pki.NAMESPACE)
    except ApiError as exc:
        if exc.status.code != 404:
            raise
    meet = _ReadersMeet(kube, 2)
    loaded: list[pki.CertificateAuthority] = []

    async def replica() -> None:
        loaded.append(await pki.load_or_create_ca(meet))

    with caplog.at_level(logging.INFO, logger="cloud"):
        async with trio.open_nursery() as replicas:
            replicas.start_soon(replica)
            replicas.start_soon(replica)

    # Both found none and both tried to create one; one won, the other read the winner's.
    assert [r.getMessage() for r in caplog.records].count("created the CA") == 1

    first, second = loaded
    assert first.ca_hash == second.ca_hash
    assert (await pki.load_or_create_ca(kube)).ca_hash == first.ca_hash
    stored = await kube.get(Secret, pki.CA_SECRET, namespace=pki.NAMESPACE)
    assert stored.type == "kubernetes.io/tls"


async def test_a_node_certificate_names_its_node_in_an_mtls_handshake(
    kube: AsyncClient, cloud: Cloud, tmp_path: Path, nursery: trio.Nursery
):
    token = await pki.create_token(kube, cloud.ca, "gw-mtls", TTL)
    saved = await identity.join(cloud.url, token, "gw-mtls", tmp_path / "edge")

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(
        *_write_pair(tmp_path / "hub", *cloud.ca.issue_server_cert(["127.0.0.1"]))
    )
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(cadata=cloud.ca.cert_pem.decode())
    seen: list[str] = []

    async def hub(stream: trio.SSLStream) -> None:
        await stream.do_handshake()
        seen.append(pki.node_name_from_cert(stream.getpeercert(binary_form=True)))
        await stream.send_all(b"welcome")
        await stream.aclose()

    listeners = await trio.open_ssl_over_tcp_listeners(0, server_context, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, hub, listeners)
    port = listeners[0].transport_listener.socket.getsockname()[1]

    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=identity.client_ssl_context(saved)
    )
    with trio.fail_after(10):
        assert await stream.receive_some() == b"welcome"
    await stream.aclose()
    assert seen == ["gw-mtls"]


def test_a_server_certificate_is_not_a_node_certificate():
    cert_pem, _ = pki.CertificateAuthority.generate().issue_server_cert(["localhost"])
    with pytest.raises(pki.NotANodeCertificate, match="is not a node certificate"):
        pki.node_name_from_cert(cert_pem)


def _csr(key, common_name: str) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


@pytest.mark.parametrize(
    ("key", "common_name", "message"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "gw-other", "names 'gw-other', but the token"),
        (ec.generate_private_key(ec.SECP521R1()), "gw-1", "carries an EC secp521r1 key"),
        (rsa.generate_private_key(65537, 1024), "gw-1", "carries a 1024-bit RSA key"),
        (ed25519.Ed25519PrivateKey.generate(), "gw-1", "carries a Ed25519PublicKey"),
    ],
)
def test_the_ca_refuses_a_csr_for_another_name_or_with_a_weak_key(key, common_name, message):
    ca = pki.CertificateAuthority.generate()
    with pytest.raises(pki.CSRRefused, match=message):
        ca.sign_node_csr(_csr(key, common_name), "gw-1")


def test_the_ca_refuses_a_csr_whose_signature_does_not_verify():
    ca = pki.CertificateAuthority.generate()
    # RSA-2048 signatures are the last 256 bytes of the DER; swapping them keeps it well formed.
    mine, theirs = (
        x509.load_pem_x509_csr(_csr(rsa.generate_private_key(65537, 2048), "gw-1")).public_bytes(
            serialization.Encoding.DER
        )
        for _ in range(2)
    )
    spliced = x509.load_der_x509_csr(mine[:-256] + theirs[-256:])
    with pytest.raises(pki.CSRRefused, match="signature does not verify"):
        ca.sign_node_csr(spliced.public_bytes(serialization.Encoding.PEM), "gw-1")


def test_the_ca_refuses_garbage_for_a_csr():
    with pytest.raises(pki.CSRRefused, match="not a usable PEM certificate request"):
        pki.CertificateAuthority.generate().sign_node_csr(b"not a csr", "gw-1")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("hello", "must be a binary msgpack message"),
        (b"\xc1", "is not valid msgpack"),
        (msgpack.packb({"node": "gw-1", "token": "t"}), "must be a map of node"),
        (b"\x00" * (bootstrap.MAX_JOIN_REQUEST_BYTES + 1), "at most 16384 are accepted"),
    ],
)
async def test_a_malformed_join_request_gets_a_reason(cloud: Cloud, message, reason):
    context = ssl.create_default_context(cadata=cloud.ca.cert_pem.decode())
    async with trio_websocket.open_websocket_url(
        cloud.url.replace("https", "wss") + JOIN_PATH, context
    ) as ws:
        await ws.send_message(message)
        with trio.fail_after(10):
            reply = msgpack.unpackb(await ws.get_message())
    assert reason in reply["error"]


async def test_the_join_command_saves_an_identity(kube: AsyncClient, cloud: Cloud, tmp_path: Path):
    token = await pki.create_token(kube, cloud.ca, "gw-cli-join", TTL)
    result = await trio.run_process(
        [
            VENV_BIN / "outpost",
            "join",
            "--cloud",
            cloud.url,
            "--token",
            token,
            "--node-name",
            "gw-cli-join",
            "--data-dir",
            tmp_path / "edge",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    saved_in = tmp_path / "edge" / "identity"
    assert (
        result.stdout.decode()
        == f"joined {cloud.url} as node gw-cli-join; identity saved in {saved_in}\n"
    )
    assert identity.load_identity(tmp_path / "edge").node == "gw-cli-join"
    assert datadir.saved_cloud_url(tmp_path / "edge") == cloud.url


async def test_the_join_command_reports_a_refusal_in_one_line(cloud: Cloud, tmp_path: Path):
    unknown = identity.Token(ca_hash=cloud.ca.ca_hash, id="zzzzzz", secret="y" * 24).text
    result = await trio.run_process(
        [
            VENV_BIN / "outpost",
            "join",
            "--cloud",
            cloud.url,
            "--token",
            unknown,
            "--node-name",
            "gw-x",
            "--data-dir",
            tmp_path,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"Error: the cloud at {cloud.url} refused to join node gw-x: token zzzzzz is unknown"
    )


async def test_the_token_command_prints_a_token(kube: AsyncClient, control_plane: ControlPlane):
    result = await trio.run_process(
        [
            VENV_BIN / "outpost-cloud",
            "token",
            "create",
            "gw-cli",
            "--ttl",
            "30m",
            "--kubeconfig",
            control_plane.kubeconfig,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    [line] = result.stdout.decode().splitlines()
    token = identity.parse_token(line)
    assert token.ca_hash == (await pki.load_or_create_ca(kube)).ca_hash
    stored = await kube.get(Secret, pki.TOKEN_SECRET_PREFIX + token.id, namespace=pki.NAMESPACE)
    assert base64.b64decode(stored.data["node"]) == b"gw-cli"
    expires = dt.datetime.fromisoformat(base64.b64decode(stored.data["expires"]).decode())
    remaining = expires - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=28) < remaining <= dt.timedelta(minutes=30)


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        ("45s", dt.timedelta(seconds=45)),
        ("30m", dt.timedelta(minutes=30)),
        ("24h", dt.timedelta(hours=24)),
        ("7d", dt.timedelta(days=7)),
    ],
)
def test_token_lifetimes_are_parsed(ttl, expected):
    assert validate_ttl(None, None, ttl) == expected


@pytest.mark.parametrize("ttl", ["0h", "24", "h", "1.5h", "-1d", "1w"])
def test_a_bad_token_lifetime_is_a_usage_error(ttl):
    result = CliRunner().invoke(cloud_cli, ["token", "create", "gw-1", "--ttl", ttl])
    assert result.exit_code == 2
    assert f"{ttl!r} is not a duration" in result.output
