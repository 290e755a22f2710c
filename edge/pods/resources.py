"""A container's resource requests and limits, and the pod's QoS class, by Kubernetes' rules."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NamedTuple

from edge.pods.containers import all_containers
from edge.pods.quantity import manifest_quantity


class Resources(NamedTuple):
    """A container's requests and limits as exact values, requests defaulted from limits."""

    requests: dict[str, Decimal]
    limits: dict[str, Decimal]


def container_resources(container: Mapping[str, Any]) -> Resources:
    """Requests and limits, with a missing request taken from the limit.

    The apiserver applies that default; a manifest applied offline has not been through it,
    and a limit without a request must not leave the container with the smallest CPU share.
    """
    resources = container.get("resources") or {}
    limits = {k: manifest_quantity(v) for k, v in (resources.get("limits") or {}).items()}
    requests = {k: manifest_quantity(v) for k, v in (resources.get("requests") or {}).items()}
    for name, limit in limits.items():
        requests.setdefault(name, limit)
    return Resources(requests, limits)


def qos_class(pod: Mapping[str, Any]) -> str:
    """``Guaranteed``, ``Burstable`` or ``BestEffort``, by Kubernetes' rules (cpu and memory)."""
    containers = all_containers(pod)
    any_set = False
    guaranteed = True
    for container in containers:
        requests, limits = container_resources(container)
        for resource in ("cpu", "memory"):
            if requests.get(resource) or limits.get(resource):
                any_set = True
            if resource not in limits or requests.get(resource) != limits[resource]:
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"
