"""What can go wrong with images, as exceptions a caller can tell apart.

Every exception here is an ``ImageError``. A pod runtime reports any ``ImageError`` from a pull
as ``ErrImagePull`` and retries later with its own backoff (``ImagePullBackOff``);
``RegistryUnavailableError`` says that the registry itself could not be reached after this
module's own bounded retries, which is the case worth telling apart in events and metrics.
"""

from __future__ import annotations


class ImageError(Exception):
    """An image operation failed; the message says which image, where, and why."""


class InvalidReferenceError(ImageError, ValueError):
    """An image reference that does not parse (``name[:tag][@digest]``)."""


class PullError(ImageError):
    """A pull from a registry failed."""


class RegistryUnavailableError(PullError):
    """The registry did not answer (connection refused, timeouts, 5xx) after every retry."""

    def __init__(self, message: str, *, registry: str, attempts: int) -> None:
        super().__init__(message)
        self.registry = registry
        self.attempts = attempts


class AuthenticationError(PullError):
    """The registry refused the credentials, or wants credentials that were not given."""


class ImageNotFoundError(PullError):
    """The registry has no such repository, tag or digest."""


class UnsupportedImageError(PullError):
    """The image exists but cannot run here: no manifest for this platform, a manifest or layer
    format this runtime does not read."""


class ManifestError(PullError):
    """A manifest, index or image config that is not valid JSON of the expected shape."""


class DigestMismatchError(ImageError):
    """Content does not match the digest (or size) it was announced with: corrupted in transit
    or on disk, or tampered with. Nothing of it is kept."""


class StorageFullError(ImageError):
    """The disk filled up while writing an image; what was stored before is intact."""


class ImageNeverPullError(ImageError):
    """``imagePullPolicy: Never`` and the image is not in the store (``ErrImageNeverPull``)."""


class InvalidSecretError(ImageError, ValueError):
    """An ``imagePullSecrets`` Secret whose data is not a valid Docker config."""


class ArchiveError(ImageError):
    """An image archive (``docker save`` or OCI archive) that cannot be imported."""


class NoSuchImageError(ImageError, LookupError):
    """The store holds no image under that reference."""


class InvalidLayerError(ImageError):
    """A layer that cannot be unpacked: not a tar archive, compressed in a way Outpost does not
    read, or with entries that would write outside the layer (``..``, through a symlink)."""
