"""The content-addressed blob store: ``<root>/blobs/sha256/<hex>``, written only through
``<root>/ingest/``.

A blob appears under its digest only after its content was verified against that digest,
flushed to disk and renamed into place, so a blob that exists is whole and correct, after a
crash too. Downloads in progress live in ``ingest/`` under the digest they are expected to
have, which is what lets an interrupted download resume where it stopped.

Methods block on the disk; trio code calls them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO

from edge.images.digest import Verifier, digest_hex
from edge.images.files import fsync_dir

_CHUNK = 1024 * 1024


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self.ingest_dir = root / "ingest"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.dir / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def ingest_path(self, digest: str) -> Path:
        """Where a download of ``digest`` keeps what it has received so far."""
        return self.ingest_dir / digest_hex(digest)

    def commit(self, digest: str, partial: BinaryIO, partial_path: Path) -> Path:
        """Move a fully received and verified ingest file into place under ``digest``."""
        partial.flush()
        os.fsync(partial.fileno())
        target = self.path(digest)
        os.replace(partial_path, target)
        fsync_dir(self.dir)
        return target

    def write(self, digest: str, data: bytes) -> Path:
        """Store ``data``, already verified against ``digest`` (a manifest, say)."""
        target = self.path(digest)
        if target.is_file():
            return target
        tmp = self.ingest_dir / f"{digest_hex(digest)}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                return self.commit(digest, f, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def copy_in(self, source: BinaryIO, expected: str | None, size: int | None, what: str) -> str:
        """Copy a stream into the store and return its digest; with ``expected``, verify it
        (``DigestMismatchError``, nothing kept) and skip the copy when already stored."""
        if expected is not None and self.has(expected):
            return expected
        tmp = self.ingest_dir / f"import.{secrets.token_hex(8)}.tmp"
        try:
            with open(tmp, "wb") as f:
                verifier = Verifier(expected, size, what=what)
                while chunk := source.read(_CHUNK):
                    verifier.update(chunk)
                    f.write(chunk)
                verifier.verify()
                digest = verifier.digest
                if not self.has(digest):
                    self.commit(digest, f, tmp)
                return digest
        finally:
            tmp.unlink(missing_ok=True)

    def digests(self) -> dict[str, int]:
        """Every stored blob and its size in bytes."""
        found = {}
        for entry in os.scandir(self.dir):
            if entry.is_file(follow_symlinks=False):
                found[f"sha256:{entry.name}"] = entry.stat(follow_symlinks=False).st_size
        return found

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def ingest_entries(self) -> list[os.DirEntry[str]]:
        return list(os.scandir(self.ingest_dir))

    def clear_ingest(self, entry: os.DirEntry[str]) -> None:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)
