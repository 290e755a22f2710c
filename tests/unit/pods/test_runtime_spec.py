"""build_spec: one container's config.json, field by field, against what Kubernetes would do."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from edge.pods import runtime_spec
from edge.pods.resolver import ContainerConfigError
from edge.pods.runtime_spec import (
    ImageIds,
    bounding_capabilities,
    build_spec,
    capabilities,
    cpu_quota,
    cpu_shares,
    resolve_user,
)
from edge.pods.volumes import HostPathInfo, PodLayout, container_volumes

LAYOUT = PodLayout(Path("/var/lib/outpost/pods/u-1"))
PASSWD = "root:x:0:0::/root:/bin/sh\nnginx:x:101:101::/:/bin/false\napp:x:1000:1000::/:/bin/sh\n"
GROUP = "root:x:0:\nnginx:x:101:\ndialout:x:20:app,nginx\nvideo:x:44:app\n"
IDS = ImageIds.parse(PASSWD, GROUP)

# Every Linux capability, in the kernel's order (include/uapi/linux/capability.h, Linux 5.9+).
LINUX_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
# containerd's defaultUnixCaps() (oci/spec.go, 1.x), Docker's default set too.
CONTAINERD_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)


def make_pod(container: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "meter", "namespace": "plant", "uid": "u-1"},
        "spec": {"containers": [{"name": "main", "image": "x", **(container or {})}], **spec},
    }


def spec_of(
    pod: dict[str, Any],
    *,
    image: dict[str, Any] | None = None,
    host_paths: dict[str, HostPathInfo] | None = None,
    env: list[tuple[str, str]] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    volumes = container_volumes(
        pod, "main", layout=LAYOUT, host_paths=host_paths or {}, env=dict(env or [])
    )
    return build_spec(
        pod,
        "main",
        image={"Cmd": ["/bin/app"], **(image or {})},
        rootfs="/var/lib/outpost/rootfs/main",
        volumes=volumes,
        env=env or [],
        hostname="meter",
        **kwargs,
    )


# --- process ----------------------------------------------------------------------------------


def test_a_plain_container() -> None:
    spec = spec_of(make_pod(), netns_path="/run/netns/pod-u-1")
    assert spec["ociVersion"] == "1.0.2"
    assert spec["process"]["terminal"] is False
    assert spec["process"]["args"] == ["/bin/app"]
    assert spec["process"]["cwd"] == "/"
    assert spec["process"]["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert spec["process"]["noNewPrivileges"] is True
    assert spec["process"]["oomScoreAdj"] == 1000  # BestEffort
    assert spec["process"]["capabilities"]["bounding"] == sorted(
        CONTAINERD_CAPABILITIES, key=LINUX_CAPABILITIES.index
    )
    assert spec["root"] == {"path": "/var/lib/outpost/rootfs/main", "readonly": False}
    assert spec["hostname"] == "meter"
    assert spec["linux"]["namespaces"] == [
        {"type": "mount"},
        {"type": "cgroup"},
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "network", "path": "/run/netns/pod-u-1"},
    ]
    assert spec["linux"]["cgroupsPath"] == "/outpost/podu-1/main"
    # containerd's (populateDefaultUnixSpec in oci/spec.go).
    assert spec["linux"]["maskedPaths"] == [
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ]
    assert spec["linux"]["readonlyPaths"] == [
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ]
    assert "seccomp" not in spec["linux"]
    assert spec["annotations"] == {
        "io.kubernetes.pod.namespace": "plant",
        "io.kubernetes.pod.name": "meter",
        "io.kubernetes.pod.uid": "u-1",
        "io.kubernetes.container.name": "main",
    }


def test_env_is_image_env_overridden_by_container_env_in_place() -> None:
    spec = spec_of(
        make_pod(),
        image={"Env": ["PATH=/opt/bin", "LANG=C", "MODE=image"]},
        env=[("MODE", "pod"), ("EXTRA", "1")],
    )
    assert spec["process"]["env"] == [
        "PATH=/opt/bin",
        "HOSTNAME=meter",
        "LANG=C",
        "MODE=pod",
        "EXTRA=1",
    ]


def test_default_path_when_the_image_has_none() -> None:
    env = spec_of(make_pod())["process"]["env"]
    # containerd's defaultUnixEnv.
    assert env[0] == "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_working_dir_container_over_image() -> None:
    assert spec_of(make_pod(), image={"WorkingDir": "/srv"})["process"]["cwd"] == "/srv"
    pod = make_pod({"workingDir": "/data"})
    assert spec_of(pod, image={"WorkingDir": "/srv"})["process"]["cwd"] == "/data"


def test_args_are_expanded_with_the_container_env() -> None:
    pod = make_pod({"args": ["--port=$(PORT)"]})
    spec = spec_of(pod, image={"Entrypoint": ["/modbusd"]}, env=[("PORT", "/dev/ttyUSB0")])
    assert spec["process"]["args"] == ["/modbusd", "--port=/dev/ttyUSB0"]


def test_extra_annotations_are_added() -> None:
    spec = spec_of(make_pod(), annotations={"io.outpost.attempt": "3"})
    assert spec["annotations"]["io.outpost.attempt"] == "3"
    assert spec["annotations"]["io.kubernetes.pod.uid"] == "u-1"


# --- users ------------------------------------------------------------------------------------


def user(
    container_sc: dict[str, Any] | None = None,
    pod_sc: dict[str, Any] | None = None,
    image_user: str = "",
) -> dict[str, Any]:
    pod = make_pod({"securityContext": container_sc or {}}, securityContext=pod_sc or {})
    return resolve_user(pod, pod["spec"]["containers"][0], image_user, IDS)


def test_container_run_as_user_beats_pod_which_beats_image() -> None:
    assert user(image_user="nginx")["uid"] == 101
    assert user({}, {"runAsUser": 2000}, image_user="nginx")["uid"] == 2000
    assert user({"runAsUser": 3000}, {"runAsUser": 2000}, image_user="nginx")["uid"] == 3000
    assert user({"runAsUser": 0}, {"runAsUser": 2000})["uid"] == 0  # 0 is a value, not unset


def test_group_from_run_as_group_else_passwd_else_zero() -> None:
    assert user({"runAsUser": 1000})["gid"] == 1000  # app's primary group
    assert user({"runAsUser": 4242})["gid"] == 0  # not in /etc/passwd
    assert user({"runAsUser": 1000, "runAsGroup": 5})["gid"] == 5
    assert user({"runAsGroup": 6}, {"runAsGroup": 5}, "app")["gid"] == 6


@pytest.mark.parametrize(
    ("image_user", "uid", "gid"),
    [
        ("", 0, 0),
        ("nginx", 101, 101),
        ("1000", 1000, 1000),
        ("1000:44", 1000, 44),
        ("app:video", 1000, 44),
        ("4242", 4242, 0),
    ],
)
def test_image_user_forms(image_user: str, uid: int, gid: int) -> None:
    resolved = user(image_user=image_user)
    assert (resolved["uid"], resolved["gid"]) == (uid, gid)


def test_supplementary_groups() -> None:
    resolved = user({}, {"supplementalGroups": [500, 20], "fsGroup": 2000}, "app")
    # primary, the image's memberships, supplementalGroups, fsGroup; no repeats.
    assert resolved["additionalGids"] == [1000, 20, 44, 500, 2000]


def test_unknown_image_user_or_group_is_a_config_error() -> None:
    with pytest.raises(ContainerConfigError, match="the image's user 'ghost' is not in its"):
        user(image_user="ghost")
    with pytest.raises(ContainerConfigError, match="the image's group 'ghosts' is not in its"):
        user(image_user="app:ghosts")


def test_run_as_non_root() -> None:
    with pytest.raises(ContainerConfigError, match="runAsNonRoot is set but the container would"):
        user({"runAsNonRoot": True})
    with pytest.raises(ContainerConfigError, match="runAsNonRoot"):
        user({}, {"runAsNonRoot": True}, "root")
    assert user({}, {"runAsNonRoot": True}, "nginx")["uid"] == 101  # resolved, so allowed
    assert user({"runAsNonRoot": False}, {"runAsNonRoot": True})["uid"] == 0


def test_image_ids_skip_malformed_lines() -> None:
    ids = ImageIds.parse("junk\nx:x:notanumber:0\nok:x:5:6:::\n", "g:x:7:ok, other\nbad\n")
    assert ids.users == {"ok": (5, 6)}
    assert ids.groups == {"g": 7}
    assert ids.memberships == {"ok": (7,), "other": (7,)}


# --- capabilities and privilege ---------------------------------------------------------------


def caps(sc: dict[str, Any], available: tuple[str, ...] = LINUX_CAPABILITIES) -> set[str]:
    return set(capabilities(sc, available))


def test_capabilities_add_and_drop() -> None:
    defaults = set(CONTAINERD_CAPABILITIES)
    assert caps({}) == defaults
    assert caps({"capabilities": {"add": ["NET_ADMIN"]}}) == defaults | {"CAP_NET_ADMIN"}
    assert caps({"capabilities": {"add": ["cap_net_admin"]}}) == defaults | {"CAP_NET_ADMIN"}
    assert caps({"capabilities": {"drop": ["NET_RAW"]}}) == defaults - {"CAP_NET_RAW"}
    assert caps({"capabilities": {"drop": ["ALL"]}}) == set()
    assert caps({"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}) == {
        "CAP_NET_BIND_SERVICE"
    }
    assert caps({"capabilities": {"add": ["ALL"], "drop": ["SYS_ADMIN"]}}) == set(
        LINUX_CAPABILITIES
    ) - {"CAP_SYS_ADMIN"}
    # Added and dropped: dropped, as in containerd.
    assert "CAP_NET_ADMIN" not in caps(
        {"capabilities": {"add": ["NET_ADMIN"], "drop": ["NET_ADMIN"]}}
    )


def test_capabilities_are_bounded_by_what_the_agent_has() -> None:
    available = tuple(c for c in LINUX_CAPABILITIES if c not in ("CAP_SYS_RESOURCE", "CAP_KILL"))
    assert caps({}, available) == set(CONTAINERD_CAPABILITIES) - {"CAP_KILL"}
    assert caps({"privileged": True}, available) == set(available)
    assert caps({"capabilities": {"add": ["ALL"]}}, available) == set(available)
    with pytest.raises(ContainerConfigError, match="CAP_SYS_RESOURCE are not available"):
        caps({"capabilities": {"add": ["SYS_RESOURCE"]}}, available)


def test_bounding_capabilities_from_proc_status() -> None:
    status = "Name:\tpython\nCapBnd:\t000001fffeffffff\n"
    found = bounding_capabilities(status)
    assert len(found) == 40
    assert "CAP_SYS_RESOURCE" not in found
    assert "CAP_CHECKPOINT_RESTORE" in found
    with pytest.raises(ValueError, match="no CapBnd line"):
        bounding_capabilities("Name:\tx\n")


def test_no_new_privileges_unless_escalation_is_allowed() -> None:
    assert spec_of(make_pod())["process"]["noNewPrivileges"] is True
    pod = make_pod({"securityContext": {"allowPrivilegeEscalation": True}})
    assert spec_of(pod)["process"]["noNewPrivileges"] is False


def test_privileged_lifts_every_restriction() -> None:
    spec = spec_of(make_pod({"securityContext": {"privileged": True}}))
    assert set(spec["process"]["capabilities"]["effective"]) == set(LINUX_CAPABILITIES)
    assert spec["process"]["noNewPrivileges"] is False
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert "maskedPaths" not in spec["linux"]
    assert "readonlyPaths" not in spec["linux"]
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/dev"] == {
        "destination": "/dev",
        "type": "bind",
        "source": "/dev",
        "options": ["rbind", "rprivate", "rw"],
    }
    assert "ro" not in mounts["/sys"]["options"]
    assert "ro" not in mounts["/sys/fs/cgroup"]["options"]


def test_read_only_root_filesystem() -> None:
    spec = spec_of(make_pod({"securityContext": {"readOnlyRootFilesystem": True}}))
    assert spec["root"]["readonly"] is True
    etc = {m["destination"]: m for m in spec["mounts"] if m["destination"].startswith("/etc/")}
    assert all("ro" in m["options"] for m in etc.values())
    assert set(etc) == {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}


# --- mounts -----------------------------------------------------------------------------------


def test_default_mounts_then_pod_mounts_parents_first() -> None:
    pod = make_pod(
        {"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    spec = spec_of(pod)
    destinations = [m["destination"] for m in spec["mounts"]]
    assert destinations[:6] == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
    ]
    assert destinations[6:] == [
        "/data",
        "/dev/shm",
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/dev/termination-log",
    ]
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/dev/shm"]["source"] == "/var/lib/outpost/pods/u-1/shm"
    assert mounts["/sys"]["options"][-1] == "ro"
    assert mounts["/sys/fs/cgroup"]["options"][-1] == "ro"
    assert mounts["/data"] == {
        "destination": "/data",
        "type": "bind",
        "source": "/var/lib/outpost/pods/u-1/volumes/data",
        "options": ["rbind", "rprivate", "rw"],
    }


def test_a_volume_at_a_default_mount_replaces_it() -> None:
    pod = make_pod(
        {"volumeMounts": [{"name": "big", "mountPath": "/dev/shm"}]},
        volumes=[{"name": "big", "emptyDir": {"medium": "Memory"}}],
    )
    shm = [m for m in spec_of(pod)["mounts"] if m["destination"] == "/dev/shm"]
    assert shm == [
        {
            "destination": "/dev/shm",
            "type": "bind",
            "source": "/var/lib/outpost/pods/u-1/volumes/big",
            "options": ["rbind", "rprivate", "rw"],
        }
    ]


def test_mount_propagation_sets_rootfs_propagation() -> None:
    pod = make_pod(
        {
            "volumeMounts": [
                {"name": "h", "mountPath": "/mnt", "mountPropagation": "HostToContainer"}
            ]
        },
        volumes=[{"name": "h", "hostPath": {"path": "/mnt"}}],
    )
    spec = spec_of(pod, host_paths={"h": HostPathInfo("/mnt", "directory")})
    assert spec["linux"]["rootfsPropagation"] == "rslave"
    assert [m["options"] for m in spec["mounts"] if m["destination"] == "/mnt"] == [
        ["rbind", "rslave", "rw"]
    ]


# --- namespaces -------------------------------------------------------------------------------


def test_host_network_keeps_the_host_network_and_uts() -> None:
    spec = spec_of(make_pod(hostNetwork=True), netns_path="/run/netns/ignored")
    types = [ns["type"] for ns in spec["linux"]["namespaces"]]
    assert "network" not in types
    assert "uts" not in types
    assert "hostname" not in spec  # runc refuses a hostname without a UTS namespace


def test_host_pid_and_ipc() -> None:
    spec = spec_of(make_pod(hostPID=True, hostIPC=True))
    types = [ns["type"] for ns in spec["linux"]["namespaces"]]
    assert "pid" not in types
    assert "ipc" not in types
    shm = next(m for m in spec["mounts"] if m["destination"] == "/dev/shm")
    assert shm["source"] == "/dev/shm"


def test_without_a_netns_path_the_container_gets_its_own() -> None:
    namespaces = spec_of(make_pod())["linux"]["namespaces"]
    assert {"type": "network"} in namespaces


def test_sysctls() -> None:
    pod = make_pod(securityContext={"sysctls": [{"name": "net.core.somaxconn", "value": "1024"}]})
    assert spec_of(pod)["linux"]["sysctl"] == {"net.core.somaxconn": "1024"}


# --- resources --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("milli", "shares"),
    [(0, 2), (1, 2), (2, 2), (10, 10), (100, 102), (1000, 1024), (10**6, 262144)],
)
def test_cpu_shares_formula(milli: int, shares: int) -> None:
    assert cpu_shares(milli) == shares


@pytest.mark.parametrize(("milli", "quota"), [(1, 1000), (10, 1000), (250, 25000), (1500, 150000)])
def test_cpu_quota_formula(milli: int, quota: int) -> None:
    assert cpu_quota(milli) == quota


def test_cgroup_values_from_quantities() -> None:
    pod = make_pod(
        {
            "resources": {
                "requests": {"cpu": "250m", "memory": "64Mi"},
                "limits": {"cpu": "1.5", "memory": "128Mi"},
            }
        }
    )
    resources = spec_of(pod, pids_limit=512)["linux"]["resources"]
    assert resources["cpu"] == {"shares": 256, "quota": 150000, "period": 100000}
    assert resources["memory"] == {"limit": 128 * 2**20}
    assert resources["pids"] == {"limit": 512}


def test_limits_alone_also_set_requests() -> None:
    pod = make_pod({"resources": {"limits": {"cpu": "500m", "memory": "1G"}}})
    resources = spec_of(pod)["linux"]["resources"]
    assert resources["cpu"]["shares"] == 512
    assert resources["memory"] == {"limit": 10**9}


def test_no_resources_means_minimum_shares_and_no_limits() -> None:
    resources = spec_of(make_pod())["linux"]["resources"]
    assert resources["cpu"] == {"shares": 2}
    assert "memory" not in resources
    assert "pids" not in resources


def test_memory_limit_rounds_up_to_a_byte() -> None:
    pod = make_pod({"resources": {"limits": {"memory": "1500m"}}})
    assert spec_of(pod)["linux"]["resources"]["memory"] == {"limit": 2}


def test_oom_score_by_qos() -> None:
    guaranteed = make_pod({"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}})
    assert spec_of(guaranteed)["process"]["oomScoreAdj"] == -997
    assert spec_of(guaranteed, oom_score_floor=-500)["process"]["oomScoreAdj"] == -500
    burstable = make_pod({"resources": {"requests": {"memory": "1Gi"}}})
    assert "oomScoreAdj" not in spec_of(burstable)["process"]
    assert spec_of(burstable, node_memory=4 * 2**30)["process"]["oomScoreAdj"] == 750
    greedy = make_pod({"resources": {"requests": {"memory": "4Gi"}}})
    assert spec_of(greedy, node_memory=4 * 2**30)["process"]["oomScoreAdj"] == 3
    tiny = make_pod({"resources": {"requests": {"cpu": "1"}}})
    assert spec_of(tiny, node_memory=4 * 2**30)["process"]["oomScoreAdj"] == 999


# --- devices ----------------------------------------------------------------------------------

SERIAL = HostPathInfo("/dev/ttyUSB0", "char-device", mode=0o660, uid=0, gid=20, major=188, minor=0)


def serial_pod(read_only: bool = False) -> dict[str, Any]:
    return make_pod(
        {"volumeMounts": [{"name": "serial", "mountPath": "/dev/ttyUSB0", "readOnly": read_only}]},
        volumes=[{"name": "serial", "hostPath": {"path": "/dev/ttyUSB0", "type": "CharDevice"}}],
    )


def test_device_passthrough_adds_the_node_and_exactly_one_allow_rule() -> None:
    spec = spec_of(serial_pod(), host_paths={"serial": SERIAL})
    assert spec["linux"]["devices"] == [
        {
            "path": "/dev/ttyUSB0",
            "type": "c",
            "major": 188,
            "minor": 0,
            "fileMode": 0o660,
            "uid": 0,
            "gid": 20,
        }
    ]
    rules = spec["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    assert rules[-1] == {"allow": True, "type": "c", "major": 188, "minor": 0, "access": "rw"}
    # Between them, the devices every container has: null, zero, full, random, urandom, tty,
    # console, ptmx and every pts.
    assert list(rules[1:-1]) == [
        *(
            {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
            for major, minor in ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2))
        ),
        {"allow": True, "type": "c", "major": 136, "access": "rwm"},
    ]
    assert not any(m["destination"] == "/dev/ttyUSB0" for m in spec["mounts"])


def test_read_only_device_is_read_only_in_the_cgroup() -> None:
    spec = spec_of(serial_pod(read_only=True), host_paths={"serial": SERIAL})
    assert spec["linux"]["resources"]["devices"][-1]["access"] == "r"


def test_an_untyped_host_path_that_is_a_device_is_passed_as_one() -> None:
    pod = serial_pod()
    del pod["spec"]["volumes"][0]["hostPath"]["type"]
    spec = spec_of(pod, host_paths={"serial": SERIAL})
    assert spec["linux"]["devices"][0]["major"] == 188


def test_default_device_rules() -> None:
    rules = runtime_spec.DEFAULT_DEVICE_RULES
    allowed = {(r["major"], r.get("minor")) for r in rules if r["allow"]}
    # null, zero, full, random, urandom, tty, console, ptmx, every pts.
    assert allowed == {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (136, None)}


def test_the_spec_is_a_pure_function_of_its_inputs() -> None:
    pod = serial_pod()
    before = copy.deepcopy(pod)
    first = spec_of(pod, host_paths={"serial": SERIAL})
    second = spec_of(pod, host_paths={"serial": SERIAL})
    assert first == second
    assert pod == before
