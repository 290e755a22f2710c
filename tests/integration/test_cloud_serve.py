"""`outpost-cloud serve` against the real apiserver: it connects through lightkube under trio,
reports what it found, and stops cleanly on SIGTERM; an unreachable apiserver is one clear line."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from tests.cluster.controlplane import ControlPlane, free_port
from tests.processes import VENV_BIN, LineReader, start

pytestmark = pytest.mark.cluster


async def test_serve_connects_to_kubernetes_serves_metrics_and_stops_on_sigterm(
    control_plane: ControlPlane,
):
    metrics_port = free_port()
    process = await start(
        VENV_BIN / "outpost-cloud",
        "serve",
        "--kubeconfig",
        control_plane.kubeconfig,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
    )
    try:
        output = LineReader(process)
        with trio.fail_after(30):
            line = await output.wait_for(r"^.*msg=\"connected to Kubernetes\".*$")
            await output.wait_for(r"msg=\"metrics listening\"")
        assert f"server={control_plane.server}" in line.group(0)
        assert "level=info" in line.group(0)
        async with httpx2.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert response.status_code == 200
        for name in (
            "outpost_hub_connected_nodes 0.0",
            "outpost_hub_queue_depth 0.0",
            "outpost_hub_ack_latency_seconds_count 0.0",
            "outpost_hub_reconnects_total 0.0",
        ):
            assert name in response.text
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()
        assert process.returncode == 0
        with trio.fail_after(5):
            await output.wait_for(r"msg=stopping signal=SIGTERM")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_runs_with_only_the_rights_of_its_rbac(
    control_plane: ControlPlane, cloud_kubeconfig: dict[str, Any], tmp_path: Path
):
    kubeconfig = tmp_path / "outpost-cloud.kubeconfig"
    kubeconfig.write_text(json.dumps(cloud_kubeconfig))
    metrics_port = free_port()
    process = await start(
        VENV_BIN / "outpost-cloud",
        "serve",
        "--kubeconfig",
        kubeconfig,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
    )
    try:
        output = LineReader(process)
        # CA, watermarks and replica lease in outpost-system; the informers cluster-wide.
        with trio.fail_after(30):
            await output.wait_for(r"msg=\"hub listening\"")
            await output.wait_for(r"msg=\"edge source synced\"")
        async with httpx2.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert "outpost_edge_nodes_online 0.0" in response.text
        assert 'outpost_edge_lists_total{kind="Secret"} 1.0' in response.text
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_reports_an_unreachable_apiserver_in_one_line(
    control_plane: ControlPlane, tmp_path
):
    config = json.loads(control_plane.kubeconfig.read_text())
    dead = f"https://127.0.0.1:{free_port()}"
    config["clusters"][0]["cluster"]["server"] = dead
    kubeconfig = tmp_path / "dead.kubeconfig"
    kubeconfig.write_text(json.dumps(config))

    result = await trio.run_process(
        [VENV_BIN / "outpost-cloud", "serve", "--kubeconfig", kubeconfig],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert lines == [lines[0]]
    assert lines[0].startswith(f"Error: cannot reach Kubernetes at {dead}")
