"""What the node holds that a pod refers to: its ConfigMaps, Secrets, service-account tokens,
IP addresses and allocatable resources, as plain data (``Resolver``); which of those objects a
pod uses (``referenced_objects``); and the error for a container the node cannot configure yet.

Environment variables (``configMapKeyRef``, ``secretKeyRef``, ``envFrom``) and volumes alike
read objects through a ``Resolver``; the downward API (``edge.pods.downward``) reads its fields.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge.pods.containers import all_containers
from edge.wire.keys import TOKEN_KIND


class ContainerConfigError(Exception):
    """A container cannot be configured from what the node holds.

    Kubernetes reports this as the waiting reason ``CreateContainerConfigError`` (a ConfigMap or
    Secret key that is missing, say); the supervisor reports it the same way and retries when
    the objects change.
    """

    reason = "CreateContainerConfigError"


@dataclass(frozen=True)
class Resolver:
    """What the node holds that a pod refers to, as plain data.

    ``configmaps`` and ``secrets`` map an object's name (in the pod's namespace) to the object
    as the API returns it: a ConfigMap's ``data`` (text) and ``binaryData`` (base64), a
    Secret's ``data`` (base64) and, for manifests applied offline, ``stringData`` (text).
    ``node_allocatable`` holds quantities (``{"cpu": "4", "memory": "8Gi"}``): the downward API
    answers with them for limits a container did not set, as the kubelet does.
    """

    configmaps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    secrets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    node_name: str = ""
    host_ips: Sequence[str] = ()
    pod_ips: Sequence[str] = ()
    node_allocatable: Mapping[str, str] = field(default_factory=dict)
    # The pod's ServiceAccountToken object (its ``tokens`` list), as the cloud sends it;
    # ``None`` in standalone mode, where no cloud mints tokens.
    tokens: Mapping[str, Any] | None = None

    def configmap(self, name: str, *, binary: bool = True) -> dict[str, bytes] | None:
        """The ConfigMap's keys and values, or ``None`` if the node does not have it.

        ``binary=False`` leaves out ``binaryData``: environment variables come from ``data``
        only, as in Kubernetes.
        """
        obj = self.configmaps.get(name)
        if obj is None:
            return None
        values = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        if binary:
            for key, encoded in (obj.get("binaryData") or {}).items():
                values[key] = _b64decode(encoded, f"ConfigMap {name!r} binaryData key {key!r}")
        return values

    def secret(self, name: str) -> dict[str, bytes] | None:
        """The Secret's keys and decoded values, or ``None`` if the node does not have it."""
        obj = self.secrets.get(name)
        if obj is None:
            return None
        values = {
            k: _b64decode(v, f"Secret {name!r} key {k!r}")
            for k, v in (obj.get("data") or {}).items()
        }
        for key, text in (obj.get("stringData") or {}).items():
            values[key] = str(text).encode()
        return values

    def token(self, pod_uid: str, audience: str, expiration_s: int) -> bytes | None:
        """The service-account token the cloud minted for this pod (``pod_uid``: a token of a
        deleted pod of the same name must not be handed to its successor), this audience and
        lifetime; ``None`` until it arrives."""
        if self.tokens is None or (self.tokens.get("metadata") or {}).get("uid") != pod_uid:
            return None
        for entry in self.tokens.get("tokens") or ():
            if (entry.get("audience") or "") == audience and entry.get(
                "expirationSeconds", DEFAULT_TOKEN_EXPIRATION_S
            ) == expiration_s:
                return str(entry.get("token", "")).encode()
        return None


DEFAULT_TOKEN_EXPIRATION_S = 3600


def referenced_objects(pod: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The ``(kind, name)`` of every object in its namespace the pod uses: ConfigMaps and
    Secrets of its volumes, environment and image pull secrets, and its ServiceAccountToken
    object (named after the pod) when a projected volume asks for a token. A change to one of
    them may let a waiting container start, or change a volume's files."""
    spec = pod.get("spec") or {}
    found: set[tuple[str, str]] = set()
    for volume in spec.get("volumes") or ():
        if volume.get("configMap") is not None:
            found.add(("ConfigMap", volume["configMap"].get("name") or ""))
        if volume.get("secret") is not None:
            found.add(("Secret", volume["secret"].get("secretName") or ""))
        for source in (volume.get("projected") or {}).get("sources") or ():
            if source.get("configMap") is not None:
                found.add(("ConfigMap", source["configMap"].get("name") or ""))
            if source.get("secret") is not None:
                found.add(("Secret", source["secret"].get("name") or ""))
            if source.get("serviceAccountToken") is not None:
                found.add((TOKEN_KIND, (pod.get("metadata") or {}).get("name") or ""))
    for container in all_containers(pod):
        for source in container.get("envFrom") or ():
            if source.get("configMapRef") is not None:
                found.add(("ConfigMap", source["configMapRef"].get("name") or ""))
            if source.get("secretRef") is not None:
                found.add(("Secret", source["secretRef"].get("name") or ""))
        for env in container.get("env") or ():
            value_from = env.get("valueFrom") or {}
            if value_from.get("configMapKeyRef") is not None:
                found.add(("ConfigMap", value_from["configMapKeyRef"].get("name") or ""))
            if value_from.get("secretKeyRef") is not None:
                found.add(("Secret", value_from["secretKeyRef"].get("name") or ""))
    for secret in spec.get("imagePullSecrets") or ():
        found.add(("Secret", secret.get("name") or ""))
    return found


def _b64decode(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ContainerConfigError(f"{what} is not valid base64: {exc}") from exc
