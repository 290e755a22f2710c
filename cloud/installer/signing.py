"""The Ed25519 key that signs every release's SHA256SUMS.

It is kept in the Secret ``outpost-system/outpost-release-key`` (key ``ed25519.key``, PKCS#8
PEM), made by whichever replica first needs it, like the CA; or it is read from a PEM file
(``outpost-cloud serve --release-key FILE``, made by ``outpost-cloud release-key --generate``),
so that it can be kept apart from the cluster. The public key is pinned into every install.sh
served, which refuses a checksum file whose signature does not verify against it.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret

from cloud.pki import NAMESPACE, ensure_namespace

log = logging.getLogger(__name__)

KEY_SECRET = "outpost-release-key"
KEY_FIELD = "ed25519.key"
_LABELS = {"app.kubernetes.io/managed-by": "outpost-cloud"}


class KeyUnusable(RuntimeError):
    """A release key that is not an Ed25519 private key in PEM; the message says where."""


class ReleaseKey:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> ReleaseKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, where: str) -> ReleaseKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyUnusable(f"{where} holds no usable PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyUnusable(f"{where} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def from_file(cls, path: Path) -> ReleaseKey:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise KeyUnusable(f"cannot read the release key {path}: {exc}") from exc
        return cls.from_pem(pem, str(path))

    @property
    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        """The raw 64-byte Ed25519 signature of ``data`` (what ``openssl pkeyutl`` checks)."""
        return self._key.sign(data)

    def write(self, path: Path) -> None:
        """Write the private key to a new file (mode 0600); an existing file is not replaced."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(self.private_pem)


def verify(public_pem: bytes, data: bytes, signature: bytes) -> bool:
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _from_secret(secret: Secret) -> ReleaseKey:
    where = f"Secret {NAMESPACE}/{KEY_SECRET}"
    try:
        pem = base64.b64decode((secret.data or {})[KEY_FIELD])
    except (KeyError, ValueError) as exc:
        raise KeyUnusable(f"{where} has no {KEY_FIELD}") from exc
    return ReleaseKey.from_pem(pem, where)


async def load_or_create(kube: AsyncClient) -> ReleaseKey:
    """The release key from its Secret, created (with the namespace) if there is none yet.

    Replicas starting together may each make one; the first create wins and the others read it.
    """
    try:
        return _from_secret(await kube.get(Secret, KEY_SECRET, namespace=NAMESPACE))
    except ApiError as exc:
        if exc.status.code != 404:
            raise
    await ensure_namespace(kube)
    key = ReleaseKey.generate()
    secret = Secret(
        metadata=ObjectMeta(name=KEY_SECRET, namespace=NAMESPACE, labels=_LABELS),
        type="Opaque",
        data={KEY_FIELD: base64.b64encode(key.private_pem).decode("ascii")},
    )
    try:
        await kube.create(secret)
    except ApiError as exc:
        if exc.status.code != 409:
            raise
        return _from_secret(await kube.get(Secret, KEY_SECRET, namespace=NAMESPACE))
    log.info("created the release-signing key", extra={"secret": f"{NAMESPACE}/{KEY_SECRET}"})
    return key
