"""The release folder given to ``outpost-cloud serve --releases DIR``, and its signed sums.

Layout::

    DIR/
      latest                      optional: a file holding the default version's name
      1.4.0/
        outpost-linux-amd64       the edge binary for each arch (amd64, arm64, arm = armv7)
        outpost-linux-arm64
        outpost.service           optional: the systemd unit; without it the repository's
                                  systemd/outpost.service is served, if there is one

A version's name is letters, digits, ``.``, ``_``, ``+`` and ``-``. Without ``latest`` the
default version is the highest by its numeric parts. ``SHA256SUMS`` (``<hex>  <name>`` per file,
sorted by name) lists every file served for the version, the unit too; it is computed when first
asked for and again whenever a file's size or mtime changes, and signed with the release key.
Files are read from disk on every request, so dropping a new version in needs no restart.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cloud.installer.signing import ReleaseKey

ARCHES = ("amd64", "arm64", "arm")
BINARY_PREFIX = "outpost-linux-"
UNIT_NAME = "outpost.service"
SUMS_NAME = "SHA256SUMS"
SIG_NAME = "SHA256SUMS.sig"
LATEST_NAME = "latest"
# The unit as the repository carries it, for a release folder that has none.
REPO_UNIT = Path(__file__).resolve().parents[2] / "systemd" / UNIT_NAME

_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")


def valid_version(name: str) -> bool:
    return bool(_VERSION.fullmatch(name)) and ".." not in name


def _version_key(name: str) -> tuple:
    parts = re.split(r"[.+-]", name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


@dataclass(frozen=True)
class Signed:
    sums: bytes
    signature: bytes
    files: dict[str, Path]


class Releases:
    def __init__(self, root: Path, key: ReleaseKey, *, fallback_unit: Path | None = REPO_UNIT):
        self.root = root
        self.key = key
        self.fallback_unit = fallback_unit
        self._digests: dict[Path, tuple[int, int, str]] = {}

    def versions(self) -> list[str]:
        """The versions that have at least one binary, lowest first."""
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return []
        found = [
            e.name
            for e in entries
            if valid_version(e.name) and e.is_dir() and any(e.glob(BINARY_PREFIX + "*"))
        ]
        return sorted(found, key=_version_key)

    def default_version(self) -> str | None:
        latest = self.root / LATEST_NAME
        if latest.is_file():
            name = latest.read_text().strip()
            if valid_version(name) and (self.root / name).is_dir():
                return name
        versions = self.versions()
        return versions[-1] if versions else None

    def files(self, version: str) -> dict[str, Path]:
        """What is served for ``version``, by name (no sums); empty if it does not exist."""
        if not valid_version(version):
            return {}
        folder = self.root / version
        files = {
            BINARY_PREFIX + arch: folder / (BINARY_PREFIX + arch)
            for arch in ARCHES
            if (folder / (BINARY_PREFIX + arch)).is_file()
        }
        if not files:
            return {}
        unit = folder / UNIT_NAME
        if unit.is_file():
            files[UNIT_NAME] = unit
        elif self.fallback_unit is not None and self.fallback_unit.is_file():
            files[UNIT_NAME] = self.fallback_unit
        return files

    def _digest(self, path: Path) -> str:
        stat = path.stat()
        cached = self._digests.get(path)
        if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = hashlib.sha256()
        with path.open("rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
        self._digests[path] = (stat.st_size, stat.st_mtime_ns, digest.hexdigest())
        return digest.hexdigest()

    def signed(self, version: str) -> Signed | None:
        """The version's files, SHA256SUMS and its signature; None if there is no such version.

        Blocking (it may hash the binaries): call it from a worker thread.
        """
        files = self.files(version)
        if not files:
            return None
        sums = "".join(f"{self._digest(path)}  {name}\n" for name, path in sorted(files.items()))
        data = sums.encode()
        return Signed(sums=data, signature=self.key.sign(data), files=files)
