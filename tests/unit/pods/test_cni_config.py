"""The CNI protocol without processes (edge/pods/cni.py): the configuration list, how a Chain
feeds one plugin's result to the next, results, errors and the saved attachment."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from edge.pods.cni import (
    CNI_VERSION,
    Attachment,
    Chain,
    ChainCommand,
    CniError,
    NetworkConfig,
    PluginCall,
    PortMapping,
    Result,
    build_conflist,
    parse_error,
    parse_result,
    parse_version,
    plugin_env,
    plugin_stdin,
    runtime_config,
    validate_container_id,
    version_call,
)

NETNS = Path("/run/netns/outpost-pod-1")
CNI_PATH = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
CONFLIST = build_conflist(NetworkConfig(), ipam_data_dir=Path("/var/lib/outpost/network/ipam"))
PORTS = (PortMapping(8080, 80), PortMapping(5353, 53, "udp", "192.0.2.2"))

# What bridge 1.1.1 printed for an ADD (copied from a real run).
BRIDGE_RESULT: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "outpost0", "mac": "22:8d:6e:91:cf:0f"},
        {"name": "veth07ddf8f7", "mac": "0a:a5:8d:fe:97:12"},
        {"name": "eth0", "mac": "7a:07:91:ac:25:39", "sandbox": str(NETNS)},
    ],
    "ips": [{"interface": 2, "address": "10.88.0.4/16", "gateway": "10.88.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


def encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


def stdin_of(call: PluginCall) -> dict[str, Any]:
    return json.loads(call.stdin)


def chain(command: ChainCommand, *, cached: Result | None = None) -> Chain:
    return Chain(
        command,
        CONFLIST,
        container_id="pod-1",
        netns=NETNS,
        cni_path=CNI_PATH,
        capability_args=runtime_config(PORTS),
        cached_result=cached,
    )


def drive(running: Chain, outputs: list[bytes]) -> list[PluginCall]:
    """Run a chain with canned plugin outputs, returning the calls it made."""
    calls = []
    for output in outputs:
        call = running.next_call()
        assert call is not None
        calls.append(call)
        running.receive(output)
    assert running.next_call() is None
    return calls


# -- configuration --------------------------------------------------------------------------


def test_the_default_conflist_is_a_cni_1_0_bridge_with_host_local_portmap_and_loopback() -> None:
    assert CONFLIST["cniVersion"] == CNI_VERSION == "1.0.0"
    assert CONFLIST["name"] == "outpost"
    assert [plugin["type"] for plugin in CONFLIST["plugins"]] == ["bridge", "portmap", "loopback"]
    bridge, portmap, _ = CONFLIST["plugins"]
    assert bridge["bridge"] == "outpost0"
    assert bridge["isGateway"] is True
    assert bridge["ipMasq"] is True
    assert bridge["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.88.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "/var/lib/outpost/network/ipam",
    }
    assert portmap["capabilities"] == {"portMappings": True}
    assert portmap["snat"] is True


def test_the_pod_range_bridge_and_name_are_configurable() -> None:
    config = NetworkConfig(
        name="site-a",
        bridge="br-pods",
        subnet=ipaddress.IPv4Network("172.30.8.0/24"),
        range_start=ipaddress.IPv4Address("172.30.8.100"),
        range_end=ipaddress.IPv4Address("172.30.8.199"),
    )
    conflist = build_conflist(config, ipam_data_dir=Path("/data/ipam"))
    assert conflist["name"] == "site-a"
    bridge = conflist["plugins"][0]
    assert bridge["bridge"] == "br-pods"
    assert bridge["ipam"]["ranges"] == [
        [{"subnet": "172.30.8.0/24", "rangeStart": "172.30.8.100", "rangeEnd": "172.30.8.199"}]
    ]


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"name": "-pods"}, "network name"),
        ({"name": "pods net"}, "network name"),
        ({"bridge": "a-very-long-bridge"}, "bridge name"),
        ({"subnet": ipaddress.IPv4Network("10.0.0.0/31")}, "no address for pods"),
        ({"range_start": ipaddress.IPv4Address("10.89.0.1")}, "outside the pod subnet"),
    ],
)
def test_a_bad_network_config_is_refused_with_the_reason(
    settings: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        NetworkConfig(**settings)


def test_port_mappings_follow_the_cni_port_mappings_convention() -> None:
    assert runtime_config(PORTS) == {
        "portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "192.0.2.2"},
        ]
    }
    assert [PortMapping.from_json(entry) for entry in runtime_config(PORTS)["portMappings"]] == [
        *PORTS
    ]
    assert runtime_config(()) == {}


@pytest.mark.parametrize(
    "arguments",
    [(0, 80), (8080, 65536), (8080, 80, "icmp"), (8080, 80, "tcp", "not-an-ip")],
)
def test_a_bad_port_mapping_is_refused(arguments: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        PortMapping(*arguments)


def test_container_ids_must_be_safe_for_cni_and_file_names() -> None:
    uid = "5f0c2a8e-95b1-4f6c-9d57-0d5b2f0f6a10"
    assert validate_container_id(uid) == uid
    for bad in ("", "../etc", "a/b", "-x", "x" * 129, "pod 1"):
        with pytest.raises(ValueError, match="cannot be a CNI container ID"):
            validate_container_id(bad)


# -- what each plugin gets ------------------------------------------------------------------


def test_each_plugin_gets_the_list_name_and_version_and_only_the_capabilities_it_declares() -> None:
    bridge, portmap, loopback = CONFLIST["plugins"]
    capability_args = runtime_config(PORTS)
    stdin = json.loads(
        plugin_stdin(CONFLIST, portmap, prev_result=None, capability_args=capability_args)
    )
    assert stdin["name"] == "outpost"
    assert stdin["cniVersion"] == "1.0.0"
    assert stdin["runtimeConfig"] == capability_args
    assert "prevResult" not in stdin
    for plugin in (bridge, loopback):
        stdin = json.loads(
            plugin_stdin(CONFLIST, plugin, prev_result=None, capability_args=capability_args)
        )
        assert "runtimeConfig" not in stdin


def test_the_list_overrides_a_plugins_own_name_and_version() -> None:
    conflist = {"cniVersion": "1.0.0", "name": "outer", "plugins": []}
    plugin = {"type": "bridge", "name": "inner", "cniVersion": "0.3.1"}
    stdin = json.loads(plugin_stdin(conflist, plugin, prev_result=None, capability_args={}))
    assert (stdin["name"], stdin["cniVersion"]) == ("outer", "1.0.0")


def test_the_cni_environment_names_command_container_namespace_interface_and_path() -> None:
    assert plugin_env(
        "ADD", container_id="pod-1", netns=NETNS, ifname="eth0", cni_path=CNI_PATH
    ) == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "pod-1",
        "CNI_NETNS": str(NETNS),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni:/opt/cni/bin",
    }


# -- chains ---------------------------------------------------------------------------------


def test_add_chains_each_plugins_result_into_the_next_as_prev_result() -> None:
    portmap_result = {**BRIDGE_RESULT, "note": "portmap passed this on"}
    running = chain("ADD")
    calls = drive(running, [encode(BRIDGE_RESULT), encode(portmap_result), encode(portmap_result)])
    assert [call.plugin for call in calls] == ["bridge", "portmap", "loopback"]
    assert all(call.command == "ADD" and call.env["CNI_COMMAND"] == "ADD" for call in calls)
    assert all(call.env["CNI_IFNAME"] == "eth0" for call in calls)
    assert "prevResult" not in stdin_of(calls[0])
    # Verbatim, fields this code does not know included.
    assert stdin_of(calls[1])["prevResult"] == BRIDGE_RESULT
    assert stdin_of(calls[2])["prevResult"] == portmap_result
    assert running.result is not None
    assert running.result.raw == portmap_result


def test_del_runs_the_list_backwards_each_plugin_with_the_cached_result() -> None:
    cached = parse_result(encode(BRIDGE_RESULT))
    calls = drive(chain("DEL", cached=cached), [b"", b"", b""])
    assert [call.plugin for call in calls] == ["loopback", "portmap", "bridge"]
    assert all(stdin_of(call)["prevResult"] == BRIDGE_RESULT for call in calls)
    # portmap removes its rules only when DEL names the mappings again.
    assert stdin_of(calls[1])["runtimeConfig"] == runtime_config(PORTS)


def test_del_after_an_add_that_never_finished_goes_without_prev_result() -> None:
    calls = drive(chain("DEL"), [b"", b"", b""])
    assert all("prevResult" not in stdin_of(call) for call in calls)


def test_check_runs_the_list_in_order_and_needs_the_cached_result() -> None:
    cached = parse_result(encode(BRIDGE_RESULT))
    calls = drive(chain("CHECK", cached=cached), [b"", b"", b""])
    assert [call.plugin for call in calls] == ["bridge", "portmap", "loopback"]
    assert all(stdin_of(call)["prevResult"] == BRIDGE_RESULT for call in calls)
    with pytest.raises(ValueError, match="CHECK needs the cached result"):
        chain("CHECK")


def test_an_add_that_prints_no_result_is_a_protocol_error_of_that_plugin() -> None:
    running = chain("ADD")
    running.receive(encode(BRIDGE_RESULT))
    with pytest.raises(CniError) as caught:
        running.receive(b"")
    assert caught.value.plugin == "portmap"
    assert caught.value.code is None
    assert "printed no usable result" in str(caught.value)


def portmap_ipv6_bug(command: str) -> CniError:
    return CniError(
        plugin="portmap",
        command=command,
        container_id="pod-1",
        code=999,
        msg="could not check ipv6 dnat: chain CNI-DN-fcb65b324db7a51765a89 not found",
    )


def test_check_forgives_portmaps_ipv6_bug_for_an_ipv4_only_pod_and_moves_on() -> None:
    running = chain("CHECK", cached=parse_result(encode(BRIDGE_RESULT)))
    running.receive(b"")
    assert running.forgive(portmap_ipv6_bug("CHECK"))
    call = running.next_call()
    assert call is not None
    assert call.plugin == "loopback"


def test_nothing_else_is_forgiven() -> None:
    dual_stack = {
        **BRIDGE_RESULT,
        "ips": [*BRIDGE_RESULT["ips"], {"interface": 2, "address": "fd00::4/64"}],
    }
    running = chain("CHECK", cached=parse_result(encode(dual_stack)))
    running.receive(b"")
    assert not running.forgive(portmap_ipv6_bug("CHECK"))
    ipv4_only = chain("CHECK", cached=parse_result(encode(BRIDGE_RESULT)))
    ipv4_only.receive(b"")
    other = CniError(
        plugin="portmap", command="CHECK", container_id="pod-1", code=999, msg="chain missing"
    )
    assert not ipv4_only.forgive(other)
    add = chain("ADD")
    add.receive(encode(BRIDGE_RESULT))
    assert not add.forgive(portmap_ipv6_bug("ADD"))


# -- results and errors ---------------------------------------------------------------------


def test_a_result_gives_the_address_of_the_interface_inside_the_pod() -> None:
    result = parse_result(encode(BRIDGE_RESULT))
    assert result.cni_version == "1.0.0"
    assert [interface.name for interface in result.interfaces] == [
        "outpost0",
        "veth07ddf8f7",
        "eth0",
    ]
    ip = result.sandbox_ip("eth0")
    assert ip.address == ipaddress.ip_interface("10.88.0.4/16")
    assert ip.gateway == ipaddress.ip_address("10.88.0.1")
    with pytest.raises(ValueError, match="no address on net1"):
        result.sandbox_ip("net1")


def test_an_address_on_a_host_interface_is_not_the_pods() -> None:
    on_host = {**BRIDGE_RESULT, "ips": [{"interface": 0, "address": "10.88.0.1/16"}]}
    with pytest.raises(ValueError, match="no address on eth0"):
        parse_result(encode(on_host)).sandbox_ip("eth0")


@pytest.mark.parametrize(
    ("output", "complaint"),
    [
        (b"", "not JSON"),
        (b"[]", "not a JSON object"),
        (encode({**BRIDGE_RESULT, "cniVersion": "0.4.0"}), "CNI version '0.4.0'"),
        (encode({**BRIDGE_RESULT, "ips": [{"address": "10.88.0.300/16"}]}), "malformed"),
        (encode({**BRIDGE_RESULT, "interfaces": [{"mac": "x"}]}), "malformed"),
    ],
)
def test_a_result_that_is_not_cni_1_0_is_refused(output: bytes, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_result(output)


ADD_CALL = PluginCall(plugin="bridge", command="ADD", container_id="pod-1", env={}, stdin=b"")


def test_a_plugins_cni_error_is_raised_with_its_code_msg_and_details() -> None:
    stdout = encode(
        {
            "cniVersion": "1.0.0",
            "code": 7,
            "msg": "invalid bridge name",
            "details": "bridge name 'x y' has a space",
        }
    )
    error = parse_error(ADD_CALL, 1, stdout, b"")
    assert (error.code, error.msg, error.details) == (
        7,
        "invalid bridge name",
        "bridge name 'x y' has a space",
    )
    assert str(error) == (
        "CNI plugin 'bridge' failed ADD for container pod-1: invalid bridge name"
        " (CNI error 7, invalid network configuration); details: bridge name 'x y' has a space"
    )


def test_a_plugin_specific_code_is_labelled_as_such() -> None:
    stdout = encode({"cniVersion": "1.0.0", "code": 999, "msg": "no IP addresses available"})
    error = parse_error(ADD_CALL, 1, stdout, b"")
    assert error.code == 999
    assert "(CNI error 999, plugin-specific error)" in str(error)


def test_a_plugin_that_dies_without_a_cni_error_is_reported_with_its_stderr() -> None:
    error = parse_error(ADD_CALL, 2, b"panic", b"goroutine 1 [running]:\nmain.main()")
    assert error.code is None
    assert "exited with status 2 without a CNI error on stdout (stdout: panic)" in str(error)
    assert "goroutine 1 [running]" in error.stderr


def test_version_answers_list_the_supported_versions() -> None:
    call = version_call("bridge", cni_path=CNI_PATH)
    assert call.env == {"CNI_COMMAND": "VERSION", "CNI_PATH": "/usr/lib/cni:/opt/cni/bin"}
    assert json.loads(call.stdin) == {"cniVersion": "1.0.0"}
    answer = encode({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]})
    assert parse_version(call, answer) == ("0.4.0", "1.0.0")
    with pytest.raises(CniError) as caught:
        parse_version(call, b"bridge v1.1.1")
    assert str(caught.value) == (
        "CNI plugin 'bridge' failed VERSION: answered VERSION without a list of"
        " supportedVersions: bridge v1.1.1"
    )


# -- the attachment -------------------------------------------------------------------------


def test_an_attachment_round_trips_before_and_after_the_add() -> None:
    before = Attachment(container_id="pod-1", netns=NETNS, conflist=CONFLIST, ports=PORTS)
    assert Attachment.from_json(before.to_json()) == before
    after = Attachment(
        container_id="pod-1",
        netns=NETNS,
        conflist=CONFLIST,
        ports=PORTS,
        result=parse_result(encode(BRIDGE_RESULT)),
    )
    again = Attachment.from_json(after.to_json())
    assert again == after
    assert again.conflist == CONFLIST
    assert again.result is not None
    assert again.result.raw == BRIDGE_RESULT


def test_a_file_that_is_not_an_attachment_is_refused() -> None:
    with pytest.raises(ValueError, match="not an Outpost CNI attachment"):
        Attachment.from_json(b'{"kind": "cniCacheV1"}')
    with pytest.raises(ValueError, match="incomplete CNI attachment"):
        Attachment.from_json(b'{"kind": "outpostCniAttachmentV1", "containerId": "pod-1"}')
