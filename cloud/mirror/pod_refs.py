"""What a pod needs on its node, read from its spec: the ConfigMaps and Secrets it refers to,
the service-account tokens it projects, and whether it already tolerates a node going away.

Pure functions over the pod as a dict (the API's JSON shape), so they are tested without
Kubernetes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# The kubelet's default for a projected token that does not say (and the API's minimum is 600).
DEFAULT_TOKEN_SECONDS = 3600
# The taints the node lifecycle controller puts on a node it cannot hear from.
OFFLINE_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")

# (kind, name) in the pod's namespace; kind is "ConfigMap" or "Secret".
Ref = tuple[str, str]
# (audience, expirationSeconds); the audience "" means the apiserver's own.
TokenSpec = tuple[str, int]

# Metadata the edge uses; the rest (managedFields above all) would only cost bytes.
_POD_METADATA = (
    "name",
    "namespace",
    "uid",
    "generateName",
    "labels",
    "annotations",
    "ownerReferences",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
# Not the resourceVersion: it travels beside the body, and a body that carried it would differ
# after every status write, sending the pod to its node again for nothing.
_OBJECT_METADATA = ("name", "namespace", "uid", "labels", "annotations")


def _containers(spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for group in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(group) or ()


def references(pod: Mapping[str, Any]) -> frozenset[Ref]:
    """Every ConfigMap and Secret the pod's volumes, env, envFrom and imagePullSecrets name."""
    spec = pod.get("spec") or {}
    refs: set[Ref] = set()
    for volume in spec.get("volumes") or ():
        if (cm := volume.get("configMap")) and cm.get("name"):
            refs.add(("ConfigMap", cm["name"]))
        if (secret := volume.get("secret")) and secret.get("secretName"):
            refs.add(("Secret", secret["secretName"]))
        for source in (volume.get("projected") or {}).get("sources") or ():
            if (cm := source.get("configMap")) and cm.get("name"):
                refs.add(("ConfigMap", cm["name"]))
            if (secret := source.get("secret")) and secret.get("name"):
                refs.add(("Secret", secret["name"]))
    for container in _containers(spec):
        for env in container.get("env") or ():
            value_from = env.get("valueFrom") or {}
            if (cm := value_from.get("configMapKeyRef")) and cm.get("name"):
                refs.add(("ConfigMap", cm["name"]))
            if (secret := value_from.get("secretKeyRef")) and secret.get("name"):
                refs.add(("Secret", secret["name"]))
        for env_from in container.get("envFrom") or ():
            if (cm := env_from.get("configMapRef")) and cm.get("name"):
                refs.add(("ConfigMap", cm["name"]))
            if (secret := env_from.get("secretRef")) and secret.get("name"):
                refs.add(("Secret", secret["name"]))
    for pull in spec.get("imagePullSecrets") or ():
        if pull.get("name"):
            refs.add(("Secret", pull["name"]))
    return frozenset(refs)


def token_specs(pod: Mapping[str, Any]) -> frozenset[TokenSpec]:
    """The service-account tokens the pod's projected volumes ask for."""
    specs = set()
    for volume in (pod.get("spec") or {}).get("volumes") or ():
        for source in (volume.get("projected") or {}).get("sources") or ():
            token = source.get("serviceAccountToken")
            if token is not None:
                specs.add(
                    (
                        token.get("audience") or "",
                        int(token.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS),
                    )
                )
    return frozenset(specs)


def pod_body(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod as the edge receives it: the metadata it uses and the whole spec."""
    meta = pod.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {k: meta[k] for k in _POD_METADATA if meta.get(k) is not None},
        "spec": pod.get("spec") or {},
    }


def object_body(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """A ConfigMap or Secret as the edge receives it."""
    meta = obj.get("metadata") or {}
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {k: meta[k] for k in _OBJECT_METADATA if meta.get(k) is not None},
    }
    if kind == "ConfigMap":
        body["data"] = obj.get("data") or {}
        body["binaryData"] = obj.get("binaryData") or {}
    else:
        body["type"] = obj.get("type") or "Opaque"
        body["data"] = obj.get("data") or {}
    return body


def autonomous_tolerations(pod: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The pod's tolerations with an unlimited NoExecute toleration of the offline taints, or
    None when it has that already.

    Adding a toleration is not enough: the taint manager evicts after the shortest
    ``tolerationSeconds`` among the matching tolerations, and the DefaultTolerationSeconds
    admission plugin gives every pod a 300 s one. So those lose their limit (an update the
    apiserver allows on a running pod), and missing ones are added.
    """
    tolerations = [dict(t) for t in (pod.get("spec") or {}).get("tolerations") or ()]
    changed = False
    for taint in OFFLINE_TAINTS:
        matching = [t for t in tolerations if _tolerates(t, taint)]
        if not matching:
            tolerations.append({"key": taint, "operator": "Exists", "effect": "NoExecute"})
            changed = True
            continue
        for toleration in matching:
            if toleration.get("tolerationSeconds") is not None:
                del toleration["tolerationSeconds"]
                changed = True
    return tolerations if changed else None


def _tolerates(toleration: Mapping[str, Any], taint: str) -> bool:
    """Whether ``toleration`` matches the NoExecute ``taint`` (which has no value)."""
    if toleration.get("effect") not in (None, "", "NoExecute"):
        return False
    key = toleration.get("key") or ""
    operator = toleration.get("operator") or "Equal"
    if key == "":
        return operator == "Exists"
    return key == taint and (operator == "Exists" or not toleration.get("value"))
