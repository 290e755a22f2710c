"""A container's root file system: an overlayfs mount of an image's snapshots, read-only and
shared, under one writable upper directory of its own.

The mount itself, its undoing and the mount table are ``edge.mounts``'; what is overlay's is
here: the option string, and which snapshots mounted overlays still use.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from pathlib import Path

from edge.mounts import MountInfo, mount, mount_table

# The kernel copies mount options into one page; longer option strings are refused.
_MAX_OPTIONS = 4095
_MOUNT_HINTS = {
    errno.ENODEV: "the kernel has no overlay file system: modprobe overlay",
    errno.EINVAL: "is work on the same file system as upper, and not inside it?",
}


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
    on the same file system as ``upper``) at ``target``. All four must exist; ``MountError``
    if the kernel refuses."""
    options = overlay_options(lowerdirs, upper, work)
    mount("overlay", target, "overlay", options=options, what="the overlay", hints=_MOUNT_HINTS)


def overlay_lowerdirs(mounts: Iterable[MountInfo]) -> set[Path]:
    """Every lower directory of every overlay among ``mounts``."""
    found: set[Path] = set()
    for info in mounts:
        if info.fstype != "overlay":
            continue
        for option in info.super_options:
            key, _, value = option.partition("=")
            if key in ("lowerdir", "lowerdir+"):
                found.update(Path(p) for p in value.split(":") if p)
    return found


def mounted_lowerdirs() -> set[Path]:
    """The lower directories of the overlays mounted now, which must not be deleted."""
    return overlay_lowerdirs(mount_table())
