import hashlib

import pytest

from edge.images.digest import Verifier, digest_hex, sha256_digest, verify_bytes
from edge.images.errors import DigestMismatchError

DATA = b"layer content " * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def test_digest_hex_accepts_only_sha256() -> None:
    assert digest_hex(DIGEST) == DIGEST[7:]
    for bad in ("sha256:ABC", "sha512:" + "a" * 128, DIGEST.upper(), "sha256:../../etc"):
        with pytest.raises(ValueError, match="not a sha256 digest"):
            digest_hex(bad)


def test_chunks_that_match_verify() -> None:
    verifier = Verifier(DIGEST, len(DATA))
    for start in range(0, len(DATA), 777):
        verifier.update(DATA[start : start + 777])
    verifier.verify()
    assert verifier.received == len(DATA)
    assert verifier.digest == DIGEST == sha256_digest(DATA)


def test_a_flipped_byte_is_a_mismatch() -> None:
    corrupt = bytearray(DATA)
    corrupt[500] ^= 1
    with pytest.raises(DigestMismatchError, match=f"expected {DIGEST}"):
        verify_bytes(bytes(corrupt), DIGEST, len(DATA), what="blob")


def test_more_than_the_announced_size_fails_at_once() -> None:
    verifier = Verifier(DIGEST, 10, what="blob x")
    verifier.update(b"0123456789")
    with pytest.raises(DigestMismatchError, match="more than the 10 bytes"):
        verifier.update(b"!")


def test_a_short_stream_is_a_mismatch() -> None:
    verifier = Verifier(DIGEST, len(DATA))
    verifier.update(DATA[:-1])
    with pytest.raises(DigestMismatchError, match=f"received {len(DATA) - 1} bytes"):
        verifier.verify()


def test_without_expected_digest_it_only_measures() -> None:
    verifier = Verifier(None)
    verifier.update(DATA)
    verifier.verify()
    assert verifier.digest == DIGEST
