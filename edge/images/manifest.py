"""Manifests, indexes and image configs: parsing and checking, no I/O.

Reads OCI image indexes and manifests and their Docker schema2 counterparts (manifest lists and
v2 manifests). Schema1 manifests (deprecated since 2017, unsigned by now) are refused with a
clear error, as are artifacts that are not container images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge.images import platforms
from edge.images.digest import digest_hex
from edge.images.errors import ManifestError, UnsupportedImageError
from edge.images.platforms import Platform

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# What ``docker save`` layers are once imported: plain tar, with a Docker-style name.
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES = frozenset(
    {
        OCI_LAYER,
        f"{OCI_LAYER}+gzip",
        f"{OCI_LAYER}+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        DOCKER_LAYER,
        DOCKER_LAYER_TAR,
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
# The Accept header for manifest requests: everything this module reads.
ACCEPT = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))
# A manifest or config is a few kilobytes; containerd refuses more than 4 MiB, and so do we,
# rather than buffer whatever a broken registry sends.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A pointer to content: its media type, digest and size (and, in an index, a platform)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class Index:
    """An OCI image index or a Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]

    def choose(self, wanted: Platform) -> Descriptor:
        """The manifest for ``wanted``; ``UnsupportedImageError`` naming what there is."""
        found = platforms.choose([(d.platform, d) for d in self.manifests], wanted)
        if found is None:
            offered = sorted({str(d.platform) for d in self.manifests if d.platform}) or ["none"]
            raise UnsupportedImageError(
                f"no manifest for {wanted}; the image is built for: {', '.join(offered)}"
            )
        return found


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest: the config and the layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What the pod runtime takes from an image's config to build a container's process."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "Entrypoint": list(self.entrypoint),
            "Cmd": list(self.cmd),
            "Env": list(self.env),
            "WorkingDir": self.working_dir,
            "User": self.user,
            "ExposedPorts": {p: {} for p in self.exposed_ports},
        }


@dataclass(frozen=True, slots=True)
class ParsedConfig:
    """An image config: the runtime part, the platform it was built for, and the digests of
    the uncompressed layers (``rootfs.diff_ids``), bottom first."""

    config: ImageConfig
    platform: Platform
    diff_ids: tuple[str, ...]


def _load(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{what} is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} allowed"
        )
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{what} is not a JSON object")
    return doc


def _descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ManifestError(f"{what}: a descriptor must be a JSON object, got {raw!r}")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise ManifestError(f"{what}: a descriptor needs string mediaType and digest: {raw!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{what}: descriptor {digest} has no valid size: {size!r}")
    try:
        digest_hex(digest)
    except ValueError as exc:
        raise UnsupportedImageError(f"{what}: {exc}") from exc
    plat = None
    if isinstance(raw.get("platform"), dict):
        try:
            plat = platforms.from_json(raw["platform"])
        except ValueError as exc:
            raise ManifestError(f"{what}: descriptor {digest}: {exc}") from exc
    annotations = raw.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ManifestError(f"{what}: descriptor {digest}: annotations must be an object")
    return Descriptor(media_type, digest, size, plat, annotations)


def parse(data: bytes, content_type: str = "", *, what: str = "manifest") -> Index | Manifest:
    """An index or a manifest from its JSON; ``content_type`` (the HTTP header) decides when
    the document has no ``mediaType`` (OCI allows leaving it out)."""
    doc = _load(data, what)
    media_type = doc.get("mediaType") or content_type.split(";")[0].strip()
    if doc.get("schemaVersion") == 1 or media_type in _SCHEMA1:
        raise UnsupportedImageError(
            f"{what} is a Docker schema1 manifest, which Outpost does not pull; push the image"
            " again with a current Docker or registry (schema2 or OCI)"
        )
    if media_type not in INDEX_TYPES | MANIFEST_TYPES:
        if "manifests" in doc:
            media_type = OCI_INDEX
        elif "layers" in doc:
            media_type = OCI_MANIFEST
        else:
            raise UnsupportedImageError(f"{what} has media type {media_type!r}, not an image")
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError(f"{what}: an index needs a 'manifests' list")
        return Index(media_type, tuple(_descriptor(e, what) for e in entries))
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestError(f"{what}: a manifest needs a 'layers' list")
    config = _descriptor(doc.get("config"), what)
    if config.media_type not in CONFIG_TYPES:
        raise UnsupportedImageError(
            f"{what} describes {config.media_type!r}, which is not a container image"
            " (an artifact such as a Helm chart or a signature?)"
        )
    parsed = tuple(_descriptor(layer, what) for layer in layers)
    for layer in parsed:
        if layer.media_type not in LAYER_TYPES:
            raise UnsupportedImageError(
                f"{what}: layer {layer.digest} has media type {layer.media_type!r}, which is not"
                " a tar layer Outpost can unpack"
            )
    return Manifest(media_type, config, parsed)


def _strings(value: Any, field_name: str, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{what}: config.{field_name} must be a list of strings")
    return tuple(value)


def parse_config(data: bytes, *, what: str = "image config") -> ParsedConfig:
    """The parts of an image config the runtime needs."""
    doc = _load(data, what)
    try:
        plat = platforms.from_json(doc)
    except ValueError as exc:
        raise ManifestError(f"{what}: {exc}") from exc
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ManifestError(f"{what}: rootfs.diff_ids must be a list of digests")
    for diff_id in diff_ids:
        try:
            digest_hex(diff_id)
        except ValueError as exc:
            raise UnsupportedImageError(f"{what}: rootfs.diff_ids: {exc}") from exc
    conf = doc.get("config") or {}
    if not isinstance(conf, dict):
        raise ManifestError(f"{what}: 'config' must be an object")
    ports = conf.get("ExposedPorts") or {}
    if not isinstance(ports, dict):
        raise ManifestError(f"{what}: config.ExposedPorts must be an object")
    for key in ("WorkingDir", "User"):
        if not isinstance(conf.get(key) or "", str):
            raise ManifestError(f"{what}: config.{key} must be a string")
    image_config = ImageConfig(
        entrypoint=_strings(conf.get("Entrypoint"), "Entrypoint", what),
        cmd=_strings(conf.get("Cmd"), "Cmd", what),
        env=_strings(conf.get("Env"), "Env", what),
        working_dir=conf.get("WorkingDir") or "",
        user=conf.get("User") or "",
        exposed_ports=tuple(sorted(ports)),
    )
    return ParsedConfig(image_config, plat, tuple(diff_ids))


def image_config_from_json(doc: Mapping[str, Any]) -> ImageConfig:
    """The inverse of ``ImageConfig.to_json`` (the store's index keeps configs that way)."""
    return ImageConfig(
        entrypoint=tuple(doc["Entrypoint"]),
        cmd=tuple(doc["Cmd"]),
        env=tuple(doc["Env"]),
        working_dir=doc["WorkingDir"],
        user=doc["User"],
        exposed_ports=tuple(sorted(doc["ExposedPorts"])),
    )
