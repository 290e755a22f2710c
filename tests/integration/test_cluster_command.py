"""`python -m tests.cluster up`, as a person runs it: usable with kubectl, and it leaves no
process behind however it is stopped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.cluster import build
from tests.processes import LineReader, start
from tests.waiting import eventually

pytestmark = pytest.mark.cluster


def _processes_using(path: Path) -> list[int]:
    """PIDs whose command line mentions ``path`` (every component gets its work folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGKILL])
async def test_cluster_up_serves_kubectl_and_leaves_nothing_behind(stop_signal, tmp_path):
    if not build.is_built():
        pytest.fail("control-plane binaries are not built: run `make setup`", pytrace=False)
    kubeconfig = tmp_path / "admin.kubeconfig"
    process = await start(
        sys.executable, "-m", "tests.cluster", "up", "--kubeconfig-out", kubeconfig
    )
    try:
        output = LineReader(process)
        with trio.fail_after(120):
            await output.wait_for(r"^control plane ready: Kubernetes v1\.\d+\.\d+")
            logs = await output.wait_for(r"^logs are in (\S+)/logs;")
        workdir = Path(logs.group(1))
        assert len(_processes_using(workdir)) == 4  # etcd, apiserver, controller-manager, scheduler

        ready = await trio.run_process(
            [build.bin_dir() / "kubectl", f"--kubeconfig={kubeconfig}", "get", "--raw", "/readyz"],
            capture_stdout=True,
        )
        assert ready.stdout == b"ok"

        # Ctrl-C takes the orderly path; kill -9 leaves it to the parent-death signal.
        process.send_signal(stop_signal)
        with trio.fail_after(60):
            await process.wait()
        await eventually(
            lambda: not _processes_using(workdir),
            f"no process uses {workdir}",
            within=20,
            interval=0.2,
        )
        if stop_signal == signal.SIGINT:
            assert process.returncode == 0
            assert not await trio.Path(workdir).exists(), (
                "the work folder should be removed on a clean stop"
            )
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_cluster_up_without_binaries_says_how_to_build_them(tmp_path):
    env = dict(os.environ, OUTPOST_CACHE_DIR=str(tmp_path / "empty-cache"))
    result = subprocess.run(
        [sys.executable, "-m", "tests.cluster", "up"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: control-plane binaries missing from ")
    assert "make setup" in result.stderr
    assert "Traceback" not in result.stderr
