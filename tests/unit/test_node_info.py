"""The node status report: parsing the host's files, the thresholds, the report's shape."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from edge import node_info
from edge.node_info import HostFacts

MEMINFO = """\
MemTotal:       24684092 kB
MemFree:        23091296 kB
MemAvailable:   23942368 kB
Buffers:           13856 kB
Cached:           780348 kB
HugePages_Total:       0
"""
OLD_MEMINFO = """\
MemTotal:         1000 kB
MemFree:           100 kB
Buffers:            20 kB
Cached:            300 kB
"""
OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
"""
RUNC_VERSION = """\
runc version 1.1.5+ds1
commit: 1.1.5+ds1-1+deb12u1
spec: 1.0.2-dev
go: go1.19.8
"""


def facts(**changes: object) -> HostFacts:
    base = HostFacts(
        cpus=2,
        memory_total_kib=2_000_000,
        memory_available_kib=1_000_000,
        disk_total_kib=10_000_000,
        disk_available_kib=5_000_000,
        processes=200,
        pid_max=32768,
        kernel="6.1.0-18-amd64",
        os_image="Debian GNU/Linux 12 (bookworm)",
        machine="x86_64",
        machine_id="0123456789abcdef0123456789abcdef",
        system_uuid="0123456789abcdef0123456789abcdef",
        boot_id="6f1c7e0a-95a4-4f0b-bb9b-8f4d52a3e2b1",
        internal_ip="192.0.2.10",
        hostname="gw-17",
        runc_version="1.1.5+ds1",
    )
    return dataclasses.replace(base, **changes)


def test_meminfo_gives_total_and_available() -> None:
    assert node_info.parse_meminfo(MEMINFO) == (24684092, 23942368)


def test_meminfo_without_mem_available_estimates_it() -> None:
    assert node_info.parse_meminfo(OLD_MEMINFO) == (1000, 420)


def test_os_release_pretty_name_falls_back_to_name_then_linux() -> None:
    assert node_info.parse_os_release(OS_RELEASE) == "Debian GNU/Linux 12 (bookworm)"
    assert node_info.parse_os_release("NAME='Alpine Linux'\n") == "Alpine Linux"
    assert node_info.parse_os_release("") == "Linux"


def test_process_count_from_loadavg() -> None:
    assert node_info.parse_process_count("0.10 0.60 1.06 1/116 24039\n") == 116
    assert node_info.parse_process_count("garbage") == 0


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", "amd64"), ("aarch64", "arm64"), ("armv7l", "arm"), ("mips", "mips")],
)
def test_arch_uses_kubernetes_names(machine: str, arch: str) -> None:
    assert node_info.kube_arch(machine) == arch


def test_runc_version_from_its_output() -> None:
    assert node_info.parse_runc_version(RUNC_VERSION) == "1.1.5+ds1"
    assert node_info.parse_runc_version("") == ""


def test_read_facts_from_a_fake_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = {
        "proc/meminfo": MEMINFO,
        "proc/loadavg": "0.10 0.60 1.06 1/116 24039\n",
        "proc/sys/kernel/pid_max": "32768\n",
        "proc/sys/kernel/random/boot_id": "6f1c7e0a-95a4-4f0b-bb9b-8f4d52a3e2b1\n",
        "etc/os-release": OS_RELEASE,
        "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    uname = os.uname_result(("Linux", "gw-17", "6.1.0-18-arm64", "#1 SMP", "aarch64"))
    found = node_info.read_facts(
        tmp_path, runc_version="1.1.5", cloud_host=None, root=root, uname=uname, cpus=4
    )
    fs = os.statvfs(tmp_path)
    assert found.disk_total_kib == fs.f_blocks * fs.f_frsize // 1024
    assert found == dataclasses.replace(
        found,
        cpus=4,
        memory_total_kib=24684092,
        memory_available_kib=23942368,
        processes=116,
        pid_max=32768,
        kernel="6.1.0-18-arm64",
        os_image="Debian GNU/Linux 12 (bookworm)",
        machine="aarch64",
        machine_id="0123456789abcdef0123456789abcdef",
        # No DMI uuid in the fake root: the machine id stands in.
        system_uuid="0123456789abcdef0123456789abcdef",
        boot_id="6f1c7e0a-95a4-4f0b-bb9b-8f4d52a3e2b1",
        hostname="gw-17",
        runc_version="1.1.5",
    )


def test_read_facts_survives_missing_files(tmp_path: Path) -> None:
    found = node_info.read_facts(
        tmp_path / "nowhere", runc_version="", cloud_host=None, root=tmp_path
    )
    assert (found.memory_total_kib, found.disk_total_kib, found.machine_id) == (0, 0, "")
    assert node_info.conditions(found)[-1]["status"] == "True"


def test_primary_ipv4_is_the_source_address_towards_the_cloud() -> None:
    assert node_info.primary_ipv4("127.0.0.1") != "127.0.0.1"


def test_node_status_matches_the_contract() -> None:
    body = node_info.node_status("gw-17", facts(), "0.1.0")
    assert body["labels"] == {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": "gw-17",
    }
    assert body["capacity"] == {
        "cpu": "2",
        "memory": "2000000Ki",
        "pods": "110",
        "ephemeral-storage": "10000000Ki",
    }
    assert body["allocatable"] == {
        "cpu": "2",
        "memory": f"{2_000_000 - 102400}Ki",
        "pods": "110",
        "ephemeral-storage": "9000000Ki",
    }
    assert body["nodeInfo"] == {
        "machineID": "0123456789abcdef0123456789abcdef",
        "systemUUID": "0123456789abcdef0123456789abcdef",
        "bootID": "6f1c7e0a-95a4-4f0b-bb9b-8f4d52a3e2b1",
        "kernelVersion": "6.1.0-18-amd64",
        "osImage": "Debian GNU/Linux 12 (bookworm)",
        "containerRuntimeVersion": "runc://1.1.5+ds1",
        "kubeletVersion": "v0.1.0-outpost",
        "kubeProxyVersion": "",
        "operatingSystem": "linux",
        "architecture": "amd64",
    }
    assert body["addresses"] == [
        {"type": "InternalIP", "address": "192.0.2.10"},
        {"type": "Hostname", "address": "gw-17"},
    ]
    assert [(c["type"], c["status"]) for c in body["conditions"]] == [
        ("MemoryPressure", "False"),
        ("DiskPressure", "False"),
        ("PIDPressure", "False"),
        ("Ready", "True"),
    ]


def test_no_internal_ip_leaves_only_the_hostname() -> None:
    body = node_info.node_status("gw-17", facts(internal_ip=""), "0.1.0")
    assert body["addresses"] == [{"type": "Hostname", "address": "gw-17"}]


@pytest.mark.parametrize(
    ("changes", "pressure"),
    [
        ({"memory_available_kib": 100 * 1024 - 1}, "MemoryPressure"),
        ({"disk_available_kib": 999_999}, "DiskPressure"),
        ({"processes": 29_500}, "PIDPressure"),
    ],
)
def test_pressure_conditions_at_their_thresholds(changes: dict, pressure: str) -> None:
    statuses = {c["type"]: c for c in node_info.conditions(facts(**changes))}
    assert statuses[pressure]["status"] == "True"
    assert statuses[pressure]["reason"].startswith(("KubeletHasInsufficient", "KubeletHasDisk"))
    assert [t for t, c in statuses.items() if c["status"] == "True"] == [pressure, "Ready"]


def test_just_above_the_thresholds_is_no_pressure() -> None:
    at = facts(memory_available_kib=100 * 1024, disk_available_kib=1_000_000, processes=29_491)
    assert [c["status"] for c in node_info.conditions(at)] == ["False", "False", "False", "True"]
