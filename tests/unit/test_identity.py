"""The edge's identity without a network: token parsing, key and CSR, CA pinning, the files
and their modes, and the TLS context built from them."""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import stat
from functools import partial
from pathlib import Path

import pytest
import trio
import trio_websocket
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud import bootstrap
from cloud.pki import CertificateAuthority, NotANodeCertificate, node_name_from_cert
from edge import identity
from edge.identity import IdentityError
from edge.openssl import PrivateKey
from tests.cluster.controlplane import free_port

CA_HASH = "ab" * 32
SECRET = "s3cr3tpart0123456789xyz"
GOOD = f"OPT1.{CA_HASH}.abc123.{SECRET}"


def test_a_token_is_parsed_into_its_parts():
    token = identity.parse_token(f"  {GOOD}\n")
    assert (token.ca_hash, token.id, token.secret) == (CA_HASH, "abc123", SECRET)
    assert token.text == GOOD


def test_a_token_repr_leaves_the_secret_out():
    assert SECRET not in repr(identity.parse_token(GOOD))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "does not start with OPT1."),
        (f"abc123.{SECRET}", "does not start with OPT1."),
        (f"OPT2.{CA_HASH}.abc123.{SECRET}", "version OPT2 is not supported"),
        (f"OPT1.{CA_HASH}.abc123", "3 dot-separated parts, not 4"),
        (f"OPT1.{CA_HASH}.abc123.{SECRET}.extra", "5 dot-separated parts, not 4"),
        (f"OPT1.{CA_HASH[:-1]}.abc123.{SECRET}", "CA hash is not 64 lower-case hex digits"),
        (f"OPT1.{CA_HASH.upper()}.abc123.{SECRET}", "CA hash is not 64 lower-case hex digits"),
        (f"OPT1.{CA_HASH}.ABC123.{SECRET}", "id is not 6 lower-case letters or digits"),
        (f"OPT1.{CA_HASH}.abc12.{SECRET}", "id is not 6 lower-case letters or digits"),
        (f"OPT1.{CA_HASH}.abc123.short", "secret part of bootstrap token abc123"),
        (f"OPT1.{CA_HASH}.abc123.{SECRET}!", "secret part of bootstrap token abc123"),
    ],
)
def test_a_malformed_token_is_refused_without_repeating_the_secret(text, message):
    with pytest.raises(IdentityError, match=re.escape(message)) as caught:
        identity.parse_token(text)
    assert SECRET not in str(caught.value)


def test_the_csr_names_the_node_and_is_signed_by_the_new_key():
    key = identity.generate_key()
    private = serialization.load_pem_private_key(key.pem, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP256R1)
    csr = x509.load_pem_x509_csr(identity.make_csr(key, "gw-1.site"))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-1.site"
    assert csr.public_key() == private.public_key()


def test_a_csr_for_a_name_longer_than_x509_allows_is_refused():
    with pytest.raises(IdentityError, match=r"X\.509 limits to 64"):
        identity.make_csr(identity.generate_key(), "a" * 65)


def test_a_ca_is_accepted_only_with_the_pinned_hash():
    ca = CertificateAuthority.generate()
    der = x509.load_pem_x509_certificate(ca.cert_pem).public_bytes(serialization.Encoding.DER)
    assert ca.ca_hash == hashlib.sha256(der).hexdigest()

    assert identity.check_ca(ca.cert_pem, ca.ca_hash).der == der
    assert identity.ca_hash(ca.cert_pem) == identity.ca_hash(der) == ca.ca_hash
    with pytest.raises(IdentityError, match=f"hash {ca.ca_hash}, but the token pins {CA_HASH}"):
        identity.check_ca(ca.cert_pem, CA_HASH)


def test_a_ca_that_is_not_one_certificate_is_refused():
    with pytest.raises(IdentityError, match="is not a PEM certificate"):
        identity.check_ca(b"hello", CA_HASH)
    two = CertificateAuthority.generate().cert_pem * 2
    with pytest.raises(IdentityError, match="holds 2 certificates, not 1"):
        identity.check_ca(two, CA_HASH)


def test_a_pinned_certificate_that_is_not_a_ca_is_refused():
    ca = CertificateAuthority.generate()
    leaf_pem, _ = ca.issue_server_cert(["localhost"])
    with pytest.raises(IdentityError, match="is not a CA certificate"):
        identity.check_ca(leaf_pem, identity.ca_hash(leaf_pem))


def _issue(ca: CertificateAuthority, node: str) -> tuple[PrivateKey, bytes]:
    key = identity.generate_key()
    return key, ca.sign_node_csr(identity.make_csr(key, node), node)


def test_the_identity_is_saved_with_private_modes_and_loaded_back(tmp_path):
    ca = CertificateAuthority.generate()
    key, cert_pem = _issue(ca, "gw-1")

    saved = identity.save_identity(tmp_path, key, cert_pem, ca.cert_pem)

    assert saved.node == "gw-1"
    folder = tmp_path / "identity"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(saved.key_path.stat().st_mode) == 0o600
    assert saved.key_path == folder / "node.key"
    assert saved.cert_path.read_bytes() == cert_pem
    assert saved.ca_path.read_bytes() == ca.cert_pem
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "node.crt", "node.key"]
    assert identity.load_identity(tmp_path) == saved


def test_the_key_is_private_even_under_a_permissive_umask(tmp_path):
    ca = CertificateAuthority.generate()
    key, cert_pem = _issue(ca, "gw-1")
    old = os.umask(0)
    try:
        saved = identity.save_identity(tmp_path, key, cert_pem, ca.cert_pem)
    finally:
        os.umask(old)
    assert stat.S_IMODE(saved.key_path.stat().st_mode) == 0o600


def test_rejoining_replaces_the_identity(tmp_path):
    ca = CertificateAuthority.generate()
    identity.save_identity(tmp_path, *_issue(ca, "gw-1"), ca.cert_pem)
    key, cert_pem = _issue(ca, "gw-2")
    saved = identity.save_identity(tmp_path, key, cert_pem, ca.cert_pem)
    assert identity.load_identity(tmp_path) == saved
    assert saved.node == "gw-2"


def test_no_identity_before_joining(tmp_path):
    assert identity.load_identity(tmp_path) is None


def test_an_incomplete_identity_is_reported(tmp_path):
    ca = CertificateAuthority.generate()
    saved = identity.save_identity(tmp_path, *_issue(ca, "gw-1"), ca.cert_pem)
    saved.cert_path.unlink()
    with pytest.raises(IdentityError, match=re.escape("incomplete (missing node.crt)")):
        identity.load_identity(tmp_path)


def test_a_key_that_does_not_match_the_certificate_is_reported(tmp_path):
    ca = CertificateAuthority.generate()
    saved = identity.save_identity(tmp_path, *_issue(ca, "gw-1"), ca.cert_pem)
    other = identity.generate_key()
    saved.key_path.write_bytes(other.pem)
    with pytest.raises(IdentityError, match="does not belong to"):
        identity.load_identity(tmp_path)


def test_an_unwritable_data_dir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(IdentityError, match="cannot create the identity folder"):
        identity.prepare_identity_dir(blocker)


def test_the_client_context_trusts_only_the_pinned_ca_and_checks_host_names(tmp_path):
    ca = CertificateAuthority.generate()
    saved = identity.save_identity(tmp_path, *_issue(ca, "gw-1"), ca.cert_pem)

    context = identity.client_ssl_context(saved)

    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    [trusted] = context.get_ca_certs(binary_form=True)
    assert trusted == x509.load_pem_x509_certificate(ca.cert_pem).public_bytes(
        serialization.Encoding.DER
    )


async def test_join_refuses_a_malformed_token_before_connecting(tmp_path):
    with pytest.raises(IdentityError, match=r"does not start with OPT1\."):
        await identity.join("https://127.0.0.1:1", "garbage", "gw-1", tmp_path)
    assert not (tmp_path / "identity").exists()


async def test_join_reports_an_unreachable_cloud(tmp_path):
    url = f"https://127.0.0.1:{free_port()}"
    with pytest.raises(IdentityError, match=re.escape(f"cannot reach the outpost-cloud at {url}")):
        await identity.join(url, GOOD, "gw-1", tmp_path)


async def _serve_ca_only(
    nursery: trio.Nursery, ca: CertificateAuthority, sans: list[str], folder
) -> int:
    """A loopback TLS WebSocket server answering /v1/ca; returns its port."""
    cert_pem, key_pem = ca.issue_server_cert(sans)
    folder.mkdir()
    (folder / "tls.crt").write_bytes(cert_pem)
    (folder / "tls.key").write_bytes(key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "tls.crt", folder / "tls.key")

    async def route(request: trio_websocket.WebSocketRequest) -> None:
        if request.path == identity.CA_PATH:
            await bootstrap.serve_ca(await request.accept(), ca)
        else:
            await request.reject(404)

    server = await nursery.start(
        partial(trio_websocket.serve_websocket, route, "127.0.0.1", 0, context)
    )
    return server.port


async def test_join_refuses_a_cloud_certificate_not_naming_the_url_host(tmp_path, nursery):
    ca = CertificateAuthority.generate()
    port = await _serve_ca_only(nursery, ca, ["10.9.8.7"], tmp_path / "cloud")
    token = identity.Token(ca_hash=ca.ca_hash, id="abc123", secret=SECRET).text

    with trio.fail_after(5), pytest.raises(IdentityError) as refused:
        await identity.join(f"https://127.0.0.1:{port}", token, "gw-1", tmp_path / "edge")
    assert "presented a certificate that does not verify" in str(refused.value)
    assert "127.0.0.1" in str(refused.value)
    assert "--tls-san" in str(refused.value)


async def test_join_reports_a_server_that_is_not_an_outpost_cloud(tmp_path, nursery):
    ca = CertificateAuthority.generate()
    port = await _serve_ca_only(nursery, ca, ["127.0.0.1"], tmp_path / "cloud")
    token = identity.Token(ca_hash=ca.ca_hash, id="abc123", secret=SECRET).text

    with pytest.raises(IdentityError, match=re.escape("refused /v1/join (HTTP 404)")):
        await identity.join(f"https://127.0.0.1:{port}", token, "gw-1", tmp_path / "edge")
    assert identity.load_identity(tmp_path / "edge") is None


@pytest.mark.parametrize(
    ("common_names", "organizations", "error"),
    [
        (("gw-1",), ("outpost:nodes",), None),
        (("gw-1",), ("other", "outpost:nodes"), None),
        (("gw-1", "gw-2"), ("outpost:nodes",), "has no single name"),
        ((), ("outpost:nodes",), "has no single name"),
        (("gw-1",), (), "is not a node certificate"),
        (("gw-1",), ("outpost:node",), "is not a node certificate"),
    ],
)
def test_one_rule_maps_a_certificate_to_its_node(
    common_names: tuple[str, ...], organizations: tuple[str, ...], error: str | None
) -> None:
    if error is None:
        assert identity.node_of("CN=x", common_names, organizations) == "gw-1"
    else:
        with pytest.raises(IdentityError, match=error):
            identity.node_of("CN=x", common_names, organizations)


def test_the_edge_and_the_cloud_read_the_same_node_from_a_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate()
    key, cert_pem = _issue(ca, "gw-7")
    assert identity.save_identity(tmp_path, key, cert_pem, ca.cert_pem).node == "gw-7"
    assert node_name_from_cert(cert_pem) == "gw-7"
    server_pem, _ = ca.issue_server_cert(["localhost"])
    with pytest.raises(NotANodeCertificate):
        node_name_from_cert(server_pem)
    with pytest.raises(IdentityError, match="not a node certificate"):
        identity.save_identity(tmp_path, key, server_pem, ca.cert_pem)
