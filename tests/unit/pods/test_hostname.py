"""A pod's hostname and FQDN, as the kubelet gives them."""

from __future__ import annotations

from typing import Any

from edge.pods.hostname import pod_hostname


def make_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "plant-gw", "namespace": "site-1", "uid": "0a1b-2c3d"},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
    }


def test_hostname_rules() -> None:
    pod = make_pod()
    assert pod_hostname(pod, node_hostname="gw") == ("plant-gw", "plant-gw", "")
    pod["spec"].update(hostname="h", subdomain="sub")
    assert pod_hostname(pod, node_hostname="gw") == ("h", "h", "h.sub.site-1.svc.cluster.local")
    pod["spec"]["setHostnameAsFQDN"] = True
    assert pod_hostname(pod, node_hostname="gw").hostname == "h.sub.site-1.svc.cluster.local"
    pod["spec"]["hostNetwork"] = True
    assert pod_hostname(pod, node_hostname="gw") == ("gw", "gw", "")
    long = make_pod()
    long["metadata"]["name"] = "a" * 62 + "-b"
    assert pod_hostname(long, node_hostname="gw").hostname == "a" * 62
