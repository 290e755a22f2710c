"""validate_pod names every reason a manifest cannot run, by field path, and never crashes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.pods.validation import pod_warnings, validate_pod


def make_pod(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "containers": [{"name": "web", "image": "nginx:1.27"}],
    }
    base.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "plant-gw", "namespace": "site-1", "uid": "0a1b-2c3d"},
        "spec": base,
    }


def container(**fields: Any) -> dict[str, Any]:
    return {"name": "web", "image": "nginx:1.27", **fields}


FULL_POD = make_pod(
    initContainers=[{"name": "init", "image": "busybox", "command": ["true"]}],
    containers=[
        container(
            command=["nginx"],
            args=["-g", "daemon off;"],
            workingDir="/srv",
            env=[
                {"name": "A", "value": "1"},
                {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "b"}}},
                {"name": "C", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "c"}}},
                {"name": "D", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "E", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
            ],
            envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            ports=[{"containerPort": 80, "hostPort": 8080, "name": "http"}],
            resources={"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1"}},
            securityContext={
                "runAsUser": 1000,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
            },
            volumeMounts=[
                {"name": "cache", "mountPath": "/cache"},
                {"name": "cfg", "mountPath": "/etc/app", "readOnly": True},
                {"name": "serial", "mountPath": "/dev/ttyUSB0"},
                {"name": "info", "mountPath": "/info"},
                {"name": "all", "mountPath": "/all", "subPath": "x"},
            ],
        )
    ],
    volumes=[
        {"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "a", "path": "a.conf"}]}},
        {"name": "serial", "hostPath": {"path": "/dev/ttyUSB0", "type": "CharDevice"}},
        {
            "name": "info",
            "downwardAPI": {
                "items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {
                        "path": "cpu",
                        "resourceFieldRef": {
                            "containerName": "web",
                            "resource": "limits.cpu",
                            "divisor": "1m",
                        },
                    },
                ]
            },
        },
        {
            "name": "all",
            "projected": {
                "sources": [
                    {"secret": {"name": "sec"}},
                    {"serviceAccountToken": {"path": "token"}},
                ]
            },
        },
    ],
    securityContext={"fsGroup": 2000, "sysctls": [{"name": "net.core.somaxconn", "value": "1024"}]},
    dnsPolicy="ClusterFirst",
    hostAliases=[{"ip": "10.0.0.9", "hostnames": ["plc"]}],
)


def test_a_full_pod_is_valid() -> None:
    assert validate_pod(FULL_POD) == []


def reasons_for(mutate: Any) -> list[str]:
    pod = copy.deepcopy(FULL_POD)
    mutate(pod)
    return validate_pod(pod)


def web(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        ("nope", 'pod: must be an object (a Kubernetes Pod manifest), not "nope"'),
        ({**make_pod(), "kind": "Deployment"}, 'kind: must be "Pod", not "Deployment"'),
        ({**make_pod(), "apiVersion": "apps/v1"}, 'apiVersion: must be "v1", not "apps/v1"'),
        (make_pod(containers=[]), "spec.containers: at least one container is required"),
        ({**make_pod(), "spec": None}, "spec: is required"),
    ],
)
def test_whole_pod_problems(pod: Any, reason: str) -> None:
    assert reason in validate_pod(pod)


def test_duplicate_container_names_name_both_places() -> None:
    pod = make_pod(containers=[container(), container(name="db"), container()])
    assert validate_pod(pod) == [
        'spec.containers[2].name: "web" is used twice (first at spec.containers[0])'
    ]


def test_init_and_app_containers_share_one_namespace_of_names() -> None:
    pod = make_pod(initContainers=[container()])
    assert validate_pod(pod) == [
        'spec.containers[0].name: "web" is used twice (first at spec.initContainers[0])'
    ]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda p: web(p).update(name="Web_1"),
            'spec.containers[0].name: "Web_1" is not a valid container name (a DNS label)',
        ),
        (lambda p: web(p).pop("image"), "spec.containers[0].image: is required"),
        (lambda p: p["metadata"].pop("uid"), "metadata.uid: is required"),
        (
            lambda p: p["metadata"].update(uid="../x"),
            'metadata.uid: "../x" is not a valid uid',
        ),
        (
            lambda p: web(p)["volumeMounts"][0].update(name="missing"),
            'spec.containers[0].volumeMounts[0].name: no volume named "missing" in spec.volumes',
        ),
        (
            lambda p: p["spec"]["volumes"].append({"name": "data", "persistentVolumeClaim": {}}),
            "spec.volumes[5].persistentVolumeClaim: volume type 'persistentVolumeClaim' is not"
            " supported by Outpost (supported: configMap, downwardAPI, emptyDir, hostPath,"
            " projected, secret)",
        ),
        (
            lambda p: p["spec"]["volumes"].append({"name": "data", "quantumDisk": {}}),
            "spec.volumes[5].quantumDisk: unknown volume type 'quantumDisk' is not supported by"
            " Outpost (supported: configMap, downwardAPI, emptyDir, hostPath, projected, secret)",
        ),
        (
            lambda p: p["spec"]["volumes"].append({"name": "data"}),
            "spec.volumes[5]: names no volume source (such as emptyDir or configMap)",
        ),
        (
            lambda p: p["spec"]["volumes"].append({"name": "cache", "emptyDir": {}}),
            'spec.volumes[5].name: "cache" is used twice',
        ),
        (
            lambda p: p["spec"]["volumes"].append({"name": "x", "emptyDir": {}, "secret": {}}),
            "spec.volumes[5]: has more than one source (emptyDir, secret)",
        ),
        (
            lambda p: web(p)["ports"].append({"hostPort": 9090}),
            "spec.containers[0].ports[1].containerPort: is required: hostPort 9090 needs the"
            " container port it maps to",
        ),
        (
            lambda p: web(p)["ports"].append({"containerPort": 70000}),
            "spec.containers[0].ports[1].containerPort: 70000 is out of range (1 to 65535)",
        ),
        (
            lambda p: web(p)["ports"].append({"containerPort": 81, "hostPort": 8080}),
            "spec.containers[0].ports[1].hostPort: 8080/TCP is already used by"
            " spec.containers[0].ports[0]",
        ),
        (
            lambda p: web(p)["resources"]["limits"].update(memory="lots"),
            "spec.containers[0].resources.limits.memory: 'lots' is not a quantity: expected a"
            " number with an optional suffix, such as 100m, 0.5, 128Mi or 1G",
        ),
        (
            lambda p: web(p)["resources"]["limits"].update(memory="-1Mi"),
            'spec.containers[0].resources.limits.memory: "-1Mi" must not be negative',
        ),
        (
            lambda p: web(p)["resources"]["requests"].update(cpu="2"),
            'spec.containers[0].resources.requests.cpu: "2" must be less than or equal to the'
            ' cpu limit "1"',
        ),
        (
            lambda p: web(p)["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
            "spec.containers[0].resources.limits.nvidia.com/gpu: resource 'nvidia.com/gpu' is"
            " not supported: Outpost has no device plugins (cpu, memory and ephemeral-storage"
            " are)",
        ),
        (
            lambda p: web(p)["env"].append({"name": "X=Y", "value": "1"}),
            'spec.containers[0].env[5].name: "X=Y" is not a valid environment variable name'
            " (printable ASCII without '=')",
        ),
        (
            lambda p: web(p)["env"].append(
                {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}
            ),
            'spec.containers[0].env[5].valueFrom.fieldRef.fieldPath: "metadata.labels" is not a'
            " field an environment variable can hold (metadata.name, metadata.namespace,"
            " metadata.uid, spec.nodeName, spec.serviceAccountName, status.hostIP,"
            " status.hostIPs, status.podIP, status.podIPs, or metadata.labels['key'] /"
            " metadata.annotations['key'])",
        ),
        (
            lambda p: web(p)["env"].append({"name": "N", "value": "1", "valueFrom": {}}),
            "spec.containers[0].env[5]: sets both value and valueFrom",
        ),
        (
            lambda p: web(p)["env"].append(
                {"name": "N", "valueFrom": {"configMapKeyRef": {"name": "cfg"}}}
            ),
            "spec.containers[0].env[5].valueFrom.configMapKeyRef.key: is required",
        ),
        (
            lambda p: web(p)["envFrom"].append({"prefix": "X"}),
            "spec.containers[0].envFrom[1]: needs exactly one of configMapRef and secretRef",
        ),
        (
            lambda p: web(p)["securityContext"]["capabilities"]["add"].append("WARP_DRIVE"),
            'spec.containers[0].securityContext.capabilities.add[1]: "WARP_DRIVE" is not a'
            " Linux capability",
        ),
        (
            lambda p: web(p)["securityContext"].update(
                privileged=True, allowPrivilegeEscalation=False
            ),
            "spec.containers[0].securityContext.allowPrivilegeEscalation: cannot be false when"
            " privileged is true",
        ),
        (
            lambda p: web(p)["securityContext"].update(runAsUser=-1),
            "spec.containers[0].securityContext.runAsUser: -1 is out of range (0 to 2147483647)",
        ),
        (
            lambda p: web(p)["volumeMounts"].append({"name": "cache", "mountPath": "/cache/"}),
            'spec.containers[0].volumeMounts[5].mountPath: "/cache/" is already used by'
            " spec.containers[0].volumeMounts[0]",
        ),
        (
            lambda p: web(p)["volumeMounts"].append({"name": "cache", "mountPath": "relative"}),
            'spec.containers[0].volumeMounts[5].mountPath: "relative" must be an absolute path',
        ),
        (
            lambda p: web(p)["volumeMounts"][0].update(subPath="../../etc"),
            "spec.containers[0].volumeMounts[0].subPath: \"../../etc\" must not contain '..'",
        ),
        (
            lambda p: web(p)["volumeMounts"][0].update(mountPropagation="Bidirectional"),
            "spec.containers[0].volumeMounts[0].mountPropagation: Bidirectional is allowed only"
            " in privileged containers",
        ),
        (
            lambda p: web(p)["volumeMounts"][2].update(mountPath="/serial"),
            'spec.containers[0].volumeMounts[2].mountPath: "/serial" must be under /dev/: volume'
            ' "serial" is a device, which the container gets as a device node',
        ),
        (
            lambda p: p["spec"]["volumes"][1]["configMap"]["items"].append(
                {"key": "b", "path": "/abs"}
            ),
            'spec.volumes[1].configMap.items[1].path: "/abs" must be a relative path',
        ),
        (
            lambda p: p["spec"]["volumes"][1]["configMap"]["items"].append(
                {"key": "b", "path": "a.conf"}
            ),
            'spec.volumes[1].configMap.items[1].path: "a.conf" is used twice in this volume',
        ),
        (
            lambda p: p["spec"]["volumes"][1]["configMap"].update(defaultMode=0o1777),
            "spec.volumes[1].configMap.defaultMode: 1023 must be a file mode between 0 and 0777"
            " (511)",
        ),
        (
            lambda p: p["spec"]["volumes"][2]["hostPath"].update(type="Pipe"),
            'spec.volumes[2].hostPath.type: "Pipe" is not one of BlockDevice, CharDevice,'
            " Directory, DirectoryOrCreate, File, FileOrCreate, Socket",
        ),
        (
            lambda p: p["spec"]["volumes"][2]["hostPath"].update(path="dev/tty"),
            'spec.volumes[2].hostPath.path: "dev/tty" must be an absolute path',
        ),
        (
            lambda p: p["spec"]["volumes"][0]["emptyDir"].update(medium="HugePages"),
            'spec.volumes[0].emptyDir.medium: "HugePages" is not supported (use "" or "Memory")',
        ),
        (
            lambda p: p["spec"]["volumes"][3]["downwardAPI"]["items"][1]["resourceFieldRef"].update(
                containerName="db"
            ),
            "spec.volumes[3].downwardAPI.items[1].resourceFieldRef.containerName: no container is"
            ' named "db"',
        ),
        (
            lambda p: p["spec"]["volumes"][3]["downwardAPI"]["items"][1]["resourceFieldRef"].update(
                divisor="3m"
            ),
            'spec.volumes[3].downwardAPI.items[1].resourceFieldRef.divisor: "3m" is not allowed'
            " (use 1m or 1)",
        ),
        (
            lambda p: p["spec"]["volumes"][3]["downwardAPI"]["items"][0]["fieldRef"].update(
                fieldPath="status.podIP"
            ),
            'spec.volumes[3].downwardAPI.items[0].fieldRef.fieldPath: "status.podIP" is not a'
            " field a downward API volume offers (metadata.annotations, metadata.labels,"
            " metadata.name, metadata.namespace, metadata.uid, or one label or annotation as"
            " metadata.labels['key'])",
        ),
        (
            lambda p: p["spec"].update(hostNetwork=True),
            'spec.securityContext.sysctls[0].name: "net.core.somaxconn" cannot be set with'
            " hostNetwork",
        ),
        (
            lambda p: p["spec"]["securityContext"]["sysctls"].append(
                {"name": "vm.swappiness", "value": "1"}
            ),
            'spec.securityContext.sysctls[1].name: "vm.swappiness" is not a namespaced sysctl',
        ),
        (
            lambda p: p["spec"].update(shareProcessNamespace=True),
            "spec.shareProcessNamespace: is not supported: each container of an Outpost pod has"
            " its own PID namespace",
        ),
        (
            lambda p: p["spec"].update(dnsPolicy="None"),
            'spec.dnsConfig.nameservers: dnsPolicy "None" needs at least one',
        ),
        (
            lambda p: p["spec"].update(restartPolicy="Sometimes"),
            'spec.restartPolicy: "Sometimes" is not Always, OnFailure or Never',
        ),
        (
            lambda p: web(p)["securityContext"].update(seccompProfile={"type": "Localhost"}),
            "spec.containers[0].securityContext.seccompProfile.type: Localhost profiles are not"
            " supported",
        ),
    ],
)
def test_each_problem_is_named_by_its_field(mutate: Any, reason: str) -> None:
    assert reason in reasons_for(mutate)


def test_host_network_ports_must_match() -> None:
    pod = make_pod(
        hostNetwork=True, containers=[container(ports=[{"containerPort": 80, "hostPort": 81}])]
    )
    assert validate_pod(pod) == [
        "spec.containers[0].ports[0].hostPort: must equal containerPort (80) with hostNetwork"
    ]


def test_every_reason_is_reported_not_just_the_first() -> None:
    pod = make_pod(containers=[{"name": "A"}, {"image": "x"}])
    assert validate_pod(pod) == [
        'spec.containers[0].name: "A" is not a valid container name (a DNS label)',
        "spec.containers[1].name: is required",
        "spec.containers[0].image: is required",
    ]


def test_quantities_may_be_json_numbers() -> None:
    pod = make_pod(containers=[container(resources={"limits": {"cpu": 0.5, "memory": 1024}})])
    assert validate_pod(pod) == []


def test_warnings_for_what_is_accepted_but_not_done() -> None:
    pod = copy.deepcopy(FULL_POD)
    web(pod)["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    pod["spec"]["volumes"].append({"name": "disk", "emptyDir": {"sizeLimit": "1Gi"}})
    assert pod_warnings(pod) == [
        "spec.volumes[4].projected.sources[1].serviceAccountToken: skipped when standalone,"
        " where no cloud mints service account tokens",
        "spec.volumes[5].emptyDir.sizeLimit: not enforced for a disk-backed emptyDir",
        "spec.containers[0].securityContext.seccompProfile: RuntimeDefault is not applied; the"
        " container runs without a seccomp filter",
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=20,
)


@given(json_values)
def test_never_crashes_on_arbitrary_json(value: Any) -> None:
    assert isinstance(validate_pod(value), list)


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            out += paths_of(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            out += paths_of(inner, (*prefix, index))
    return out


ALL_PATHS = paths_of(FULL_POD)[1:]


@given(st.sampled_from(ALL_PATHS), json_values)
def test_never_crashes_when_any_field_holds_anything(path: tuple[Any, ...], value: Any) -> None:
    pod = copy.deepcopy(FULL_POD)
    target = pod
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert isinstance(validate_pod(pod), list)


def test_absurdly_large_quantities_are_refused() -> None:
    pod = make_pod(containers=[container(resources={"limits": {"memory": "1e30"}})])
    assert validate_pod(pod) == ['spec.containers[0].resources.limits.memory: "1e30" is too large']
