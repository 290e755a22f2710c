"""The CNI protocol without I/O: the pod network's configuration list, the plugin calls that
ADD, DEL and CHECK make of it, and the results and errors the plugins print.

A network configuration list ("conflist") names plugins that run one after the other. The rules
for running them are the runtime's, not the plugins' (CNI spec 1.0.0, "Network configuration
lists"), and ``Chain`` follows them the way libcni does:

- every plugin gets the list's ``name`` and ``cniVersion`` injected into its own configuration;
- ``runtimeConfig`` carries only the capabilities a plugin declares (here: portmap's
  ``portMappings``);
- on ADD each plugin after the first gets the previous plugin's result as ``prevResult``, and
  the last plugin's result is the result of the list;
- DEL runs the plugins in reverse order and CHECK in order, each with the cached result of the
  ADD as ``prevResult`` (DEL may go without it when the ADD never finished).

``Chain`` hands out one ``PluginCall`` at a time (executable name, CNI environment, stdin) and is
fed each plugin's stdout; whoever runs the processes (``edge.pods.network``) stays thin.
``Attachment`` is what a runtime must remember between ADD and DEL — libcni's result cache —
with the configuration and port mappings used, so that DEL undoes exactly what ADD did even if
the node's configuration has changed since.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge import defaults

CNI_VERSION = "1.0.0"
NETWORK_NAME = "outpost"
BRIDGE = "outpost0"
SUBNET = ipaddress.IPv4Network(defaults.POD_SUBNET)
POD_IFNAME = "eth0"

Command = Literal["ADD", "DEL", "CHECK", "VERSION"]
ChainCommand = Literal["ADD", "DEL", "CHECK"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# CNI spec 1.0.0, "Well-known error codes"; 100 and up are the plugin's own.
WELL_KNOWN_ERRORS = {
    1: "incompatible CNI version",
    2: "unsupported field in network configuration",
    3: "container unknown or does not exist",
    4: "invalid necessary environment variables",
    5: "I/O failure",
    6: "failed to decode content",
    7: "invalid network configuration",
    11: "try again later",
}

# libcni's rule for container IDs; it also keeps them safe in file and namespace names.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# CNI spec 1.0.0: the rule for network names.
_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_IFNAMSIZ = 15  # the kernel's limit on interface names, without the terminating NUL
_ATTACHMENT_KIND = "outpostCniAttachmentV1"


class CniError(Exception):
    """A CNI plugin failed.

    ``code``, ``msg`` and ``details`` are the plugin's CNI error; ``code`` is None when the
    plugin broke the protocol instead (it crashed, hung, or printed something that is not CNI
    JSON), and then ``stderr`` usually says why.
    """

    def __init__(
        self,
        *,
        plugin: str,
        command: str,
        container_id: str,
        code: int | None,
        msg: str,
        details: str = "",
        stderr: str = "",
    ) -> None:
        self.plugin = plugin
        self.command = command
        self.container_id = container_id
        self.code = code
        self.msg = msg
        self.details = details
        self.stderr = stderr
        super().__init__(self._describe())

    def _describe(self) -> str:
        what = f"CNI plugin {self.plugin!r} failed {self.command}"
        if self.container_id:
            what += f" for container {self.container_id}"
        if self.code is None:
            text = f"{what}: {self.msg}"
        else:
            meaning = WELL_KNOWN_ERRORS.get(self.code, "plugin-specific error")
            text = f"{what}: {self.msg} (CNI error {self.code}, {meaning})"
        if self.details and self.details != self.msg:
            text += f"; details: {self.details}"
        if self.stderr:
            text += f"; stderr: {self.stderr}"
        return text


def validate_container_id(container_id: str) -> str:
    """Return ``container_id`` if CNI (and a file or namespace name) can carry it."""
    if not _CONTAINER_ID.fullmatch(container_id):
        raise ValueError(
            f"{container_id!r} cannot be a CNI container ID: it must be 1-128 letters, digits,"
            " '_', '.' or '-', starting with a letter or digit"
        )
    return container_id


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class PortMapping:
    """A pod's ``hostPort``: connections to ``host_port`` on the node reach ``container_port``
    in the pod. ``host_ip`` "" means every address of the node."""

    host_port: int
    container_port: int
    protocol: Literal["tcp", "udp", "sctp"] = "tcp"
    host_ip: str = ""

    def __post_init__(self) -> None:
        for name in ("host_port", "container_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} must be within 1-65535, not {port}")
        if self.protocol not in ("tcp", "udp", "sctp"):
            raise ValueError(f"protocol must be tcp, udp or sctp, not {self.protocol!r}")
        if self.host_ip:
            ipaddress.ip_address(self.host_ip)

    def to_json(self) -> dict[str, Any]:
        """The entry of the ``portMappings`` capability (CNI CONVENTIONS.md)."""
        entry: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol,
        }
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PortMapping:
        return cls(
            host_port=int(data["hostPort"]),
            container_port=int(data["containerPort"]),
            protocol=data.get("protocol", "tcp"),
            host_ip=data.get("hostIP", ""),
        )


@dataclass(frozen=True)
class NetworkConfig:
    """The node-local pod network: one bridge, one IPv4 range, NAT to the outside.

    ``range_start``/``range_end`` narrow the addresses handed to pods within ``subnet`` (the
    bridge keeps the subnet's first address as the pods' gateway).
    """

    name: str = NETWORK_NAME
    bridge: str = BRIDGE
    subnet: ipaddress.IPv4Network = SUBNET
    range_start: ipaddress.IPv4Address | None = None
    range_end: ipaddress.IPv4Address | None = None

    def __post_init__(self) -> None:
        if not _NETWORK_NAME.fullmatch(self.name):
            raise ValueError(
                f"network name {self.name!r} must start with a letter or digit and hold only"
                " letters, digits, '_', '.' and '-'"
            )
        if not 1 <= len(self.bridge) <= _IFNAMSIZ or "/" in self.bridge or " " in self.bridge:
            raise ValueError(f"bridge name {self.bridge!r} is not a valid interface name")
        if self.subnet.num_addresses < 4:
            raise ValueError(f"subnet {self.subnet} leaves no address for pods next to a gateway")
        for bound in (self.range_start, self.range_end):
            if bound is not None and bound not in self.subnet:
                raise ValueError(f"{bound} is outside the pod subnet {self.subnet}")


def build_conflist(config: NetworkConfig, *, ipam_data_dir: Path) -> dict[str, Any]:
    """The configuration list for pods on ``config``'s bridge.

    The order matters: bridge makes the interface and address; portmap then needs that address
    (from ``prevResult``) for its DNAT rules; loopback last, because it hands its
    ``prevResult`` on unchanged, so the list's result stays bridge's.
    """
    ip_range: dict[str, str] = {"subnet": str(config.subnet)}
    if config.range_start is not None:
        ip_range["rangeStart"] = str(config.range_start)
    if config.range_end is not None:
        ip_range["rangeEnd"] = str(config.range_end)
    return {
        "cniVersion": CNI_VERSION,
        "name": config.name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": config.bridge,
                "isGateway": True,
                "ipMasq": True,
                # A pod reaching its own hostPort comes back in through its own port.
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[ip_range]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    # Not the global /var/lib/cni: the agent's allocations live and die with
                    # its data directory.
                    "dataDir": str(ipam_data_dir),
                },
            },
            # snat: connections from the node itself (127.0.0.1 included) to a hostPort are
            # masqueraded, so the pod's replies come back through the node.
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": "loopback"},
        ],
    }


def runtime_config(ports: Sequence[PortMapping]) -> dict[str, Any]:
    """The capability arguments for a pod: its port mappings, if it has any."""
    return {"portMappings": [port.to_json() for port in ports]} if ports else {}


def plugin_stdin(
    conflist: Mapping[str, Any],
    plugin: Mapping[str, Any],
    *,
    prev_result: Result | None,
    capability_args: Mapping[str, Any],
) -> bytes:
    """The network configuration one plugin of ``conflist`` reads on stdin (libcni's
    ``buildOneConfig``)."""
    config = dict(plugin)
    config["name"] = conflist["name"]
    config["cniVersion"] = conflist["cniVersion"]
    if prev_result is not None:
        config["prevResult"] = prev_result.raw
    declared = plugin.get("capabilities") or {}
    wanted = {key: value for key, value in capability_args.items() if declared.get(key)}
    if wanted:
        config["runtimeConfig"] = wanted
    return json.dumps(config, separators=(",", ":")).encode()


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""  # the netns path; "" for interfaces on the host


@dataclass(frozen=True)
class IPConfig:
    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None  # index into Result.interfaces


@dataclass(frozen=True)
class Result:
    """A CNI 1.0 result. ``raw`` is the JSON exactly as the plugin printed it: that, not a
    re-encoding of the fields parsed here, is what the next plugin and DEL get."""

    cni_version: str
    interfaces: tuple[Interface, ...]
    ips: tuple[IPConfig, ...]
    raw: dict[str, Any] = field(compare=False, repr=False)

    def sandbox_ip(self, ifname: str = POD_IFNAME) -> IPConfig:
        """The address of the interface ``ifname`` inside the pod's namespace."""
        for ip in self.ips:
            if ip.interface is None or not 0 <= ip.interface < len(self.interfaces):
                continue
            interface = self.interfaces[ip.interface]
            if interface.name == ifname and interface.sandbox:
                return ip
        raise ValueError(f"the CNI result has no address on {ifname} inside the pod: {self.raw}")


def parse_result(data: bytes | Mapping[str, Any], *, cni_version: str = CNI_VERSION) -> Result:
    """Parse a result printed by an ADD (or stored after one); ``ValueError`` says what is
    wrong with it."""
    raw = _load_object(data) if isinstance(data, bytes) else dict(data)
    version = raw.get("cniVersion")
    if version != cni_version:
        raise ValueError(f"result is for CNI version {version!r}, not {cni_version}: {raw}")
    try:
        interfaces = tuple(
            Interface(name=i["name"], mac=i.get("mac", ""), sandbox=i.get("sandbox", ""))
            for i in raw.get("interfaces") or ()
        )
        ips = tuple(
            IPConfig(
                address=ipaddress.ip_interface(ip["address"]),
                gateway=ipaddress.ip_address(ip["gateway"]) if ip.get("gateway") else None,
                interface=ip.get("interface"),
            )
            for ip in raw.get("ips") or ()
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed CNI result ({error!r}): {raw}") from error
    return Result(cni_version=version, interfaces=interfaces, ips=ips, raw=raw)


def _load_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as error:
        raise ValueError(f"not JSON ({error}): {_excerpt(data)}") from error
    if isinstance(value, dict):
        return value
    raise ValueError(f"not a JSON object: {_excerpt(data)}")


def _excerpt(data: bytes, limit: int = 500) -> str:
    text = data.decode(errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "…"


# -- running a list -------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginCall:
    """One plugin process to run: the executable named ``plugin``, found in ``CNI_PATH``, with
    ``env`` added to the runtime's environment and ``stdin`` on its standard input."""

    plugin: str
    command: Command
    container_id: str
    env: dict[str, str]
    stdin: bytes


def plugin_env(
    command: Command,
    *,
    container_id: str,
    netns: Path,
    ifname: str,
    cni_path: Sequence[Path],
) -> dict[str, str]:
    """The ``CNI_*`` variables of one call (CNI spec 1.0.0, "Parameters").

    DEL gets ``CNI_NETNS`` too, also when the namespace is gone: the plugins then skip what
    lived in it and release the rest.
    """
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": str(netns),
        "CNI_IFNAME": ifname,
        "CNI_PATH": ":".join(str(path) for path in cni_path),
    }


def parse_error(call: PluginCall, returncode: int, stdout: bytes, stderr: bytes) -> CniError:
    """The error a plugin that exited with ``returncode`` reported (a CNI error on stdout), or
    failing that, what can be said about it."""
    context = {"plugin": call.plugin, "command": call.command, "container_id": call.container_id}
    stderr_text = _excerpt(stderr)
    try:
        error = _load_object(stdout)
    except ValueError:
        error = {}
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        return CniError(
            **context,
            code=None,
            msg=f"exited with status {returncode} without a CNI error on stdout"
            + (f" (stdout: {_excerpt(stdout)})" if stdout.strip() else ""),
            stderr=stderr_text,
        )
    return CniError(
        **context,
        code=code,
        msg=str(error.get("msg", "")),
        details=str(error.get("details", "")),
        stderr=stderr_text,
    )


def version_call(plugin: str, *, cni_path: Sequence[Path]) -> PluginCall:
    """Ask ``plugin`` which CNI versions it speaks."""
    env = {"CNI_COMMAND": "VERSION", "CNI_PATH": ":".join(str(path) for path in cni_path)}
    stdin = json.dumps({"cniVersion": CNI_VERSION}).encode()
    return PluginCall(plugin=plugin, command="VERSION", container_id="", env=env, stdin=stdin)


def parse_version(call: PluginCall, stdout: bytes) -> tuple[str, ...]:
    """The versions in a VERSION answer; ``CniError`` if the answer is not one."""
    try:
        versions = _load_object(stdout).get("supportedVersions")
    except ValueError:
        versions = None
    if not isinstance(versions, list):
        raise CniError(
            plugin=call.plugin,
            command="VERSION",
            container_id="",
            code=None,
            msg=f"answered VERSION without a list of supportedVersions: {_excerpt(stdout)}",
        )
    return tuple(str(version) for version in versions)


class Chain:
    """One ADD, DEL or CHECK of a whole configuration list for one container, as a sequence of
    plugin calls.

    Run ``next_call()``; when its process exits 0, pass its stdout to ``receive()``; repeat
    until ``next_call()`` returns None. A plugin that fails ends the chain (as in libcni): raise
    its error, do not ``receive()``. After an ADD, ``result`` is the result of the list.
    """

    def __init__(
        self,
        command: ChainCommand,
        conflist: Mapping[str, Any],
        *,
        container_id: str,
        netns: Path,
        ifname: str = POD_IFNAME,
        cni_path: Sequence[Path],
        capability_args: Mapping[str, Any],
        cached_result: Result | None = None,
    ) -> None:
        if command == "ADD" and cached_result is not None:
            raise ValueError("ADD starts without a previous result")
        if command == "CHECK" and cached_result is None:
            raise ValueError("CHECK needs the cached result of the ADD (CNI spec 1.0.0)")
        self.command = command
        self._conflist = conflist
        self._container_id = validate_container_id(container_id)
        self._env = plugin_env(
            command, container_id=container_id, netns=netns, ifname=ifname, cni_path=cni_path
        )
        self._capability_args = capability_args
        plugins = list(conflist["plugins"])
        self._pending = plugins[::-1] if command == "DEL" else plugins
        self._prev = cached_result
        self.result: Result | None = None

    def next_call(self) -> PluginCall | None:
        if not self._pending:
            return None
        plugin = self._pending[0]
        return PluginCall(
            plugin=plugin["type"],
            command=self.command,
            container_id=self._container_id,
            env=dict(self._env),
            stdin=plugin_stdin(
                self._conflist,
                plugin,
                prev_result=self._prev,
                capability_args=self._capability_args,
            ),
        )

    def receive(self, stdout: bytes) -> None:
        """The current plugin exited 0 and printed ``stdout``."""
        if not self._pending:
            raise RuntimeError(f"{self.command} chain has no plugin call outstanding")
        plugin = self._pending.pop(0)
        if self.command != "ADD":
            return
        try:
            self._prev = parse_result(stdout, cni_version=self._conflist["cniVersion"])
        except ValueError as error:
            raise CniError(
                plugin=plugin["type"],
                command="ADD",
                container_id=self._container_id,
                code=None,
                msg=f"succeeded but printed no usable result: {error}",
            ) from error
        if not self._pending:
            self.result = self._prev

    def forgive(self, error: CniError) -> bool:
        """Whether the current plugin's ``error`` is a known plugin bug rather than a fault of
        the network; if so the chain moves on as if the plugin had succeeded.

        The one such bug: portmap before 1.3.0 (Debian 12 ships 1.1.1) CHECKs the IPv6 DNAT
        chain whenever ip6tables works, also for a pod that has no IPv6 address and so never
        got one (containernetworking/plugins#819). It checks IPv4 first, so by the time it
        fails on IPv6 the pod's IPv4 rules are known to be in place.
        """
        plugin = self._pending[0]["type"] if self._pending else None
        known_bug = (
            self.command == "CHECK"
            and plugin == "portmap"
            and error.plugin == "portmap"
            and error.msg.startswith("could not check ipv6 dnat:")
            and self._prev is not None
            and not any(ip.address.version == 6 for ip in self._prev.ips)
        )
        if known_bug:
            self._pending.pop(0)
        return known_bug


# -- what a runtime remembers between ADD and DEL -------------------------------------------


@dataclass(frozen=True)
class Attachment:
    """A container's attachment to the network: written before the ADD (``result`` None) and
    again after it, deleted after a successful DEL.

    Writing it before the ADD means a crash halfway through still leaves what DEL needs: the
    configuration list (DEL must get the one ADD got), the namespace and the port mappings
    (portmap removes its rules only when DEL names mappings).
    """

    container_id: str
    netns: Path
    conflist: dict[str, Any] = field(compare=False)
    ports: tuple[PortMapping, ...] = ()
    ifname: str = POD_IFNAME
    result: Result | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "kind": _ATTACHMENT_KIND,
                "containerId": self.container_id,
                "netns": str(self.netns),
                "ifName": self.ifname,
                "config": self.conflist,
                "portMappings": [port.to_json() for port in self.ports],
                "result": None if self.result is None else self.result.raw,
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Attachment:
        """``ValueError`` if ``data`` is not an attachment this code wrote."""
        raw = _load_object(data)
        if raw.get("kind") != _ATTACHMENT_KIND:
            raise ValueError(f"not an Outpost CNI attachment (kind {raw.get('kind')!r})")
        try:
            conflist = raw["config"]
            result = raw["result"]
            return cls(
                container_id=validate_container_id(raw["containerId"]),
                netns=Path(raw["netns"]),
                conflist=conflist,
                ports=tuple(PortMapping.from_json(port) for port in raw["portMappings"]),
                ifname=raw["ifName"],
                result=None
                if result is None
                else parse_result(result, cni_version=conflist["cniVersion"]),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"incomplete CNI attachment ({error!r})") from error
