"""Whether a Pod manifest can run on Outpost, and what it asks for that Outpost does not do.

``validate_pod`` says why a manifest cannot run before anything is created for it, naming the
field of each reason; ``pod_warnings`` lists what a valid pod asks for that is accepted but not
applied. Pure functions of the manifest.

Pods reach an edge after the apiserver validated and defaulted them, but a gateway also runs
manifests applied offline; so validation repeats the apiserver's checks that matter to running a
pod, and adds Outpost's own limits (the volume types it supports, no device plugins).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from edge.pods.capabilities import capability_name
from edge.pods.downward import (
    BYTE_DIVISORS,
    CPU_DIVISORS,
    ENV_FIELD_PATHS,
    RESOURCE_FIELDS,
    VOLUME_FIELD_PATHS,
    field_path_allowed,
)
from edge.pods.quantity import INT64_MAX, manifest_quantity

SUPPORTED_VOLUMES = ("configMap", "downwardAPI", "emptyDir", "hostPath", "projected", "secret")
HOST_PATH_TYPES = frozenset(
    {
        "",
        "DirectoryOrCreate",
        "Directory",
        "FileOrCreate",
        "File",
        "Socket",
        "CharDevice",
        "BlockDevice",
    }
)
DEVICE_HOST_PATH_TYPES = frozenset({"CharDevice", "BlockDevice"})
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_UID = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]*")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SYSCTL = re.compile(r"[a-z0-9]([-_a-z0-9]*[a-z0-9])?([./][a-z0-9]([-_a-z0-9]*[a-z0-9])?)*")
# Sysctls a container may set in its own namespaces (runc refuses the others).
_NAMESPACED_SYSCTLS = ("kernel.shm", "kernel.msg", "kernel.sem", "fs.mqueue.", "net.")
_RESOURCES = ("cpu", "memory", "ephemeral-storage")
_MAX_ID = 2**31 - 1
_KNOWN_VOLUME_SOURCES = frozenset(
    {
        *SUPPORTED_VOLUMES,
        "awsElasticBlockStore",
        "azureDisk",
        "azureFile",
        "cephfs",
        "cinder",
        "csi",
        "ephemeral",
        "fc",
        "flexVolume",
        "flocker",
        "gcePersistentDisk",
        "gitRepo",
        "glusterfs",
        "image",
        "iscsi",
        "nfs",
        "persistentVolumeClaim",
        "photonPersistentDisk",
        "portworxVolume",
        "quobyte",
        "rbd",
        "scaleIO",
        "storageos",
        "vsphereVolume",
    }
)


def _show(value: Any) -> str:
    """A manifest value quoted for a message, cut short if it is long."""
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_of(value: Any, choices: Iterable[str]) -> bool:
    # Membership without hashing: a manifest may put a list where a string belongs.
    return isinstance(value, str) and value in choices


def is_env_var_name(name: Any) -> bool:
    """Printable ASCII without ``=`` (Kubernetes' relaxed rule, the default since 1.32)."""
    return (
        isinstance(name, str)
        and bool(name)
        and all(" " <= c <= "~" for c in name)
        and "=" not in name
    )


def _relative_path_problem(path: Any) -> str | None:
    if not isinstance(path, str) or not path:
        return "must be a non-empty relative path"
    if path.startswith("/"):
        return f"{_show(path)} must be a relative path"
    if ".." in path.split("/"):
        return f"{_show(path)} must not contain '..'"
    if path.startswith(".."):
        return f"{_show(path)} must not start with '..'"
    return None


class _Validator:
    """Collects reasons, each prefixed by the field path it is about."""

    def __init__(self, pod: Any) -> None:
        self.pod = pod
        self.reasons: list[str] = []
        self.volumes: dict[str, Mapping[str, Any]] = {}
        self.container_names: set[str] = set()

    def fail(self, path: str, message: str) -> None:
        self.reasons.append(f"{path}: {message}")

    def obj(self, value: Any, path: str, *, required: bool = False) -> Mapping[str, Any]:
        if value is None:
            if required:
                self.fail(path, "is required")
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, f"must be an object, not {_show(value)}")
            return {}
        return value

    def items(self, value: Any, path: str) -> list[tuple[str, Mapping[str, Any]]]:
        """The objects of a list, each with its path; complains about what is not a list."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"must be a list, not {_show(value)}")
            return []
        out = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if isinstance(item, Mapping):
                out.append((item_path, item))
            else:
                self.fail(item_path, f"must be an object, not {_show(item)}")
        return out

    def boolean(self, value: Any, path: str) -> bool:
        if value is not None and not isinstance(value, bool):
            self.fail(path, f"must be true or false, not {_show(value)}")
            return False
        return bool(value)

    def integer(self, value: Any, path: str, low: int, high: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, not {_show(value)}")
            return None
        if not low <= value <= high:
            self.fail(path, f"{value} is out of range ({low} to {high})")
            return None
        return value

    def mode(self, value: Any, path: str) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
            self.fail(path, f"{_show(value)} must be a file mode between 0 and 0777 (511)")

    def string_list(self, value: Any, path: str) -> None:
        if value is None:
            return
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(path, f"must be a list of strings, not {_show(value)}")

    def name(self, value: Any, path: str, pattern: re.Pattern[str], limit: int, what: str) -> bool:
        if not isinstance(value, str) or not value:
            self.fail(path, "is required")
            return False
        if len(value) > limit or pattern.fullmatch(value) is None:
            self.fail(path, f"{_show(value)} is not a valid {what}")
            return False
        return True

    def quantity(self, value: Any, path: str) -> Decimal | None:
        try:
            quantity = manifest_quantity(value)
        except (TypeError, ValueError) as exc:
            self.fail(path, str(exc))
            return None
        if quantity < 0:
            self.fail(path, f"{_show(value)} must not be negative")
            return None
        # Kubernetes' int64 accessors overflow past this; nothing on a gateway is that large.
        if quantity > INT64_MAX:
            self.fail(path, f"{_show(value)} is too large")
            return None
        return quantity

    # --- the pod --------------------------------------------------------------------------

    def run(self) -> list[str]:
        pod = self.pod
        if not isinstance(pod, Mapping):
            return [f"pod: must be an object (a Kubernetes Pod manifest), not {_show(pod)}"]
        if pod.get("apiVersion") != "v1":
            self.fail("apiVersion", f'must be "v1", not {_show(pod.get("apiVersion"))}')
        if pod.get("kind") != "Pod":
            self.fail("kind", f'must be "Pod", not {_show(pod.get("kind"))}')
        self.metadata(self.obj(pod.get("metadata"), "metadata", required=True))
        spec = self.obj(pod.get("spec"), "spec", required=True)
        if spec:
            self.spec(spec)
        return self.reasons

    def metadata(self, meta: Mapping[str, Any]) -> None:
        self.name(meta.get("name"), "metadata.name", _DNS_SUBDOMAIN, 253, "pod name")
        if meta.get("namespace") is not None:
            self.name(meta["namespace"], "metadata.namespace", _DNS_LABEL, 63, "namespace")
        # The uid names the pod's directory and cgroup: it must be a safe path element.
        self.name(meta.get("uid"), "metadata.uid", _UID, 128, "uid")
        for part in ("labels", "annotations"):
            values = meta.get(part)
            if values is not None and not (
                isinstance(values, Mapping)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
            ):
                self.fail(f"metadata.{part}", "must map strings to strings")

    def spec(self, spec: Mapping[str, Any]) -> None:
        self.pod_volumes(spec.get("volumes"))
        containers = spec.get("containers")
        if not isinstance(containers, list) or not containers:
            self.fail("spec.containers", "at least one container is required")
        # Names first, so downward API references from volumes can be checked against them.
        every = [
            *self.items(spec.get("initContainers"), "spec.initContainers"),
            *self.items(containers, "spec.containers"),
        ]
        seen: dict[str, str] = {}
        for path, container in every:
            name = container.get("name")
            if not self.name(name, f"{path}.name", _DNS_LABEL, 63, "container name (a DNS label)"):
                continue
            if name in seen:
                self.fail(f"{path}.name", f"{_show(name)} is used twice (first at {seen[name]})")
            seen[name] = path
        self.container_names = set(seen)
        self.volume_field_refs(spec.get("volumes"))
        host_network = self.boolean(spec.get("hostNetwork"), "spec.hostNetwork")
        self.boolean(spec.get("hostPID"), "spec.hostPID")
        self.boolean(spec.get("hostIPC"), "spec.hostIPC")
        if self.boolean(spec.get("shareProcessNamespace"), "spec.shareProcessNamespace"):
            self.fail(
                "spec.shareProcessNamespace",
                "is not supported: each container of an Outpost pod has its own PID namespace",
            )
        if spec.get("hostUsers") is False:
            self.fail("spec.hostUsers", "false is not supported: Outpost has no user namespaces")
        restart = spec.get("restartPolicy")
        if restart is not None and restart not in ("Always", "OnFailure", "Never"):
            self.fail("spec.restartPolicy", f"{_show(restart)} is not Always, OnFailure or Never")
        pod_sc = self.obj(spec.get("securityContext"), "spec.securityContext")
        self.pod_security(pod_sc, host_network)
        self.dns(spec)
        for path, alias in self.items(spec.get("hostAliases"), "spec.hostAliases"):
            if not isinstance(alias.get("ip"), str) or not alias.get("ip"):
                self.fail(f"{path}.ip", "is required")
            self.string_list(alias.get("hostnames"), f"{path}.hostnames")
        host_ports: dict[tuple[Any, Any], str] = {}
        for path, container in every:
            self.container(path, container, host_network, host_ports)
        for path, _ in self.items(spec.get("ephemeralContainers"), "spec.ephemeralContainers"):
            self.fail(path, "ephemeral containers are not supported")

    def pod_security(self, sc: Mapping[str, Any], host_network: bool) -> None:
        base = "spec.securityContext"
        for key in ("runAsUser", "runAsGroup", "fsGroup"):
            self.integer(sc.get(key), f"{base}.{key}", 0, _MAX_ID)
        self.boolean(sc.get("runAsNonRoot"), f"{base}.runAsNonRoot")
        groups = sc.get("supplementalGroups")
        if groups is not None:
            if not isinstance(groups, list):
                self.fail(f"{base}.supplementalGroups", "must be a list of group ids")
            else:
                for index, gid in enumerate(groups):
                    self.integer(gid, f"{base}.supplementalGroups[{index}]", 0, _MAX_ID)
        self.seccomp(sc.get("seccompProfile"), f"{base}.seccompProfile")
        for path, sysctl in self.items(sc.get("sysctls"), f"{base}.sysctls"):
            name = sysctl.get("name")
            if not self.name(name, f"{path}.name", _SYSCTL, 253, "sysctl name"):
                continue
            if not isinstance(sysctl.get("value"), str):
                self.fail(f"{path}.value", "must be a string")
            if not name.startswith(_NAMESPACED_SYSCTLS):
                self.fail(f"{path}.name", f"{_show(name)} is not a namespaced sysctl")
            elif host_network and name.startswith("net."):
                self.fail(f"{path}.name", f"{_show(name)} cannot be set with hostNetwork")

    def seccomp(self, value: Any, path: str) -> None:
        profile = self.obj(value, path)
        kind = profile.get("type")
        if not profile:
            return
        if kind == "Localhost":
            self.fail(f"{path}.type", "Localhost profiles are not supported")
        elif kind not in ("RuntimeDefault", "Unconfined"):
            self.fail(f"{path}.type", f"{_show(kind)} is not RuntimeDefault or Unconfined")

    def dns(self, spec: Mapping[str, Any]) -> None:
        policy = spec.get("dnsPolicy")
        policies = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
        if policy is not None and policy not in policies:
            self.fail("spec.dnsPolicy", f"{_show(policy)} is not one of {', '.join(policies)}")
        config = self.obj(spec.get("dnsConfig"), "spec.dnsConfig")
        self.string_list(config.get("nameservers"), "spec.dnsConfig.nameservers")
        self.string_list(config.get("searches"), "spec.dnsConfig.searches")
        nameservers = config.get("nameservers") or []
        if isinstance(nameservers, list) and len(nameservers) > 3:
            self.fail("spec.dnsConfig.nameservers", "must not list more than 3 nameservers")
        if policy == "None" and not nameservers:
            self.fail("spec.dnsConfig.nameservers", 'dnsPolicy "None" needs at least one')
        for path, option in self.items(config.get("options"), "spec.dnsConfig.options"):
            if not isinstance(option.get("name"), str) or not option.get("name"):
                self.fail(f"{path}.name", "is required")

    # --- volumes --------------------------------------------------------------------------

    def pod_volumes(self, volumes: Any) -> None:
        for path, volume in self.items(volumes, "spec.volumes"):
            name = volume.get("name")
            if self.name(name, f"{path}.name", _DNS_LABEL, 63, "volume name (a DNS label)"):
                if name in self.volumes:
                    self.fail(f"{path}.name", f"{_show(name)} is used twice")
                self.volumes[name] = volume
            sources = [key for key in volume if key != "name"]
            if not sources:
                self.fail(path, "names no volume source (such as emptyDir or configMap)")
                continue
            if len(sources) > 1:
                self.fail(path, f"has more than one source ({', '.join(sorted(sources))})")
                continue
            source = sources[0]
            if source not in SUPPORTED_VOLUMES:
                known = "" if source in _KNOWN_VOLUME_SOURCES else "unknown "
                self.fail(
                    f"{path}.{source}",
                    f"{known}volume type {source!r} is not supported by Outpost"
                    f" (supported: {', '.join(SUPPORTED_VOLUMES)})",
                )
                continue
            body = self.obj(volume[source], f"{path}.{source}", required=True)
            check = {
                "configMap": self.volume_config_map,
                "downwardAPI": self.volume_downward_api,
                "emptyDir": self.volume_empty_dir,
                "hostPath": self.volume_host_path,
                "projected": self.volume_projected,
                "secret": self.volume_secret,
            }[source]
            check(body, f"{path}.{source}")

    def volume_empty_dir(self, body: Mapping[str, Any], path: str) -> None:
        medium = body.get("medium", "")
        if medium not in ("", "Memory"):
            self.fail(f"{path}.medium", f'{_show(medium)} is not supported (use "" or "Memory")')
        if body.get("sizeLimit") is not None:
            self.quantity(body["sizeLimit"], f"{path}.sizeLimit")

    def volume_host_path(self, body: Mapping[str, Any], path: str) -> None:
        host_path = body.get("path")
        if not isinstance(host_path, str) or not host_path.startswith("/"):
            self.fail(f"{path}.path", f"{_show(host_path)} must be an absolute path")
        kind = body.get("type", "")
        if not _one_of(kind, HOST_PATH_TYPES):
            types = ", ".join(sorted(t for t in HOST_PATH_TYPES if t))
            self.fail(f"{path}.type", f"{_show(kind)} is not one of {types}")

    def key_items(self, body: Mapping[str, Any], path: str, paths: set[str]) -> None:
        for item_path, item in self.items(body.get("items"), f"{path}.items"):
            self.name(item.get("key"), f"{item_path}.key", _CONFIG_KEY, 253, "key")
            self.file_path(item.get("path"), f"{item_path}.path", paths)
            self.mode(item.get("mode"), f"{item_path}.mode")
        self.boolean(body.get("optional"), f"{path}.optional")

    def file_path(self, value: Any, path: str, paths: set[str]) -> None:
        problem = _relative_path_problem(value)
        if problem:
            self.fail(path, problem)
        elif value in paths:
            self.fail(path, f"{_show(value)} is used twice in this volume")
        else:
            paths.add(value)

    def volume_config_map(self, body: Mapping[str, Any], path: str) -> None:
        self.name(body.get("name"), f"{path}.name", _DNS_SUBDOMAIN, 253, "ConfigMap name")
        self.mode(body.get("defaultMode"), f"{path}.defaultMode")
        self.key_items(body, path, set())

    def volume_secret(self, body: Mapping[str, Any], path: str) -> None:
        self.name(body.get("secretName"), f"{path}.secretName", _DNS_SUBDOMAIN, 253, "Secret name")
        self.mode(body.get("defaultMode"), f"{path}.defaultMode")
        self.key_items(body, path, set())

    def volume_downward_api(self, body: Mapping[str, Any], path: str) -> None:
        self.mode(body.get("defaultMode"), f"{path}.defaultMode")
        self.downward_items(body, path, set())

    def downward_items(self, body: Mapping[str, Any], path: str, paths: set[str]) -> None:
        for item_path, item in self.items(body.get("items"), f"{path}.items"):
            self.file_path(item.get("path"), f"{item_path}.path", paths)
            self.mode(item.get("mode"), f"{item_path}.mode")
            refs = [key for key in ("fieldRef", "resourceFieldRef") if item.get(key) is not None]
            if len(refs) != 1:
                self.fail(item_path, "needs exactly one of fieldRef and resourceFieldRef")
            elif refs[0] == "fieldRef":
                ref = self.obj(item["fieldRef"], f"{item_path}.fieldRef")
                field_path = ref.get("fieldPath")
                if not isinstance(field_path, str) or not field_path_allowed(
                    field_path, volume=True
                ):
                    self.fail(
                        f"{item_path}.fieldRef.fieldPath",
                        f"{_show(field_path)} is not a field a downward API volume offers"
                        f" ({', '.join(sorted(VOLUME_FIELD_PATHS))}, or one label or annotation"
                        " as metadata.labels['key'])",
                    )

    def volume_field_refs(self, volumes: Any) -> None:
        # resourceFieldRef in volumes must name a container: checked once names are known.
        if not isinstance(volumes, list):
            return
        for index, volume in enumerate(volumes):
            if not isinstance(volume, Mapping):
                continue
            path = f"spec.volumes[{index}]"
            groups: list[tuple[str, Any]] = []
            if isinstance(volume.get("downwardAPI"), Mapping):
                groups.append((f"{path}.downwardAPI", volume["downwardAPI"].get("items")))
            projected = volume.get("projected")
            if isinstance(projected, Mapping) and isinstance(projected.get("sources"), list):
                for number, source in enumerate(projected["sources"]):
                    if isinstance(source, Mapping) and isinstance(
                        source.get("downwardAPI"), Mapping
                    ):
                        groups.append(
                            (
                                f"{path}.projected.sources[{number}].downwardAPI",
                                source["downwardAPI"].get("items"),
                            )
                        )
            for group_path, items in groups:
                if not isinstance(items, list):
                    continue
                for number, item in enumerate(items):
                    if isinstance(item, Mapping) and item.get("resourceFieldRef") is not None:
                        self.resource_ref(
                            item["resourceFieldRef"],
                            f"{group_path}.items[{number}].resourceFieldRef",
                            container=None,
                        )

    def resource_ref(self, value: Any, path: str, *, container: str | None) -> None:
        ref = self.obj(value, path)
        name = ref.get("containerName") or container
        if name is None:
            self.fail(f"{path}.containerName", "is required in a volume")
        elif not _one_of(name, self.container_names):
            self.fail(f"{path}.containerName", f"no container is named {_show(name)}")
        resource = ref.get("resource")
        if not _one_of(resource, RESOURCE_FIELDS):
            self.fail(
                f"{path}.resource",
                f"{_show(resource)} is not one of {', '.join(sorted(RESOURCE_FIELDS))}",
            )
            return
        if ref.get("divisor") is None:
            return
        divisor = self.quantity(ref["divisor"], f"{path}.divisor")
        allowed = CPU_DIVISORS if resource.endswith(".cpu") else BYTE_DIVISORS
        if divisor is not None and divisor not in allowed:
            hint = "1m or 1" if resource.endswith(".cpu") else "1, 1k, 1Ki, 1M, 1Mi, …"
            self.fail(f"{path}.divisor", f"{_show(ref['divisor'])} is not allowed (use {hint})")

    def volume_projected(self, body: Mapping[str, Any], path: str) -> None:
        self.mode(body.get("defaultMode"), f"{path}.defaultMode")
        sources = body.get("sources")
        if sources is None:
            return
        paths: set[str] = set()
        for source_path, source in self.items(sources, f"{path}.sources"):
            kinds = [key for key in source if source[key] is not None]
            if len(kinds) != 1:
                self.fail(
                    source_path,
                    "needs exactly one of configMap, secret, downwardAPI and serviceAccountToken",
                )
                continue
            kind = kinds[0]
            inner = self.obj(source[kind], f"{source_path}.{kind}")
            inner_path = f"{source_path}.{kind}"
            if kind == "configMap":
                self.name(
                    inner.get("name"), f"{inner_path}.name", _DNS_SUBDOMAIN, 253, "ConfigMap name"
                )
                self.key_items(inner, inner_path, paths)
            elif kind == "secret":
                self.name(
                    inner.get("name"), f"{inner_path}.name", _DNS_SUBDOMAIN, 253, "Secret name"
                )
                self.key_items(inner, inner_path, paths)
            elif kind == "downwardAPI":
                self.downward_items(inner, inner_path, paths)
            elif kind == "serviceAccountToken":
                # Accepted (every pod from a cluster carries one) but never written; see
                # pod_warnings.
                self.file_path(inner.get("path"), f"{inner_path}.path", paths)
            else:
                self.fail(inner_path, f"projected source {kind!r} is not supported by Outpost")

    # --- containers -----------------------------------------------------------------------

    def container(
        self,
        path: str,
        container: Mapping[str, Any],
        host_network: bool,
        host_ports: dict[tuple[Any, Any], str],
    ) -> None:
        image = container.get("image")
        if not isinstance(image, str) or not image.strip():
            self.fail(f"{path}.image", "is required")
        self.string_list(container.get("command"), f"{path}.command")
        self.string_list(container.get("args"), f"{path}.args")
        working_dir = container.get("workingDir")
        if working_dir is not None and (
            not isinstance(working_dir, str) or (working_dir and not working_dir.startswith("/"))
        ):
            self.fail(f"{path}.workingDir", f"{_show(working_dir)} must be an absolute path")
        self.env(path, container)
        self.ports(path, container, host_network, host_ports)
        self.resources(self.obj(container.get("resources"), f"{path}.resources"), path)
        sc = self.obj(container.get("securityContext"), f"{path}.securityContext")
        privileged = self.container_security(sc, f"{path}.securityContext")
        self.volume_mounts(path, container, privileged)
        if container.get("volumeDevices"):
            self.fail(f"{path}.volumeDevices", "raw block volumes are not supported by Outpost")
        message_path = container.get("terminationMessagePath")
        if message_path is not None and (
            not isinstance(message_path, str) or not message_path.startswith("/")
        ):
            self.fail(
                f"{path}.terminationMessagePath", f"{_show(message_path)} must be an absolute path"
            )
        policy = container.get("terminationMessagePolicy")
        if policy is not None and policy not in ("File", "FallbackToLogsOnError"):
            self.fail(
                f"{path}.terminationMessagePolicy",
                f"{_show(policy)} is not File or FallbackToLogsOnError",
            )

    def env(self, path: str, container: Mapping[str, Any]) -> None:
        for env_path, var in self.items(container.get("env"), f"{path}.env"):
            name = var.get("name")
            if not is_env_var_name(name):
                self.fail(
                    f"{env_path}.name",
                    f"{_show(name)} is not a valid environment variable name"
                    " (printable ASCII without '=')",
                )
            value_from = var.get("valueFrom")
            if value_from is not None and var.get("value") not in (None, ""):
                self.fail(env_path, "sets both value and valueFrom")
            if var.get("value") is not None and not isinstance(var.get("value"), str):
                self.fail(f"{env_path}.value", f"must be a string, not {_show(var.get('value'))}")
            if value_from is not None:
                self.value_from(
                    self.obj(value_from, f"{env_path}.valueFrom"),
                    f"{env_path}.valueFrom",
                    container.get("name"),
                )
        for source_path, source in self.items(container.get("envFrom"), f"{path}.envFrom"):
            refs = [key for key in ("configMapRef", "secretRef") if source.get(key) is not None]
            if len(refs) != 1:
                self.fail(source_path, "needs exactly one of configMapRef and secretRef")
                continue
            ref = self.obj(source[refs[0]], f"{source_path}.{refs[0]}")
            self.name(
                ref.get("name"), f"{source_path}.{refs[0]}.name", _DNS_SUBDOMAIN, 253, "object name"
            )
            self.boolean(ref.get("optional"), f"{source_path}.{refs[0]}.optional")
            prefix = source.get("prefix")
            if prefix not in (None, "") and not is_env_var_name(prefix):
                self.fail(f"{source_path}.prefix", f"{_show(prefix)} is not a valid name prefix")

    def value_from(self, value_from: Mapping[str, Any], path: str, container: Any) -> None:
        kinds = [
            k
            for k in ("configMapKeyRef", "secretKeyRef", "fieldRef", "resourceFieldRef")
            if value_from.get(k) is not None
        ]
        if len(kinds) != 1:
            self.fail(
                path,
                "needs exactly one of configMapKeyRef, secretKeyRef, fieldRef and resourceFieldRef",
            )
            return
        kind = kinds[0]
        ref_path = f"{path}.{kind}"
        if kind in ("configMapKeyRef", "secretKeyRef"):
            ref = self.obj(value_from[kind], ref_path)
            self.name(ref.get("name"), f"{ref_path}.name", _DNS_SUBDOMAIN, 253, "object name")
            self.name(ref.get("key"), f"{ref_path}.key", _CONFIG_KEY, 253, "key")
            self.boolean(ref.get("optional"), f"{ref_path}.optional")
        elif kind == "fieldRef":
            ref = self.obj(value_from[kind], ref_path)
            field_path = ref.get("fieldPath")
            if not isinstance(field_path, str) or not field_path_allowed(field_path, volume=False):
                self.fail(
                    f"{ref_path}.fieldPath",
                    f"{_show(field_path)} is not a field an environment variable can hold"
                    f" ({', '.join(sorted(ENV_FIELD_PATHS))}, or metadata.labels['key'] /"
                    " metadata.annotations['key'])",
                )
        else:
            self.resource_ref(value_from[kind], ref_path, container=container)

    def ports(
        self,
        path: str,
        container: Mapping[str, Any],
        host_network: bool,
        host_ports: dict[tuple[Any, Any], str],
    ) -> None:
        names: set[str] = set()
        for port_path, port in self.items(container.get("ports"), f"{path}.ports"):
            container_port = port.get("containerPort")
            host_port = self.integer(port.get("hostPort"), f"{port_path}.hostPort", 0, 65535)
            if container_port is None:
                if host_port:
                    self.fail(
                        f"{port_path}.containerPort",
                        f"is required: hostPort {host_port} needs the container port it maps to",
                    )
                else:
                    self.fail(f"{port_path}.containerPort", "is required")
            else:
                container_port = self.integer(
                    container_port, f"{port_path}.containerPort", 1, 65535
                )
            protocol = port.get("protocol", "TCP")
            if protocol not in ("TCP", "UDP", "SCTP"):
                self.fail(f"{port_path}.protocol", f"{_show(protocol)} is not TCP, UDP or SCTP")
            name = port.get("name")
            if name is not None and self.name(
                name, f"{port_path}.name", _PORT_NAME, 15, "port name"
            ):
                if name in names:
                    self.fail(f"{port_path}.name", f"{_show(name)} is used twice")
                names.add(name)
            if host_network and host_port and container_port and host_port != container_port:
                self.fail(
                    f"{port_path}.hostPort",
                    f"must equal containerPort ({container_port}) with hostNetwork",
                )
            effective = host_port or (container_port if host_network else None)
            if effective and isinstance(protocol, str):
                key = (effective, protocol)
                if key in host_ports:
                    self.fail(
                        f"{port_path}.hostPort",
                        f"{effective}/{protocol} is already used by {host_ports[key]}",
                    )
                host_ports[key] = port_path

    def resources(self, resources: Mapping[str, Any], path: str) -> None:
        parsed: dict[str, dict[str, Decimal]] = {}
        for part in ("limits", "requests"):
            values = self.obj(resources.get(part), f"{path}.resources.{part}")
            parsed[part] = {}
            for name, value in values.items():
                field_path = f"{path}.resources.{part}.{name}"
                if not isinstance(name, str):
                    self.fail(f"{path}.resources.{part}", f"{_show(name)} is not a resource name")
                elif name.startswith("hugepages-"):
                    self.fail(field_path, "huge pages are not supported by Outpost")
                elif name not in _RESOURCES:
                    self.fail(
                        field_path,
                        f"resource {name!r} is not supported: Outpost has no device plugins"
                        " (cpu, memory and ephemeral-storage are)",
                    )
                else:
                    quantity = self.quantity(value, field_path)
                    if quantity is not None:
                        parsed[part][name] = quantity
        for name, request in parsed["requests"].items():
            limit = parsed["limits"].get(name)
            if limit is not None and request > limit:
                self.fail(
                    f"{path}.resources.requests.{name}",
                    f"{_show(resources['requests'][name])} must be less than or equal to the"
                    f" {name} limit {_show(resources['limits'][name])}",
                )
        if resources.get("claims"):
            self.fail(f"{path}.resources.claims", "dynamic resource claims are not supported")

    def container_security(self, sc: Mapping[str, Any], path: str) -> bool:
        privileged = self.boolean(sc.get("privileged"), f"{path}.privileged")
        escalation = sc.get("allowPrivilegeEscalation")
        self.boolean(escalation, f"{path}.allowPrivilegeEscalation")
        for key in ("runAsUser", "runAsGroup"):
            self.integer(sc.get(key), f"{path}.{key}", 0, _MAX_ID)
        self.boolean(sc.get("runAsNonRoot"), f"{path}.runAsNonRoot")
        self.boolean(sc.get("readOnlyRootFilesystem"), f"{path}.readOnlyRootFilesystem")
        caps = self.obj(sc.get("capabilities"), f"{path}.capabilities")
        added: set[str] = set()
        for part in ("add", "drop"):
            names = caps.get(part)
            self.string_list(names, f"{path}.capabilities.{part}")
            if not isinstance(names, list):
                continue
            for index, name in enumerate(names):
                if not isinstance(name, str):
                    continue
                full = capability_name(name)
                if full is None:
                    self.fail(
                        f"{path}.capabilities.{part}[{index}]",
                        f"{_show(name)} is not a Linux capability",
                    )
                elif part == "add":
                    added.add(full)
        if escalation is False and privileged:
            self.fail(f"{path}.allowPrivilegeEscalation", "cannot be false when privileged is true")
        if escalation is False and added & {"ALL", "CAP_SYS_ADMIN"}:
            self.fail(
                f"{path}.allowPrivilegeEscalation", "cannot be false when CAP_SYS_ADMIN is added"
            )
        proc_mount = sc.get("procMount")
        if proc_mount not in (None, "Default"):
            self.fail(f"{path}.procMount", f"{_show(proc_mount)} is not supported (only Default)")
        self.seccomp(sc.get("seccompProfile"), f"{path}.seccompProfile")
        return privileged

    def volume_mounts(self, path: str, container: Mapping[str, Any], privileged: bool) -> None:
        destinations: dict[str, str] = {}
        for mount_path_, mount in self.items(container.get("volumeMounts"), f"{path}.volumeMounts"):
            name = mount.get("name")
            volume = self.volumes.get(name) if isinstance(name, str) else None
            if volume is None:
                self.fail(f"{mount_path_}.name", f"no volume named {_show(name)} in spec.volumes")
            destination = mount.get("mountPath")
            if not isinstance(destination, str) or not destination.startswith("/"):
                self.fail(
                    f"{mount_path_}.mountPath", f"{_show(destination)} must be an absolute path"
                )
            else:
                normal = "/" + "/".join(p for p in destination.split("/") if p)
                if normal in destinations:
                    self.fail(
                        f"{mount_path_}.mountPath",
                        f"{_show(destination)} is already used by {destinations[normal]}",
                    )
                destinations[normal] = mount_path_
            self.boolean(mount.get("readOnly"), f"{mount_path_}.readOnly")
            sub_path, sub_expr = mount.get("subPath"), mount.get("subPathExpr")
            if sub_path not in (None, "") and sub_expr not in (None, ""):
                self.fail(mount_path_, "sets both subPath and subPathExpr")
            for key, value in (("subPath", sub_path), ("subPathExpr", sub_expr)):
                if value not in (None, ""):
                    problem = _relative_path_problem(value)
                    if problem:
                        self.fail(f"{mount_path_}.{key}", problem)
            propagation = mount.get("mountPropagation")
            if propagation not in (None, "None", "HostToContainer", "Bidirectional"):
                self.fail(
                    f"{mount_path_}.mountPropagation",
                    f"{_show(propagation)} is not None, HostToContainer or Bidirectional",
                )
            elif propagation == "Bidirectional" and not privileged:
                self.fail(
                    f"{mount_path_}.mountPropagation",
                    "Bidirectional is allowed only in privileged containers",
                )
            if mount.get("recursiveReadOnly") == "Enabled":
                self.fail(f"{mount_path_}.recursiveReadOnly", "Enabled is not supported")
            host_path = volume.get("hostPath") if volume else None
            if (
                isinstance(host_path, Mapping)
                and _one_of(host_path.get("type"), DEVICE_HOST_PATH_TYPES)
                and isinstance(destination, str)
                and not destination.startswith("/dev/")
            ):
                self.fail(
                    f"{mount_path_}.mountPath",
                    f"{_show(destination)} must be under /dev/: volume {_show(name)} is a"
                    " device, which the container gets as a device node",
                )


def validate_pod(pod: Any) -> list[str]:
    """Every reason the Pod manifest ``pod`` cannot run on Outpost; empty when it can.

    Each reason names the field it is about, as ``spec.containers[1].name: "web" is used
    twice``. Never raises, whatever ``pod`` is.
    """
    return _Validator(pod).run()


def pod_warnings(pod: Mapping[str, Any]) -> list[str]:
    """What a valid pod asks for that Outpost accepts but does not do, one sentence each.

    Meant for Events, so that a person sees why a token file is missing or a profile is not
    applied. Call it on a pod ``validate_pod`` accepts.
    """
    spec = pod.get("spec") or {}
    warnings: list[str] = []
    for index, volume in enumerate(spec.get("volumes") or ()):
        path = f"spec.volumes[{index}]"
        empty_dir = volume.get("emptyDir")
        if empty_dir and empty_dir.get("sizeLimit") and empty_dir.get("medium") != "Memory":
            warnings.append(f"{path}.emptyDir.sizeLimit: not enforced for a disk-backed emptyDir")
        for number, source in enumerate((volume.get("projected") or {}).get("sources") or ()):
            if source.get("serviceAccountToken") is not None:
                warnings.append(
                    f"{path}.projected.sources[{number}].serviceAccountToken: skipped when"
                    " standalone, where no cloud mints service account tokens"
                )
    contexts: list[tuple[str, Mapping[str, Any]]] = [
        ("spec.securityContext", spec.get("securityContext") or {})
    ]
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or ()):
            path = f"spec.{kind}[{index}]"
            contexts.append((f"{path}.securityContext", container.get("securityContext") or {}))
            if container.get("tty") or container.get("stdin"):
                warnings.append(
                    f"{path}: tty and stdin are not supported; the container runs"
                    " without a terminal and with stdin closed"
                )
    for path, sc in contexts:
        if (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault":
            warnings.append(
                f"{path}.seccompProfile: RuntimeDefault is not applied; the"
                " container runs without a seccomp filter"
            )
        for key in ("seLinuxOptions", "appArmorProfile"):
            if sc.get(key):
                warnings.append(f"{path}.{key}: ignored, Outpost does not apply it")
    return warnings
