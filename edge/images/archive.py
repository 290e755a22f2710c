"""Importing image archives, for sites without a registry: ``docker save`` tarballs and OCI
archives (an OCI image layout in a tar, as ``skopeo copy … oci-archive:`` or ``buildah push``
write them). Compressed archives (``docker save | gzip``) are read as well.

- ``docker save``: ``manifest.json`` lists each image's config, layers and ``RepoTags``. Layers
  are stored as they are (plain tar, normally); a Docker schema2 manifest is written for them,
  so the image is stored as if pulled.
- OCI archive: ``index.json`` points at manifests (or indexes, from which the node's platform
  is chosen), named by the annotation ``io.containerd.image.name`` or
  ``org.opencontainers.image.ref.name``; a name that is only a tag (``1.0``) cannot be
  imported, since it does not say which image it is.

Every blob is verified against its digest before it is stored. Functions here block on the
disk; trio code runs them in ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.images import manifest
from edge.images.blobs import BlobStore
from edge.images.digest import sha256_digest, verify_bytes
from edge.images.errors import ArchiveError, ImageError, UnsupportedImageError
from edge.images.layers import clean_path, sniff_compression
from edge.images.manifest import Descriptor, Index, Manifest, ParsedConfig
from edge.images.platforms import Platform
from edge.images.reference import normalize

_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_CONFIG_NAME = re.compile(r"([0-9a-f]{64})\.json")
_NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_LAYER_TYPES = {
    "gzip": manifest.DOCKER_LAYER,
    "zstd": "application/vnd.docker.image.rootfs.diff.tar.zstd",
    None: manifest.DOCKER_LAYER_TAR,
}


@dataclass(frozen=True, slots=True)
class ArchivedImage:
    """One image imported from an archive, its blobs already in the blob store."""

    references: tuple[str, ...]
    digest: str
    index_digest: str | None
    manifest: Manifest
    config: ParsedConfig


class _Archive:
    def __init__(self, path: Path, tar: tarfile.TarFile) -> None:
        self.path = path
        self.tar = tar
        try:
            self.members = {str(clean_path(m.name)): m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, EOFError, ImageError) as exc:
            raise ArchiveError(f"{path} is not a readable tar archive: {exc}") from exc

    def member(self, name: str) -> tarfile.TarInfo:
        try:
            return self.members[str(clean_path(name))]
        except (KeyError, ImageError):
            raise ArchiveError(f"{self.path} lacks {name!r}, which it refers to") from None

    def read(self, name: str, limit: int = manifest.MAX_MANIFEST_BYTES) -> bytes:
        member = self.member(name)
        if member.size > limit:
            raise ArchiveError(f"{self.path}: {name} is {member.size} bytes, more than {limit}")
        source = self.tar.extractfile(member)
        assert source is not None  # members holds regular files only
        return source.read()

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArchiveError(f"{self.path}: {name} is not valid JSON: {exc}") from exc

    def head(self, name: str) -> bytes:
        """The first bytes of a member, which tell its compression."""
        source = self.tar.extractfile(self.member(name))
        assert source is not None
        return source.read(4)

    def copy_blob(self, blobs: BlobStore, name: str, expected: str | None) -> tuple[str, int]:
        """Store a member as a blob; ``(digest, size)``."""
        member = self.member(name)
        source = self.tar.extractfile(member)
        assert source is not None
        return blobs.copy_in(source, expected, member.size, f"{self.path}: {name}"), member.size


def read_archive(path: Path, blobs: BlobStore, wanted: Platform) -> list[ArchivedImage]:
    """Store the blobs of every image in the archive at ``path`` and describe the images."""
    with _open(path) as tar:
        archive = _Archive(path, tar)
        if "manifest.json" in archive.members:
            return _docker_save(archive, blobs)
        if "index.json" in archive.members:
            return _oci_archive(archive, blobs, wanted)
    raise ArchiveError(
        f"{path} is neither a `docker save` archive (no manifest.json) nor an OCI archive"
        " (no index.json)"
    )


def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError) as exc:
        # tarfile lists why each compression failed; the one line that matters is this.
        raise ArchiveError(
            f"{path} is not a tar archive (plain, or compressed with gzip, bzip2 or xz)"
        ) from exc
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise ArchiveError(f"cannot read {path}: {exc.strerror}") from exc


def _expected_digest(name: str) -> str | None:
    """The digest a ``docker save`` member's name promises, if it names one."""
    match = _BLOB_NAME.fullmatch(name) or _CONFIG_NAME.fullmatch(name)
    return f"sha256:{match.group(1)}" if match else None


def _docker_save(archive: _Archive, blobs: BlobStore) -> list[ArchivedImage]:
    entries = archive.json("manifest.json")
    if not isinstance(entries, list):
        raise ArchiveError(f"{archive.path}: manifest.json is not a list of images")
    images = []
    for number, entry in enumerate(entries, 1):
        where = f"{archive.path}: image {number} of manifest.json"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise ArchiveError(f"{where} has no Config")
        layer_names = entry.get("Layers")
        if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
            raise ArchiveError(f"{where} has no list of Layers")
        tags = entry.get("RepoTags") or []
        if not tags:
            raise ArchiveError(
                f"{where} has no RepoTags: save the image by name (docker save NAME:TAG)"
            )
        try:
            references = tuple(normalize(tag) for tag in tags)
        except ImageError as exc:
            raise ArchiveError(f"{where}: {exc}") from exc
        config_bytes = archive.read(entry["Config"])
        config_digest = _expected_digest(str(clean_path(entry["Config"])))
        config_digest = config_digest or sha256_digest(config_bytes)
        verify_bytes(config_bytes, config_digest, what=f"{where}: config")
        config = manifest.parse_config(config_bytes, what=f"{where}: config")
        if len(config.diff_ids) != len(layer_names):
            raise ArchiveError(
                f"{where}: the config lists {len(config.diff_ids)} layers, the archive"
                f" {len(layer_names)}"
            )
        layers = []
        for name, diff_id in zip(layer_names, config.diff_ids, strict=True):
            compression = sniff_compression(archive.head(name))
            # A plain tar layer is its own diff: check it against the config before storing it.
            expected = _expected_digest(str(clean_path(name)))
            if expected is None and compression is None:
                expected = diff_id
            digest, size = archive.copy_blob(blobs, name, expected)
            layers.append(Descriptor(_LAYER_TYPES[compression], digest, size))
        blobs.write(config_digest, config_bytes)
        config_desc = Descriptor(manifest.DOCKER_CONFIG, config_digest, len(config_bytes))
        doc = {
            "schemaVersion": 2,
            "mediaType": manifest.DOCKER_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
        body = json.dumps(doc, indent=3).encode()
        digest = sha256_digest(body)
        blobs.write(digest, body)
        parsed = Manifest(manifest.DOCKER_MANIFEST, config_desc, tuple(layers))
        images.append(ArchivedImage(references, digest, None, parsed, config))
    return images


def _oci_archive(archive: _Archive, blobs: BlobStore, wanted: Platform) -> list[ArchivedImage]:
    where = f"{archive.path}: index.json"
    top = manifest.parse(archive.read("index.json"), manifest.OCI_INDEX, what=where)
    if not isinstance(top, Index):
        raise ArchiveError(f"{where} is not an image index")
    images = []
    for entry in top.manifests:
        name = next((entry.annotations[a] for a in _NAME_ANNOTATIONS if a in entry.annotations), "")
        if "/" not in name and ":" not in name:
            raise ArchiveError(
                f"{where}: manifest {entry.digest} is named {name!r}, not an image name with a"
                " repository; write the archive with the full name (oci-archive:FILE:NAME:TAG)"
            )
        try:
            reference = normalize(name)
        except ImageError as exc:
            raise ArchiveError(f"{where}: {exc}") from exc
        digest, body = entry.digest, _blob(archive, entry)
        parsed = manifest.parse(body, entry.media_type, what=f"{archive.path}: {digest}")
        index_digest = None
        if isinstance(parsed, Index):
            blobs.write(digest, body)
            index_digest = digest
            try:
                chosen = parsed.choose(wanted)
            except UnsupportedImageError as exc:
                raise UnsupportedImageError(f"{reference} in {archive.path}: {exc}") from exc
            digest, body = chosen.digest, _blob(archive, chosen)
            parsed = manifest.parse(body, chosen.media_type, what=f"{archive.path}: {digest}")
            if isinstance(parsed, Index):
                raise UnsupportedImageError(f"{archive.path}: {digest} is an index inside an index")
        config_bytes = _blob(archive, parsed.config)
        config = manifest.parse_config(
            config_bytes, what=f"{archive.path}: config {parsed.config.digest}"
        )
        for layer in parsed.layers:
            archive.copy_blob(blobs, _blob_name(layer), layer.digest)
        blobs.write(parsed.config.digest, config_bytes)
        blobs.write(digest, body)
        images.append(ArchivedImage((reference,), digest, index_digest, parsed, config))
    return images


def _blob_name(descriptor: Descriptor) -> str:
    return f"blobs/sha256/{descriptor.digest.removeprefix('sha256:')}"


def _blob(archive: _Archive, descriptor: Descriptor) -> bytes:
    """A small blob (manifest, config) from the archive, verified."""
    body = archive.read(_blob_name(descriptor))
    verify_bytes(
        body, descriptor.digest, descriptor.size, what=f"{archive.path}: {descriptor.digest}"
    )
    return body
