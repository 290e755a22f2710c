"""A pod's volumes: where each lives on the host, what goes into it, and how containers mount it.

The pure part, which the supervisor calls in this order:

- ``PodLayout`` names every path under a pod's directory (volumes, ``/dev/shm``, ``/etc`` files,
  termination logs), so the supervisor and the spec builder agree on them.
- ``pod_tmpfs`` says which of those directories are memory-backed: the pod's shared
  ``/dev/shm``, ``emptyDir`` with ``medium: Memory``, and Secret, downward API and projected
  volumes (as the kubelet does, so that secrets never reach the flash).
- ``volume_files`` turns ConfigMap, Secret, downward API and projected volumes into a *file
  plan* per volume, and ``pod_files`` makes the pod's ``/etc/hosts``, ``/etc/hostname`` and
  ``/etc/resolv.conf``.
- ``container_volumes`` gives one container's bind mounts and device nodes.

The I/O part is a few small functions around it: ``check_host_paths`` (hostPath ``type``
checks, creating what ``…OrCreate`` asks for), ``prepare_pod_dir`` (directories and tmpfs
mounts), ``write_plan`` (atomic, like the kubelet's atomic writer), ``check_subpaths`` and
``release_pod_dir``.

Device passthrough: a pod asks for a host device the way Kubernetes users do, with a
``hostPath`` volume naming the device (``/dev/ttyUSB0``, type ``CharDevice`` or
``BlockDevice``, or no type) mounted under ``/dev/`` in the container. Outpost turns it into a
device node in the container and a device-cgroup rule allowing exactly that device, read-write
or, with ``readOnly``, read-only.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edge import mounts as host_mounts
from edge.pods.containers import all_containers, get_container
from edge.pods.downward import field_value, resource_value
from edge.pods.expansion import expand
from edge.pods.hostname import PodHostname
from edge.pods.quantity import quantity_value
from edge.pods.resolver import DEFAULT_TOKEN_EXPIRATION_S, ContainerConfigError, Resolver
from edge.pods.resources import container_resources

DEFAULT_FILE_MODE = 0o644
SHM_SIZE = 64 * 1024 * 1024
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
_FILE_KINDS = ("configMap", "secret", "downwardAPI", "projected")
# Kinds whose files are kept in memory; a ConfigMap is not secret and may stay on disk.
_MEMORY_KINDS = ("secret", "downwardAPI", "projected")
_DATA_LINK = "..data"
_PROPAGATION = {
    None: "rprivate",
    "None": "rprivate",
    "HostToContainer": "rslave",
    "Bidirectional": "rshared",
}


class VolumeError(Exception):
    """A volume cannot be set up; the kubelet reports this as a ``FailedMount`` event."""

    reason = "FailedMount"


# --- layout -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodLayout:
    """Paths under one pod's directory (``root``, e.g. ``/var/lib/outpost/pods/<uid>``)."""

    root: Path

    def volume(self, name: str) -> Path:
        """The host directory of an ``emptyDir`` or file-plan volume."""
        return self.root / "volumes" / name

    @property
    def shm(self) -> Path:
        """The pod's ``/dev/shm``, shared by its containers."""
        return self.root / "shm"

    @property
    def etc(self) -> Path:
        """Where ``hosts``, ``hostname`` and ``resolv.conf`` are written (a file plan)."""
        return self.root / "etc"

    def termination_log(self, container: str) -> Path:
        """The file a container's termination message is written to."""
        return self.root / "containers" / container / "termination-log"


# --- host paths (I/O) -------------------------------------------------------------------------


@dataclass(frozen=True)
class HostPathInfo:
    """What a hostPath volume's path is on this host, from ``check_host_path``.

    ``kind`` is ``directory``, ``file``, ``socket``, ``char-device``, ``block-device`` or
    ``other``; ``major``/``minor`` are set for devices.
    """

    path: str
    kind: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    major: int = 0
    minor: int = 0

    @property
    def is_device(self) -> bool:
        return self.kind in ("char-device", "block-device")


_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFREG: "file",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char-device",
    stat.S_IFBLK: "block-device",
}
_EXPECTED = {
    "Directory": "directory",
    "DirectoryOrCreate": "directory",
    "File": "file",
    "FileOrCreate": "file",
    "Socket": "socket",
    "CharDevice": "char-device",
    "BlockDevice": "block-device",
}


def check_host_path(path: str, type_: str = "") -> HostPathInfo:
    """Check (and for ``…OrCreate`` and the unset type, create) a hostPath volume's path.

    Follows the kubelet's hostPath types: ``DirectoryOrCreate`` makes a 0755 directory,
    ``FileOrCreate`` an empty 0644 file (its directory must exist); the other types must
    already exist and be of that kind. An unset type creates a missing path as a directory,
    as containerd does. Raises ``VolumeError`` saying what was found instead.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if type_ in ("", "DirectoryOrCreate"):
            os.makedirs(path, mode=0o755, exist_ok=True)
        elif type_ == "FileOrCreate":
            try:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            except FileNotFoundError as exc:
                raise VolumeError(
                    f"hostPath {path}: FileOrCreate does not create directories, and"
                    f" {os.path.dirname(path)} does not exist"
                ) from exc
        else:
            raise VolumeError(f"hostPath {path}: does not exist (type {type_})") from None
        info = os.stat(path)
    except OSError as exc:
        raise VolumeError(f"hostPath {path}: cannot be read: {exc.strerror}") from exc
    kind = _KINDS.get(stat.S_IFMT(info.st_mode), "other")
    expected = _EXPECTED.get(type_)
    if expected is not None and kind != expected:
        raise VolumeError(f"hostPath {path}: is a {kind}, but the volume's type is {type_}")
    device = stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
    return HostPathInfo(
        path=path,
        kind=kind,
        mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
        major=os.major(info.st_rdev) if device else 0,
        minor=os.minor(info.st_rdev) if device else 0,
    )


def check_host_paths(pod: Mapping[str, Any]) -> dict[str, HostPathInfo]:
    """``check_host_path`` for every hostPath volume, by volume name; messages name the volume."""
    found = {}
    for volume in (pod.get("spec") or {}).get("volumes") or ():
        host_path = volume.get("hostPath")
        if host_path is None:
            continue
        try:
            found[volume["name"]] = check_host_path(host_path["path"], host_path.get("type", ""))
        except VolumeError as exc:
            raise VolumeError(f"volume {volume['name']!r}: {exc}") from exc
    return found


# --- file plans -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a plan: a relative path, its bytes and its permission bits."""

    path: str
    data: bytes
    mode: int = DEFAULT_FILE_MODE


def volume_files(pod: Mapping[str, Any], resolver: Resolver) -> dict[str, list[FileEntry]]:
    """The file plan of every ConfigMap, Secret, downward API and projected volume, by name.

    Follows the kubelet: without ``items`` every key becomes a file named after it; with
    ``items`` only those keys, at their ``path``; ``mode`` beats ``defaultMode`` beats 0644.
    A missing object or key fails the volume unless ``optional`` (an optional volume whose
    object is missing is empty). A ``serviceAccountToken`` projection is the token the cloud
    minted for the pod, and fails the volume until it has arrived; standalone (the resolver has
    no tokens at all) it is skipped, see ``pod_warnings``. Raises ``VolumeError`` naming the
    volume.
    """
    plans: dict[str, list[FileEntry]] = {}
    for volume in (pod.get("spec") or {}).get("volumes") or ():
        kind = next((k for k in _FILE_KINDS if volume.get(k) is not None), None)
        if kind is None:
            continue
        name = volume["name"]
        body = volume[kind]
        default_mode = body.get("defaultMode", DEFAULT_FILE_MODE)
        try:
            if kind == "projected":
                entries = []
                for source in body.get("sources") or ():
                    for inner, inner_body in source.items():
                        if inner_body is not None:
                            entries += _source_files(pod, inner, inner_body, default_mode, resolver)
            else:
                entries = _source_files(pod, kind, body, default_mode, resolver)
        except (VolumeError, ContainerConfigError) as exc:
            raise VolumeError(f"volume {name!r}: {exc}") from exc
        for entry in entries:
            _check_plan_path(entry.path)
        plans[name] = entries
    return plans


def _source_files(
    pod: Mapping[str, Any],
    kind: str,
    body: Mapping[str, Any],
    default_mode: int,
    resolver: Resolver,
) -> list[FileEntry]:
    if kind == "downwardAPI":
        return [
            _downward_file(pod, item, default_mode, resolver) for item in body.get("items") or ()
        ]
    if kind in ("configMap", "secret"):
        object_name = body.get("name") or body.get("secretName") or ""
        kind_name = "ConfigMap" if kind == "configMap" else "Secret"
        values = (
            resolver.configmap(object_name) if kind == "configMap" else resolver.secret(object_name)
        )
        optional = bool(body.get("optional"))
        if values is None:
            if optional:
                return []
            raise VolumeError(f"{kind_name} {object_name!r} not found")
        items = body.get("items")
        if not items:
            return [FileEntry(key, values[key], default_mode) for key in sorted(values)]
        entries = []
        for item in items:
            key = item["key"]
            if key not in values:
                if optional:
                    continue
                raise VolumeError(f"{kind_name} {object_name!r} has no key {key!r}")
            entries.append(FileEntry(item["path"], values[key], item.get("mode", default_mode)))
        return entries
    if kind == "serviceAccountToken":
        return _token_file(pod, body, default_mode, resolver)
    return []  # nothing else gets past validation


def _token_file(
    pod: Mapping[str, Any], body: Mapping[str, Any], default_mode: int, resolver: Resolver
) -> list[FileEntry]:
    if resolver.tokens is None:
        return []
    meta = pod.get("metadata") or {}
    audience = body.get("audience") or ""
    expiration = body.get("expirationSeconds") or DEFAULT_TOKEN_EXPIRATION_S
    token = resolver.token(meta.get("uid", ""), audience, expiration)
    if token is None:
        raise VolumeError(
            f"the service account token (audience {audience or 'the API server'},"
            f" {expiration} s) has not arrived from the cloud yet"
        )
    return [FileEntry(body.get("path") or "token", token, default_mode)]


def _downward_file(
    pod: Mapping[str, Any], item: Mapping[str, Any], default_mode: int, resolver: Resolver
) -> FileEntry:
    if item.get("fieldRef") is not None:
        value = field_value(pod, item["fieldRef"]["fieldPath"], resolver)
    else:
        ref = item["resourceFieldRef"]
        value = resource_value(
            pod, ref["containerName"], ref["resource"], ref.get("divisor"), resolver
        )
    return FileEntry(item["path"], value.encode(), item.get("mode", default_mode))


def _check_plan_path(path: str) -> None:
    # The apiserver rejects such keys, but a plan must never write outside its directory
    # even if the store holds an object that never went through it.
    parts = PurePosixPath(path).parts
    if not parts or path.startswith(("/", "..")) or ".." in parts:
        raise VolumeError(f"file path {path!r} would leave the volume")


# --- the pod's /etc files ---------------------------------------------------------------------

_MANAGED_HOSTS = """\
# Kubernetes-managed hosts file.
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::0\tip6-mcastprefix
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
"""
_MAX_NAMESERVERS = 3
_MAX_SEARCHES = 32


def pod_files(
    pod: Mapping[str, Any],
    *,
    hostname: PodHostname,
    pod_ips: Sequence[str],
    host_hosts: str,
    host_resolv: str,
    cluster_dns: Sequence[str] = (),
    cluster_domain: str = "cluster.local",
) -> list[FileEntry]:
    """The pod's ``hosts``, ``hostname`` and ``resolv.conf``, as the kubelet makes them.

    ``host_hosts`` and ``host_resolv`` are the node's own files (read by the caller).
    ``dnsPolicy`` ``ClusterFirst`` uses ``cluster_dns`` when the node has one and falls back
    to the node's resolver otherwise (an edge may have no cluster DNS), as the kubelet does.
    """
    spec = pod.get("spec") or {}
    host_network = bool(spec.get("hostNetwork"))
    if host_network:
        hosts = "# Kubernetes-managed hosts file (host network).\n" + host_hosts
        if hosts and not hosts.endswith("\n"):
            hosts += "\n"
    else:
        hosts = _MANAGED_HOSTS
        names = f"{hostname.fqdn}\t{hostname.short}" if hostname.fqdn else hostname.short
        hosts += "".join(f"{ip}\t{names}\n" for ip in pod_ips)
    aliases = spec.get("hostAliases") or ()
    if aliases:
        hosts += "\n# Entries added by HostAliases.\n"
        for alias in aliases:
            hosts += "\t".join([alias["ip"], *(alias.get("hostnames") or ())]) + "\n"
    return [
        FileEntry("hosts", hosts.encode()),
        FileEntry("hostname", f"{hostname.hostname}\n".encode()),
        FileEntry(
            "resolv.conf",
            _resolv_conf(spec, host_network, host_resolv, cluster_dns, cluster_domain, pod),
        ),
    ]


def _resolv_conf(
    spec: Mapping[str, Any],
    host_network: bool,
    host_resolv: str,
    cluster_dns: Sequence[str],
    cluster_domain: str,
    pod: Mapping[str, Any],
) -> bytes:
    host_servers, host_searches, host_options = _parse_resolv(host_resolv)
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    cluster = policy == "ClusterFirstWithHostNet" or (policy == "ClusterFirst" and not host_network)
    if policy == "None":
        servers, searches, options = [], [], []
    elif cluster and cluster_dns:
        namespace = (pod.get("metadata") or {}).get("namespace") or "default"
        servers = list(cluster_dns)
        searches = [f"{namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}", cluster_domain]
        searches += host_searches
        options = ["ndots:5"]
    else:
        servers, searches, options = host_servers, host_searches, host_options
    config = spec.get("dnsConfig") or {}
    servers = _dedupe([*servers, *(config.get("nameservers") or ())])[:_MAX_NAMESERVERS]
    searches = _dedupe([*searches, *(config.get("searches") or ())])[:_MAX_SEARCHES]
    merged = {option.split(":", 1)[0]: option for option in options}
    for option in config.get("options") or ():
        value = option.get("value")
        merged[option["name"]] = option["name"] + (f":{value}" if value not in (None, "") else "")
    lines = []
    if searches:
        lines.append("search " + " ".join(searches))
    lines += [f"nameserver {server}" for server in servers]
    if merged:
        lines.append("options " + " ".join(merged.values()))
    return "".join(f"{line}\n" for line in lines).encode()


def _parse_resolv(text: str) -> tuple[list[str], list[str], list[str]]:
    servers: list[str] = []
    searches: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2:
            continue
        if words[0] == "nameserver":
            servers.append(words[1])
        elif words[0] in ("search", "domain"):
            # The last search or domain line wins, as in the resolver.
            searches = words[1:]
        elif words[0] == "options":
            options += words[1:]
    return servers, searches, options


def _dedupe(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


# --- writing plans (I/O) ----------------------------------------------------------------------


def write_plan(plan: Sequence[FileEntry], directory: Path, *, fs_group: int | None = None) -> None:
    """Write ``plan`` into ``directory`` so that a reader never sees half of an update.

    The kubelet's atomic writer: the files go into a new hidden directory, a ``..data``
    symlink is switched to it with one ``rename``, and each top-level name is a symlink
    through ``..data``; the previous version is then removed. A plan identical to what is
    there is not rewritten (flash wear). ``fs_group`` (the pod's ``fsGroup``) becomes the
    group of every file, which is then group-readable. Raises ``VolumeError``.
    """
    for entry in plan:
        _check_plan_path(entry.path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        data_link = directory / _DATA_LINK
        old = os.readlink(data_link) if data_link.is_symlink() else None
        if old is not None and _plan_matches(plan, directory / old, fs_group):
            return
        version = Path(tempfile.mkdtemp(prefix="..", dir=directory))
        try:
            _write_version(plan, version, fs_group)
            staged = directory / f"{_DATA_LINK}_tmp"
            if staged.is_symlink():
                staged.unlink()
            os.symlink(version.name, staged)
            os.replace(staged, data_link)
        except OSError:
            shutil.rmtree(version, ignore_errors=True)
            raise
        names = {PurePosixPath(entry.path).parts[0] for entry in plan}
        for name in names:
            link = directory / name
            if not link.is_symlink():
                os.symlink(f"{_DATA_LINK}/{name}", link)
        for child in directory.iterdir():
            if not child.name.startswith("..") and child.name not in names and child.is_symlink():
                child.unlink()
        if old is not None and old != version.name:
            shutil.rmtree(directory / old, ignore_errors=True)
    except OSError as exc:
        raise VolumeError(f"cannot write files into {directory}: {exc}") from exc


def _write_version(plan: Sequence[FileEntry], version: Path, fs_group: int | None) -> None:
    os.chmod(version, 0o755)
    for entry in plan:
        target = version / entry.path
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        target.write_bytes(entry.data)
        # Set after writing: the mode must not depend on the agent's umask.
        os.chmod(target, entry.mode | 0o440 if fs_group is not None else entry.mode)
        if fs_group is not None:
            os.chown(target, -1, fs_group)
    if fs_group is not None:
        for folder in [version, *(p for p in version.rglob("*") if p.is_dir())]:
            os.chown(folder, -1, fs_group)


def _plan_matches(plan: Sequence[FileEntry], version: Path, fs_group: int | None) -> bool:
    try:
        present = {str(p.relative_to(version)) for p in version.rglob("*") if not p.is_dir()}
        if present != {entry.path for entry in plan}:
            return False
        for entry in plan:
            target = version / entry.path
            info = target.stat()
            mode = entry.mode | 0o440 if fs_group is not None else entry.mode
            if stat.S_IMODE(info.st_mode) != mode or target.read_bytes() != entry.data:
                return False
            if fs_group is not None and info.st_gid != fs_group:
                return False
    except OSError:
        return False
    return True


# --- memory-backed directories ----------------------------------------------------------------


@dataclass(frozen=True)
class Tmpfs:
    """A tmpfs the supervisor mounts on the host before the pod's containers start."""

    path: Path
    options: tuple[str, ...]


def pod_tmpfs(pod: Mapping[str, Any], layout: PodLayout) -> list[Tmpfs]:
    """The pod's memory-backed directories: ``/dev/shm`` (unless ``hostIPC``), ``emptyDir``
    with ``medium: Memory`` (sized by ``sizeLimit``, else by the pod's memory limit when every
    container has one), and Secret, downward API and projected volumes.
    """
    spec = pod.get("spec") or {}
    mounts = []
    if not spec.get("hostIPC"):
        shm_options = ("nosuid", "nodev", "noexec", "mode=1777", f"size={SHM_SIZE}")
        mounts.append(Tmpfs(layout.shm, shm_options))
    for volume in spec.get("volumes") or ():
        empty_dir = volume.get("emptyDir")
        if empty_dir is not None and empty_dir.get("medium") == "Memory":
            size = _memory_volume_size(pod, empty_dir)
            options = ("nosuid", "nodev", "mode=777", *((f"size={size}",) if size else ()))
            mounts.append(Tmpfs(layout.volume(volume["name"]), options))
        elif any(volume.get(kind) is not None for kind in _MEMORY_KINDS):
            mounts.append(Tmpfs(layout.volume(volume["name"]), ("nosuid", "nodev", "mode=755")))
    return mounts


def _memory_volume_size(pod: Mapping[str, Any], empty_dir: Mapping[str, Any]) -> int | None:
    if empty_dir.get("sizeLimit") is not None:
        return quantity_value(empty_dir["sizeLimit"])
    limits = [container_resources(c).limits.get("memory") for c in all_containers(pod)]
    if limits and all(limit is not None for limit in limits):
        return math.ceil(sum(limit for limit in limits if limit is not None))
    return None


_FLAGS = {
    "nosuid": host_mounts.MS_NOSUID,
    "nodev": host_mounts.MS_NODEV,
    "noexec": host_mounts.MS_NOEXEC,
}


def _mount_tmpfs(tmpfs: Tmpfs) -> None:
    flags = 0
    data = []
    for option in tmpfs.options:
        if option in _FLAGS:
            flags |= _FLAGS[option]
        else:
            data.append(option)
    try:
        host_mounts.mount(
            "tmpfs", tmpfs.path, "tmpfs", flags=flags, options=",".join(data), what="a tmpfs"
        )
    except host_mounts.MountError as exc:
        raise VolumeError(exc.strerror) from exc


def prepare_pod_dir(pod: Mapping[str, Any], layout: PodLayout) -> None:
    """Create the pod's directories and mount its tmpfs; safe to call again for a running pod.

    ``emptyDir`` directories are world-writable (0777) as the kubelet makes them, so that a
    container running as any user can use them; with ``fsGroup`` they belong to that group.
    Each container gets an empty, writable termination-log file. Needs root.
    """
    spec = pod.get("spec") or {}
    fs_group = (spec.get("securityContext") or {}).get("fsGroup")
    layout.root.mkdir(parents=True, exist_ok=True, mode=0o750)
    layout.etc.mkdir(exist_ok=True)
    for volume in spec.get("volumes") or ():
        if volume.get("emptyDir") is not None or any(
            volume.get(k) is not None for k in _FILE_KINDS
        ):
            layout.volume(volume["name"]).mkdir(parents=True, exist_ok=True)
    mounted = host_mounts.mount_points()
    for tmpfs in pod_tmpfs(pod, layout):
        tmpfs.path.mkdir(parents=True, exist_ok=True)
        if tmpfs.path not in mounted:
            _mount_tmpfs(tmpfs)
    for volume in spec.get("volumes") or ():
        if volume.get("emptyDir") is not None:
            path = layout.volume(volume["name"])
            os.chmod(path, 0o777 if fs_group is None else 0o2777)
            if fs_group is not None:
                os.chown(path, -1, fs_group)
    for container in all_containers(pod):
        log = layout.termination_log(container["name"])
        log.parent.mkdir(parents=True, exist_ok=True)
        if not log.exists():
            log.touch()
        os.chmod(log, 0o666)


def release_pod_dir(layout: PodLayout) -> None:
    """Unmount everything under the pod's directory and remove it (its containers are gone).

    Raises ``VolumeError`` and removes nothing if a mount cannot be undone, so that a busy
    tmpfs is never emptied from under a process that still uses it.
    """
    for point in sorted(host_mounts.mount_points(), key=lambda p: len(str(p)), reverse=True):
        if point.is_relative_to(layout.root):
            try:
                host_mounts.unmount(point)
            except host_mounts.MountError as exc:
                raise VolumeError(exc.strerror) from exc
    shutil.rmtree(layout.root, ignore_errors=True)


# --- one container's mounts -------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """A bind mount into a container.

    ``volume_root`` is set when ``source`` is a ``subPath`` inside a volume: ``check_subpaths``
    makes sure it stays inside (a container could have planted a symlink there).
    """

    destination: str
    source: str
    read_only: bool = False
    propagation: str = "rprivate"
    volume: str = ""
    volume_root: str | None = None

    def oci(self) -> dict[str, Any]:
        """The ``config.json`` mount entry."""
        return {
            "destination": self.destination,
            "type": "bind",
            "source": self.source,
            "options": ["rbind", self.propagation, "ro" if self.read_only else "rw"],
        }


@dataclass(frozen=True)
class Device:
    """A host device node passed into a container, with the cgroup rule that allows it."""

    path: str
    type: str  # "c" or "b"
    major: int
    minor: int
    file_mode: int
    uid: int
    gid: int
    read_only: bool = False

    def oci(self) -> dict[str, Any]:
        """The ``linux.devices`` entry (runc creates the node)."""
        return {
            "path": self.path,
            "type": self.type,
            "major": self.major,
            "minor": self.minor,
            "fileMode": self.file_mode,
            "uid": self.uid,
            "gid": self.gid,
        }

    def rule(self) -> dict[str, Any]:
        """The ``linux.resources.devices`` rule allowing exactly this device."""
        return {
            "allow": True,
            "type": self.type,
            "major": self.major,
            "minor": self.minor,
            "access": "r" if self.read_only else "rw",
        }


@dataclass(frozen=True)
class ContainerVolumes:
    """One container's bind mounts (in mount order) and device nodes."""

    mounts: tuple[Mount, ...]
    devices: tuple[Device, ...]


def container_volumes(
    pod: Mapping[str, Any],
    container_name: str,
    *,
    layout: PodLayout,
    host_paths: Mapping[str, HostPathInfo],
    env: Mapping[str, str],
) -> ContainerVolumes:
    """The mounts and devices of one container.

    Its ``volumeMounts`` (``subPath``, ``subPathExpr`` expanded with ``env`` as the kubelet
    does, ``readOnly``, ``mountPropagation``), then the pod's ``/dev/shm``, ``/etc/hosts``,
    ``/etc/hostname``, ``/etc/resolv.conf`` (read-only with ``readOnlyRootFilesystem``; left
    out where the container mounts a volume of its own) and its termination-log file.
    ``host_paths`` comes from ``check_host_paths``; a hostPath that is a device becomes a
    ``Device``. ``env`` is the container's own variables (``runtime_spec.container_env``).
    Raises ``VolumeError``.
    """
    spec = pod.get("spec") or {}
    container = get_container(pod, container_name)
    volumes = {volume["name"]: volume for volume in spec.get("volumes") or ()}
    read_only_root = bool((container.get("securityContext") or {}).get("readOnlyRootFilesystem"))
    mounts: list[Mount] = []
    devices: list[Device] = []
    for volume_mount in container.get("volumeMounts") or ():
        name = volume_mount["name"]
        volume = volumes[name]
        destination = _normal(volume_mount["mountPath"])
        read_only = bool(volume_mount.get("readOnly"))
        sub_path = _sub_path(volume_mount, env, name)
        host_path = volume.get("hostPath")
        info = host_paths.get(name)
        if host_path is not None and info is None:
            raise VolumeError(
                f"volume {name!r}: hostPath {host_path['path']} has not been checked"
                " (pass the result of check_host_paths)"
            )
        if info is not None and info.is_device:
            if sub_path:
                raise VolumeError(f"volume {name!r}: a device cannot have a subPath")
            devices.append(_device(destination, info, read_only))
            continue
        if host_path is not None:
            root = host_path["path"]
        else:
            root = str(layout.volume(name))
            # ConfigMap, Secret, downward API and projected volumes are always read-only.
            read_only = read_only or any(volume.get(kind) is not None for kind in _FILE_KINDS)
        mounts.append(
            Mount(
                destination=destination,
                source=f"{root}/{sub_path}" if sub_path else root,
                read_only=read_only,
                propagation=_PROPAGATION[volume_mount.get("mountPropagation")],
                volume=name,
                volume_root=root if sub_path else None,
            )
        )
    taken = {mount.destination for mount in mounts} | {device.path for device in devices}
    system = []
    if not spec.get("hostIPC"):
        system.append(Mount("/dev/shm", str(layout.shm)))
    else:
        system.append(Mount("/dev/shm", "/dev/shm"))
    for name in ("hosts", "hostname", "resolv.conf"):
        system.append(Mount(f"/etc/{name}", str(layout.etc / name), read_only=read_only_root))
    message_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
    system.append(Mount(_normal(message_path), str(layout.termination_log(container_name))))
    mounts = [mount for mount in system if mount.destination not in taken] + mounts
    # Parents before children, whatever order the manifest lists them in.
    mounts.sort(key=lambda mount: mount.destination.count("/"))
    return ContainerVolumes(tuple(mounts), tuple(devices))


def _normal(path: str) -> str:
    return "/" + "/".join(part for part in path.split("/") if part)


def _sub_path(volume_mount: Mapping[str, Any], env: Mapping[str, str], volume: str) -> str:
    sub_path = volume_mount.get("subPath") or ""
    if volume_mount.get("subPathExpr"):
        sub_path = expand(volume_mount["subPathExpr"], env)
    if not sub_path:
        return ""
    parts = PurePosixPath(sub_path).parts
    if sub_path.startswith("/") or ".." in parts:
        raise VolumeError(f"volume {volume!r}: subPath {sub_path!r} must stay inside the volume")
    return "/".join(parts)


def _device(path: str, info: HostPathInfo, read_only: bool) -> Device:
    return Device(
        path=path,
        type="c" if info.kind == "char-device" else "b",
        major=info.major,
        minor=info.minor,
        file_mode=info.mode,
        uid=info.uid,
        gid=info.gid,
        read_only=read_only,
    )


def check_subpaths(volumes: ContainerVolumes) -> None:
    """Make sure every ``subPath`` source stays inside its volume; create missing ones.

    A container can plant a symlink in an ``emptyDir`` pointing anywhere on the host; this
    resolves each source and refuses one that leaves its volume. A missing subPath of a
    writable volume is created as a directory (the kubelet does the same). What remains is a
    race with a container swapping a symlink between this check and runc's mount. Raises
    ``VolumeError``.
    """
    for mount in volumes.mounts:
        if mount.volume_root is None:
            continue
        sub_path = mount.source[len(mount.volume_root) + 1 :]
        # Checked before creating anything too: makedirs would follow a planted symlink.
        _check_inside(mount, sub_path)
        if not os.path.lexists(mount.source):
            if mount.read_only:
                raise VolumeError(f"volume {mount.volume!r}: subPath {sub_path!r} does not exist")
            os.makedirs(mount.source, mode=0o755, exist_ok=True)
            _check_inside(mount, sub_path)


def _check_inside(mount: Mount, sub_path: str) -> None:
    root = os.path.realpath(mount.volume_root or "/")
    real = os.path.realpath(mount.source)
    if real != root and not real.startswith(root.rstrip("/") + "/"):
        raise VolumeError(
            f"volume {mount.volume!r}: subPath {sub_path!r} leads outside the volume (to {real})"
        )
