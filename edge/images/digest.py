"""Content digests: every byte that comes from a registry or an archive is checked against the
digest (and size) it was announced with before anything uses it.

Only sha256 is supported, as in ``edge.images.reference``.
"""

from __future__ import annotations

import hashlib
import re

from edge.images.errors import DigestMismatchError

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def digest_hex(digest: str) -> str:
    """The hex part of ``sha256:<hex>``; ``ValueError`` for anything else (a path is built from
    it, so nothing unchecked gets through)."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise ValueError(
            f"{digest!r} is not a sha256 digest (sha256: and 64 lower-case hex digits)"
        )
    return match.group(1)


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Verifier:
    """Checks a stream of chunks against an expected digest and, when known, size; with
    ``expected`` None it only measures (``digest``), for content whose digest is not known yet.

    ``update`` raises as soon as the stream runs past the expected size, so an endless or
    oversized answer is cut short instead of filling the disk; ``verify`` checks the rest once
    the stream has ended. ``what`` names the content in error messages.
    """

    def __init__(
        self, expected: str | None, size: int | None = None, *, what: str = "content"
    ) -> None:
        if expected is not None:
            digest_hex(expected)
        self.expected = expected
        self.size = size
        self.what = what
        self.received = 0
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.size is not None and self.received > self.size:
            raise DigestMismatchError(
                f"{self.what}: received more than the {self.size} bytes announced for it"
            )
        self._hash.update(chunk)

    @property
    def digest(self) -> str:
        """The digest of what was received so far."""
        return "sha256:" + self._hash.hexdigest()

    def verify(self) -> None:
        """Raise ``DigestMismatchError`` unless everything received matches size and digest."""
        if self.size is not None and self.received != self.size:
            raise DigestMismatchError(
                f"{self.what}: received {self.received} bytes, but {self.size} were announced;"
                " nothing of it was kept"
            )
        actual = self.digest
        if self.expected is not None and actual != self.expected:
            raise DigestMismatchError(
                f"{self.what}: expected {self.expected}, got {actual}: the content was corrupted"
                " in transit or on disk, or tampered with; nothing of it was kept"
            )


def verify_bytes(data: bytes, expected: str, size: int | None = None, *, what: str) -> None:
    """``Verifier`` for content already in memory (manifests, configs)."""
    verifier = Verifier(expected, size, what=what)
    verifier.update(data)
    verifier.verify()
