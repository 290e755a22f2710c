"""The downward API: which pod fields and container resources a pod may read, and their
values, for environment variables (``fieldRef``, ``resourceFieldRef``) and volumes alike.

``field_value`` and ``resource_value`` answer as the kubelet does, from the manifest and what a
``Resolver`` knows of the node; labels and annotations as a whole become ``key="value"`` lines
quoted as Go quotes them, so that a file reads the same as on a Kubernetes node.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from edge.pods.containers import get_container
from edge.pods.quantity import ceil_scaled, manifest_quantity
from edge.pods.resolver import ContainerConfigError, Resolver
from edge.pods.resources import container_resources

# Downward API field paths, as the apiserver allows them (labels and annotations as a whole
# only in volumes, where they become a file of key="value" lines).
ENV_FIELD_PATHS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "metadata.uid",
        "spec.nodeName",
        "spec.serviceAccountName",
        "status.hostIP",
        "status.hostIPs",
        "status.podIP",
        "status.podIPs",
    }
)
VOLUME_FIELD_PATHS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "metadata.uid",
        "metadata.labels",
        "metadata.annotations",
    }
)
_SUBSCRIPTABLE = frozenset({"metadata.labels", "metadata.annotations"})
RESOURCE_FIELDS = frozenset(
    {
        "limits.cpu",
        "limits.memory",
        "limits.ephemeral-storage",
        "requests.cpu",
        "requests.memory",
        "requests.ephemeral-storage",
    }
)
# The divisors a resourceFieldRef may name.
CPU_DIVISORS = frozenset({Decimal("0.001"), Decimal(1)})
BYTE_DIVISORS = frozenset(
    {Decimal(1)} | {Decimal(1000**n) for n in range(1, 7)} | {Decimal(1024**n) for n in range(1, 7)}
)


def split_field_path(path: str) -> tuple[str, str | None]:
    """``metadata.labels['app']`` → (``metadata.labels``, ``app``); other paths → (path, None)."""
    if path.endswith("']") and "['" in path:
        base, key = path[:-2].split("['", 1)
        if base:
            return base, key
    return path, None


def field_path_allowed(path: str, *, volume: bool) -> bool:
    """Whether the downward API offers ``path`` in an env var (or, ``volume=True``, a file)."""
    base, key = split_field_path(path)
    if key is not None:
        return base in _SUBSCRIPTABLE
    return path in (VOLUME_FIELD_PATHS if volume else ENV_FIELD_PATHS)


def field_value(pod: Mapping[str, Any], path: str, resolver: Resolver) -> str:
    """The value of a downward API ``fieldRef`` (the caller checked the path is allowed)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    base, key = split_field_path(path)
    if key is not None:
        return str((meta.get(base.split(".", 1)[1]) or {}).get(key, ""))
    match path:
        case "metadata.name":
            return str(meta.get("name", ""))
        case "metadata.namespace":
            return str(meta.get("namespace") or "default")
        case "metadata.uid":
            return str(meta.get("uid", ""))
        case "metadata.labels" | "metadata.annotations":
            return format_map(meta.get(path.split(".", 1)[1]) or {})
        case "spec.nodeName":
            return str(spec.get("nodeName") or resolver.node_name)
        case "spec.serviceAccountName":
            return str(spec.get("serviceAccountName") or "")
        case "status.hostIP":
            return resolver.host_ips[0] if resolver.host_ips else ""
        case "status.hostIPs":
            return ",".join(resolver.host_ips)
        case "status.podIP":
            return resolver.pod_ips[0] if resolver.pod_ips else ""
        case "status.podIPs":
            return ",".join(resolver.pod_ips)
    raise ContainerConfigError(f"the downward API has no field {path!r}")


def resource_value(
    pod: Mapping[str, Any], container_name: str, resource: str, divisor: Any, resolver: Resolver
) -> str:
    """The value of a downward API ``resourceFieldRef``, as the kubelet computes it.

    The quantity divided by ``divisor`` (default 1), rounded up; a limit the container does
    not set reads as the node's allocatable amount.
    """
    try:
        container = get_container(pod, container_name)
    except KeyError as exc:
        raise ContainerConfigError(str(exc.args[0])) from exc
    kind, name = resource.split(".", 1)
    requests, limits = container_resources(container)
    if kind == "limits":
        quantity = limits.get(name)
        if quantity is None and name in resolver.node_allocatable:
            quantity = manifest_quantity(resolver.node_allocatable[name])
        if quantity is None:
            raise ContainerConfigError(
                f"container {container_name!r} sets no {resource} and the node's allocatable"
                f" {name} is not known, so the downward API cannot report it"
            )
    else:
        quantity = requests.get(name, Decimal(0))
    per = manifest_quantity(divisor if divisor not in (None, "") else "1")
    if per <= 0:
        raise ContainerConfigError(f"divisor {divisor!r} for {resource} must be positive")
    # CPU in millicores, the rest in units, as the kubelet's MilliValue()/Value().
    scale = 3 if name == "cpu" else 0
    numerator = ceil_scaled(quantity, scale)
    denominator = ceil_scaled(per, scale)
    return str(-(-numerator // denominator))


def format_map(values: Mapping[str, Any]) -> str:
    """Labels or annotations as the downward API writes them: sorted ``key="value"`` lines."""
    return "\n".join(f"{key}={go_quote(str(values[key]))}" for key in sorted(values))


_GO_ESCAPES = {
    "\a": r"\a",
    "\b": r"\b",
    "\f": r"\f",
    "\n": r"\n",
    "\r": r"\r",
    "\t": r"\t",
    "\v": r"\v",
    "\\": r"\\",
    '"': r"\"",
}


def go_quote(text: str) -> str:
    """``text`` quoted as Go's ``%q`` does, so downward API files match the kubelet's."""
    out = ['"']
    for char in text:
        if char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    out.append('"')
    return "".join(out)
