"""Mounting and unmounting through the kernel's own calls, and the mount table they change.

``mount(2)`` and ``umount2(2)`` are called directly (through ctypes) rather than through
``mount(8)``: no dependency on util-linux, and the error is the kernel's errno, not a message to
parse. The agent runs as root. These are quick system calls; they still block, so trio code runs
them in ``trio.to_thread.run_sync`` like any other file-system step.

``unmount`` leaves nothing mounted at a path, whatever was there: mount propagation can stack
copies of one mount on the same path (the table lists such a path once per copy, but a reader
that keeps a set sees it once), and a mount can go away between reading the table and
unmounting it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_MOUNTINFO = Path("/proc/self/mountinfo")
# More copies than mount propagation stacks in practice: past this, something remounts.
_MAX_STACKED_MOUNTS = 16
# mountinfo writes space, tab, newline and backslash as octal escapes.
_ESCAPES = (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\"))


class MountError(OSError):
    """mount(2) or umount2(2) failed; ``errno`` is the kernel's, ``strerror`` says what was
    being done and why it failed."""


@dataclass(frozen=True)
class MountInfo:
    """One mount of a ``/proc/*/mountinfo`` table, its fields unescaped."""

    mount_point: Path
    fstype: str
    source: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    for code, char in _ESCAPES:
        field = field.replace(code, char)
    return field


def parse_mountinfo(text: str) -> list[MountInfo]:
    """The mounts of a mountinfo text, in its order (a path mounted over shows up again)."""
    mounts = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(" "), after.split(" ")
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append(
            MountInfo(
                mount_point=Path(_unescape(fields[4])),
                fstype=tail[0],
                source=_unescape(tail[1]),
                super_options=tuple(_unescape(o) for o in tail[2].split(",")),
            )
        )
    return mounts


def mount_table() -> list[MountInfo]:
    """The mounts this process sees now."""
    with open(_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as info:
        return parse_mountinfo(info.read())


def mount_points() -> set[Path]:
    """Every path something is mounted on now."""
    return {mount.mount_point for mount in mount_table()}


def mount(
    source: str,
    target: Path,
    fstype: str,
    *,
    flags: int = 0,
    options: str = "",
    what: str = "",
    hints: Mapping[int, str] | None = None,
) -> None:
    """Mount ``source`` of type ``fstype`` at ``target`` with ``flags`` (``MS_*``) and the
    file system's ``options``. On failure ``MountError`` says "cannot mount <what> at
    <target>", the kernel's reason, and the hint ``hints`` holds for that errno, if any."""
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, options.encode()):
        code = ctypes.get_errno()
        hint = ({errno.EPERM: "mounting needs root"} | dict(hints or {})).get(code)
        raise MountError(
            code,
            f"cannot mount {what or fstype} at {target}: {os.strerror(code)}"
            + (f" ({hint})" if hint else ""),
            str(target),
        )


def unmount(target: Path) -> None:
    """Unmount ``target`` until nothing is mounted there; nothing to do if nothing is.

    A failure because ``target`` is no mount point (``EINVAL``) or no longer exists
    (``ENOENT``) is the mount having gone already, unless the table still lists it.
    """
    point = Path(os.path.realpath(target))
    for _ in range(_MAX_STACKED_MOUNTS):
        if _libc.umount2(os.fsencode(point), 0) != 0:
            code = ctypes.get_errno()
            if code in (errno.EINVAL, errno.ENOENT) and point not in mount_points():
                return
            hint = " (a process still uses it)" if code == errno.EBUSY else ""
            raise MountError(code, f"cannot unmount {point}: {os.strerror(code)}{hint}", str(point))
        if point not in mount_points():
            return
    raise MountError(
        errno.EBUSY,
        f"cannot unmount {point}: still mounted after {_MAX_STACKED_MOUNTS} tries",
        str(point),
    )
