"""A pod manifest's containers, found by name, and the pod's name in messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def all_containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The pod's init containers, then its containers (each a manifest dict)."""
    spec = pod.get("spec") or {}
    return [*(spec.get("initContainers") or ()), *(spec.get("containers") or ())]


def get_container(pod: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The (init) container called ``name``; ``KeyError`` naming the pod if there is none."""
    for container in all_containers(pod):
        if container.get("name") == name:
            return container
    raise KeyError(f"pod {namespaced_name(pod)} has no container named {name!r}")


def namespaced_name(pod: Mapping[str, Any]) -> str:
    """``namespace/name``, as Kubernetes names a pod in messages (its store key is
    ``edge.wire.keys.pod_key``)."""
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or '?'}"
