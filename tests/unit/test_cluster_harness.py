"""The test control plane's own pieces that need no Kubernetes: its PKI and its build cache."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.cluster import build
from tests.cluster.certs import CertificateAuthority


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("test-ca")


def _load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_serving_certificate_covers_names_and_addresses(ca):
    cert = _load(ca.issue("api", server_names=("127.0.0.1", "localhost")).cert_pem)
    cert.verify_directly_issued_by(_load(ca.pair.cert_pem))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_certificate_carries_user_and_groups(ca):
    cert = _load(ca.issue("alice", organizations=("system:masters",), client=True).cert_pem)
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_certificate_for_nothing_is_refused(ca):
    with pytest.raises(ValueError, match="usable for nothing"):
        ca.issue("useless")


def test_keys_are_private_on_disk(ca, tmp_path):
    _, key_path = ca.pair.write(tmp_path, "ca")
    assert key_path.stat().st_mode & 0o077 == 0


def test_cache_folder_is_keyed_by_the_pinned_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTPOST_CACHE_DIR", str(tmp_path))
    folder = build.bin_dir()
    assert folder.parent == tmp_path / "controlplane"
    assert folder.name.startswith(f"k8s-{build.kubernetes_version()}-etcd-{build.etcd_version()}-")
    assert build.kubernetes_version().startswith("v1.3")
    assert not build.is_built()
