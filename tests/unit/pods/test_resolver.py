"""What a pod refers to among the objects of its namespace."""

from __future__ import annotations

from typing import Any

from edge.pods.resolver import referenced_objects


def test_referenced_objects_are_everything_the_pod_uses_in_its_namespace() -> None:
    spec: dict[str, Any] = dict(
        containers=[
            dict(
                name="web",
                image="nginx:1.27",
                envFrom=[{"configMapRef": {"name": "env-cm"}}, {"secretRef": {"name": "env-s"}}],
                env=[
                    {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "a", "key": "k"}}},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "b", "key": "k"}}},
                    {"name": "C", "value": "plain"},
                ],
            )
        ],
        volumes=[
            {"name": "cfg", "configMap": {"name": "vol-cm"}},
            {"name": "sec", "secret": {"secretName": "vol-s"}},
            {"name": "tmp", "emptyDir": {}},
            {
                "name": "api",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt"}},
                        {"secret": {"name": "proj-s"}},
                    ]
                },
            },
        ],
    )
    pod = {
        "metadata": {"name": "plant-gw", "namespace": "site-1", "uid": "0a1b-2c3d"},
        "spec": spec,
    }
    pod["spec"]["imagePullSecrets"] = [{"name": "pull"}]
    assert referenced_objects(pod) == {
        ("ConfigMap", "env-cm"),
        ("ConfigMap", "a"),
        ("ConfigMap", "vol-cm"),
        ("ConfigMap", "kube-root-ca.crt"),
        ("Secret", "env-s"),
        ("Secret", "b"),
        ("Secret", "vol-s"),
        ("Secret", "proj-s"),
        ("Secret", "pull"),
        ("ServiceAccountToken", pod["metadata"]["name"]),
    }
