"""edge.openssl, the edge's libcrypto binding, checked against the cryptography package: what it
makes, cryptography reads; what cryptography makes, it reads the same way."""

from __future__ import annotations

import ctypes
import hashlib
import ssl
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from cloud.pki import CertificateAuthority
from edge import identity, openssl
from edge.identity import IdentityError
from edge.openssl import Certificate, OpenSSLError, PrivateKey

CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])


def _name(*common_names: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "outpost tests")]
        + [x509.NameAttribute(NameOID.COMMON_NAME, n) for n in common_names]
    )


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    issuer: x509.Name | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    ca: bool | None = None,
) -> x509.Certificate:
    """A certificate made by cryptography; self-signed unless an issuer is given; with a
    BasicConstraints extension only if ``ca`` is not None."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _one(cert: x509.Certificate) -> Certificate:
    [parsed] = openssl.read_certificates(_pem(cert))
    return parsed


def _new_ec() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _as_private_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> PrivateKey:
    return PrivateKey(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _queue_is_empty() -> bool:
    return openssl._libcrypto().ERR_get_error() == 0


def test_it_uses_the_openssl_that_ssl_loaded():
    assert openssl.version() == ssl.OPENSSL_VERSION
    assert ssl.OPENSSL_VERSION_INFO >= (3, 0)


# Keys


def test_a_generated_key_is_an_unencrypted_pkcs8_p256_key():
    key = openssl.generate_p256_key()
    assert key.pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(key.pem, password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert isinstance(loaded.curve, ec.SECP256R1)
    assert key.pem == loaded.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_each_generated_key_is_new_and_none_shows_in_a_repr():
    first, second = openssl.generate_p256_key(), openssl.generate_p256_key()
    assert first.pem != second.pem
    assert "PRIVATE" not in repr(first)


def test_a_key_written_and_loaded_back_is_the_same_key(tmp_path):
    key = openssl.generate_p256_key()
    path = tmp_path / "node.key"
    path.write_bytes(key.pem)
    assert openssl.load_private_key(path.read_bytes()) == key


def test_a_traditional_ec_key_is_loaded_as_pkcs8():
    key = _new_ec()
    traditional = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert traditional.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert openssl.load_private_key(traditional) == _as_private_key(key)


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        (b"", "unsupported"),
        (b"not a key", "unsupported"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", ""),
    ],
)
def test_a_bad_key_is_refused_with_openssls_reasons(pem, reason):
    with pytest.raises(OpenSSLError, match=r"^reading a PEM private key: error:") as refused:
        openssl.load_private_key(pem)
    assert reason in str(refused.value)
    assert _queue_is_empty()


@pytest.mark.parametrize(
    "form", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
@pytest.mark.parametrize("attempt", range(20))  # random salts: the refusal must not vary
def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(form, attempt):
    pem = _new_ec().private_bytes(
        serialization.Encoding.PEM, form, serialization.BestAvailableEncryption(b"passphrase")
    )
    with pytest.raises(OpenSSLError, match="the key is encrypted"):
        openssl.load_private_key(pem)


# Certificate requests


@pytest.mark.parametrize("node", ["gw-1", "gateway-ü-测试-1", "a" * 64])
def test_a_csr_has_only_the_common_name_the_key_and_a_sha256_signature(node):
    key = openssl.generate_p256_key()
    csr = x509.load_pem_x509_csr(openssl.make_csr(key, node))
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)])
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    assert csr.public_key() == serialization.load_pem_private_key(key.pem, None).public_key()
    assert list(csr.extensions) == []


def test_the_cloud_signs_the_csr_into_a_certificate_the_edge_reads():
    ca = CertificateAuthority.generate()
    key = openssl.generate_p256_key()
    node = "gw-ü-1"

    cert_pem = ca.sign_node_csr(openssl.make_csr(key, node), node)

    [cert] = openssl.read_certificates(cert_pem)
    [ca_cert] = openssl.read_certificates(ca.cert_pem)
    assert cert.common_names == (node,)
    assert "CN=gw-ü-1" in cert.subject
    assert not cert.is_ca
    assert openssl.is_issued_by(cert, ca_cert)
    assert openssl.key_matches(cert, key)


def test_a_common_name_longer_than_x509_allows_is_refused_by_openssl():
    with pytest.raises(OpenSSLError, match=r"setting the CSR's common name.*string too long"):
        openssl.make_csr(openssl.generate_p256_key(), "a" * 65)
    assert _queue_is_empty()


# Reading certificates


def _ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_ec()
    return _cert(CA_NAME, key, ca=True), key


def _leaf(issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], **kw) -> x509.Certificate:
    cert, key = issuer
    return _cert(_name("leaf"), _new_ec(), issuer=cert.subject, issuer_key=key, **kw)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _ca()[0], id="ca"),
        pytest.param(lambda: _leaf(_ca(), ca=False), id="leaf"),
        pytest.param(lambda: _leaf(_ca(), ca=None), id="no-basic-constraints"),
        pytest.param(lambda: _cert(_name("self"), _new_ec()), id="self-signed-no-constraints"),
        pytest.param(
            lambda: _cert(_name("rsa"), rsa.generate_private_key(65537, 2048), ca=True),
            id="rsa-ca",
        ),
        pytest.param(lambda: _cert(_name(), _new_ec(), ca=True), id="no-common-name"),
        pytest.param(lambda: _cert(_name("one", "two"), _new_ec()), id="two-common-names"),
    ],
)
def test_a_certificate_reads_as_cryptography_reads_it(make):
    cert = make()
    der = cert.public_bytes(serialization.Encoding.DER)
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None

    parsed = _one(cert)

    assert parsed.der == der
    assert identity.ca_hash(_pem(cert)) == identity.ca_hash(der) == hashlib.sha256(der).hexdigest()
    assert parsed.common_names == tuple(
        a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    )
    assert parsed.is_ca == (constraints is not None and constraints.ca)
    assert parsed.subject == cert.subject.rfc4514_string()


def test_a_certificate_without_a_single_common_name_names_no_node(tmp_path):
    key = _new_ec()
    for subject in (_name("one", "two"), _name()):
        cert = _cert(subject, key)
        with pytest.raises(IdentityError, match="has no single name"):
            identity.save_identity(tmp_path, _as_private_key(key), _pem(cert), _pem(cert))


def test_certificates_are_read_in_order_skipping_other_text_and_blocks():
    first, second = _ca()[0], _leaf(_ca())
    key_pem = _as_private_key(_new_ec()).pem
    pem = b"comment\n" + _pem(first) + key_pem + b"\n" + _pem(second) + b"trailer\n"
    assert [c.der for c in openssl.read_certificates(pem)] == [
        first.public_bytes(serialization.Encoding.DER),
        second.public_bytes(serialization.Encoding.DER),
    ]


@pytest.mark.parametrize(
    "pem", [b"", b"hello", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_text_without_a_certificate_holds_none(pem):
    assert openssl.read_certificates(pem) == []
    assert _queue_is_empty()
    with pytest.raises(IdentityError, match="is not a PEM certificate: no BEGIN CERTIFICATE"):
        identity.check_ca(pem, "ab" * 32)


def test_two_certificates_where_one_is_expected_are_refused():
    pem = _pem(_ca()[0], _ca()[0])
    assert len(openssl.read_certificates(pem)) == 2
    with pytest.raises(IdentityError, match="holds 2 certificates, not 1"):
        identity.check_ca(pem, "ab" * 32)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda pem: pem.replace(pem[40:80], b"A" * 40), id="bad-der"),
        pytest.param(lambda pem: pem[:200] + pem[-26:], id="truncated"),
        pytest.param(lambda pem: pem[:100] + b"!!!!" + pem[104:], id="bad-base64"),
        pytest.param(lambda pem: pem[:-10], id="no-end-line"),
    ],
)
def test_a_damaged_certificate_is_refused_with_openssls_reasons(damage):
    good = _pem(_ca()[0])
    pem = _pem(_ca()[0]) + damage(good)
    with pytest.raises(OpenSSLError, match=r"^reading PEM certificate 2: error:") as refused:
        openssl.read_certificates(pem)
    assert "no start line" not in str(refused.value)
    assert _queue_is_empty()
    with pytest.raises(IdentityError, match="the CA the cloud sent is not a PEM certificate: "):
        identity.check_ca(damage(good), "ab" * 32)


def test_a_failure_leaves_nothing_behind_for_the_next_call():
    ca = CertificateAuthority.generate()
    with pytest.raises(OpenSSLError):
        openssl.read_certificates(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    # A leftover error would make the end of this PEM text look like a damaged certificate.
    [cert] = openssl.read_certificates(ca.cert_pem)
    with pytest.raises(OpenSSLError):
        openssl.load_private_key(b"junk")
    key = openssl.generate_p256_key()
    assert openssl.load_private_key(key.pem) == key
    assert x509.load_pem_x509_csr(openssl.make_csr(key, "gw-1")).is_signature_valid
    other = _one(_ca()[0])
    assert not openssl.is_issued_by(cert, other)
    assert _queue_is_empty()
    assert openssl.read_certificates(ca.cert_pem) == [cert]


def test_it_works_from_a_worker_thread():
    # save_identity runs in a trio worker thread; OpenSSL keeps one error queue per thread.
    ca = CertificateAuthority.generate()
    results: list[object] = []

    def work() -> None:
        with pytest.raises(OpenSSLError):
            openssl.read_certificates(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
        results.extend(openssl.read_certificates(ca.cert_pem))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == openssl.read_certificates(ca.cert_pem)


# Issuer and key checks


def test_a_certificate_is_issued_by_its_real_issuer_only():
    ca = _ca()
    leaf = _leaf(ca, ca=False)
    same_name_ca = _ca()
    assert same_name_ca[0].subject == ca[0].subject

    assert openssl.is_issued_by(_one(leaf), _one(ca[0]))
    assert openssl.is_issued_by(_one(ca[0]), _one(ca[0]))
    assert not openssl.is_issued_by(_one(leaf), _one(same_name_ca[0]))
    assert not openssl.is_issued_by(_one(ca[0]), _one(leaf))
    assert _queue_is_empty()


def test_a_certificate_signed_by_the_ca_key_under_another_issuer_name_is_not_issued_by_it():
    ca_cert, ca_key = _ca()
    leaf = _cert(_name("leaf"), _new_ec(), issuer=_name("elsewhere"), issuer_key=ca_key)
    assert not openssl.is_issued_by(_one(leaf), _one(ca_cert))


def test_a_tampered_signature_does_not_verify():
    ca = _ca()
    der = bytearray(_leaf(ca).public_bytes(serialization.Encoding.DER))
    # The signature's last byte ends the certificate; flipping it keeps the DER well-formed.
    der[-1] ^= 0x01
    tampered = x509.load_der_x509_certificate(bytes(der))

    assert not openssl.is_issued_by(_one(tampered), _one(ca[0]))
    assert _queue_is_empty()


def test_the_edge_refuses_an_issued_certificate_that_its_ca_did_not_sign():
    ca, impostor = CertificateAuthority.generate(), CertificateAuthority.generate()
    key = openssl.generate_p256_key()
    cert_pem = impostor.sign_node_csr(openssl.make_csr(key, "gw-1"), "gw-1")
    [ca_cert] = openssl.read_certificates(ca.cert_pem)

    with pytest.raises(IdentityError, match="the certificate the cloud issued is not signed by"):
        identity._check_certificate(cert_pem, ca_cert, key, "gw-1")
    with pytest.raises(IdentityError, match="not for this key and node gw-1"):
        identity._check_certificate(
            ca.sign_node_csr(openssl.make_csr(key, "gw-1"), "gw-1"),
            ca_cert,
            openssl.generate_p256_key(),
            "gw-1",
        )
    identity._check_certificate(
        ca.sign_node_csr(openssl.make_csr(key, "gw-1"), "gw-1"), ca_cert, key, "gw-1"
    )


def test_a_key_matches_only_its_own_certificate():
    key = _new_ec()
    cert = _one(_cert(_name("leaf"), key))
    assert openssl.key_matches(cert, _as_private_key(key))
    assert not openssl.key_matches(cert, openssl.generate_p256_key())
    assert not openssl.key_matches(cert, _as_private_key(rsa.generate_private_key(65537, 2048)))
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert not openssl.key_matches(cert, PrivateKey(ed_pem))
    assert _queue_is_empty()


# Loading libcrypto


class _FakeFunction:
    def __init__(self, result: int) -> None:
        self.result = result

    def __call__(self) -> int:
        return self.result


class _FakeLibcrypto:
    _name = "libcrypto.so.1.1"

    def __init__(self, version: int) -> None:
        self.OpenSSL_version_num = _FakeFunction(version)


@pytest.fixture
def fresh_load():
    openssl._libcrypto.cache_clear()
    yield
    openssl._libcrypto.cache_clear()


def test_an_openssl_older_than_3_is_refused(monkeypatch, fresh_load):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: _FakeLibcrypto(0x1010_117F))
    with pytest.raises(OpenSSLError, match=r"libcrypto\.so\.1\.1 is OpenSSL 1\.1; 3\.0 or later"):
        openssl.generate_p256_key()


def test_without_the_soname_the_library_is_searched_for(monkeypatch, fresh_load):
    real = ctypes.CDLL
    asked = []

    def cdll(name: str) -> ctypes.CDLL:
        asked.append(name)
        if name == "libcrypto.so.3":
            raise OSError("not found")
        return real(name)

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libcrypto.so.3.found")
    with pytest.raises(OpenSSLError, match=r"cannot load OpenSSL's libcrypto libcrypto\.so\.3"):
        openssl.version()
    assert asked == ["libcrypto.so.3", "libcrypto.so.3.found"]

    # The path _ssl loaded it from, as find_library might answer.
    with open("/proc/self/maps") as maps:
        [loaded] = {line.split()[-1] for line in maps if "/libcrypto.so" in line}
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: loaded)
    assert openssl.version() == ssl.OPENSSL_VERSION

    openssl._libcrypto.cache_clear()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(OpenSSLError, match="cannot find OpenSSL's libcrypto"):
        openssl.version()
