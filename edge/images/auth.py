"""Registry authentication, without I/O: credentials, ``WWW-Authenticate`` challenges, token
answers, and credentials from Kubernetes ``imagePullSecrets``.

A registry answers an unauthenticated request with 401 and a challenge. ``Basic`` means: send
the username and password with every request. ``Bearer realm=…,service=…,scope=…`` means: ask
the token service at ``realm`` (with the username and password, or anonymously) for a token
for ``scope``, then send ``Authorization: Bearer <token>``. ``edge.images.registry`` runs that
exchange; this module only reads and writes its parts.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from edge.images.errors import InvalidSecretError
from edge.images.reference import DOCKER_HUB, Reference

DOCKERCONFIGJSON_KEY = ".dockerconfigjson"
DOCKERCFG_KEY = ".dockercfg"
_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_SCHEME = re.compile(rf"\s*({_TOKEN})(?=\s|$|,)")
# Values are quoted strings or, leniently (some servers send unquoted URLs), any run of
# characters up to the next comma or space.
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))\s*(?:,|$)')
_COMMA = re.compile(r"\s*,")


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password (or token used as a password) for one registry."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: the scheme, lower-cased, and its
    parameters (names lower-cased, values unquoted)."""

    scheme: str
    params: Mapping[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in a ``WWW-Authenticate`` value (RFC 7235), in order.

    ``Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"``
    gives one Challenge; a value the grammar does not allow gives what parsed before it.
    """
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        if match := _COMMA.match(header, pos):
            pos = match.end()
            continue
        scheme = _SCHEME.match(header, pos)
        if scheme is None:
            break
        pos = scheme.end()
        params: dict[str, str] = {}
        while param := _PARAM.match(header, pos):
            name, quoted, plain = param.groups()
            params[name.lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else plain
            pos = param.end()
        challenges.append(Challenge(scheme.group(1).lower(), params))
    return challenges


def token_params(challenge: Challenge, repository: str) -> dict[str, str]:
    """The query for the token service; the scope defaults to pulling ``repository`` when the
    challenge names none (a registry's answer to ``/v2/`` has no scope)."""
    params = {"scope": challenge.params.get("scope") or f"repository:{repository}:pull"}
    if "service" in challenge.params:
        params["service"] = challenge.params["service"]
    return params


def parse_token_response(body: bytes) -> str:
    """The token in a token service's JSON answer: the Docker token spec calls it ``token``,
    OAuth2 ``access_token``. (Its lifetime does not matter: a registry that rejects an expired
    token answers 401 with a fresh challenge.)"""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the token service's answer is not JSON: {exc}") from exc
    token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
    if not isinstance(token, str) or not token:
        raise ValueError("the token service's answer carries no 'token'")
    return token


def basic_header(credentials: Credentials) -> str:
    """``Authorization`` value for basic auth."""
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


# -- imagePullSecrets ----------------------------------------------------------------------------


def _decode_value(value: str | bytes, key: str) -> bytes:
    """Secret ``data`` values are base64 strings (as the API serves them); bytes are taken as
    already decoded."""
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidSecretError(f"secret data {key!r} is not base64: {exc}") from exc


def _auths(data: Mapping[str, str | bytes]) -> dict[str, Any]:
    """The ``auths`` map of a ``kubernetes.io/dockerconfigjson`` (or legacy ``dockercfg``)
    Secret's data; empty for other Secrets."""
    for key in (DOCKERCONFIGJSON_KEY, DOCKERCFG_KEY):
        if key not in data:
            continue
        try:
            doc = json.loads(_decode_value(data[key], key))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidSecretError(f"secret data {key!r} is not JSON: {exc}") from exc
        auths = doc.get("auths") if key == DOCKERCONFIGJSON_KEY and isinstance(doc, dict) else doc
        if not isinstance(auths, dict):
            raise InvalidSecretError(f"secret data {key!r} has no 'auths' object")
        return auths
    return {}


def _entry_credentials(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    username, password = entry.get("username"), entry.get("password")
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            username, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
    if isinstance(username, str) and isinstance(password, str) and username:
        return Credentials(username, password)
    return None


def _key_parts(key: str) -> tuple[str, str]:
    """``(host[:port], path)`` of a key of ``auths``: a host, ``host/path`` or a URL."""
    parts = urlsplit(key if "://" in key else f"//{key}")
    host = (parts.netloc or "").lower()
    path = parts.path.strip("/")
    if host in _HUB_HOSTS:
        host = DOCKER_HUB
    # ``https://index.docker.io/v1/`` and the like name the API version, not a repository.
    if path in ("v1", "v2"):
        path = ""
    return host, path


def _host_matches(pattern: str, host: str) -> bool:
    """Kubelet's rule: hosts match label by label, ``*`` matching one label; ports must agree."""
    pattern_host, _, pattern_port = pattern.partition(":")
    name, _, port = host.partition(":")
    labels, wanted = pattern_host.split("."), name.split(".")
    if pattern_port != port or len(labels) != len(wanted):
        return False
    return all(p in ("*", w) for p, w in zip(labels, wanted, strict=True))


def credentials_for(
    image: str | Reference, secrets: Iterable[Mapping[str, str | bytes]]
) -> Credentials | None:
    """The credentials that the Secrets' data (a pod's ``imagePullSecrets``, in order) hold
    for ``image``, or None.

    Keys match as the kubelet matches them: by host (``*.example.com`` globs one label),
    port, and path prefix of the repository; the most specific key wins, and among equals
    the first Secret. Docker Hub answers to ``docker.io``, ``index.docker.io`` and
    ``https://index.docker.io/v1/``. Raises ``InvalidSecretError`` for a Secret whose data is
    malformed, naming the key.
    """
    ref = image if isinstance(image, Reference) else Reference.parse(image)
    best: tuple[int, Credentials] | None = None
    for data in secrets:
        for key, entry in _auths(data).items():
            host, path = _key_parts(key)
            if not _host_matches(host, ref.registry):
                continue
            if path and not (ref.repository == path or ref.repository.startswith(path + "/")):
                continue
            creds = _entry_credentials(entry)
            specificity = len(path) * 2 + ("*" not in host)
            if creds is not None and (best is None or specificity > best[0]):
                best = (specificity, creds)
    return None if best is None else best[1]
