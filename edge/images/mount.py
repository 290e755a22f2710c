"""A container's root file system: an overlayfs mount of an image's snapshots, read-only and
shared, under one writable upper directory of its own.

``mount(2)`` is called directly (through ctypes) rather than through ``mount -t overlay``: no
dependency on util-linux, and the error is the kernel's errno, not a message to parse. The
agent runs as root. These calls are quick system calls; they still block, so trio code runs
them in ``trio.to_thread.run_sync`` like any other file-system step.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
# The kernel copies mount options into one page; longer option strings are refused.
_MAX_OPTIONS = 4095
_MOUNTINFO = Path("/proc/self/mountinfo")


class MountError(OSError):
    """mount(2) or umount(2) failed; ``errno`` is the kernel's."""


def overlay_options(lowerdirs: Sequence[Path], upper: Path, work: Path) -> str:
    """The option string for an overlay of ``lowerdirs`` (bottom first, as
    ``ImageStore.snapshots`` lists them) under ``upper``."""
    if not lowerdirs:
        raise ValueError("an overlay needs at least one lower directory")
    paths = [*(str(p) for p in reversed(lowerdirs)), str(upper), str(work)]
    for path in paths:
        if any(c in path for c in ":,\\\n"):
            raise ValueError(
                f"{path!r} cannot be used in an overlay mount: it contains ':', ',', a backslash"
                " or a newline"
            )
    options = f"lowerdir={':'.join(paths[:-2])},upperdir={upper},workdir={work}"
    if len(options) > _MAX_OPTIONS:
        raise ValueError(
            f"the overlay options for {len(lowerdirs)} layers are {len(options)} bytes, more than"
            f" the {_MAX_OPTIONS} the kernel takes: keep the image store on a shorter path"
        )
    return options


def mount_rootfs(lowerdirs: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount the overlay of ``lowerdirs`` (bottom first) with ``upper`` and ``work`` (empty,
    on the same file system as ``upper``) at ``target``. All four must exist."""
    options = overlay_options(lowerdirs, upper, work)
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) != 0:
        code = ctypes.get_errno()
        hint = ""
        if code == errno.EPERM:
            hint = " (mounting needs root)"
        elif code == errno.ENODEV:
            hint = " (the kernel has no overlay file system: modprobe overlay)"
        elif code == errno.EINVAL:
            hint = " (is work on the same file system as upper, and not inside it?)"
        raise MountError(
            code, f"cannot mount the overlay at {target}: {os.strerror(code)}{hint}", str(target)
        )


def unmount(target: Path) -> None:
    """Unmount ``target``; nothing to do if nothing is mounted there."""
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):
        return
    hint = " (a process still uses it)" if code == errno.EBUSY else ""
    raise MountError(code, f"cannot unmount {target}: {os.strerror(code)}{hint}", str(target))


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def parse_overlay_lowerdirs(mountinfo: str) -> set[Path]:
    """Every lower directory of every overlay mount in a ``/proc/*/mountinfo`` text."""
    found: set[Path] = set()
    for line in mountinfo.splitlines():
        _, sep, rest = line.partition(" - ")
        fields = rest.split(" ")
        if not sep or len(fields) < 3 or fields[0] != "overlay":
            continue
        for option in fields[2].split(","):
            key, _, value = option.partition("=")
            if key in ("lowerdir", "lowerdir+"):
                found.update(Path(_unescape(p)) for p in value.split(":") if p)
    return found


def mounted_lowerdirs() -> set[Path]:
    """The lower directories of the overlays mounted now, which must not be deleted."""
    return parse_overlay_lowerdirs(_MOUNTINFO.read_text())
