"""Unpacking layers into snapshots, with whiteouts in overlayfs's own format.

Every layer is unpacked on its own into one directory, which then serves, unchanged, as one
``lowerdir`` of every container whose image has the layer. So a layer's deletions cannot be
applied by deleting files below it (they are in other directories, shared with other images);
they are recorded the way overlayfs reads them:

- ``dir/.wh.name`` (the file ``name`` is deleted) becomes ``dir/name``, a character device 0:0;
- ``dir/.wh..wh..opq`` (nothing below ``dir`` shows through) becomes the extended attribute
  ``trusted.overlay.opaque=y`` on ``dir``.

Entries are written as root with their owners, modes (setuid included), times and extended
attributes, since that is what a container's root file system needs. Because it runs as root,
the unpacking refuses every entry that would land outside the directory: ``..`` components,
and paths through a symlink or over a hard link to one. Overlay attributes that a layer itself
carries are dropped: only this module decides what is opaque.

Functions here block on the disk; trio code runs them in ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from edge.images.errors import DigestMismatchError, InvalidLayerError
from edge.images.files import is_disk_full

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PAX = "SCHILY.xattr."
_CHUNK = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True, slots=True)
class Whiteout:
    """A whiteout entry: ``path`` is hidden from the layers below, or, when ``opaque``, is a
    directory whose contents below are hidden."""

    path: PurePosixPath
    opaque: bool


def clean_path(name: str) -> PurePosixPath:
    """A tar entry's name as a path relative to the layer's root; ``InvalidLayerError`` for
    one that climbs out with ``..``. Leading ``/`` and ``./`` are dropped, as tar does."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidLayerError(f"entry {name!r} climbs out of the layer with '..'")
    return PurePosixPath(*parts)


def classify(name: str) -> Whiteout | None:
    """The whiteout an entry name stands for, or None for an ordinary entry.

    Other ``.wh..wh.`` names (aufs's hard-link bookkeeping) are not whiteouts of a file named
    ``.wh.…``; ``unpack`` skips them.
    """
    path = clean_path(name)
    if path.name == OPAQUE_MARKER:
        return Whiteout(path.parent, opaque=True)
    if path.name.startswith(WHITEOUT_PREFIX) and not path.name.startswith(".wh..wh."):
        return Whiteout(path.parent / path.name[len(WHITEOUT_PREFIX) :], opaque=False)
    return None


class _Hashing:
    """Hashes what tarfile reads, which is the layer's diff-id once the stream has ended."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.hash.update(data)
        return data


def sniff_compression(head: bytes) -> str | None:
    """``"gzip"``, ``"zstd"`` or None (plain tar) from a layer's first four bytes."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head == _ZSTD_MAGIC:
        return "zstd"
    return None


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """The layer's tar stream, by the compression its first bytes show (media types are
    sometimes wrong; magic numbers are not)."""
    compression = sniff_compression(raw.read(4))
    raw.seek(0)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        return zstd.ZstdFile(raw)
    return raw


def unpack(blob: Path, diff_id: str, dest: Path) -> int:
    """Unpack the layer in ``blob`` into ``dest``, a new directory, and check that the
    uncompressed stream matches ``diff_id``. Returns the bytes of file content written.

    Raises ``DigestMismatchError`` or ``InvalidLayerError``; ``OSError`` (a full disk, say)
    passes through. On any error, ``dest`` holds a partial tree the caller deletes.
    """
    dest.mkdir(mode=0o755)
    try:
        with open(blob, "rb") as raw:
            reader = _Hashing(_decompressed(raw))
            with tarfile.open(fileobj=reader, mode="r|") as archive:
                extractor = _Extractor(dest, archive)
                for member in archive:
                    extractor.add(member)
                extractor.finish()
            # tarfile stops at the end-of-archive blocks; the diff-id covers what follows too.
            while reader.read(_CHUNK):
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstd.ZstdError) as exc:
        raise InvalidLayerError(f"layer {diff_id} is not a readable tar archive: {exc}") from exc
    actual = "sha256:" + reader.hash.hexdigest()
    if actual != diff_id:
        raise DigestMismatchError(
            f"layer {diff_id} unpacks to content with digest {actual}: the image config and the"
            " layer disagree, or the blob was corrupted"
        )
    return extractor.size


class _Extractor:
    def __init__(self, dest: Path, archive: tarfile.TarFile) -> None:
        self.dest = dest
        self.archive = archive
        self.size = 0
        # Directories already checked to be real directories inside dest, not symlinks.
        self._known: set[Path] = {dest}
        # Directory attributes are set last, deepest first: a read-only directory could not
        # take its entries, and every entry written would change its mtime.
        self._dirs: list[tuple[Path, tarfile.TarInfo]] = []

    def add(self, member: tarfile.TarInfo) -> None:
        try:
            self._add(member)
        except InvalidLayerError:
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise
            raise InvalidLayerError(f"cannot unpack entry {member.name!r}: {exc}") from exc

    def _add(self, member: tarfile.TarInfo) -> None:
        path = clean_path(member.name)
        if path.name.startswith(".wh..wh.") and path.name != OPAQUE_MARKER:
            return
        whiteout = classify(member.name)
        if whiteout is not None:
            self._whiteout(whiteout, member.name)
            return
        if not path.parts:
            self._dirs.append((self.dest, member))
            return
        target = self._directory(path.parent, member.name, create=True) / path.name
        if member.isdir():
            if not (target.is_dir() and not target.is_symlink()):
                self._clear(target)
                os.mkdir(target, 0o700)
            self._known.add(target)
            self._dirs.append((target, member))
            return
        self._clear(target)
        if member.isreg():
            self._write(target, member)
        elif member.issym():
            os.symlink(member.linkname, target)
        elif member.islnk():
            # A hard link shares the inode, owner and mode of its source: nothing more to set.
            self._link(target, member)
            return
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(target, 0o600)
        else:
            raise InvalidLayerError(f"entry {member.name!r} has a tar type Outpost cannot unpack")
        self._attributes(target, member)

    def _whiteout(self, whiteout: Whiteout, name: str) -> None:
        if whiteout.opaque:
            directory = self._directory(whiteout.path, name, create=True)
            os.setxattr(directory, OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        target = self._directory(whiteout.path.parent, name, create=True) / whiteout.path.name
        self._clear(target)
        os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))

    def _directory(self, relative: PurePosixPath, name: str, *, create: bool) -> Path:
        """``dest/relative``, checked to be a real directory; missing ones are made (tar
        archives may leave parents out) when ``create``."""
        path = self.dest
        for part in relative.parts:
            path = path / part
            if path in self._known:
                continue
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                if not create:
                    raise InvalidLayerError(
                        f"entry {name!r} refers to {relative}, which the layer does not contain"
                    ) from None
                os.mkdir(path, 0o755)
                mode = stat.S_IFDIR
            if not stat.S_ISDIR(mode):
                raise InvalidLayerError(
                    f"entry {name!r} would be written through {path.relative_to(self.dest)},"
                    " which is not a directory (a symlink would lead outside the layer)"
                )
            self._known.add(path)
        return path

    def _clear(self, target: Path) -> None:
        """Later entries replace earlier ones of the same name, as with tar."""
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            shutil.rmtree(target)
            self._known = {p for p in self._known if not p.is_relative_to(target)}
        else:
            os.unlink(target)

    def _write(self, target: Path, member: tarfile.TarInfo) -> None:
        source = self.archive.extractfile(member)
        if source is None:
            raise InvalidLayerError(f"entry {member.name!r} has no content to read")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(target, flags, 0o600), "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
        self.size += member.size

    def _link(self, target: Path, member: tarfile.TarInfo) -> None:
        link = clean_path(member.linkname)
        source = self._directory(link.parent, member.name, create=False) / link.name
        if not source.exists() and not source.is_symlink():
            raise InvalidLayerError(
                f"entry {member.name!r} is a hard link to {member.linkname!r}, which comes"
                " nowhere before it in the layer"
            )
        os.link(source, target, follow_symlinks=False)

    def _attributes(self, target: Path, member: tarfile.TarInfo) -> None:
        os.lchown(target, member.uid, member.gid)
        if member.issym():
            os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
            return
        # After chown, which clears setuid and setgid bits.
        os.chmod(target, member.mode & 0o7777)
        for key, value in member.pax_headers.items():
            if not key.startswith(_XATTR_PAX):
                continue
            name = key[len(_XATTR_PAX) :]
            if name.startswith(("trusted.overlay.", "user.overlay.")):
                continue
            os.setxattr(target, name, value.encode("utf-8", "surrogateescape"))
        os.utime(target, (member.mtime, member.mtime))

    def finish(self) -> None:
        for path, member in sorted(self._dirs, key=lambda d: len(d[0].parts), reverse=True):
            try:
                self._attributes(path, member)
            except OSError as exc:
                if is_disk_full(exc):
                    raise
                raise InvalidLayerError(
                    f"cannot set the attributes of {member.name!r}: {exc}"
                ) from exc
