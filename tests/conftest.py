"""Fixtures shared by every test tier.

``control_plane`` starts one real Kubernetes control plane per test session, the first time a
test asks for it; unit tests never do, so the unit tier needs no Go build.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig

from tests.cluster import build
from tests.cluster.controlplane import ControlPlane


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    if not build.is_built():
        pytest.fail(
            f"control-plane binaries are not built in {build.bin_dir()}: run `make setup`",
            pytrace=False,
        )
    with ControlPlane() as plane:
        yield plane


@pytest.fixture
async def kube(control_plane: ControlPlane) -> AsyncIterator[AsyncClient]:
    """An admin lightkube client for the session's control plane."""
    client = AsyncClient(KubeConfig.from_file(control_plane.kubeconfig), trust_env=False)
    try:
        yield client
    finally:
        await client.close()
