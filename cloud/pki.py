"""The cloud's certificate authority, and the bootstrap tokens that let a gateway join.

The CA (EC P-256, valid ten years) is kept in the Secret ``outpost-system/outpost-ca`` (type
``kubernetes.io/tls``), made by whichever replica first needs it. It signs the hub's serving
certificate and one client certificate per node: CN=<node>, O=outpost:nodes, clientAuth. The hub
takes a connected node's name from its client certificate with ``node_name_from_cert``.

A bootstrap token reads ``OPT1.<ca-hash>.<id>.<secret>`` (parsed by ``edge.identity``, which
owns the format because the edge binary must stand alone):

- ``<ca-hash>``: hex SHA-256 of the CA certificate's DER, which the edge pins before it sends
  anything;
- ``<id>``: 6 lower-case letters or digits, naming the Secret
  ``outpost-system/outpost-token-<id>``; not secret, it appears in logs;
- ``<secret>``: 24 lower-case letters or digits drawn with ``secrets``.

A token's Secret (type ``outpost.io/bootstrap-token``) holds the node name, the expiry (RFC 3339,
UTC) and the SHA-256 of the secret, never the secret itself, so whoever can read Secrets still
cannot join. A token works once: redeeming it deletes its Secret with preconditions on uid and
resourceVersion, so of two concurrent redeemers exactly one wins. Expired token Secrets are
deleted when found: by a redeem that meets one, and by every ``create_token``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret

from cloud.kube import delete_if
from cloud.kube import ensure_namespace as kube_ensure_namespace
from edge.identity import (
    MAX_NODE_NAME,
    NODE_ORGANIZATION,
    IdentityError,
    Token,
    ca_hash,
    node_of,
    parse_token,
)

log = logging.getLogger(__name__)

NAMESPACE = "outpost-system"
CA_SECRET = "outpost-ca"
TOKEN_SECRET_PREFIX = "outpost-token-"
TOKEN_SECRET_TYPE = "outpost.io/bootstrap-token"

_LABELS = {"app.kubernetes.io/managed-by": "outpost-cloud"}
_CA_VALIDITY = timedelta(days=3650)
_LEAF_VALIDITY = timedelta(days=365)
# Gateways' clocks drift; a certificate valid from a few minutes ago works on a clock running
# slightly behind.
_BACKDATE = timedelta(minutes=5)
_ALPHABET = string.ascii_lowercase + string.digits
_ID_LENGTH = 6
_SECRET_LENGTH = 24

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class JoinRefused(Exception):
    """The cloud will not grant a join; ``reason`` tells the person at the gateway what to do."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenRefused(JoinRefused):
    """The bootstrap token is unknown, expired, used, bound to another node or another CA."""


class CSRRefused(JoinRefused):
    """The certificate signing request is malformed, unsigned, misnamed or has a weak key."""


class CAUnusable(RuntimeError):
    """The CA Secret exists but does not hold a CA this cloud can sign with."""


class NotANodeCertificate(ValueError):
    """A certificate that does not name an Outpost node."""


def _now() -> datetime:
    return datetime.now(UTC)


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, rsa.RSAPublicKey):
        return f"a {key.key_size}-bit RSA key"
    return f"a {type(key).__name__.removeprefix('_')}"


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class CertificateAuthority:
    """The CA: a certificate and its private key, which signs serving and node certificates."""

    def __init__(self, cert: x509.Certificate, key: CAKey) -> None:
        if cert.public_key() != key.public_key():
            raise ValueError("the CA private key does not belong to the CA certificate")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ValueError("the CA certificate is not marked as a CA (basicConstraints)")
        self._cert = cert
        self._key = key

    @classmethod
    def generate(cls) -> CertificateAuthority:
        """A new self-signed CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outpost-cloud CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """The CA in ``cert_pem`` and ``key_pem``; ValueError or TypeError say what is wrong."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise TypeError(f"the CA key is {type(key).__name__}, not an EC or RSA key")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def ca_hash(self) -> str:
        """What bootstrap tokens pin this CA by: hex SHA-256 of the certificate's DER."""
        return ca_hash(self._cert.public_bytes(serialization.Encoding.DER))

    def _leaf(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    ) -> x509.CertificateBuilder:
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(min(now + _LEAF_VALIDITY, self._cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )

    def issue_server_cert(self, sans: list[str]) -> tuple[bytes, bytes]:
        """A serving certificate for ``sans`` (DNS names or IP addresses) and its new key, as
        (certificate PEM, key PEM)."""
        if not sans:
            raise ValueError("a serving certificate needs at least one DNS name or IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self._leaf(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outpost-cloud")]),
                key.public_key(),
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in sans]), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def sign_node_csr(self, csr_pem: bytes, node: str) -> bytes:
        """The client certificate (PEM) for ``node`` over the key in ``csr_pem``.

        Only the CSR's key is used: the subject, validity and usages are this CA's choice.
        Raises CSRRefused if the CSR is malformed, its signature does not verify, it names
        another node, or its key is weak.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise CSRRefused(f"the CSR is not a usable PEM certificate request: {exc}") from exc
        if not (
            isinstance(public_key, ec.EllipticCurvePublicKey)
            and isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1)
        ) and not (isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048):
            raise CSRRefused(
                f"the CSR carries {_describe_key(public_key)}; node keys must be EC P-256 or"
                " P-384, or RSA of at least 2048 bits"
            )
        if not csr.is_signature_valid:
            raise CSRRefused("the CSR's signature does not verify against the key it carries")
        names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [node]:
            shown = ", ".join(repr(n) for n in names) or "no common name"
            raise CSRRefused(f"the CSR names {shown}, but the token is for node {node!r}")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, NODE_ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, node),
            ]
        )
        cert = (
            self._leaf(subject, public_key)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def node_name_from_cert(cert: bytes) -> str:
    """The node a client certificate (DER or PEM) was issued to.

    This reads names only: call it on a certificate that TLS has already verified against this
    cloud's CA.
    """
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            parsed = x509.load_pem_x509_certificate(cert)
        else:
            parsed = x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise NotANodeCertificate(f"not a certificate: {exc}") from exc
    subject = parsed.subject
    organizations = [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    names = [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not all(isinstance(n, str) for n in (*names, *organizations)):
        raise NotANodeCertificate(f"certificate {subject.rfc4514_string()!r} has a binary name")
    try:
        return node_of(subject.rfc4514_string(), names, organizations)  # type: ignore[arg-type]
    except IdentityError as exc:
        raise NotANodeCertificate(str(exc)) from exc


def _encode(data: dict[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode("ascii") for k, v in data.items()}


def _decode(secret: Secret) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


async def ensure_namespace(kube: AsyncClient) -> None:
    """Create the ``outpost-system`` namespace unless it exists."""
    await kube_ensure_namespace(kube, NAMESPACE, _LABELS)


def _ca_from_secret(secret: Secret) -> CertificateAuthority:
    try:
        data = _decode(secret)
        return CertificateAuthority.from_pem(data["tls.crt"], data["tls.key"])
    except (KeyError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CAUnusable(
            f"Secret {NAMESPACE}/{CA_SECRET} holds no usable CA ({exc}): restore it from a"
            " backup, or delete it to make a new CA, which invalidates every node certificate"
            " and token"
        ) from exc


async def load_or_create_ca(kube: AsyncClient) -> CertificateAuthority:
    """The cloud's CA, created (with its namespace) if there is none yet.

    Replicas starting together may all find none; each creates one, the first create wins, and
    the others read the winner's, so every replica ends with the same CA.
    """
    try:
        return _ca_from_secret(await kube.get(Secret, CA_SECRET, namespace=NAMESPACE))
    except ApiError as exc:
        if exc.status.code != 404:
            raise
    await ensure_namespace(kube)
    ca = CertificateAuthority.generate()
    secret = Secret(
        metadata=ObjectMeta(name=CA_SECRET, namespace=NAMESPACE, labels=_LABELS),
        type="kubernetes.io/tls",
        data=_encode({"tls.crt": ca.cert_pem, "tls.key": ca.key_pem}),
    )
    try:
        await kube.create(secret)
    except ApiError as exc:
        if exc.status.code != 409:
            raise
        return _ca_from_secret(await kube.get(Secret, CA_SECRET, namespace=NAMESPACE))
    log.info(
        "created the CA",
        extra={"secret": f"{NAMESPACE}/{CA_SECRET}", "ca_hash": ca.ca_hash},
    )
    return ca


@dataclass(frozen=True)
class _TokenRecord:
    node: str
    expires: datetime
    digest: bytes


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).hexdigest().encode("ascii")


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _token_record(secret: Secret) -> _TokenRecord | None:
    """What a token Secret says, or None if it is not one or is damaged."""
    if secret.type != TOKEN_SECRET_TYPE:
        return None
    try:
        data = _decode(secret)
        expires = datetime.fromisoformat(data["expires"].decode("ascii"))
        node = data["node"].decode("utf-8")
        digest = data["secret-sha256"]
    except (KeyError, ValueError):
        return None
    if expires.tzinfo is None:
        return None
    return _TokenRecord(node=node, expires=expires, digest=digest)


async def _delete_unchanged(kube: AsyncClient, secret: Secret) -> None:
    """Delete ``secret`` only if it is still the very object that was read."""
    meta = secret.metadata
    await delete_if(
        kube,
        Secret,
        meta.name,
        namespace=meta.namespace,
        uid=meta.uid,
        resource_version=meta.resourceVersion,
    )


async def _delete_expired(kube: AsyncClient, secret: Secret) -> None:
    try:
        await _delete_unchanged(kube, secret)
    except ApiError as exc:
        # Someone else removed or redeemed it meanwhile: either way it is not ours to delete.
        if exc.status.code not in (404, 409):
            raise
    else:
        log.info("removed an expired token", extra={"secret": secret.metadata.name})


async def _remove_expired_tokens(kube: AsyncClient) -> None:
    now = _now()
    async for secret in kube.list(Secret, namespace=NAMESPACE, fields={"type": TOKEN_SECRET_TYPE}):
        record = _token_record(secret)
        if record is None or record.expires <= now:
            await _delete_expired(kube, secret)


async def create_token(
    kube: AsyncClient, ca: CertificateAuthority, node: str, ttl: timedelta
) -> str:
    """A new single-use bootstrap token for ``node``, valid for ``ttl``; returns its text."""
    if ttl <= timedelta(0):
        raise ValueError(f"a token's lifetime must be positive, not {ttl}")
    if len(node) > MAX_NODE_NAME:
        raise ValueError(
            f"node name {node!r} has {len(node)} characters; node certificates carry it as their"
            f" common name, which X.509 limits to {MAX_NODE_NAME}"
        )
    await _remove_expired_tokens(kube)
    token = Token(
        ca_hash=ca.ca_hash,
        id="".join(secrets.choice(_ALPHABET) for _ in range(_ID_LENGTH)),
        secret="".join(secrets.choice(_ALPHABET) for _ in range(_SECRET_LENGTH)),
    )
    expires = _rfc3339(_now() + ttl)
    await kube.create(
        Secret(
            metadata=ObjectMeta(
                name=TOKEN_SECRET_PREFIX + token.id, namespace=NAMESPACE, labels=_LABELS
            ),
            type=TOKEN_SECRET_TYPE,
            data=_encode(
                {
                    "node": node.encode(),
                    "expires": expires.encode(),
                    "secret-sha256": _digest(token.secret),
                }
            ),
        )
    )
    log.info("created a token", extra={"token_id": token.id, "node": node, "expires": expires})
    return token.text


async def redeem_token(
    kube: AsyncClient, ca: CertificateAuthority, token: str, csr_pem: bytes, node: str
) -> bytes:
    """Spend ``token`` on a client certificate for ``node`` over the key in ``csr_pem``.

    Returns the certificate PEM. Raises TokenRefused or CSRRefused, whose reason is meant for
    the person at the gateway. A refused CSR or node name leaves the token unspent, so a
    mistake at the gateway can be corrected and retried.
    """
    try:
        parsed = parse_token(token)
    except IdentityError as exc:
        raise TokenRefused(str(exc)) from exc
    if parsed.ca_hash != ca.ca_hash:
        raise TokenRefused(
            f"token {parsed.id} pins CA {parsed.ca_hash[:12]}…, but this cloud's CA is"
            f" {ca.ca_hash[:12]}…: it was made by another cloud or for a replaced CA; create a"
            " new token"
        )
    unknown = (
        f"token {parsed.id} is unknown or was already used (a token works once): create a new"
        f" one with `outpost-cloud token create {node}`"
    )
    try:
        stored = await kube.get(Secret, TOKEN_SECRET_PREFIX + parsed.id, namespace=NAMESPACE)
    except ApiError as exc:
        if exc.status.code == 404:
            raise TokenRefused(unknown) from exc
        raise
    record = _token_record(stored)
    if record is None:
        raise TokenRefused(unknown)
    # Constant time, so the response time does not reveal how much of a guess was right.
    genuine = hmac.compare_digest(_digest(parsed.secret), record.digest)
    if record.expires <= _now():
        await _delete_expired(kube, stored)
        if genuine:
            raise TokenRefused(
                f"token {parsed.id} expired at {_rfc3339(record.expires)}: create a new one with"
                f" `outpost-cloud token create {record.node}`"
            )
    if not genuine:
        raise TokenRefused(unknown)
    if record.node != node:
        raise TokenRefused(
            f"token {parsed.id} is bound to node {record.node}, not {node}: join with"
            f" --node-name {record.node}, or create a token for {node}"
        )
    cert_pem = ca.sign_node_csr(csr_pem, node)
    try:
        await _delete_unchanged(kube, stored)
    except ApiError as exc:
        if exc.status.code in (404, 409):
            raise TokenRefused(
                f"token {parsed.id} was already used (a token works once): create a new one"
                f" with `outpost-cloud token create {node}`"
            ) from exc
        raise
    log.info("redeemed a token", extra={"token_id": parsed.id, "node": node})
    return cert_pem
