"""The OCI runtime config (``config.json``) of one container of a pod, as pure functions.

``build_spec`` is a function of its arguments only: the pod manifest, the image's config, and
what the supervisor prepared (the rootfs path, the container's volumes from
``volumes.container_volumes``, its environment from ``container_env``, the network namespace
path). It follows what the kubelet asks of containerd, and what containerd then puts in the
spec, so that a pod behaves on Outpost as it does on a Kubernetes node:

- command and args against the image's Entrypoint and Cmd, ``$(VAR)`` expansion, the
  environment built in Kubernetes' order on top of the image's;
- the user from ``runAsUser``/``runAsGroup`` (container over pod) or the image's ``User``;
- containerd's default capabilities, mounts, masked and read-only paths and device rules;
  ``privileged`` lifts them all;
- cgroup limits from requests and limits with the kubelet's formulas (CPU shares, CFS quota,
  memory, OOM score), in the cgroupfs layout ``/outpost/pod<uid>/<container>``: runc uses its
  cgroupfs driver unless told ``--systemd-cgroup``, which Outpost does not use, so the same
  path works on cgroup v1 and v2 and on gateways without systemd.

Deliberately not done: no seccomp filter (``RuntimeDefault`` is reported by
``validation.pod_warnings``), no AppArmor or SELinux, no swap limit (Kubernetes nodes run without
swap), no rlimits (containers inherit the agent's), and the process never has a terminal.
Unlike Kubernetes, ``noNewPrivileges`` is on unless ``allowPrivilegeEscalation: true`` or
``privileged`` asks otherwise: secure by default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from edge.pods.capabilities import ALL_CAPABILITIES, capability_name
from edge.pods.containers import get_container, namespaced_name
from edge.pods.downward import field_value, resource_value
from edge.pods.expansion import expand
from edge.pods.resolver import ContainerConfigError, Resolver
from edge.pods.resources import container_resources, qos_class
from edge.pods.validation import is_env_var_name
from edge.pods.volumes import ContainerVolumes

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# containerd's default set (defaultUnixCaps in 1.x's oci/spec.go; 2.0 dropped five from its
# client default), and Docker's.
DEFAULT_CAPABILITIES = (
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
MASKED_PATHS = (
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
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def _char(major: int, minor: int | None) -> dict[str, Any]:
    rule: dict[str, Any] = {"allow": True, "type": "c", "major": major, "access": "rwm"}
    if minor is not None:
        rule["minor"] = minor
    return rule


# Deny everything, then allow the devices every container has: null, zero, full, random,
# urandom, tty, console, ptmx and the pseudo-terminals.
DEFAULT_DEVICE_RULES = (
    {"allow": False, "access": "rwm"},
    _char(1, 3),
    _char(1, 5),
    _char(1, 7),
    _char(1, 8),
    _char(1, 9),
    _char(5, 0),
    _char(5, 1),
    _char(5, 2),
    _char(136, None),
)
CPU_PERIOD = 100_000
MIN_SHARES = 2
MAX_SHARES = 262_144
MIN_QUOTA = 1_000
OOM_GUARANTEED = -997
OOM_BEST_EFFORT = 1000
CGROUP_PARENT = "/outpost"


def cgroup_path(pod_uid: str, container: str) -> str:
    """The container's cgroup, in runc's cgroupfs form; the pod's is its parent."""
    return f"{CGROUP_PARENT}/pod{pod_uid}/{container}"


def cpu_shares(milli_cpu: int) -> int:
    """The kubelet's CPU shares for a CPU request in millicores (2 when there is none)."""
    if milli_cpu <= 0:
        return MIN_SHARES
    return min(max(milli_cpu * 1024 // 1000, MIN_SHARES), MAX_SHARES)


def cpu_quota(milli_cpu: int, period: int = CPU_PERIOD) -> int:
    """The kubelet's CFS quota for a CPU limit in millicores, per ``period`` microseconds."""
    return max(milli_cpu * period // 1000, MIN_QUOTA)


def oom_score_adj(pod: Mapping[str, Any], container: Mapping[str, Any], node_memory: int) -> int:
    """The kubelet's OOM score adjustment, by the pod's QoS class.

    Guaranteed pods are the last killed, BestEffort ones the first; a Burstable container
    scores by the share of the node's memory it requests, always between the two.
    """
    qos = qos_class(pod)
    if qos == "Guaranteed":
        return OOM_GUARANTEED
    if qos == "BestEffort":
        return OOM_BEST_EFFORT
    request = math.ceil(container_resources(container).requests.get("memory", 0))
    score = 1000 - (1000 * request) // max(node_memory, 1)
    if score < 1000 + OOM_GUARANTEED:
        return 1000 + OOM_GUARANTEED
    return score - 1 if score == OOM_BEST_EFFORT else score


# --- users ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageIds:
    """Users and groups of an image, from its ``/etc/passwd`` and ``/etc/group``.

    ``users`` maps a user name to (uid, primary gid), ``groups`` a group name to its gid, and
    ``memberships`` a user name to the gids of the groups that list it as a member.
    """

    users: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    groups: Mapping[str, int] = field(default_factory=dict)
    memberships: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, passwd: str = "", group: str = "") -> ImageIds:
        """Read the two files' text (either may be empty); malformed lines are skipped."""
        users: dict[str, tuple[int, int]] = {}
        for line in passwd.splitlines():
            parts = line.split(":")
            if len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit():
                users.setdefault(parts[0], (int(parts[2]), int(parts[3])))
        groups: dict[str, int] = {}
        memberships: dict[str, list[int]] = {}
        for line in group.splitlines():
            parts = line.split(":")
            if len(parts) >= 3 and parts[2].isdigit():
                gid = int(parts[2])
                groups.setdefault(parts[0], gid)
                for member in filter(None, parts[3].split(",") if len(parts) > 3 else ()):
                    memberships.setdefault(member.strip(), []).append(gid)
        return cls(users, groups, {name: tuple(gids) for name, gids in memberships.items()})

    def by_uid(self, uid: int) -> tuple[str, int] | None:
        """The first user with this uid: (name, primary gid)."""
        for name, (user_uid, gid) in self.users.items():
            if user_uid == uid:
                return name, gid
        return None


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def resolve_user(
    pod: Mapping[str, Any], container: Mapping[str, Any], image_user: str, ids: ImageIds
) -> dict[str, Any]:
    """The OCI ``process.user``: uid, gid and supplementary gids.

    ``runAsUser`` and ``runAsGroup`` (the container's over the pod's) win over the image's
    ``User`` (``name``, ``uid``, ``name:group``, ``uid:gid``); a gid not given is the user's
    primary group from the image's ``/etc/passwd``, else 0. Supplementary groups: the primary
    one, the image's groups the user belongs to, then ``supplementalGroups`` and ``fsGroup``.
    Raises ``ContainerConfigError`` for a name the image does not know, or for root under
    ``runAsNonRoot`` (checked on the resolved uid, so a named image user is fine).
    """
    pod_sc = (pod.get("spec") or {}).get("securityContext") or {}
    sc = container.get("securityContext") or {}
    where = f"container {container.get('name')!r} of pod {namespaced_name(pod)}"
    run_as_user = _first(sc.get("runAsUser"), pod_sc.get("runAsUser"))
    if run_as_user is not None:
        uid = int(run_as_user)
        known = ids.by_uid(uid)
        name, gid = known if known else ("", 0)
    else:
        uid, gid, name = _image_user(image_user or "", ids, where)
    run_as_group = _first(sc.get("runAsGroup"), pod_sc.get("runAsGroup"))
    if run_as_group is not None:
        gid = int(run_as_group)
    if _first(sc.get("runAsNonRoot"), pod_sc.get("runAsNonRoot")) and uid == 0:
        raise ContainerConfigError(
            f"{where}: runAsNonRoot is set but the container would run as root (uid 0);"
            " set securityContext.runAsUser or use an image whose User is not root"
        )
    additional = [gid, *ids.memberships.get(name, ())] if name else [gid]
    additional += [int(g) for g in pod_sc.get("supplementalGroups") or ()]
    if pod_sc.get("fsGroup") is not None:
        additional.append(int(pod_sc["fsGroup"]))
    return {"uid": uid, "gid": gid, "additionalGids": list(dict.fromkeys(additional))}


def _image_user(user: str, ids: ImageIds, where: str) -> tuple[int, int, str]:
    user_part, _, group_part = user.partition(":")
    if not user_part:
        uid, gid, name = 0, 0, "root"
    elif user_part.isdigit():
        uid = int(user_part)
        known = ids.by_uid(uid)
        name, gid = known if known else ("", 0)
    elif user_part in ids.users:
        name = user_part
        uid, gid = ids.users[name]
    else:
        raise ContainerConfigError(
            f"{where}: the image's user {user_part!r} is not in its /etc/passwd;"
            " set securityContext.runAsUser"
        )
    if group_part.isdigit():
        gid = int(group_part)
    elif group_part:
        if group_part not in ids.groups:
            raise ContainerConfigError(
                f"{where}: the image's group {group_part!r} is not in its /etc/group;"
                " set securityContext.runAsGroup"
            )
        gid = ids.groups[group_part]
    return uid, gid, name


# --- environment and command ------------------------------------------------------------------


def container_env(
    pod: Mapping[str, Any], container_name: str, resolver: Resolver
) -> list[tuple[str, str]]:
    """The container's own environment variables, in order, as the kubelet builds them.

    ``envFrom`` sources first, in order (a later source wins; keys that are not valid names
    are skipped, as the kubelet does), then ``env`` in order, each ``value`` expanded with the
    variables defined before it; ``valueFrom`` reads ConfigMaps, Secrets and the downward API
    through ``resolver``. Raises ``ContainerConfigError`` for a missing object or key that is
    not ``optional``. The image's variables are not here: ``build_spec`` puts these on top of
    them, and ``$(VAR)`` never sees them, as in Kubernetes.
    """
    container = get_container(pod, container_name)
    where = f"container {container_name!r} of pod {namespaced_name(pod)}"
    namespace = (pod.get("metadata") or {}).get("namespace") or "default"
    values: dict[str, str] = {}
    for source in container.get("envFrom") or ():
        prefix = source.get("prefix") or ""
        if source.get("configMapRef") is not None:
            ref, kind = source["configMapRef"], "ConfigMap"
            data = resolver.configmap(ref["name"], binary=False)
        else:
            ref, kind = source["secretRef"], "Secret"
            data = resolver.secret(ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ContainerConfigError(
                f"{where}: envFrom {kind} {namespace}/{ref['name']} not found"
            )
        for key in sorted(data):
            if is_env_var_name(prefix + key):
                values[prefix + key] = data[key].decode("utf-8", errors="replace")
    for var in container.get("env") or ():
        name = var["name"]
        if var.get("valueFrom") is None:
            values[name] = expand(var.get("value") or "", values)
            continue
        value = _value_from(pod, container_name, var["valueFrom"], resolver, where, name)
        if value is not None:
            values[name] = value
    return list(values.items())


def _value_from(
    pod: Mapping[str, Any],
    container_name: str,
    value_from: Mapping[str, Any],
    resolver: Resolver,
    where: str,
    name: str,
) -> str | None:
    namespace = (pod.get("metadata") or {}).get("namespace") or "default"
    if value_from.get("fieldRef") is not None:
        return field_value(pod, value_from["fieldRef"]["fieldPath"], resolver)
    if value_from.get("resourceFieldRef") is not None:
        ref = value_from["resourceFieldRef"]
        return resource_value(
            pod,
            ref.get("containerName") or container_name,
            ref["resource"],
            ref.get("divisor"),
            resolver,
        )
    if value_from.get("configMapKeyRef") is not None:
        ref, kind = value_from["configMapKeyRef"], "ConfigMap"
        data = resolver.configmap(ref["name"], binary=False)
    else:
        ref, kind = value_from["secretKeyRef"], "Secret"
        data = resolver.secret(ref["name"])
    if data is None:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(
            f"{where}: env {name}: {kind} {namespace}/{ref['name']} not found"
        )
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(
            f"{where}: env {name}: couldn't find key {ref['key']!r} in"
            f" {kind} {namespace}/{ref['name']}"
        )
    return data[ref["key"]].decode("utf-8", errors="replace")


def container_args(
    container: Mapping[str, Any], image: Mapping[str, Any], env: Mapping[str, str]
) -> list[str]:
    """The process arguments, by Kubernetes' rules against the image's Entrypoint and Cmd.

    ``command`` replaces the Entrypoint and drops the Cmd; ``args`` replaces the Cmd; both
    are ``$(VAR)``-expanded with the container's variables. Raises ``ContainerConfigError``
    when nothing is left to run.
    """
    command = container.get("command") or []
    args = container.get("args") or []
    entrypoint = list(image.get("Entrypoint") or [])
    cmd = list(image.get("Cmd") or [])
    if command:
        argv = [expand(part, env) for part in [*command, *args]]
    elif args:
        argv = [*entrypoint, *(expand(part, env) for part in args)]
    else:
        argv = [*entrypoint, *cmd]
    if not argv:
        raise ContainerConfigError(
            f"container {container.get('name')!r}: nothing to run: the image has no Entrypoint"
            " or Cmd and the container sets no command"
        )
    return argv


def _merge_env(base: list[str], overrides: Sequence[tuple[str, str]]) -> list[str]:
    # containerd's replace-or-append: a variable keeps its place and takes the newer value.
    merged: dict[str, str] = {}
    for item in base:
        key, _, value = item.partition("=")
        merged[key] = value
    for key, value in overrides:
        merged[key] = value
    return [f"{key}={value}" for key, value in merged.items()]


# --- capabilities and mounts ------------------------------------------------------------------


def capabilities(
    security_context: Mapping[str, Any], available: Sequence[str] = ALL_CAPABILITIES
) -> list[str]:
    """The capability set, as containerd computes it from ``capabilities.add``/``drop``.

    ``privileged`` gives every capability. Otherwise, in containerd's order: add ``ALL``,
    drop ``ALL``, add the named ones, drop the named ones; so a capability both added and
    dropped is dropped, and ``drop: [ALL]`` with ``add: [NET_BIND_SERVICE]`` leaves just that.

    ``available`` is what the agent itself may hand out (``bounding_capabilities``): runc
    cannot give more, and refuses to start a container that asks for more. "Every" and the
    defaults mean every one available; a capability named in ``add`` that is not available
    raises ``ContainerConfigError``.
    """
    universe = [name for name in ALL_CAPABILITIES if name in set(available)]
    if security_context.get("privileged"):
        return universe
    caps = security_context.get("capabilities") or {}
    add = [capability_name(name) for name in caps.get("add") or ()]
    drop = [capability_name(name) for name in caps.get("drop") or ()]
    missing = [name for name in add if name and name != "ALL" and name not in universe]
    if missing:
        raise ContainerConfigError(
            f"capabilities {', '.join(missing)} are not available to Outpost on this node,"
            " so no container can have them"
        )
    current = set(DEFAULT_CAPABILITIES) & set(universe)
    if "ALL" in add:
        current = set(universe)
    if "ALL" in drop:
        current = set()
    current |= {name for name in add if name and name != "ALL"}
    current -= {name for name in drop if name and name != "ALL"}
    return [name for name in universe if name in current]


def bounding_capabilities(proc_status: str) -> tuple[str, ...]:
    """The capabilities in the ``CapBnd`` line of a ``/proc/<pid>/status`` text.

    The caller reads ``/proc/self/status``: an agent in a restricted sandbox has fewer
    capabilities than Linux knows, and a privileged container can get only those.
    """
    for line in proc_status.splitlines():
        if line.startswith("CapBnd:"):
            mask = int(line.split(":", 1)[1].strip(), 16)
            return tuple(name for bit, name in enumerate(ALL_CAPABILITIES) if mask >> bit & 1)
    raise ValueError("the status text has no CapBnd line")


def default_mounts(*, privileged: bool) -> list[dict[str, Any]]:
    """The mounts every container has (containerd's defaults; ``privileged`` relaxes them).

    A privileged container gets the host's ``/dev`` (every device, including ones plugged in
    later, which is what a privileged pod on an industrial gateway is usually for) and
    writable ``/sys`` and cgroup filesystems.
    """
    read_only = [] if privileged else ["ro"]
    if privileged:
        dev = {
            "destination": "/dev",
            "type": "bind",
            "source": "/dev",
            "options": ["rbind", "rprivate", "rw"],
        }
    else:
        dev = {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        }
    return [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        dev,
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", *read_only],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", *read_only],
        },
    ]


# --- the spec ---------------------------------------------------------------------------------


def build_spec(
    pod: Mapping[str, Any],
    container_name: str,
    *,
    image: Mapping[str, Any],
    rootfs: str,
    volumes: ContainerVolumes,
    env: Sequence[tuple[str, str]],
    hostname: str,
    netns_path: str | None = None,
    ids: ImageIds | None = None,
    pids_limit: int | None = None,
    node_memory: int | None = None,
    oom_score_floor: int | None = None,
    available_capabilities: Sequence[str] = ALL_CAPABILITIES,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The complete ``config.json`` for one container of ``pod``.

    ``image`` is the ``config`` object of the OCI image configuration (``User``, ``Env``,
    ``Entrypoint``, ``Cmd``, ``WorkingDir``); ``rootfs`` the container's root filesystem
    directory; ``volumes`` from ``volumes.container_volumes``; ``env`` from
    ``container_env``; ``hostname`` from ``hostname.pod_hostname``. ``netns_path`` is the
    pod's network namespace (``/run/netns/…``); ``None`` gives the container a namespace of its
    own, and with ``hostNetwork`` it is ignored: the container stays in the host's. ``ids``
    resolves user and group names (``ImageIds.parse`` of the image's files). ``node_memory``
    (bytes) sets a Burstable container's OOM score; without it the kernel's default stays.
    ``oom_score_floor`` is the agent's own ``/proc/self/oom_score_adj``: as containerd does, no
    container gets a lower score than the agent (the agent should be the last one killed, and
    without CAP_SYS_RESOURCE it could not set a lower one anyway).
    ``available_capabilities`` bounds the capabilities given (see ``capabilities``).
    ``annotations`` are added to the spec's (runc reports them in ``runc state``).

    Raises ``ContainerConfigError`` for a user the image cannot resolve, root under
    ``runAsNonRoot``, a capability the node cannot give, or nothing to run.
    """
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    container = get_container(pod, container_name)
    sc = container.get("securityContext") or {}
    privileged = bool(sc.get("privileged"))
    host_network = bool(spec.get("hostNetwork"))
    own_env = dict(env)

    process: dict[str, Any] = {
        "terminal": False,
        "user": resolve_user(pod, container, str(image.get("User") or ""), ids or ImageIds()),
        "args": container_args(container, image, own_env),
        "env": _merge_env(
            [f"PATH={DEFAULT_PATH}", f"HOSTNAME={hostname}", *(image.get("Env") or ())], env
        ),
        "cwd": container.get("workingDir") or image.get("WorkingDir") or "/",
        "capabilities": {
            kind: capabilities(sc, available_capabilities)
            for kind in ("bounding", "effective", "permitted")
        },
        "noNewPrivileges": not (privileged or sc.get("allowPrivilegeEscalation") is True),
    }
    if qos_class(pod) != "Burstable" or node_memory:
        score = oom_score_adj(pod, container, node_memory or 0)
        process["oomScoreAdj"] = score if oom_score_floor is None else max(score, oom_score_floor)

    user_mounts = [mount.oci() for mount in volumes.mounts]
    taken = {mount["destination"] for mount in user_mounts}
    mounts = [m for m in default_mounts(privileged=privileged) if m["destination"] not in taken]
    mounts += user_mounts

    namespaces: list[dict[str, Any]] = [{"type": "mount"}, {"type": "cgroup"}]
    if not spec.get("hostPID"):
        namespaces.append({"type": "pid"})
    if not spec.get("hostIPC"):
        namespaces.append({"type": "ipc"})
    if not host_network:
        # The host's UTS namespace goes with its network, as in Kubernetes.
        namespaces.append({"type": "uts"})
        namespaces.append(
            {"type": "network", "path": netns_path} if netns_path else {"type": "network"}
        )

    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "cgroupsPath": cgroup_path(str(meta.get("uid", "")), container_name),
        "resources": _resources(container, privileged, volumes, pids_limit),
    }
    # A privileged container has the host's /dev already, where runc creates no nodes.
    if volumes.devices and not privileged:
        linux["devices"] = [device.oci() for device in volumes.devices]
    if not privileged:
        linux["maskedPaths"] = list(MASKED_PATHS)
        linux["readonlyPaths"] = list(READONLY_PATHS)
    sysctls = (spec.get("securityContext") or {}).get("sysctls") or ()
    if sysctls:
        linux["sysctl"] = {item["name"]: item["value"] for item in sysctls}
    propagation = {mount.propagation for mount in volumes.mounts}
    if "rshared" in propagation:
        linux["rootfsPropagation"] = "rshared"
    elif "rslave" in propagation:
        linux["rootfsPropagation"] = "rslave"

    config: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs, "readonly": bool(sc.get("readOnlyRootFilesystem"))},
        "mounts": mounts,
        "linux": linux,
        "annotations": {
            "io.kubernetes.pod.namespace": str(meta.get("namespace") or "default"),
            "io.kubernetes.pod.name": str(meta.get("name", "")),
            "io.kubernetes.pod.uid": str(meta.get("uid", "")),
            "io.kubernetes.container.name": container_name,
            **(annotations or {}),
        },
    }
    if not host_network:
        config["hostname"] = hostname
    return config


def _resources(
    container: Mapping[str, Any],
    privileged: bool,
    volumes: ContainerVolumes,
    pids_limit: int | None,
) -> dict[str, Any]:
    requests, limits = container_resources(container)
    cpu: dict[str, Any] = {"shares": cpu_shares(_milli(requests.get("cpu")))}
    if "cpu" in limits:
        cpu["quota"] = cpu_quota(_milli(limits["cpu"]))
        cpu["period"] = CPU_PERIOD
    resources: dict[str, Any] = {
        "devices": (
            [{"allow": True, "access": "rwm"}]
            if privileged
            else [
                *(dict(rule) for rule in DEFAULT_DEVICE_RULES),
                *(device.rule() for device in volumes.devices),
            ]
        ),
        "cpu": cpu,
    }
    if "memory" in limits:
        resources["memory"] = {"limit": math.ceil(limits["memory"])}
    if pids_limit is not None:
        resources["pids"] = {"limit": pids_limit}
    return resources


def _milli(value: Decimal | None) -> int:
    return 0 if value is None else math.ceil(value * 1000)
