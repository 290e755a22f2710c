"""The node's own status as Kubernetes shows it: capacity, allocatable, nodeInfo, addresses and
conditions.

``read_facts`` gathers what the host says (``/proc``, ``/etc``, ``statvfs`` of the data
directory, the route to the cloud); everything after that is pure: ``node_status`` turns
``HostFacts`` into the body of the ``/Node/<node>`` status report the cloud writes into the
Node object. Tests feed ``read_facts`` a fake root with fixture files.

Pressure conditions follow the kubelet's default hard eviction thresholds, which are also what
allocatable holds back from capacity:

- MemoryPressure when less than 100 MiB is available (``memory.available<100Mi``);
- DiskPressure when less than 10 % of the data directory's filesystem is free
  (``nodefs.available<10%``): images, logs and pod volumes all live there;
- PIDPressure when more than 90 % of ``kernel.pid_max`` is in use (the kubelet has no default
  here; Outpost picks one so that a fork bomb shows before the node fails).

Outpost does not evict on these: it reports them, so that the scheduler stops placing pods.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_PODS = 110  # the kubelet's default --max-pods
MEMORY_EVICTION_KIB = 100 * 1024
DISK_EVICTION_FRACTION = 0.10
PID_PRESSURE_FRACTION = 0.90

# ``uname -m`` -> the GOARCH names Kubernetes labels nodes with.
_ARCHES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "armv8l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


@dataclass(frozen=True)
class HostFacts:
    """What ``read_facts`` found; sizes in KiB."""

    cpus: int
    memory_total_kib: int
    memory_available_kib: int
    disk_total_kib: int
    disk_available_kib: int
    processes: int
    pid_max: int
    kernel: str
    os_image: str
    machine: str
    machine_id: str
    system_uuid: str
    boot_id: str
    internal_ip: str
    hostname: str
    runc_version: str


# --- parsing (pure) ---------------------------------------------------------------------------


def parse_meminfo(text: str) -> tuple[int, int]:
    """``(MemTotal, MemAvailable)`` in KiB from ``/proc/meminfo``.

    Kernels before 3.14 have no MemAvailable: free plus page cache is the usual estimate.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            values[name.strip()] = int(words[0])
    total = values.get("MemTotal", 0)
    available = values.get("MemAvailable")
    if available is None:
        available = values.get("MemFree", 0) + values.get("Buffers", 0) + values.get("Cached", 0)
    return total, available


def parse_os_release(text: str) -> str:
    """``PRETTY_NAME`` from ``/etc/os-release`` (quotes removed); ``Linux`` without one."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1].replace('\\"', '"')
            fields[name] = value
    return fields.get("PRETTY_NAME") or fields.get("NAME") or "Linux"


def parse_process_count(loadavg: str) -> int:
    """Scheduling entities (processes and threads) from ``/proc/loadavg``'s ``running/total``."""
    words = loadavg.split()
    if len(words) >= 4 and "/" in words[3]:
        total = words[3].split("/", 1)[1]
        if total.isdigit():
            return int(total)
    return 0


def kube_arch(machine: str) -> str:
    """Kubernetes' name for ``uname -m`` (``x86_64`` -> ``amd64``); unknown ones unchanged."""
    return _ARCHES.get(machine, machine)


def parse_runc_version(output: str) -> str:
    """``1.1.5+ds1`` from ``runc --version``; empty when the output is not runc's."""
    for line in output.splitlines():
        if line.startswith("runc version "):
            return line.split(maxsplit=2)[2].strip()
    return ""


# --- the report (pure) ------------------------------------------------------------------------


def _condition(kind: str, pressure: bool, reason: str, message: str) -> dict[str, str]:
    return {
        "type": kind,
        "status": "True" if pressure else "False",
        "reason": reason,
        "message": message,
    }


def conditions(facts: HostFacts) -> list[dict[str, str]]:
    """Memory, disk and PID pressure by the module's thresholds, then Ready (always True: the
    agent reporting is what Ready means; the cloud's Lease handling covers a silent node)."""
    memory = facts.memory_available_kib < MEMORY_EVICTION_KIB
    disk = facts.disk_available_kib < facts.disk_total_kib * DISK_EVICTION_FRACTION
    pids = facts.pid_max > 0 and facts.processes > facts.pid_max * PID_PRESSURE_FRACTION
    return [
        _condition(
            "MemoryPressure",
            memory,
            "KubeletHasInsufficientMemory" if memory else "KubeletHasSufficientMemory",
            "node has memory pressure" if memory else "node has sufficient memory available",
        ),
        _condition(
            "DiskPressure",
            disk,
            "KubeletHasDiskPressure" if disk else "KubeletHasNoDiskPressure",
            "node has disk pressure" if disk else "node has no disk pressure",
        ),
        _condition(
            "PIDPressure",
            pids,
            "KubeletHasInsufficientPID" if pids else "KubeletHasSufficientPID",
            "node has PID pressure" if pids else "node has sufficient PID available",
        ),
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "outpost is posting ready status",
        },
    ]


def node_status(node: str, facts: HostFacts, outpost_version: str) -> dict[str, Any]:
    """The body of the ``/Node/<node>`` status report (see the issue 5 wire contract)."""
    arch = kube_arch(facts.machine)
    disk_reserve = int(facts.disk_total_kib * DISK_EVICTION_FRACTION)
    capacity = {
        "cpu": str(facts.cpus),
        "memory": f"{facts.memory_total_kib}Ki",
        "pods": str(MAX_PODS),
        "ephemeral-storage": f"{facts.disk_total_kib}Ki",
    }
    allocatable = {
        **capacity,
        "memory": f"{max(0, facts.memory_total_kib - MEMORY_EVICTION_KIB)}Ki",
        "ephemeral-storage": f"{max(0, facts.disk_total_kib - disk_reserve)}Ki",
    }
    addresses = []
    if facts.internal_ip:
        addresses.append({"type": "InternalIP", "address": facts.internal_ip})
    addresses.append({"type": "Hostname", "address": facts.hostname})
    return {
        "labels": {
            "kubernetes.io/arch": arch,
            "kubernetes.io/os": "linux",
            "kubernetes.io/hostname": node,
        },
        "capacity": capacity,
        "allocatable": allocatable,
        "nodeInfo": {
            "machineID": facts.machine_id,
            "systemUUID": facts.system_uuid,
            "bootID": facts.boot_id,
            "kernelVersion": facts.kernel,
            "osImage": facts.os_image,
            "containerRuntimeVersion": f"runc://{facts.runc_version or 'unknown'}",
            "kubeletVersion": f"v{outpost_version}-outpost",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": arch,
        },
        "addresses": addresses,
        "conditions": conditions(facts),
    }


# --- reading the host (I/O) -------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def primary_ipv4(cloud_host: str | None) -> str:
    """The address this host reaches the cloud from (the source address of that route), else
    the first non-loopback address of its host name; empty when it has neither.

    Connecting a UDP socket sends nothing: it only makes the kernel choose the route.
    """
    if cloud_host:
        with contextlib.suppress(OSError):
            target = socket.getaddrinfo(cloud_host, 443, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(target)
                address = probe.getsockname()[0]
                if not address.startswith("127."):
                    return address
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            if not str(sockaddr[0]).startswith("127."):
                return str(sockaddr[0])
    return ""


def read_facts(
    data_dir: Path,
    *,
    runc_version: str,
    cloud_host: str | None,
    root: Path = Path("/"),
    uname: os.uname_result | None = None,
    cpus: int | None = None,
) -> HostFacts:
    """Everything ``node_status`` needs, read from the host (``root`` is ``/`` but in tests).

    Files that cannot be read give empty values rather than an error: a node with no
    ``/etc/machine-id`` still reports its status.
    """
    uname = uname or os.uname()
    total, available = parse_meminfo(_read(root / "proc/meminfo"))
    disk_total = disk_available = 0
    with contextlib.suppress(OSError):
        fs = os.statvfs(data_dir)
        disk_total = fs.f_blocks * fs.f_frsize // 1024
        disk_available = fs.f_bavail * fs.f_frsize // 1024
    machine_id = _read(root / "etc/machine-id").strip()
    pid_max = _read(root / "proc/sys/kernel/pid_max").strip()
    return HostFacts(
        cpus=cpus or os.cpu_count() or 1,
        memory_total_kib=total,
        memory_available_kib=available,
        disk_total_kib=disk_total,
        disk_available_kib=disk_available,
        processes=parse_process_count(_read(root / "proc/loadavg")),
        pid_max=int(pid_max) if pid_max.isdigit() else 0,
        kernel=uname.release,
        os_image=parse_os_release(_read(root / "etc/os-release")),
        machine=uname.machine,
        machine_id=machine_id,
        # Only root may read the DMI uuid, and many boards have none: the kubelet then
        # reports an empty one; the machine id is at least stable and unique.
        system_uuid=_read(root / "sys/class/dmi/id/product_uuid").strip() or machine_id,
        boot_id=_read(root / "proc/sys/kernel/random/boot_id").strip(),
        internal_ip=primary_ipv4(cloud_host),
        hostname=uname.nodename,
        runc_version=runc_version,
    )
