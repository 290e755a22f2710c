"""Volumes: file plans and their atomic writes, host paths, mounts, subPath, /etc files."""

from __future__ import annotations

import base64
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from edge.pods.hostname import PodHostname
from edge.pods.resolver import Resolver
from edge.pods.volumes import (
    ContainerVolumes,
    FileEntry,
    HostPathInfo,
    Mount,
    PodLayout,
    Tmpfs,
    VolumeError,
    check_host_path,
    check_host_paths,
    check_subpaths,
    container_volumes,
    pod_files,
    pod_tmpfs,
    volume_files,
    write_plan,
)
from tests.appliance import require_root

LAYOUT = PodLayout(Path("/pods/u-1"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_pod(volumes: list[dict[str, Any]], **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "meter",
            "namespace": "plant",
            "uid": "u-1",
            "labels": {"app": "modbus", "tier": 'edge "north"'},
            "annotations": {"note": "line1\nline2"},
        },
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "x",
                    "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
                    **container,
                }
            ],
            "volumes": volumes,
        },
    }


RESOLVER = Resolver(
    configmaps={
        "cfg": {
            "data": {"app.conf": "rate=9600\n", "log.conf": "level=info"},
            "binaryData": {"logo.png": b64(b"\x89PNG")},
        }
    },
    secrets={"creds": {"data": {"user": b64(b"admin"), "password": b64(b"s3cret")}}},
)


def files(volume: dict[str, Any]) -> list[FileEntry]:
    return volume_files(make_pod([volume]), RESOLVER)[volume["name"]]


# --- file plans -------------------------------------------------------------------------------


def test_config_map_without_items_has_every_key_including_binary() -> None:
    assert files({"name": "v", "configMap": {"name": "cfg"}}) == [
        FileEntry("app.conf", b"rate=9600\n", 0o644),
        FileEntry("log.conf", b"level=info", 0o644),
        FileEntry("logo.png", b"\x89PNG", 0o644),
    ]


def test_items_choose_keys_paths_and_modes() -> None:
    volume = {
        "name": "v",
        "configMap": {
            "name": "cfg",
            "defaultMode": 0o600,
            "items": [
                {"key": "app.conf", "path": "conf/app.conf"},
                {"key": "log.conf", "path": "log", "mode": 0o400},
            ],
        },
    }
    assert files(volume) == [
        FileEntry("conf/app.conf", b"rate=9600\n", 0o600),
        FileEntry("log", b"level=info", 0o400),
    ]


def test_secret_values_are_decoded() -> None:
    volume = {"name": "v", "secret": {"secretName": "creds", "defaultMode": 0o440}}
    assert files(volume) == [
        FileEntry("password", b"s3cret", 0o440),
        FileEntry("user", b"admin", 0o440),
    ]


def test_missing_objects_and_keys() -> None:
    with pytest.raises(VolumeError, match="volume 'v': ConfigMap 'gone' not found"):
        files({"name": "v", "configMap": {"name": "gone"}})
    assert files({"name": "v", "configMap": {"name": "gone", "optional": True}}) == []
    items = [{"key": "nope", "path": "x"}, {"key": "user", "path": "u"}]
    with pytest.raises(VolumeError, match="volume 'v': Secret 'creds' has no key 'nope'"):
        files({"name": "v", "secret": {"secretName": "creds", "items": items}})
    optional = {"secretName": "creds", "items": items, "optional": True}
    assert files({"name": "v", "secret": optional}) == [FileEntry("u", b"admin")]


def test_downward_api_files_match_the_kubelet() -> None:
    volume = {
        "name": "v",
        "downwardAPI": {
            "defaultMode": 0o444,
            "items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}},
                {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}, "mode": 0o400},
                {
                    "path": "mem",
                    "resourceFieldRef": {
                        "containerName": "main",
                        "resource": "limits.memory",
                        "divisor": "1Mi",
                    },
                },
                {
                    "path": "cpu",
                    "resourceFieldRef": {
                        "containerName": "main",
                        "resource": "limits.cpu",
                        "divisor": "1m",
                    },
                },
            ],
        },
    }
    assert files(volume) == [
        FileEntry("labels", b'app="modbus"\ntier="edge \\"north\\""', 0o444),
        FileEntry("annotations", b'note="line1\\nline2"', 0o444),
        FileEntry("app", b"modbus", 0o444),
        FileEntry("name", b"meter", 0o400),
        FileEntry("mem", b"64", 0o444),
        FileEntry("cpu", b"500", 0o444),
    ]


def test_projected_sources_combine_and_tokens_are_skipped() -> None:
    volume = {
        "name": "v",
        "projected": {
            "defaultMode": 0o640,
            "sources": [
                {"configMap": {"name": "cfg", "items": [{"key": "app.conf", "path": "app"}]}},
                {"secret": {"name": "creds", "items": [{"key": "user", "path": "user"}]}},
                {
                    "downwardAPI": {
                        "items": [{"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    }
                },
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                {"configMap": {"name": "kube-root-ca.crt", "optional": True}},
            ],
        },
    }
    assert files(volume) == [
        FileEntry("app", b"rate=9600\n", 0o640),
        FileEntry("user", b"admin", 0o640),
        FileEntry("ns", b"plant", 0o640),
    ]


TOKEN_VOLUME = {
    "name": "kube-api-access",
    "projected": {
        "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"serviceAccountToken": {"path": "vault", "audience": "vault"}},
        ]
    },
}


def tokens(uid: str = "u-1") -> dict[str, Any]:
    """The ServiceAccountToken object the cloud sends for the pod ``meter``."""
    return {
        "metadata": {"name": "meter", "namespace": "plant", "uid": uid},
        "tokens": [
            {"audience": "", "expirationSeconds": 3607, "token": "jwt-api"},
            {"audience": "vault", "expirationSeconds": 3600, "token": "jwt-vault"},
            {"audience": "vault", "expirationSeconds": 600, "token": "jwt-short"},
        ],
    }


def test_service_account_tokens_come_from_the_pods_token_object() -> None:
    plan = volume_files(make_pod([TOKEN_VOLUME]), Resolver(tokens=tokens()))
    assert plan["kube-api-access"] == [
        FileEntry("token", b"jwt-api", 0o644),
        FileEntry("vault", b"jwt-vault", 0o644),  # expirationSeconds defaults to 3600
    ]


@pytest.mark.parametrize(
    "resolver",
    [
        Resolver(tokens={}),  # not arrived yet
        Resolver(tokens=tokens(uid="u-of-an-earlier-pod-of-that-name")),
        Resolver(tokens={**tokens(), "tokens": tokens()["tokens"][1:]}),  # not this audience
    ],
)
def test_a_token_not_there_yet_fails_the_volume_until_it_arrives(resolver: Resolver) -> None:
    with pytest.raises(VolumeError, match="has not arrived from the cloud yet"):
        volume_files(make_pod([TOKEN_VOLUME]), resolver)


def test_standalone_pods_run_without_their_token_files() -> None:
    assert volume_files(make_pod([TOKEN_VOLUME]), Resolver())["kube-api-access"] == []


def test_a_key_that_would_leave_the_volume_is_refused() -> None:
    resolver = Resolver(configmaps={"evil": {"data": {"..data": "x"}}})
    with pytest.raises(VolumeError, match="would leave the volume"):
        volume_files(make_pod([{"name": "v", "configMap": {"name": "evil"}}]), resolver)


def test_other_volume_kinds_have_no_plan() -> None:
    assert volume_files(make_pod([{"name": "v", "emptyDir": {}}]), RESOLVER) == {}


# --- write_plan -------------------------------------------------------------------------------


def listing(directory: Path) -> dict[str, str]:
    return {p.name: os.readlink(p) for p in directory.iterdir() if p.is_symlink()}


def test_write_plan_is_the_kubelet_atomic_layout(tmp_path: Path) -> None:
    plan = [FileEntry("app.conf", b"a", 0o600), FileEntry("conf/x", b"x", 0o644)]
    write_plan(plan, tmp_path)

    links = listing(tmp_path)
    version = links.pop("..data")
    assert links == {"app.conf": "..data/app.conf", "conf": "..data/conf"}
    assert version.startswith("..")
    assert (tmp_path / "app.conf").read_bytes() == b"a"
    assert (tmp_path / "conf" / "x").read_bytes() == b"x"
    assert (tmp_path / version / "app.conf").stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "..data_tmp").exists()


def test_an_update_switches_versions_and_removes_the_old_one(tmp_path: Path) -> None:
    write_plan([FileEntry("a", b"1"), FileEntry("b", b"2")], tmp_path)
    first = os.readlink(tmp_path / "..data")

    write_plan([FileEntry("a", b"one"), FileEntry("c", b"3")], tmp_path)

    second = os.readlink(tmp_path / "..data")
    assert second != first
    assert not (tmp_path / first).exists()
    assert (tmp_path / "a").read_bytes() == b"one"
    assert not (tmp_path / "b").exists()  # gone from the plan, gone from the volume
    assert (tmp_path / "c").read_bytes() == b"3"
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".."))
    assert hidden == sorted(["..data", second])


def test_an_identical_plan_is_not_rewritten(tmp_path: Path) -> None:
    plan = [FileEntry("a", b"1", 0o640)]
    write_plan(plan, tmp_path)
    version = os.readlink(tmp_path / "..data")
    inode = (tmp_path / "a").stat().st_ino

    write_plan(plan, tmp_path)

    assert os.readlink(tmp_path / "..data") == version
    assert (tmp_path / "a").stat().st_ino == inode
    write_plan([FileEntry("a", b"1", 0o600)], tmp_path)  # a new mode is a change
    assert os.readlink(tmp_path / "..data") != version


def test_fs_group_owns_the_files_and_can_read_them(tmp_path: Path) -> None:
    require_root("changing a file's group to an arbitrary one needs root")
    write_plan([FileEntry("k", b"v", 0o400)], tmp_path, fs_group=2000)
    info = (tmp_path / "k").stat()
    assert info.st_gid == 2000
    assert info.st_mode & 0o777 == 0o440


def test_an_empty_plan_is_an_empty_volume(tmp_path: Path) -> None:
    write_plan([], tmp_path)
    assert listing(tmp_path).keys() == {"..data"}


def test_write_plan_refuses_paths_outside(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="would leave the volume"):
        write_plan([FileEntry("../x", b"")], tmp_path / "v")
    assert not (tmp_path / "x").exists()


# --- host paths -------------------------------------------------------------------------------


def test_host_path_types(tmp_path: Path) -> None:
    folder = tmp_path / "dir"
    assert check_host_path(str(folder), "DirectoryOrCreate").kind == "directory"
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755 & ~_umask())
    assert check_host_path(str(folder), "Directory").kind == "directory"
    file = tmp_path / "file"
    assert check_host_path(str(file), "FileOrCreate").kind == "file"
    assert file.read_bytes() == b""
    assert check_host_path(str(file), "File").kind == "file"
    assert check_host_path(str(tmp_path / "new"), "").kind == "directory"  # containerd's way
    null = check_host_path("/dev/null", "CharDevice")
    assert (null.kind, null.major, null.minor) == ("char-device", 1, 3)
    assert check_host_path("/dev/null").is_device


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_host_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        assert check_host_path(str(path), "Socket").kind == "socket"


@pytest.mark.parametrize(
    ("setup", "type_", "message"),
    [
        ("file", "Directory", "is a file, but the volume's type is Directory"),
        ("dir", "File", "is a directory, but the volume's type is File"),
        ("file", "CharDevice", "is a file, but the volume's type is CharDevice"),
        ("none", "Directory", "does not exist (type Directory)"),
        ("none", "Socket", "does not exist (type Socket)"),
        ("nodir", "FileOrCreate", "FileOrCreate does not create directories"),
    ],
)
def test_host_path_mismatches(tmp_path: Path, setup: str, type_: str, message: str) -> None:
    path = tmp_path / "p"
    if setup == "file":
        path.write_text("")
    elif setup == "dir":
        path.mkdir()
    elif setup == "nodir":
        path = tmp_path / "missing" / "p"
    with pytest.raises(VolumeError, match=re.escape(message)):
        check_host_path(str(path), type_)


def test_check_host_paths_names_the_volume(tmp_path: Path) -> None:
    pod = make_pod([{"name": "logs", "hostPath": {"path": str(tmp_path / "x"), "type": "File"}}])
    with pytest.raises(VolumeError, match=r"volume 'logs': hostPath .* does not exist"):
        check_host_paths(pod)


# --- container mounts -------------------------------------------------------------------------


def mounts_of(pod: dict[str, Any], **kwargs: Any) -> dict[str, Mount]:
    volumes = container_volumes(
        pod,
        "main",
        layout=LAYOUT,
        host_paths=kwargs.get("host_paths", {}),
        env=kwargs.get("env", {}),
    )
    return {mount.destination: mount for mount in volumes.mounts}


def test_each_volume_kind_mounts_from_its_place() -> None:
    pod = make_pod(
        [
            {"name": "scratch", "emptyDir": {}},
            {"name": "ram", "emptyDir": {"medium": "Memory"}},
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "sec", "secret": {"secretName": "creds"}},
            {"name": "logs", "hostPath": {"path": "/var/log/plant"}},
        ],
        volumeMounts=[
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "ram", "mountPath": "/ram", "readOnly": True},
            {"name": "cfg", "mountPath": "/etc/app"},
            {"name": "sec", "mountPath": "/secrets/"},
            {"name": "logs", "mountPath": "/logs"},
        ],
    )
    mounts = mounts_of(pod, host_paths={"logs": HostPathInfo("/var/log/plant", "directory")})
    assert mounts["/scratch"] == Mount(
        "/scratch", "/pods/u-1/volumes/scratch", False, volume="scratch"
    )
    assert mounts["/ram"].read_only is True
    assert mounts["/etc/app"].read_only is True  # ConfigMaps are always read-only
    assert mounts["/secrets"].source == "/pods/u-1/volumes/sec"
    assert mounts["/secrets"].read_only is True
    assert mounts["/logs"] == Mount("/logs", "/var/log/plant", False, volume="logs")


def test_pod_files_and_termination_log_are_mounted() -> None:
    mounts = mounts_of(make_pod([]))
    assert mounts["/etc/hosts"].source == "/pods/u-1/etc/hosts"
    assert mounts["/etc/hostname"].source == "/pods/u-1/etc/hostname"
    assert mounts["/etc/resolv.conf"].source == "/pods/u-1/etc/resolv.conf"
    assert mounts["/dev/shm"].source == "/pods/u-1/shm"
    log = mounts["/dev/termination-log"]
    assert (log.source, log.read_only) == ("/pods/u-1/containers/main/termination-log", False)


def test_a_custom_termination_message_path() -> None:
    mounts = mounts_of(make_pod([], terminationMessagePath="/tmp/why"))
    assert "/dev/termination-log" not in mounts
    assert mounts["/tmp/why"].source.endswith("/containers/main/termination-log")


def test_the_container_may_bring_its_own_etc_hosts() -> None:
    pod = make_pod(
        [{"name": "h", "configMap": {"name": "cfg"}}],
        volumeMounts=[{"name": "h", "mountPath": "/etc/hosts", "subPath": "app.conf"}],
    )
    mounts = mounts_of(pod)
    assert mounts["/etc/hosts"].source == "/pods/u-1/volumes/h/app.conf"
    assert mounts["/etc/hostname"].source == "/pods/u-1/etc/hostname"


def test_sub_path_and_sub_path_expr() -> None:
    pod = make_pod(
        [{"name": "data", "emptyDir": {}}],
        volumeMounts=[
            {"name": "data", "mountPath": "/a", "subPath": "x/y"},
            {"name": "data", "mountPath": "/b", "subPathExpr": "logs/$(POD_NAME)"},
            {"name": "data", "mountPath": "/c", "subPathExpr": "$(UNSET)"},
        ],
    )
    mounts = mounts_of(pod, env={"POD_NAME": "meter"})
    assert mounts["/a"].source == "/pods/u-1/volumes/data/x/y"
    assert mounts["/a"].volume_root == "/pods/u-1/volumes/data"
    assert mounts["/b"].source == "/pods/u-1/volumes/data/logs/meter"
    assert mounts["/c"].source == "/pods/u-1/volumes/data/$(UNSET)"  # as the kubelet leaves it


def test_a_sub_path_expr_that_expands_outside_is_refused() -> None:
    pod = make_pod(
        [{"name": "data", "emptyDir": {}}],
        volumeMounts=[{"name": "data", "mountPath": "/a", "subPathExpr": "$(WHERE)"}],
    )
    with pytest.raises(VolumeError, match=re.escape("subPath '../..' must stay inside the volume")):
        mounts_of(pod, env={"WHERE": "../.."})


def test_mounts_are_ordered_parents_first() -> None:
    pod = make_pod(
        [{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}],
        volumeMounts=[
            {"name": "a", "mountPath": "/srv/data/inner"},
            {"name": "b", "mountPath": "/srv"},
        ],
    )
    volumes = container_volumes(pod, "main", layout=LAYOUT, host_paths={}, env={})
    order = [m.destination for m in volumes.mounts]
    assert order.index("/srv") < order.index("/srv/data/inner")


def test_a_device_volume_becomes_a_device() -> None:
    pod = make_pod(
        [{"name": "serial", "hostPath": {"path": "/dev/ttyUSB0", "type": "CharDevice"}}],
        volumeMounts=[{"name": "serial", "mountPath": "/dev/modbus"}],
    )
    info = HostPathInfo("/dev/ttyUSB0", "char-device", 0o660, 0, 20, 188, 0)
    volumes = container_volumes(pod, "main", layout=LAYOUT, host_paths={"serial": info}, env={})
    assert [d.path for d in volumes.devices] == ["/dev/modbus"]
    assert volumes.devices[0].oci()["gid"] == 20
    assert "/dev/modbus" not in {m.destination for m in volumes.mounts}


def test_oci_mount_entries() -> None:
    assert Mount("/a", "/src", read_only=True, propagation="rslave").oci() == {
        "destination": "/a",
        "type": "bind",
        "source": "/src",
        "options": ["rbind", "rslave", "ro"],
    }


# --- subPath safety (I/O) ---------------------------------------------------------------------


def sub_mount(root: Path, sub: str, read_only: bool = False) -> ContainerVolumes:
    mount = Mount("/m", f"{root}/{sub}", read_only, volume="data", volume_root=str(root))
    return ContainerVolumes((mount,), ())


def test_missing_sub_paths_of_writable_volumes_are_created(tmp_path: Path) -> None:
    check_subpaths(sub_mount(tmp_path, "x/y"))
    assert (tmp_path / "x" / "y").is_dir()


def test_missing_sub_path_of_a_read_only_volume_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="volume 'data': subPath 'nope' does not exist"):
        check_subpaths(sub_mount(tmp_path, "nope", read_only=True))


def test_a_planted_symlink_cannot_lead_out(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    (root / "evil").symlink_to("/etc")
    with pytest.raises(VolumeError, match="subPath 'evil' leads outside the volume"):
        check_subpaths(sub_mount(root, "evil"))
    with pytest.raises(VolumeError, match="leads outside the volume"):
        check_subpaths(sub_mount(root, "evil/newdir"))
    assert not Path("/etc/newdir").exists()


def test_a_sub_path_through_the_data_link_is_fine(tmp_path: Path) -> None:
    write_plan([FileEntry("app.conf", b"x")], tmp_path)
    check_subpaths(sub_mount(tmp_path, "app.conf", read_only=True))


# --- tmpfs ------------------------------------------------------------------------------------


def test_memory_backed_directories() -> None:
    pod = make_pod(
        [
            {"name": "disk", "emptyDir": {}},
            {"name": "sized", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
            {"name": "unsized", "emptyDir": {"medium": "Memory"}},
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "sec", "secret": {"secretName": "creds"}},
        ]
    )
    assert pod_tmpfs(pod, LAYOUT) == [
        # containerd's /dev/shm: 64 MiB.
        Tmpfs(LAYOUT.shm, ("nosuid", "nodev", "noexec", "mode=1777", f"size={64 * 2**20}")),
        Tmpfs(LAYOUT.volume("sized"), ("nosuid", "nodev", "mode=777", f"size={16 * 2**20}")),
        # No sizeLimit: the pod's memory limit, as every container has one.
        Tmpfs(LAYOUT.volume("unsized"), ("nosuid", "nodev", "mode=777", f"size={64 * 2**20}")),
        Tmpfs(LAYOUT.volume("sec"), ("nosuid", "nodev", "mode=755")),
    ]


def test_host_ipc_shares_the_host_shm_and_no_limit_means_no_size() -> None:
    pod = make_pod([{"name": "ram", "emptyDir": {"medium": "Memory"}}])
    pod["spec"]["hostIPC"] = True
    del pod["spec"]["containers"][0]["resources"]
    assert pod_tmpfs(pod, LAYOUT) == [Tmpfs(LAYOUT.volume("ram"), ("nosuid", "nodev", "mode=777"))]


# --- /etc files -------------------------------------------------------------------------------

HOST_RESOLV = (
    "# generated\nnameserver 192.168.1.1\nnameserver 192.168.1.2\nsearch lan\noptions edns0\n"
)


def etc(pod: dict[str, Any], **kwargs: Any) -> dict[str, str]:
    names = kwargs.pop("hostname", PodHostname("meter", "meter", ""))
    entries = pod_files(
        pod,
        hostname=names,
        pod_ips=kwargs.pop("pod_ips", ["10.88.0.4"]),
        host_hosts="127.0.0.1 localhost gw\n",
        host_resolv=HOST_RESOLV,
        **kwargs,
    )
    return {entry.path: entry.data.decode() for entry in entries}


def test_hosts_file_for_a_pod() -> None:
    pod = make_pod([])
    pod["spec"]["hostAliases"] = [{"ip": "10.0.0.9", "hostnames": ["plc", "plc.local"]}]
    hosts = etc(pod, hostname=PodHostname("meter", "meter", "meter.sub.plant.svc.cluster.local"))[
        "hosts"
    ]
    assert hosts.startswith("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n")
    assert "10.88.0.4\tmeter.sub.plant.svc.cluster.local\tmeter\n" in hosts
    assert hosts.endswith("# Entries added by HostAliases.\n10.0.0.9\tplc\tplc.local\n")


def test_hosts_file_on_the_host_network() -> None:
    pod = make_pod([])
    pod["spec"]["hostNetwork"] = True
    assert etc(pod)["hosts"] == (
        "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost gw\n"
    )


def test_hostname_file() -> None:
    assert etc(make_pod([]))["hostname"] == "meter\n"


def test_resolv_conf_cluster_first_with_cluster_dns() -> None:
    assert etc(make_pod([]), cluster_dns=["10.96.0.10"])["resolv.conf"] == (
        "search plant.svc.cluster.local svc.cluster.local cluster.local lan\n"
        "nameserver 10.96.0.10\n"
        "options ndots:5\n"
    )


def test_resolv_conf_falls_back_to_the_node_without_cluster_dns() -> None:
    assert etc(make_pod([]))["resolv.conf"] == (
        "search lan\nnameserver 192.168.1.1\nnameserver 192.168.1.2\noptions edns0\n"
    )


def test_resolv_conf_host_network_uses_the_node_unless_asked() -> None:
    pod = make_pod([])
    pod["spec"]["hostNetwork"] = True
    assert "192.168.1.1" in etc(pod, cluster_dns=["10.96.0.10"])["resolv.conf"]
    pod["spec"]["dnsPolicy"] = "ClusterFirstWithHostNet"
    assert "nameserver 10.96.0.10\n" in etc(pod, cluster_dns=["10.96.0.10"])["resolv.conf"]


def test_resolv_conf_none_with_dns_config() -> None:
    pod = make_pod([])
    pod["spec"]["dnsPolicy"] = "None"
    pod["spec"]["dnsConfig"] = {
        "nameservers": ["1.1.1.1", "1.1.1.1", "8.8.8.8"],
        "searches": ["plant.local"],
        "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}],
    }
    assert etc(pod)["resolv.conf"] == (
        "search plant.local\nnameserver 1.1.1.1\nnameserver 8.8.8.8\noptions ndots:2 rotate\n"
    )


def test_dns_config_merges_over_the_policy() -> None:
    pod = make_pod([])
    pod["spec"]["dnsConfig"] = {
        "nameservers": ["9.9.9.9", "8.8.8.8", "1.1.1.1"],
        "options": [{"name": "ndots", "value": "1"}],
    }
    resolv = etc(pod, cluster_dns=["10.96.0.10"])["resolv.conf"]
    # At most three nameservers; a dnsConfig option replaces the policy's of the same name.
    assert resolv.count("nameserver") == 3
    assert "nameserver 1.1.1.1" not in resolv
    assert resolv.endswith("options ndots:1\n")


def test_write_plan_failures_are_volume_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(VolumeError, match=r"cannot write files into .*file/v"):
        write_plan([FileEntry("a", b"")], blocker / "v")
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "a").write_text("left over")
    with pytest.raises(VolumeError, match="File exists"):
        write_plan([FileEntry("a", b"")], tmp_path / "vol")


def test_labels_are_quoted_as_go_does() -> None:
    item = {"path": "l", "fieldRef": {"fieldPath": "metadata.labels"}}
    pod = make_pod([{"name": "v", "downwardAPI": {"items": [item]}}])
    pod["metadata"]["labels"] = {"b": "tab\there", "a": "bell\x07 del\x7f é \u200b 🙂"}
    (entry,) = volume_files(pod, RESOLVER)["v"]
    assert entry.data.decode() == 'a="bell\\a del\\x7f é \\u200b 🙂"\nb="tab\\there"'


def test_host_paths_must_have_been_checked() -> None:
    pod = make_pod(
        [{"name": "logs", "hostPath": {"path": "/var/log"}}],
        volumeMounts=[{"name": "logs", "mountPath": "/logs"}],
    )
    with pytest.raises(VolumeError, match="pass the result of check_host_paths"):
        mounts_of(pod)
