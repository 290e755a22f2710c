"""Images for the edge runtime: pulling from OCI registries, importing archives, unpacking
layers into snapshots, mounting containers' root file systems, and garbage collection.

The parts, each usable alone:

- ``store``: ``ImageStore``, which ties the rest together, and ``Image``;
- ``registry``: the distribution API client (auth, retries, resumable verified downloads);
- ``reference``, ``platforms``, ``manifest``, ``digest``, ``auth``, ``policy``: pure code for
  references, platform choice, manifests and configs, digests, registry auth and
  ``imagePullSecrets``, ``imagePullPolicy``;
- ``blobs``, ``layers``, ``archive``, ``index``: the content-addressed blob store, layer
  unpacking with whiteouts, ``docker save``/OCI archive import, the image index;
- ``mount``: overlay mounts of a container's root file system;
- ``cli``: the ``outpost image`` commands.
"""

from edge.images.auth import Credentials, credentials_for
from edge.images.errors import (
    ArchiveError,
    AuthenticationError,
    DigestMismatchError,
    ImageError,
    ImageNeverPullError,
    ImageNotFoundError,
    InvalidLayerError,
    InvalidReferenceError,
    InvalidSecretError,
    ManifestError,
    NoSuchImageError,
    PullError,
    RegistryUnavailableError,
    StorageFullError,
    UnsupportedImageError,
)
from edge.images.index import Image, Layer
from edge.images.manifest import ImageConfig
from edge.images.mount import mount_rootfs
from edge.images.platforms import Platform, host_platform
from edge.images.policy import PullPolicy, RetryPolicy, pull_policy, should_pull
from edge.images.reference import Reference, normalize
from edge.images.store import DEFAULT_BUDGET_BYTES, GcResult, ImageStore

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "ArchiveError",
    "AuthenticationError",
    "Credentials",
    "DigestMismatchError",
    "GcResult",
    "Image",
    "ImageConfig",
    "ImageError",
    "ImageNeverPullError",
    "ImageNotFoundError",
    "ImageStore",
    "InvalidLayerError",
    "InvalidReferenceError",
    "InvalidSecretError",
    "Layer",
    "ManifestError",
    "NoSuchImageError",
    "Platform",
    "PullError",
    "PullPolicy",
    "Reference",
    "RegistryUnavailableError",
    "RetryPolicy",
    "StorageFullError",
    "UnsupportedImageError",
    "credentials_for",
    "host_platform",
    "mount_rootfs",
    "normalize",
    "pull_policy",
    "should_pull",
]
