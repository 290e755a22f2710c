"""Smoke tests of the built `outpost` binary itself (not the venv): it prints its build, runs a
standalone pod from a manifest folder on runc, reports `status`, and joins a loopback cloud.

They skip when the binary for the current sources is not built (`make binary`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from edge.version import __version__
from tests.channelkit import Cloud, LogFile, Managed, spawn
from tests.cluster.controlplane import ControlPlane
from tests.hubkit import until
from tests.podkit import busybox_registry
from tests.processes import REPO

pytestmark = pytest.mark.binary

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runc needs root")


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
        with trio.move_on_after(60):
            while (  # noqa: ASYNC110
                agent.process is not None
                and agent.process.returncode is None
                and (agent.containers() or await mounts_under(tmp_path))
            ):
                await trio.sleep(0.2)
        await agent.stop()
        assert await mounts_under(tmp_path) == []


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
    await until(lambda: len(agent.containers()) == 1, "the pod runs")
    logs = lambda: run(agent.binary, "logs", "hello", "--data-dir", agent.data_dir).stdout  # noqa: E731
    await until(lambda: logs() == "hello from the binary\n", "its output is logged")
    status = agent.status()
    assert status["node"] is None or isinstance(status["node"], str)
    assert status["cloud"] in (None, "")
    assert "node:" in run(agent.binary, "status", "--data-dir", agent.data_dir).stdout


@pytest.mark.cluster
async def test_it_joins_a_loopback_cloud_and_comes_online(
    outpost_binary: Path, control_plane: ControlPlane, tmp_path: Path
) -> None:
    cloud = Cloud(control_plane, tmp_path)
    await cloud.start()
    agent = BinaryAgent(outpost_binary, tmp_path / "edge")
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
        await until(lambda: agent.status()["link"]["online"], "status shows the link online")
        status = agent.status()
        assert status["node"] == "binary-smoke"
        assert status["cloud"] == cloud.url
    finally:
        await agent.stop()
        await cloud.stop()
