"""Smoke tests of the built `outpost` binary itself (not the venv): it prints its build, runs a
standalone pod from a manifest folder on runc, joins a loopback cloud and runs the pod it sends,
and reports both in `outpost status`.

They skip when the binary for the current sources is not built (`make binary`), and fail
instead under OUTPOST_REQUIRE_BINARY=1, as `make test` runs them (tests/appliance.py)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from edge.version import __version__
from tests.channelkit import Cloud, LogFile, Managed, spawn
from tests.cluster.controlplane import ControlPlane
from tests.podkit import busybox_registry
from tests.processes import REPO
from tests.serialkit import modbus_line, modbus_tcp_server
from tests.waiting import eventually

MODEL = {
    "apiVersion": "devices.outpost.io/v1beta1",
    "kind": "DeviceModel",
    "metadata": {"name": "thermostat"},
    "spec": {
        "protocol": "modbus",
        "properties": [
            {"name": "temperature", "type": "float", "accessMode": "ReadOnly", "unit": "C"},
            {"name": "setpoint", "type": "float", "accessMode": "ReadWrite"},
        ],
    },
}


def device(name: str, protocol: dict, desired: str) -> dict:
    def visit(register: str, offset: int, scale: float) -> dict:
        return {
            "collectCycle": 200_000_000,
            "reportCycle": 500_000_000,
            "visitors": {
                "protocolName": "modbus",
                "configData": {
                    "register": register,
                    "offset": offset,
                    "dataType": "int16",
                    "scale": scale,
                },
            },
        }

    return {
        "apiVersion": "devices.outpost.io/v1beta1",
        "kind": "Device",
        "metadata": {"name": name},
        "spec": {
            "deviceModelRef": {"name": "thermostat"},
            "protocol": protocol,
            "properties": [
                {"name": "temperature", **visit("InputRegister", 0, 0.1)},
                {
                    "name": "setpoint",
                    "desired": {"value": desired},
                    **visit("HoldingRegister", 1, 0.5),
                },
            ],
        },
    }


pytestmark = pytest.mark.binary

needs_root = pytest.mark.requires_root("runc needs root")


def run(binary: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, check=True, timeout=60
    )


def test_version_prints_the_embedded_build_info(outpost_binary: Path) -> None:
    info = json.loads(run(outpost_binary, "version", "--json").stdout)
    assert info["build"] == "release"
    assert info["version"] == __version__
    assert len(info["commit"].removesuffix("-dirty")) == 40
    assert info["build_date"].endswith("Z")
    assert info["python"].startswith("3.")
    assert info["platform"].startswith("linux/")
    text = run(outpost_binary, "version").stdout
    assert text.startswith(f"outpost {__version__} (python 3.")
    assert f"commit:   {info['commit']}" in text


def test_help_lists_the_edge_commands(outpost_binary: Path) -> None:
    result = run(outpost_binary, "--help").stdout
    for command in ("run", "join", "status", "version", "logs", "image", "device"):
        assert f"  {command} " in result


def test_it_carries_every_edge_module_and_no_cloud_or_test_code(outpost_binary: Path) -> None:
    """Device drivers are imported by name at runtime, so the build must include them itself."""
    report = outpost_binary.parent / "report.xml"
    if not report.exists():
        pytest.skip(f"no Nuitka report next to {outpost_binary}")
    compiled = set(re.findall(r'<module name="([^"]+)"', report.read_text()))
    edge = REPO / "edge"
    expected = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in edge.rglob("*.py")
    }
    assert expected - compiled == set()
    assert {"minimalmodbus", "serial", "pymodbus", "paho"} <= {m.split(".")[0] for m in compiled}
    assert not {m for m in compiled if m.split(".")[0] in {"cloud", "tests", "pytest"}}


class BinaryAgent(Managed):
    """`outpost run` of the binary, with its own data, manifest and runc folders."""

    def __init__(self, binary: Path, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.data_dir = folder / "data"
        self.manifests = folder / "manifests"
        self.runc_root = folder / "runc"
        self.manifests.mkdir(parents=True)
        self.process: trio.Process | None = None
        self.runs: list[LogFile] = []

    async def start(self, *args: str | Path) -> LogFile:
        self.process, output = await spawn(
            self.folder / f"agent-{len(self.runs)}.log",
            self.binary,
            "--log-level",
            "debug",
            "run",
            "--data-dir",
            self.data_dir,
            "--runc-root",
            self.runc_root,
            *args,
        )
        self.runs.append(output)
        return output

    def containers(self) -> dict[str, int]:
        for _ in range(5):  # runc list fails when a container goes away while it reads
            result = subprocess.run(
                ["runc", "--root", str(self.runc_root), "list", "--format", "json"],
                capture_output=True,
                check=False,
            )
            if result.returncode == 0:
                break
        result.check_returncode()
        listed = json.loads(result.stdout or b"null") or []
        return {c["id"]: c["pid"] for c in listed if c["status"] == "running"}

    def status(self) -> dict:
        return json.loads(run(self.binary, "status", "--json", "--data-dir", self.data_dir).stdout)

    def status_text(self) -> str:
        return run(self.binary, "status", "--data-dir", self.data_dir).stdout

    async def drain_and_stop(self) -> None:
        """Once its pods are gone (deleted by the caller), wait until the agent has stopped
        their containers and unmounted their volumes, then stop it; nothing stays mounted."""

        async def torn_down() -> bool:
            if self.process is None or self.process.returncode is not None:
                return True
            return not self.containers() and not await mounts_under(self.folder)

        try:
            await eventually(torn_down, "the agent has torn its pods down", within=60, interval=0.2)
        finally:
            await self.stop()
        assert await mounts_under(self.folder) == []


async def mounts_under(folder: Path) -> list[str]:
    mounts = await trio.Path("/proc/mounts").read_text()
    return [line.split()[1] for line in mounts.splitlines() if str(folder) in line.split()[1]]


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    with busybox_registry() as (_, ref):
        yield ref


@pytest.fixture
async def agent(outpost_binary: Path, tmp_path: Path) -> AsyncIterator[BinaryAgent]:
    agent = BinaryAgent(outpost_binary, tmp_path)
    try:
        yield agent
    finally:
        for manifest in agent.manifests.glob("*.yaml"):
            manifest.unlink()
        await agent.drain_and_stop()


@needs_root
async def test_a_standalone_pod_from_a_manifest_folder_runs_on_runc(
    agent: BinaryAgent, image: str
) -> None:
    (agent.manifests / "hello.yaml").write_text(
        f"""apiVersion: v1
kind: Pod
metadata: {{name: hello}}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "echo hello from the binary; while true; do sleep 1; done"]
"""
    )
    output = await agent.start("--standalone", "--manifests", agent.manifests)
    with trio.fail_after(30):
        await output.wait_for(r"msg=\"pods adopted\"")
    await eventually(lambda: len(agent.containers()) == 1, "the pod runs")
    logs = lambda: run(agent.binary, "logs", "hello", "--data-dir", agent.data_dir).stdout  # noqa: E731
    await eventually(lambda: logs() == "hello from the binary\n", "its output is logged")
    # `outpost status` of a standalone gateway: no node, no cloud, never connected.
    status = agent.status()
    assert status["node"] is None
    assert status["cloud"] is None
    assert status["link"]["online"] is False
    assert status["link"]["reason"] == "never connected"
    text = agent.status_text()
    assert "node:      (not joined)\n" in text
    assert "cloud:     (none)\n" in text
    assert re.search(r"^link:      offline \(never connected\)$", text, re.M), text
    await eventually(
        lambda: agent.status()["pods"].get("default/Pod/hello", {}).get("phase") == "Running",
        "status lists the pod running",
    )
    assert "  default/hello  Running  ready 1/1  restarts 0\n" in agent.status_text()


async def test_standalone_modbus_devices_over_tcp_and_a_serial_line(
    agent: BinaryAgent, tmp_path: Path
) -> None:
    """The device stack in the binary: pymodbus (TCP) and minimalmodbus + pyserial (RTU on a
    PTY) are loaded by name at run time, so only a real read shows they made it in."""
    async with (
        modbus_tcp_server(tmp_path / "tcp", slaves=(1,)) as tcp,
        modbus_line(tmp_path / "rtu", baudrate=19200, slaves=(3,)) as line,
    ):
        await tcp.set(1, "ir", 0, [215])
        await line.set(3, "ir", 0, [187])
        protocols = {
            "over-tcp": {
                "protocolName": "modbus-tcp",
                "configData": {"ip": tcp.host, "port": tcp.tcp_port, "slaveID": 1},
            },
            "over-rtu": {
                "protocolName": "modbus-rtu",
                "configData": {"serialPort": line.port, "baudRate": 19200, "slaveID": 3},
            },
        }
        documents = [MODEL] + [
            device(name, protocol, desired="20.5") for name, protocol in protocols.items()
        ]
        (agent.manifests / "devices.yaml").write_text(
            "---\n".join(json.dumps(d) + "\n" for d in documents)
        )
        await agent.start("--standalone", "--manifests", agent.manifests, "--eventbus", "")

        def twin(name: str) -> dict:
            result = subprocess.run(
                [agent.binary, "device", "--data-dir", agent.data_dir, "get", name, "--json"],
                capture_output=True,
                text=True,
                check=False,
            )
            return json.loads(result.stdout) if result.returncode == 0 else {}

        def prop(name: str, what: str) -> str | None:
            props = {p["name"]: p for p in twin(name).get("properties", [])}
            return props.get(what, {}).get("value")

        for name, expected in (("over-tcp", "21.5"), ("over-rtu", "18.7")):
            await eventually(
                lambda n=name, e=expected: prop(n, "temperature") == e,
                f"{name} reports its temperature {expected}",
                within=30,
                interval=0.2,
            )
            await eventually(
                lambda n=name: prop(n, "setpoint") == "20.5",
                f"{name} reports the desired setpoint",
                within=30,
                interval=0.2,
            )
            assert twin(name)["state"] == "online"
        # The desired setpoint reached each device's holding register (scale 0.5).
        assert await tcp.get(1, "hr", 1) == [41]
        assert await line.get(3, "hr", 1) == [41]
        listing = run(agent.binary, "device", "--data-dir", agent.data_dir, "ls").stdout
        assert re.search(r"^default\s+over-rtu\s+online\s+modbus-rtu\s", listing, re.M), listing


@needs_root
@pytest.mark.cluster
async def test_it_joins_a_loopback_cloud_and_runs_the_pod_it_sends(
    outpost_binary: Path, control_plane: ControlPlane, image: str, tmp_path: Path
) -> None:
    """`outpost join` with a token from `outpost-cloud token create`, `outpost run` linked to
    that cloud, a pod bound to the node in Kubernetes running on runc, and `outpost status`."""
    cloud = Cloud(control_plane, tmp_path)
    await cloud.start()
    agent = BinaryAgent(outpost_binary, tmp_path / "edge")
    pod = tmp_path / "pod.json"
    pod.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "binary-smoke", "namespace": "default"},
                "spec": {
                    "nodeName": "binary-smoke",
                    "hostNetwork": True,
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "main",
                            "image": image,
                            "command": ["sh", "-c", "while true; do sleep 1; done"],
                        }
                    ],
                },
            }
        )
    )
    try:
        token = await cloud.token("binary-smoke")
        joined = run(
            outpost_binary, "join", "--cloud", cloud.url, "--token", token,
            "--node-name", "binary-smoke", "--data-dir", agent.data_dir,
        )  # fmt: skip
        assert "binary-smoke" in joined.stdout + joined.stderr
        output = await agent.start()
        with trio.fail_after(30):
            await output.wait_for(r"msg=\"cloud link up\"")
        await eventually(lambda: agent.status()["link"]["online"], "status shows the link online")
        status = agent.status()
        assert status["node"] == "binary-smoke"
        assert status["cloud"] == cloud.url

        control_plane.kubectl("apply", "-f", str(pod))
        await eventually(lambda: len(agent.containers()) == 1, "the cloud's pod runs on runc")

        def phase() -> str:
            get = ("get", "pod", "binary-smoke", "-o", "jsonpath={.status.phase}")
            return control_plane.kubectl(*get).stdout

        await eventually(lambda: phase() == "Running", "Kubernetes shows the pod Running")
        status = agent.status()
        assert status["objects"].get("Pod") == 1, status
        text = agent.status_text()
        assert "node:      binary-smoke\n" in text
        assert f"cloud:     {cloud.url}\n" in text
        assert re.search(r"^link:      online since ", text, re.M), text
        assert re.search(r"^objects:   .*\b1 Pod\b", text, re.M), text
    finally:
        control_plane.kubectl("delete", "pod", "binary-smoke", "--wait=false", check=False)
        await agent.drain_and_stop()
        await cloud.stop()
        control_plane.kubectl(
            "delete", "pod", "binary-smoke", "--force", "--grace-period=0", "--ignore-not-found",
            check=False,
        )  # fmt: skip
