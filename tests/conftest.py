"""Fixtures shared by every test tier.

``control_plane`` starts one real Kubernetes control plane per test session, the first time a
test asks for it; unit tests never do, so the unit tier needs no Go build. ``outpost_binary`` is
the built edge binary (tests/appliance.py). A test marked ``requires_root(reason)`` is skipped
without root, and fails instead under ``OUTPOST_REQUIRE_ROOT=1`` (`make test`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig

from tests.appliance import binary_or_missing, require_root
from tests.cluster import build
from tests.cluster.controlplane import ControlPlane


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_root(reason): needs root; skipped without it, failed under"
        " OUTPOST_REQUIRE_ROOT=1 (make test)",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="requires_root"):
        require_root(marker.args[0] if marker.args else "this test needs root")


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    if not build.is_built():
        pytest.fail(
            f"control-plane binaries are not built in {build.bin_dir()}: run `make setup`",
            pytrace=False,
        )
    with ControlPlane() as plane:
        yield plane


@pytest.fixture(scope="session")
def outpost_binary() -> Path:
    """The built edge binary (`make binary`): skipped without it, failed under
    OUTPOST_REQUIRE_BINARY=1 (`make test`); see tests/appliance.py."""
    return binary_or_missing()


@pytest.fixture(scope="session")
def cloud_kubeconfig(control_plane: ControlPlane) -> dict[str, Any]:
    """A kubeconfig (as a dict) for the service account `outpost-cloud rbac` sets up, applied
    once per session: tests running the cloud with it show that its RBAC is enough."""
    rbac = subprocess.run(
        [str(Path(sys.executable).with_name("outpost-cloud")), "rbac"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    applied = subprocess.run(
        [str(control_plane.kubectl_path), f"--kubeconfig={control_plane.kubeconfig}",
         "apply", "-f", "-"],
        input=rbac, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    token = control_plane.kubectl(
        "create", "token", "outpost-cloud", "-n", "outpost-system", "--duration=6h"
    ).stdout.strip()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": control_plane.server,
                    "certificate-authority": str(control_plane.ca_path),
                },
            }
        ],
        "users": [{"name": "outpost-cloud", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "test", "user": "outpost-cloud"}}],
        "current-context": "c",
    }


@pytest.fixture
async def cloud_kube(cloud_kubeconfig: dict[str, Any]) -> AsyncIterator[AsyncClient]:
    """A client with only the rights `outpost-cloud rbac` grants: tests running the edge
    controller with it also show that the RBAC is enough for what they exercise."""
    config = KubeConfig.from_dict(cloud_kubeconfig)
    client = AsyncClient(config, field_manager="outpost-cloud", trust_env=False)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def kube(control_plane: ControlPlane) -> AsyncIterator[AsyncClient]:
    """An admin lightkube client for the session's control plane."""
    client = AsyncClient(KubeConfig.from_file(control_plane.kubeconfig), trust_env=False)
    try:
        yield client
    finally:
        await client.close()
