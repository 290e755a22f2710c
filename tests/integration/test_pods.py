"""Pods end to end on real runc: images from a loopback registry, overlayfs, CNI, volumes,
probes, restarts, graceful stop and logs."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from edge.pods import logs
from edge.pods.manager import PodManager
from tests.hubkit import until
from tests.podkit import PodWorld, busybox_registry, pod

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runc needs root")


@pytest.fixture(scope="module")
def image() -> Any:
    with busybox_registry() as (_, ref):
        yield ref


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PodWorld]:
    yield PodWorld(tmp_path, crash_base_s=1.0)


@pytest.fixture
async def manager(world: PodWorld) -> AsyncIterator[PodManager]:
    manager = world.manager()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run, 0.2)
        yield manager
        # Pods are stopped for real at the end, so nothing outlives the test.
        world.pods.clear()
        manager.changed()
        with trio.fail_after(60):
            while manager.supervisors:  # noqa: ASYNC110
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def read_log(world: PodWorld, manifest: dict, container: str, attempt: int = 0) -> str:
    path = world.runtime.log_path(manifest, container, attempt)
    if not path.exists():
        return ""
    lines = path.read_bytes().splitlines(keepends=True)
    return "\n".join(m.content.decode() for m in logs.messages(iter(lines)))


async def test_env_configmap_and_secret_volumes_are_visible_inside(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    world.objects[("ConfigMap", "default")] = {"settings": {"data": {"mode": "eco"}}}
    world.objects[("Secret", "default")] = {
        "creds": {"data": {"password": base64.b64encode(b"s3cret").decode()}}
    }
    manifest = world.add(
        pod(
            "volumes",
            {
                "name": "app",
                "image": image,
                "command": [
                    "sh",
                    "-c",
                    "echo env=$GREETING; cat /cfg/mode; echo; cat /sec/password; echo; sleep 3600",
                ],
                "env": [{"name": "GREETING", "value": "hello"}],
                "volumeMounts": [
                    {"name": "cfg", "mountPath": "/cfg"},
                    {"name": "sec", "mountPath": "/sec"},
                ],
            },
            volumes=[
                {"name": "cfg", "configMap": {"name": "settings"}},
                {"name": "sec", "secret": {"secretName": "creds"}},
            ],
            hostNetwork=True,
        )
    )
    manager.changed()
    await until(lambda: world.status(manifest).get("phase") == "Running", "the pod runs")
    await until(lambda: "s3cret" in read_log(world, manifest, "app"), "the output is logged")
    assert read_log(world, manifest, "app").splitlines() == ["env=hello", "eco", "s3cret"]
    status = world.status(manifest)
    assert status["containerStatuses"][0]["ready"] is True
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "True"
