"""Image references: ``[registry/]repository[:tag][@digest]``, as Docker and Kubernetes read them.

The grammar is distribution's (``github.com/distribution/reference``): the first path component
is a registry when it contains ``.`` or ``:``, is ``localhost``, or has upper-case letters;
otherwise the image is on Docker Hub, where one-component names live under ``library/``. A
reference with neither tag nor digest means ``:latest``.

Only sha256 digests are accepted: it is the one algorithm registries use, and the blob store is
laid out by it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge.images.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
# Docker Hub's names for itself; its API lives on a host of its own.
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"\w[\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference. ``str()`` gives its canonical form, which the store keys images by:
    ``docker.io/library/busybox:latest``, ``127.0.0.1:5000/app@sha256:…``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``text``, or raise ``InvalidReferenceError`` saying what is wrong with it."""
        rest, digest = text, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not _DIGEST.fullmatch(digest):
                raise InvalidReferenceError(
                    f"{text!r}: {digest!r} is not a sha256 digest (sha256: and 64 lower-case hex"
                    " digits)"
                )
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise InvalidReferenceError(
                    f"{text!r}: {tag!r} is not a valid tag (letters, digits, '_', '.', '-';"
                    " at most 128 characters, not starting with '.' or '-')"
                )
        first, _, remainder = rest.partition("/")
        if remainder and (
            "." in first or ":" in first or first == "localhost" or first.lower() != first
        ):
            registry, path = first, remainder
            if not _DOMAIN.fullmatch(registry):
                raise InvalidReferenceError(f"{text!r}: {registry!r} is not a valid registry host")
        else:
            registry, path = DOCKER_HUB, rest
        if registry in _HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in path:
                path = f"library/{path}"
        if not path or not all(_COMPONENT.fullmatch(part) for part in path.split("/")):
            raise InvalidReferenceError(
                f"{text!r}: the repository name {path!r} must be lower-case letters and digits,"
                " separated by '/', '.', '_', '__' or '-'"
            )
        if len(registry) + 1 + len(path) > _MAX_NAME:
            raise InvalidReferenceError(f"{text!r}: the name is longer than {_MAX_NAME} characters")
        return cls(registry, path, tag, digest)

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host (and port) that serves the registry API for this reference."""
        return _HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def target(self) -> str:
        """What to ask ``/v2/<repository>/manifests/`` for: the digest when there is one, since
        it pins the content, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        if self.digest and not self.tag:
            return f"{self.name}@{self.digest}"
        text = f"{self.name}:{self.tag or DEFAULT_TAG}"
        return f"{text}@{self.digest}" if self.digest else text


def normalize(text: str) -> str:
    """The canonical form of a reference: ``busybox`` → ``docker.io/library/busybox:latest``."""
    return str(Reference.parse(text))
