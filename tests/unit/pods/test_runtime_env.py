"""A container's command and environment, by Kubernetes' rules: override, expansion, sources."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from edge.pods.resolver import ContainerConfigError, Resolver
from edge.pods.runtime_spec import container_args, container_env


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def make_pod(**container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "meter",
            "namespace": "plant",
            "uid": "u-1",
            "labels": {"app": "modbus"},
            "annotations": {"site": "north"},
        },
        "spec": {
            "nodeName": "gw-7",
            "serviceAccountName": "reader",
            "containers": [{"name": "main", "image": "x", **container}],
        },
    }


RESOLVER = Resolver(
    configmaps={
        "cfg": {"data": {"RATE": "9600", "PORT": "/dev/ttyUSB0", "BAD=KEY": "x"}},
        "more": {"data": {"RATE": "19200"}, "binaryData": {"BLOB": b64("bin")}},
    },
    secrets={"creds": {"data": {"PASSWORD": b64("s3cret")}}},
    host_ips=["192.168.1.7", "fd00::7"],
    pod_ips=["10.88.0.4"],
    node_allocatable={"cpu": "4", "memory": "2Gi"},
)


def env_of(resolver: Resolver = RESOLVER, **container: Any) -> dict[str, str]:
    return dict(container_env(make_pod(**container), "main", resolver))


# --- command and args -------------------------------------------------------------------------

IMAGE = {"Entrypoint": ["/entry"], "Cmd": ["--default"]}


@pytest.mark.parametrize(
    ("container", "argv"),
    [
        ({}, ["/entry", "--default"]),
        ({"command": ["/bin/app"]}, ["/bin/app"]),  # command drops the image's Cmd too
        ({"args": ["--fast"]}, ["/entry", "--fast"]),
        ({"command": ["/bin/app"], "args": ["--fast"]}, ["/bin/app", "--fast"]),
        ({"command": [], "args": []}, ["/entry", "--default"]),  # empty lists are unset
    ],
)
def test_command_and_args_override_the_image(container: dict[str, Any], argv: list[str]) -> None:
    assert container_args({"name": "c", **container}, IMAGE, {}) == argv


def test_command_and_args_are_expanded_but_the_image_is_not() -> None:
    env = {"PORT": "/dev/ttyUSB0"}
    image = {"Entrypoint": ["/entry", "$(PORT)"]}
    assert container_args({"args": ["--port=$(PORT)", "$$(PORT)"]}, image, env) == [
        "/entry",
        "$(PORT)",
        "--port=/dev/ttyUSB0",
        "$(PORT)",
    ]


def test_nothing_to_run_is_a_config_error() -> None:
    with pytest.raises(ContainerConfigError, match="nothing to run"):
        container_args({"name": "c"}, {}, {})


# --- env --------------------------------------------------------------------------------------


def test_values_expand_with_earlier_variables_only() -> None:
    env = env_of(
        env=[
            {"name": "LATER_REF", "value": "$(B)"},
            {"name": "A", "value": "a"},
            {"name": "B", "value": "$(A)-b"},
            {"name": "ESCAPED", "value": "$$(A)"},
            {"name": "FROM_PREFIX", "value": "$(CFG_RATE)"},
        ],
        envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
    )
    assert env["LATER_REF"] == "$(B)"
    assert env["B"] == "a-b"
    assert env["ESCAPED"] == "$(A)"
    assert env["FROM_PREFIX"] == "9600"


def test_env_from_sources_in_order_then_env_wins() -> None:
    env = container_env(
        make_pod(
            envFrom=[{"configMapRef": {"name": "cfg"}}, {"configMapRef": {"name": "more"}}],
            env=[{"name": "PORT", "value": "/dev/ttyS1"}],
        ),
        "main",
        RESOLVER,
    )
    values = dict(env)
    assert values["RATE"] == "19200"  # the later source wins
    assert values["PORT"] == "/dev/ttyS1"  # env beats envFrom
    assert "BAD=KEY" not in values  # not a valid name: skipped, as the kubelet does
    assert "BLOB" not in values  # binaryData never becomes env
    assert [name for name, _ in env] == ["PORT", "RATE"]


def test_secret_env_is_decoded() -> None:
    env = env_of(
        env=[{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "PASSWORD"}}}],
        envFrom=[{"secretRef": {"name": "creds"}, "prefix": "S_"}],
    )
    assert env == {"S_PASSWORD": "s3cret", "PW": "s3cret"}


def test_field_refs() -> None:
    def field(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = env_of(
        env=[
            {"name": "NAME", **field("metadata.name")},
            {"name": "NS", **field("metadata.namespace")},
            {"name": "UID", **field("metadata.uid")},
            {"name": "APP", **field("metadata.labels['app']")},
            {"name": "SITE", **field("metadata.annotations['site']")},
            {"name": "NONE", **field("metadata.labels['absent']")},
            {"name": "NODE", **field("spec.nodeName")},
            {"name": "SA", **field("spec.serviceAccountName")},
            {"name": "POD_IP", **field("status.podIP")},
            {"name": "HOST_IP", **field("status.hostIP")},
            {"name": "HOST_IPS", **field("status.hostIPs")},
        ]
    )
    assert env == {
        "NAME": "meter",
        "NS": "plant",
        "UID": "u-1",
        "APP": "modbus",
        "SITE": "north",
        "NONE": "",
        "NODE": "gw-7",
        "SA": "reader",
        "POD_IP": "10.88.0.4",
        "HOST_IP": "192.168.1.7",
        "HOST_IPS": "192.168.1.7,fd00::7",
    }


def test_resource_field_refs_round_up_and_default_to_allocatable() -> None:
    def resource(name: str, divisor: str | None = None) -> dict[str, Any]:
        ref = {"resource": name, **({"divisor": divisor} if divisor else {})}
        return {"valueFrom": {"resourceFieldRef": ref}}

    env = env_of(
        resources={"requests": {"cpu": "250m"}, "limits": {"memory": "100M"}},
        env=[
            {"name": "CPU_REQ", **resource("requests.cpu")},
            {"name": "CPU_REQ_M", **resource("requests.cpu", "1m")},
            {"name": "CPU_LIMIT", **resource("limits.cpu")},
            {"name": "MEM_LIMIT_MI", **resource("limits.memory", "1Mi")},
            {"name": "MEM_REQ", **resource("requests.memory")},
        ],
    )
    assert env == {
        "CPU_REQ": "1",  # 250m rounds up to one core
        "CPU_REQ_M": "250",
        "CPU_LIMIT": "4",  # no limit: the node's allocatable
        "MEM_LIMIT_MI": "96",  # 100M = 95.37Mi, rounded up
        "MEM_REQ": "100000000",  # a request defaults to the limit
    }


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            {"valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "NOPE"}}},
            "container 'main' of pod plant/meter: env V: couldn't find key 'NOPE' in ConfigMap"
            " plant/cfg",
        ),
        (
            {"valueFrom": {"configMapKeyRef": {"name": "gone", "key": "K"}}},
            "container 'main' of pod plant/meter: env V: ConfigMap plant/gone not found",
        ),
        (
            {"valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}},
            "container 'main' of pod plant/meter: env V: couldn't find key 'TOKEN' in Secret"
            " plant/creds",
        ),
        (
            {"valueFrom": {"configMapKeyRef": {"name": "more", "key": "BLOB"}}},
            "couldn't find key 'BLOB' in ConfigMap plant/more",
        ),
    ],
)
def test_missing_keys_are_config_errors(var: dict[str, Any], message: str) -> None:
    with pytest.raises(ContainerConfigError) as caught:
        env_of(env=[{"name": "V", **var}])
    assert message in str(caught.value)
    assert caught.value.reason == "CreateContainerConfigError"


def test_optional_references_are_skipped() -> None:
    env = env_of(
        env=[
            {
                "name": "A",
                "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "K", "optional": True}},
            },
            {
                "name": "B",
                "valueFrom": {"secretKeyRef": {"name": "creds", "key": "X", "optional": True}},
            },
        ],
        envFrom=[{"configMapRef": {"name": "gone", "optional": True}}],
    )
    assert env == {}


def test_missing_env_from_source_is_a_config_error() -> None:
    with pytest.raises(ContainerConfigError, match="envFrom Secret plant/gone not found"):
        env_of(envFrom=[{"secretRef": {"name": "gone"}}])


def test_bad_base64_in_a_secret_is_a_config_error() -> None:
    resolver = Resolver(secrets={"bad": {"data": {"K": "***"}}})
    with pytest.raises(ContainerConfigError, match="Secret 'bad' key 'K' is not valid base64"):
        env_of(resolver, envFrom=[{"secretRef": {"name": "bad"}}])


def test_string_data_of_an_offline_secret() -> None:
    resolver = Resolver(secrets={"s": {"stringData": {"K": "plain"}}})
    assert env_of(resolver, envFrom=[{"secretRef": {"name": "s"}}]) == {"K": "plain"}
