"""What the edge controller reads from a pod spec: the ConfigMaps and Secrets a node must hold
for it, the tokens it projects, the bodies sent to the edge, and the tolerations that keep a pod
on a gateway that goes offline."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cloud.mirror.pod_refs import (
    autonomous_tolerations,
    object_body,
    pod_body,
    references,
    token_specs,
)

UNREACHABLE = "node.kubernetes.io/unreachable"
NOT_READY = "node.kubernetes.io/not-ready"


def pod(spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u", **metadata},
        "spec": spec,
    }


# -- references ------------------------------------------------------------------------------


def test_every_way_a_pod_names_a_configmap_or_secret_is_found() -> None:
    spec = {
        "volumes": [
            {"name": "v1", "configMap": {"name": "cm-volume"}},
            {"name": "v2", "secret": {"secretName": "secret-volume"}},
            {
                "name": "v3",
                "projected": {
                    "sources": [
                        {"configMap": {"name": "cm-projected"}},
                        {"secret": {"name": "secret-projected"}},
                        {"serviceAccountToken": {"path": "token"}},
                        {"downwardAPI": {"items": []}},
                    ]
                },
            },
            {"name": "v4", "emptyDir": {}},
            {"name": "v5", "persistentVolumeClaim": {"claimName": "claim"}},
        ],
        "initContainers": [
            {
                "name": "init",
                "env": [
                    {
                        "name": "A",
                        "valueFrom": {"configMapKeyRef": {"name": "cm-init-env", "key": "k"}},
                    }
                ],
            }
        ],
        "containers": [
            {
                "name": "main",
                "env": [
                    {"name": "PLAIN", "value": "x"},
                    {
                        "name": "B",
                        "valueFrom": {"secretKeyRef": {"name": "secret-env", "key": "k"}},
                    },
                    {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                ],
                "envFrom": [
                    {"configMapRef": {"name": "cm-envfrom"}},
                    {"secretRef": {"name": "secret-envfrom"}, "prefix": "S_"},
                ],
            }
        ],
        "ephemeralContainers": [
            {"name": "debug", "envFrom": [{"secretRef": {"name": "secret-ephemeral"}}]}
        ],
        "imagePullSecrets": [{"name": "registry"}],
    }
    assert references(pod(spec)) == {
        ("ConfigMap", "cm-volume"),
        ("Secret", "secret-volume"),
        ("ConfigMap", "cm-projected"),
        ("Secret", "secret-projected"),
        ("ConfigMap", "cm-init-env"),
        ("Secret", "secret-env"),
        ("ConfigMap", "cm-envfrom"),
        ("Secret", "secret-envfrom"),
        ("Secret", "secret-ephemeral"),
        ("Secret", "registry"),
    }


def test_optional_references_are_still_references() -> None:
    spec = {
        "volumes": [{"name": "v", "secret": {"secretName": "maybe", "optional": True}}],
        "containers": [
            {"name": "c", "envFrom": [{"configMapRef": {"name": "perhaps", "optional": True}}]}
        ],
    }
    assert references(pod(spec)) == {("Secret", "maybe"), ("ConfigMap", "perhaps")}


def test_a_secret_named_only_outside_the_spec_is_not_a_reference() -> None:
    p = pod(
        {"containers": [{"name": "c", "image": "secret-image", "args": ["--secret=other"]}]},
        annotations={"example.com/secret": "in-annotation"},
        labels={"secret": "in-label"},
    )
    p["status"] = {"message": "Secret missing"}
    assert references(p) == frozenset()


def test_a_pod_without_a_spec_refers_to_nothing() -> None:
    assert references({"metadata": {"name": "p"}}) == frozenset()
    assert references(pod({"volumes": None, "containers": None})) == frozenset()


def test_the_same_object_named_twice_is_one_reference() -> None:
    spec = {
        "volumes": [{"name": "v", "secret": {"secretName": "s"}}],
        "containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "s"}}]}],
        "imagePullSecrets": [{"name": "s"}],
    }
    assert references(pod(spec)) == {("Secret", "s")}


def test_a_configmap_and_a_secret_of_the_same_name_are_two_references() -> None:
    spec = {
        "volumes": [
            {"name": "a", "configMap": {"name": "same"}},
            {"name": "b", "secret": {"secretName": "same"}},
        ]
    }
    assert references(pod(spec)) == {("ConfigMap", "same"), ("Secret", "same")}


# -- token_specs -----------------------------------------------------------------------------


def test_the_kube_api_access_projection_asks_for_one_3607_second_apiserver_token() -> None:
    # As the ServiceAccount admission plugin writes it into every pod.
    kube_api_access = {
        "name": "kube-api-access-abcde",
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
        },
    }
    p = pod({"volumes": [kube_api_access], "containers": [{"name": "c"}]})
    assert token_specs(p) == {("", 3607)}
    assert references(p) == {("ConfigMap", "kube-root-ca.crt")}


def test_a_token_without_audience_or_expiry_gets_the_defaults() -> None:
    p = pod({"volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {}}]}}]})
    assert token_specs(p) == {("", 3600)}


def test_tokens_for_several_audiences_are_all_asked_for_and_duplicates_once() -> None:
    sources = [
        {"serviceAccountToken": {"audience": "vault", "expirationSeconds": 600, "path": "a"}},
        {"serviceAccountToken": {"audience": "vault", "expirationSeconds": 600, "path": "b"}},
        {"serviceAccountToken": {"audience": "s3", "path": "c"}},
    ]
    p = pod(
        {
            "volumes": [
                {"name": "one", "projected": {"sources": sources[:2]}},
                {"name": "two", "projected": {"sources": sources[2:]}},
            ]
        }
    )
    assert token_specs(p) == {("vault", 600), ("s3", 3600)}


def test_a_pod_without_projected_tokens_needs_none() -> None:
    p = pod({"volumes": [{"name": "s", "secret": {"secretName": "x"}}]})
    assert token_specs(p) == frozenset()


# -- bodies ----------------------------------------------------------------------------------


def api_pod() -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "u-1",
            "resourceVersion": "42",
            "labels": {"app": "web"},
            "annotations": {"a": "b"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-1", "uid": "rs"}],
            "creationTimestamp": "2024-01-01T00:00:00Z",
            "deletionTimestamp": "2024-01-02T00:00:00Z",
            "deletionGracePeriodSeconds": 30,
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"nodeName": "gw", "containers": [{"name": "c", "image": "nginx"}]},
        "status": {"phase": "Running"},
    }


def test_the_pod_body_is_a_whole_object_without_managed_fields() -> None:
    source = api_pod()
    body = pod_body(source)
    assert body["apiVersion"] == "v1"
    assert body["kind"] == "Pod"
    assert "managedFields" not in body["metadata"]
    assert body["spec"] == source["spec"]
    meta = body["metadata"]
    assert (meta["name"], meta["namespace"], meta["uid"]) == ("web", "shop", "u-1")
    assert meta["labels"] == {"app": "web"}
    assert meta["ownerReferences"] == source["metadata"]["ownerReferences"]


def test_the_pod_body_keeps_the_deletion_the_edge_must_carry_out() -> None:
    meta = pod_body(api_pod())["metadata"]
    assert meta["deletionTimestamp"] == "2024-01-02T00:00:00Z"
    assert meta["deletionGracePeriodSeconds"] == 30


def test_object_bodies_keep_their_data_and_drop_managed_fields() -> None:
    managed = [{"manager": "kubectl"}]
    secret = {
        "metadata": {"name": "s", "namespace": "ns", "uid": "1", "managedFields": managed},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": "e30="},
    }
    body = object_body("Secret", secret)
    assert (body["apiVersion"], body["kind"]) == ("v1", "Secret")
    assert body["type"] == "kubernetes.io/dockerconfigjson"
    assert body["data"] == {".dockerconfigjson": "e30="}
    assert "managedFields" not in body["metadata"]

    configmap = {
        "metadata": {"name": "c", "namespace": "ns", "uid": "2", "managedFields": managed},
        "data": {"k": "v"},
        "binaryData": {"b": "AA=="},
    }
    body = object_body("ConfigMap", configmap)
    assert (body["apiVersion"], body["kind"]) == ("v1", "ConfigMap")
    assert (body["data"], body["binaryData"]) == ({"k": "v"}, {"b": "AA=="})
    assert "managedFields" not in body["metadata"]


def test_a_secret_without_a_type_is_opaque() -> None:
    body = object_body("Secret", {"metadata": {"name": "s", "uid": "1"}})
    assert body["type"] == "Opaque"
    assert body["data"] == {}


# -- autonomous_tolerations --------------------------------------------------------------------


def default_toleration_seconds() -> list[dict[str, Any]]:
    """What the DefaultTolerationSeconds admission plugin adds to every pod."""
    return [
        {"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
    ]


def unlimited(tolerations: list[dict[str, Any]], taint: str) -> bool:
    """Whether a NoExecute ``taint`` never evicts a pod with ``tolerations`` (per Kubernetes)."""
    matching = []
    for t in tolerations:
        if t.get("effect") not in (None, "", "NoExecute"):
            continue
        key, operator = t.get("key") or "", t.get("operator") or "Equal"
        everything = key == "" and operator == "Exists"
        if everything or (key == taint and (operator == "Exists" or not t.get("value"))):
            matching.append(t)
    return bool(matching) and all(t.get("tolerationSeconds") is None for t in matching)


def test_a_pod_without_tolerations_gets_unlimited_ones_for_both_offline_taints() -> None:
    result = autonomous_tolerations(pod({"containers": [{"name": "c"}]}))
    assert result is not None
    assert sorted(result, key=lambda t: t["key"]) == [
        {"key": NOT_READY, "operator": "Exists", "effect": "NoExecute"},
        {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"},
    ]


def test_the_admission_plugins_300_second_limits_are_lifted_not_duplicated() -> None:
    result = autonomous_tolerations(pod({"tolerations": default_toleration_seconds()}))
    assert result == [
        {"key": NOT_READY, "operator": "Exists", "effect": "NoExecute"},
        {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"},
    ]


def test_a_limit_is_lifted_even_next_to_an_unlimited_toleration() -> None:
    # The taint manager evicts after the shortest limit among matching tolerations.
    tolerations = [
        {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"},
        {"key": NOT_READY, "operator": "Exists", "effect": "NoExecute"},
        {"key": UNREACHABLE, "operator": "Exists", "tolerationSeconds": 60},
    ]
    result = autonomous_tolerations(pod({"tolerations": tolerations}))
    assert result is not None
    assert unlimited(result, UNREACHABLE)
    assert len(result) == 3


def test_a_pod_that_already_stays_offline_needs_no_change() -> None:
    tolerations = [
        {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"},
        {"key": NOT_READY, "operator": "Exists"},
    ]
    assert autonomous_tolerations(pod({"tolerations": tolerations})) is None


def test_an_empty_key_exists_toleration_tolerates_everything() -> None:
    assert autonomous_tolerations(pod({"tolerations": [{"operator": "Exists"}]})) is None
    everything_noexecute = [{"key": "", "operator": "Exists", "effect": "NoExecute"}]
    assert autonomous_tolerations(pod({"tolerations": everything_noexecute})) is None


def test_unrelated_tolerations_are_left_as_they_are() -> None:
    unrelated = [
        {"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoExecute",
         "tolerationSeconds": 60},
        {"key": UNREACHABLE, "operator": "Exists", "effect": "NoSchedule"},
        {"key": UNREACHABLE, "operator": "Equal", "value": "yes", "effect": "NoExecute",
         "tolerationSeconds": 10},
    ]  # fmt: skip
    result = autonomous_tolerations(pod({"tolerations": copy.deepcopy(unrelated)}))
    assert result is not None
    assert result[: len(unrelated)] == unrelated
    assert unlimited(result, UNREACHABLE)
    assert unlimited(result, NOT_READY)


def test_the_pod_given_is_not_changed() -> None:
    p = pod({"tolerations": default_toleration_seconds()})
    before = copy.deepcopy(p)
    autonomous_tolerations(p)
    assert p == before


toleration = st.fixed_dictionaries(
    {},
    optional={
        "key": st.sampled_from(["", UNREACHABLE, NOT_READY, "other"]),
        "operator": st.sampled_from(["Exists", "Equal"]),
        "value": st.sampled_from(["", "x"]),
        "effect": st.sampled_from(["", "NoExecute", "NoSchedule", "PreferNoSchedule"]),
        "tolerationSeconds": st.sampled_from([0, 300, 6000]),
    },
)


@given(st.lists(toleration, max_size=5))
def test_after_the_change_no_offline_taint_can_evict_and_nothing_else_moves(
    tolerations: list[dict[str, Any]],
) -> None:
    result = autonomous_tolerations(pod({"tolerations": copy.deepcopy(tolerations)}))
    if result is None:
        assert unlimited(tolerations, UNREACHABLE)
        assert unlimited(tolerations, NOT_READY)
        return
    assert unlimited(result, UNREACHABLE)
    assert unlimited(result, NOT_READY)
    # The existing tolerations stay, in order, at most without their limit.
    for before, after in zip(tolerations, result, strict=False):
        assert {k: v for k, v in before.items() if k != "tolerationSeconds"} == {
            k: v for k, v in after.items() if k != "tolerationSeconds"
        }
        if after.get("tolerationSeconds") is None and before.get("tolerationSeconds") is not None:
            # Only a limit that would evict on an offline taint is lifted.
            assert _matches(before, UNREACHABLE) or _matches(before, NOT_READY)
        else:
            assert after == before
    assert len(result) - len(tolerations) <= 2
    # And applying it again changes nothing.
    assert autonomous_tolerations(pod({"tolerations": result})) is None


def _matches(t: dict[str, Any], taint: str) -> bool:
    """Whether ``t`` matches the NoExecute ``taint`` at all, limit or not."""
    return unlimited([{k: v for k, v in t.items() if k != "tolerationSeconds"}], taint)
