"""Pod sandboxes' networking: a network namespace per pod, joined to the node's pod bridge by the
standard CNI plugins, or the node's own network for ``hostNetwork`` pods.

A bridged pod gets the namespace ``/run/netns/outpost-<pod uid>``, made with ``ip netns add``,
and an address from the node-local range (10.88.0.0/16 unless configured) through the
configuration list of ``edge.pods.cni``: bridge (``outpost0``, the pods' gateway, masquerading
their traffic out), host-local IPAM, portmap for ``hostPort``\\s, loopback. runc then joins the
pod's containers to the namespace by its path.

Why ``ip netns add`` rather than bind-mounting ``/proc/self/ns/net`` of an unshared helper: it
is one command instead of a helper process and mount calls through ctypes, and it first makes
``/run/netns`` a shared mount point, so that unmounting a namespace there (``ip netns
delete``) also reaches the copies in mount namespaces made since — runc's for containers —
instead of a stale copy keeping the namespace alive. Operators get ``ip netns exec`` and ``ip
netns pids`` on it for free. The name carries the whole pod UID: a restarted agent finds the
namespace from the UID alone, and two pods can never share a name.

What DEL needs is saved before the ADD starts (``cni.Attachment``, one JSON file per pod,
replaced atomically), so a crash at any point leaves enough to tear the pod's network down;
after the ADD the file also holds the result, from which a restarted agent re-reads the pod's
address (``adopt``). Calls for one pod must not overlap; calls for different pods may.

``hostPort``\\s: portmap DNATs in PREROUTING (traffic from elsewhere) and OUTPUT (traffic from
the node itself) to the pod, for any local destination address: the node's addresses and, since
portmap sets ``route_localnet`` on the bridge and masquerades such connections (``snat``),
127.0.0.1 too. Traffic from another host additionally needs the host's FORWARD chain to let it
through.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from edge.pods.cni import (
    CNI_VERSION,
    Attachment,
    Chain,
    ChainCommand,
    CniError,
    IPAddress,
    NetworkConfig,
    PluginCall,
    PortMapping,
    build_conflist,
    parse_error,
    parse_version,
    runtime_config,
    validate_container_id,
    version_call,
)

log = logging.getLogger("edge.pods.network")

CNI_PATH = (Path("/usr/lib/cni"),)  # where Debian's containernetworking-plugins puts them
NETNS_DIR = Path("/run/netns")  # iproute2's, fixed when it was built
NETNS_PREFIX = "outpost-"
PLUGIN_TIMEOUT_S = 30.0


class PodNetworkError(Exception):
    """Pod networking failed outside a CNI plugin (``ip``, the saved attachments, misuse);
    plugin failures are ``cni.CniError``."""


@dataclass(frozen=True)
class Sandbox:
    """Where a pod's containers live on the network: ``netns_path`` for runc's network
    namespace (None: the node's own, for ``hostNetwork``), and the pod's IP."""

    netns_path: Path | None
    ip: IPAddress
    gateway: IPAddress | None

    @property
    def host_network(self) -> bool:
        return self.netns_path is None


# -- hostNetwork ----------------------------------------------------------------------------


async def node_address() -> IPAddress:
    """The node's primary address, which is a ``hostNetwork`` pod's IP.

    That is the source address of the default route (IPv4 before IPv6): the route's ``src`` if
    it has one, else the address the kernel picks to reach its gateway, else the first global
    address on its device. Without any default route (an offline site with only a local
    network), the first global address of the node, in interface order.
    """
    for family in ("-4", "-6"):
        routes = await _ip_json(family, "route", "show", "default")
        if not routes:
            continue
        route = min(routes, key=lambda route: route.get("metric", 0))
        if "prefsrc" in route:
            return ipaddress.ip_address(route["prefsrc"])
        if "gateway" in route:
            # oif: an IPv6 default gateway is usually link-local, reachable only via its device.
            reach = await _ip_json(family, "route", "get", route["gateway"], "oif", route["dev"])
            if reach and "prefsrc" in reach[0]:
                return ipaddress.ip_address(reach[0]["prefsrc"])
        on_device = await _ip_json(family, "addr", "show", "dev", route["dev"], "scope", "global")
        if (address := _first_address(on_device)) is not None:
            return address
    for family in ("-4", "-6"):
        addresses = await _ip_json(family, "addr", "show", "scope", "global")
        if (address := _first_address(addresses)) is not None:
            return address
    raise PodNetworkError(
        "this node has no global IP address to give hostNetwork pods: configure its network"
    )


async def host_network_sandbox() -> Sandbox:
    """The sandbox of a ``hostNetwork`` pod: no namespace of its own, the node's address."""
    return Sandbox(netns_path=None, ip=await node_address(), gateway=None)


def _first_address(links: list[dict[str, Any]]) -> IPAddress | None:
    for link in links:
        for info in link.get("addr_info", ()):
            if "local" in info:
                return ipaddress.ip_address(info["local"])
    return None


async def _ip_json(*args: str) -> list[dict[str, Any]]:
    return json.loads(await _ip("-j", *args) or b"[]")


async def _ip(*args: str) -> bytes:
    argv = ["ip", *args]
    try:
        process = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False
        )
    except FileNotFoundError as error:
        raise PodNetworkError("`ip` is not installed: pod networking needs iproute2") from error
    if process.returncode != 0:
        raise PodNetworkError(
            f"`{' '.join(argv)}` failed (exit {process.returncode}): "
            f"{process.stderr.decode(errors='replace').strip()}"
        )
    return process.stdout


# -- bridged pods ---------------------------------------------------------------------------


class PodNetwork:
    """Bridged pod networks on this node.

    ``state_dir`` is this module's directory under the agent's data directory: the per-pod
    attachments go to ``pods/``, host-local's address leases to ``ipam/``. Both must survive
    agent restarts (reboots too: the leases are released by tearing down the pods that held
    them, which the attachments make possible).
    """

    def __init__(
        self,
        state_dir: Path,
        config: NetworkConfig | None = None,
        *,
        cni_path: Sequence[Path] = CNI_PATH,
        plugin_timeout: float = PLUGIN_TIMEOUT_S,
    ) -> None:
        self.config = config or NetworkConfig()
        self.conflist = build_conflist(self.config, ipam_data_dir=state_dir / "ipam")
        self._attachments = state_dir / "pods"
        self._cni_path = tuple(cni_path)
        self._plugin_timeout = plugin_timeout

    @staticmethod
    def netns_path(pod_uid: str) -> Path:
        return NETNS_DIR / (NETNS_PREFIX + validate_container_id(pod_uid))

    async def verify(self) -> None:
        """Check that every plugin the configuration list needs is installed and speaks CNI
        1.0.0; ``CniError`` says which does not. Meant for agent start-up."""
        plugins = []
        for plugin in self.conflist["plugins"]:
            plugins.append(plugin["type"])
            if "ipam" in plugin:
                plugins.append(plugin["ipam"]["type"])
        for plugin in plugins:
            call = version_call(plugin, cni_path=self._cni_path)
            versions = parse_version(call, await self._execute(call))
            if CNI_VERSION not in versions:
                raise CniError(
                    plugin=plugin,
                    command="VERSION",
                    container_id="",
                    code=1,
                    msg=f"speaks CNI {', '.join(versions)} but Outpost needs {CNI_VERSION}:"
                    " install containernetworking-plugins 1.0 or newer",
                )

    async def setup(self, pod_uid: str, ports: Sequence[PortMapping] = ()) -> Sandbox:
        """Make the pod's namespace and attach it to the network, with ``ports`` as its
        hostPorts. If anything fails (or the call is cancelled), whatever was done is undone
        before the error propagates."""
        netns = self.netns_path(pod_uid)
        if await trio.Path(self._attachment_path(pod_uid)).exists():
            raise PodNetworkError(
                f"pod {pod_uid} is already attached to the pod network: adopt() it, or"
                " teardown() it before setting it up again"
            )
        attachment = Attachment(
            container_id=pod_uid, netns=netns, conflist=self.conflist, ports=tuple(ports)
        )
        await self._save(attachment)
        try:
            await _ip("netns", "add", netns.name)
            chain = self._chain("ADD", attachment)
            await self._run(chain)
            attachment = replace(attachment, result=chain.result)
            sandbox = _sandbox(attachment)
            await self._save(attachment)
        except BaseException as error:
            await self._undo_setup(pod_uid, error)
            raise
        log.info(
            "pod network set up",
            extra={"pod": pod_uid, "ip": str(sandbox.ip), "netns": str(netns)},
        )
        return sandbox

    async def teardown(self, pod_uid: str) -> None:
        """Detach the pod from the network (releasing its address, hostPort rules and
        masquerading) and delete its namespace. Doing it again, or for a pod that was never
        set up, does nothing; a failure leaves enough behind to try again."""
        attachment = await self._load(pod_uid)
        netns = self.netns_path(pod_uid) if attachment is None else attachment.netns
        if attachment is not None:
            # Before the namespace goes: bridge finds the addresses whose masquerading it
            # removes on the pod's interface. If the namespace is already gone, the plugins
            # still release what they can (CNI spec: DEL tolerates missing resources) — but
            # bridge 1.1.1 then leaves the pod's masquerade rule. Namespaces go missing in
            # practice with a reboot, which empties iptables too.
            await self._run(self._chain("DEL", attachment))
        if await trio.Path(netns).exists():
            await _ip("netns", "delete", netns.name)
        if attachment is not None:
            await trio.Path(self._attachment_path(pod_uid)).unlink(missing_ok=True)
            log.info("pod network torn down", extra={"pod": pod_uid, "netns": str(netns)})

    async def check(self, pod_uid: str) -> None:
        """Ask every plugin whether the pod's network is still as ADD left it (CNI CHECK).

        Raises ``CniError`` from the first plugin that finds it is not, and
        ``PodNetworkError`` if the pod has no network set up.
        """
        attachment = await self._load(pod_uid)
        if attachment is None or attachment.result is None:
            raise PodNetworkError(f"pod {pod_uid} has no network set up to check")
        await self._run(self._chain("CHECK", attachment))

    async def adopt(self, pod_uid: str) -> Sandbox | None:
        """The sandbox a previous agent set up for the pod, or None if there is none whole
        (never set up, torn down, cut short by a crash, or its namespace gone with a reboot;
        ``teardown()`` cleans up the last two)."""
        attachment = await self._load(pod_uid)
        if attachment is None or attachment.result is None:
            return None
        if not await trio.Path(attachment.netns).exists():
            return None
        return _sandbox(attachment)

    async def attached_pods(self) -> list[str]:
        """The pods that have (or had, if a crash cut them short) a network set up: after a
        restart, those the agent no longer wants are for ``teardown()``."""
        return await trio.to_thread.run_sync(_json_stems, self._attachments)

    # -- inside ------------------------------------------------------------------------------

    def _attachment_path(self, pod_uid: str) -> Path:
        return self._attachments / f"{validate_container_id(pod_uid)}.json"

    def _chain(self, command: ChainCommand, attachment: Attachment) -> Chain:
        return Chain(
            command,
            attachment.conflist,
            container_id=attachment.container_id,
            netns=attachment.netns,
            ifname=attachment.ifname,
            cni_path=self._cni_path,
            capability_args=runtime_config(attachment.ports),
            cached_result=attachment.result if command != "ADD" else None,
        )

    async def _run(self, chain: Chain) -> None:
        while (call := chain.next_call()) is not None:
            try:
                stdout = await self._execute(call)
            except CniError as error:
                if not chain.forgive(error):
                    raise
                log.debug("ignoring a known plugin bug", extra={"error": str(error)})
                continue
            chain.receive(stdout)

    async def _execute(self, call: PluginCall) -> bytes:
        executable = _find_plugin(call, self._cni_path)
        # Plugins run further programs (iptables, the IPAM plugin), so they get the agent's
        # PATH; stale CNI_* variables must not leak into the call.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")} | call.env
        try:
            with trio.fail_after(self._plugin_timeout):
                process = await trio.run_process(
                    [executable],
                    stdin=call.stdin,
                    capture_stdout=True,
                    capture_stderr=True,
                    env=env,
                    check=False,
                )
        except trio.TooSlowError as error:
            raise CniError(
                plugin=call.plugin,
                command=call.command,
                container_id=call.container_id,
                code=None,
                msg=f"did not finish within {self._plugin_timeout:g} s and was killed",
            ) from error
        if process.returncode != 0:
            raise parse_error(call, process.returncode, process.stdout, process.stderr)
        return process.stdout

    async def _undo_setup(self, pod_uid: str, error: BaseException) -> None:
        # Shielded: a cancelled setup must not leave a namespace, an address or iptables rules
        # behind. Bounded: a DEL that hangs must not hold the cancellation up forever.
        with trio.move_on_after(self._plugin_timeout * 4, shield=True) as scope:
            try:
                await self.teardown(pod_uid)
            except Exception as cleanup_error:
                error.add_note(
                    f"undoing the failed setup of pod {pod_uid} failed too: {cleanup_error};"
                    " teardown() it again"
                )
        if scope.cancelled_caught:
            error.add_note(
                f"undoing the failed setup of pod {pod_uid} timed out: teardown() it again"
            )

    async def _load(self, pod_uid: str) -> Attachment | None:
        path = self._attachment_path(pod_uid)
        try:
            data = await trio.Path(path).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Attachment.from_json(data)
        except ValueError as error:
            raise PodNetworkError(
                f"{path} is unreadable ({error}): remove pod {pod_uid}'s namespace"
                f" {self.netns_path(pod_uid)} and its iptables rules by hand, then the file"
            ) from error

    async def _save(self, attachment: Attachment) -> None:
        path = self._attachment_path(attachment.container_id)
        await trio.to_thread.run_sync(_write_atomically, path, attachment.to_json())


def _sandbox(attachment: Attachment) -> Sandbox:
    assert attachment.result is not None
    ip = attachment.result.sandbox_ip(attachment.ifname)
    return Sandbox(netns_path=attachment.netns, ip=ip.address.ip, gateway=ip.gateway)


def _find_plugin(call: PluginCall, cni_path: Sequence[Path]) -> Path:
    for directory in cni_path:
        candidate = directory / call.plugin
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(
        plugin=call.plugin,
        command=call.command,
        container_id=call.container_id,
        code=None,
        msg=f"no executable {call.plugin!r} in {':'.join(map(str, cni_path))}:"
        " install containernetworking-plugins",
    )


def _json_stems(directory: Path) -> list[str]:
    return sorted(path.stem for path in directory.glob("*.json"))


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
