"""File-system steps that make writes durable and atomic, and turn a full disk into one error."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from edge.images.errors import StorageFullError

_libc = ctypes.CDLL(None, use_errno=True)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable: the directory entry is data too."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the whole file system holding ``path``: one call for an unpacked layer of
    thousands of files, where an fsync each would take far longer."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs: {os.strerror(code)}", str(path))
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(root: Path, what: str, exc: OSError) -> StorageFullError:
    """The error for a full disk while doing ``what`` in the store at ``root``."""
    return StorageFullError(
        f"no space left on the file system of {root} while {what} ({exc.strerror}); images stored"
        " before are intact. Free space there, or remove unused images (`outpost image rm`)"
    )
