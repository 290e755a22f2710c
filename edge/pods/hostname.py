"""A pod's hostname and fully qualified name, as the kubelet gives them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class PodHostname(NamedTuple):
    """A pod's names: ``hostname`` is what its containers' UTS namespace gets, ``short`` the
    name without a domain, ``fqdn`` the fully qualified one ("" without ``spec.subdomain``).
    """

    hostname: str
    short: str
    fqdn: str


def pod_hostname(
    pod: Mapping[str, Any], *, node_hostname: str, cluster_domain: str = "cluster.local"
) -> PodHostname:
    """The kubelet's hostname for a pod: ``spec.hostname`` or the pod name, cut to 63
    characters; ``hostname.subdomain.namespace.svc.<domain>`` when ``spec.subdomain`` is set;
    the node's hostname with ``hostNetwork``.
    """
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    if spec.get("hostNetwork"):
        return PodHostname(node_hostname, node_hostname, "")
    name = str(spec.get("hostname") or meta.get("name") or "")
    if len(name) > 63:
        name = name[:63].rstrip("-.")
    fqdn = ""
    if spec.get("subdomain"):
        namespace = meta.get("namespace") or "default"
        fqdn = f"{name}.{spec['subdomain']}.{namespace}.svc.{cluster_domain}"
    if fqdn and spec.get("setHostnameAsFQDN"):
        return PodHostname(fqdn, name, fqdn)
    return PodHostname(name, name, fqdn)
