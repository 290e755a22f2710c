"""Platforms (``linux/arm64``, ``linux/arm/v7``) and choosing one manifest from an index.

Names are normalized the way containerd does it (``x86_64`` → ``amd64``, ``aarch64`` → ``arm64``,
``armhf`` → ``arm/v7``; ``arm64/v8`` is plain ``arm64``; ``arm`` without variant is ``arm/v7``),
and so is matching: a platform runs its own images first, then those it can also run, in order:
``arm/v7`` also runs ``v6`` and ``v5``; ``arm64`` also runs 32-bit ``arm``; ``amd64`` also ``386``.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_ARCH_ALIASES = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "386": ("386", ""),
}


@dataclass(frozen=True, slots=True)
class Platform:
    """An OS, CPU architecture and variant, normalized (build with ``normalize`` or ``parse``)."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/arm/v7``, ``linux/arm64``, or an architecture alone (OS ``linux``)."""
        parts = text.strip().split("/")
        if len(parts) == 1:
            parts = ["linux", *parts]
        if len(parts) > 3 or not all(parts):
            raise ValueError(
                f"{text!r} is not a platform: use os/architecture[/variant], like linux/arm/v7,"
                " or an architecture, like arm64"
            )
        return normalize(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def normalize(os: str, architecture: str, variant: str = "") -> Platform:
    """The normal form of a platform as images, indexes and ``uname -m`` spell it."""
    arch = architecture.lower()
    variant = variant.lower()
    arch, implied = _ARCH_ALIASES.get(arch, (arch, ""))
    variant = variant or implied
    if variant and variant[0].isdigit():
        variant = f"v{variant}"
    if arch == "arm64" and variant in ("v8", "v8.0"):
        variant = ""
    elif arch == "arm" and not variant:
        variant = "v7"
    elif arch == "amd64" and variant == "v1":
        variant = ""
    return Platform(os.lower(), arch, variant)


def from_json(data: Mapping[str, Any]) -> Platform:
    """A platform from an index entry's ``platform`` or an image config's top level."""
    os = data.get("os")
    arch = data.get("architecture")
    if not isinstance(os, str) or not isinstance(arch, str) or not os or not arch:
        raise ValueError(f"a platform needs string 'os' and 'architecture', got {dict(data)!r}")
    variant = data.get("variant") or ""
    return normalize(os, arch, variant if isinstance(variant, str) else "")


def host_platform() -> Platform:
    """The platform of this machine."""
    return normalize("linux", _platform.machine())


def compatible(wanted: Platform) -> list[Platform]:
    """The platforms ``wanted`` runs, best first."""
    order = [wanted]
    if wanted.architecture == "arm" and wanted.variant in ("v8", "v7", "v6", "v5"):
        start = ("v8", "v7", "v6", "v5").index(wanted.variant) + 1
        order += [Platform(wanted.os, "arm", v) for v in ("v8", "v7", "v6", "v5")[start:]]
    elif wanted.architecture == "arm64" and not wanted.variant:
        order += [Platform(wanted.os, "arm", v) for v in ("v8", "v7", "v6", "v5")]
    elif wanted.architecture == "amd64" and not wanted.variant:
        order.append(Platform(wanted.os, "386"))
    return order


def choose(candidates: Sequence[tuple[Platform | None, T]], wanted: Platform) -> T | None:
    """The candidate whose platform ``wanted`` runs best; the first of equals (index order is
    the publisher's preference). Candidates without a platform never match."""
    ranks = {p: i for i, p in enumerate(compatible(wanted))}
    best: tuple[int, T] | None = None
    for plat, item in candidates:
        rank = ranks.get(plat) if plat is not None else None
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, item)
    return None if best is None else best[1]
