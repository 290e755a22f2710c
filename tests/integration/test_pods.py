"""Pods end to end on real runc: images from a loopback registry, overlayfs, CNI, volumes,
probes, restarts, graceful stop and logs."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio

from edge.pods import logs
from edge.pods.manager import PodManager
from tests.podkit import PodWorld, busybox_registry, pod
from tests.waiting import eventually

pytestmark = pytest.mark.requires_root("runc needs root")


@pytest.fixture(scope="module")
def image() -> Any:
    with busybox_registry() as (_, ref):
        yield ref


@pytest.fixture
def world(tmp_path: Path) -> PodWorld:
    return PodWorld(tmp_path, crash_base_s=1.0)


@pytest.fixture
async def manager(world: PodWorld) -> AsyncIterator[PodManager]:
    manager = world.manager()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run, 0.2)
        yield manager
        # Pods are stopped for real at the end, so nothing outlives the test.
        world.pods.clear()
        manager.changed()
        await eventually(lambda: not manager.supervisors, "every pod has stopped", within=60)
        nursery.cancel_scope.cancel()
    mounts = await trio.Path("/proc/mounts").read_text()
    leftovers = [line for line in mounts.splitlines() if str(world.data_dir) in line]
    assert leftovers == [], "a stopped pod left mounts behind"


def read_log(world: PodWorld, manifest: dict, container: str, attempt: int = 0) -> str:
    path = world.runtime.log_path(manifest, container, attempt)
    if not path.exists():
        return ""
    return "\n".join(m.content.decode() for m in logs.messages(path.read_bytes()))


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
    await eventually(lambda: world.status(manifest).get("phase") == "Running", "the pod runs")
    await eventually(lambda: "s3cret" in read_log(world, manifest, "app"), "the output is logged")
    assert read_log(world, manifest, "app").splitlines() == ["env=hello", "eco", "s3cret"]
    await eventually(lambda: world.container(manifest, "app").get("ready") is True, "ready")
    status = world.status(manifest)
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "True"


async def test_a_bridged_pod_gets_its_own_ip_in_its_status(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    manifest = world.add(
        pod("bridged", {"name": "app", "image": image, "command": ["sleep", "3600"]})
    )
    manager.changed()
    await eventually(lambda: world.status(manifest).get("phase") == "Running", "the pod runs")
    status = world.status(manifest)
    assert status["podIP"].startswith("10.215.0.")
    assert status["hostIP"] != status["podIP"]


async def test_readiness_follows_its_probe_and_a_failed_liveness_probe_restarts(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    manifest = world.add(
        pod(
            "probed",
            {
                "name": "app",
                "image": image,
                "command": ["sh", "-c", "sleep 1; touch /tmp/ready; sleep 3600"],
                "readinessProbe": {
                    "exec": {"command": ["test", "-f", "/tmp/ready"]},
                    "periodSeconds": 1,
                },
                "livenessProbe": {
                    "exec": {"command": ["test", "!", "-f", "/tmp/broken"]},
                    "periodSeconds": 1,
                    "failureThreshold": 2,
                },
            },
            hostNetwork=True,
        )
    )
    manager.changed()
    await eventually(lambda: world.status(manifest).get("phase") == "Running", "the pod runs")
    assert world.container(manifest, "app")["ready"] is False
    await eventually(
        lambda: world.container(manifest, "app").get("ready") is True, "it turns ready"
    )
    supervisor = next(iter(manager.supervisors.values()))
    container_id = supervisor.running["app"].id
    await world_services_exec(world, container_id, ["touch", "/tmp/broken"])
    await eventually(
        lambda: world.container(manifest, "app").get("restartCount") == 1, "liveness restarts it"
    )
    last = world.container(manifest, "app")["lastState"]["terminated"]
    assert last["exitCode"] == 137
    # A new container: a fresh writable layer, so not ready until the probe passes again.
    await eventually(lambda: world.container(manifest, "app").get("ready") is True, "ready again")
    reasons = world.reasons(manifest, "app")
    assert {"Unhealthy", "Killing"} <= set(reasons)
    killing = next(b for _, b in world.events if b["reason"] == "Killing")
    assert killing["message"] == "Container app failed liveness probe, will be restarted"
    assert reasons.count("Started") == 2


async def world_services_exec(world: PodWorld, container_id: str, argv: list[str]) -> None:
    from edge.pods.runc import Runc

    result = await Runc(world.data_dir / "runc").exec(container_id, argv)
    assert result.exit_code == 0, result.output


async def test_crash_loop_backoff_doubles_between_restarts(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    manifest = world.add(
        pod("crashing", {"name": "app", "image": image, "command": ["false"]}, hostNetwork=True)
    )
    starts: list[float] = []
    seen = -1

    def restarted() -> bool:
        nonlocal seen
        count = world.container(manifest, "app").get("restartCount", -1)
        if count != seen:
            seen = count
            starts.append(trio.current_time())
        return count >= 4

    manager.changed()
    await eventually(restarted, "the container has restarted 4 times", within=30, interval=0.02)
    waiting = world.container(manifest, "app")["state"].get("waiting", {})
    gaps = [b - a for a, b in pairwise(starts)]
    # Base 1 s in this test (10 s in production): at once, then 1 s, then 2 s; each gap also
    # holds the container's own start and run.
    assert gaps[-3] < 0.9
    assert 1.0 <= gaps[-2] < 1.9
    assert 2.0 <= gaps[-1] < 2.9
    assert waiting.get("reason") in ("CrashLoopBackOff", None)
    assert world.status(manifest)["phase"] == "Running"
    backoffs = [b for _, b in world.events if b["reason"] == "BackOff"]
    assert len(backoffs) >= 2
    assert backoffs[0]["type"] == "Warning"
    assert backoffs[0]["fieldPath"] == "spec.containers{app}"
    assert backoffs[0]["message"].startswith("Back-off restarting failed container app in pod")


async def test_graceful_stop_waits_for_sigterm_and_kills_at_the_grace_period(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    polite = world.add(
        pod(
            "polite",
            {
                "name": "app",
                "image": image,
                "command": [
                    "sh",
                    "-c",
                    "trap 'echo bye; exit 0' TERM; echo trapped; while true; do sleep 0.1; done",
                ],
            },
            hostNetwork=True,
            terminationGracePeriodSeconds=10,
        )
    )
    stubborn = world.add(
        pod(
            "stubborn",
            {
                "name": "app",
                "image": image,
                "command": [
                    "sh",
                    "-c",
                    "trap '' TERM; echo trapped; while true; do sleep 0.1; done",
                ],
                "lifecycle": {
                    "preStop": {"exec": {"command": ["sh", "-c", "echo prestop > /tmp/p"]}}
                },
            },
            hostNetwork=True,
            terminationGracePeriodSeconds=2,
        )
    )
    manager.changed()
    for manifest in (polite, stubborn):
        await eventually(lambda m=manifest: world.status(m).get("phase") == "Running", "running")
    for manifest in (polite, stubborn):
        await eventually(
            lambda m=manifest: "trapped" in read_log(world, m, "app"), "the shell traps SIGTERM"
        )

    async def stop(name: str) -> float:
        supervisor = next(
            s for s in manager.supervisors.values() if s.pod["metadata"]["name"] == name
        )
        started = trio.current_time()
        del world.pods[name]
        await supervisor.stop()
        return trio.current_time() - started

    assert await stop("polite") < 2
    stubborn_s = await stop("stubborn")
    assert 2 <= stubborn_s < 5
    assert world.container(stubborn, "app")["state"]["terminated"]["exitCode"] == 137
    assert "bye" in read_log(world, polite, "app")


async def test_init_containers_run_first_in_order(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    manifest = world.add(
        pod(
            "init",
            {
                "name": "app",
                "image": image,
                "command": ["sh", "-c", "cat /work/order; sleep 3600"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            },
            initContainers=[
                {
                    "name": f"step{i}",
                    "image": image,
                    "command": ["sh", "-c", f"echo {i} >> /work/order"],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }
                for i in (1, 2)
            ],
            volumes=[{"name": "work", "emptyDir": {}}],
            hostNetwork=True,
        )
    )
    manager.changed()
    await eventually(lambda: world.status(manifest).get("phase") == "Running", "the pod runs")
    await eventually(
        lambda: read_log(world, manifest, "app").splitlines() == ["1", "2"], "in order"
    )
    inits = world.status(manifest)["initContainerStatuses"]
    assert [c["state"]["terminated"]["reason"] for c in inits] == ["Completed", "Completed"]


async def test_bad_pods_get_a_clear_reason_in_their_status(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    invalid = world.add(
        pod("invalid", {"name": "a", "image": image}, {"name": "a", "image": image})
    )
    missing = world.add(
        pod(
            "missing-image",
            {"name": "a", "image": image.replace(":1.0", ":nope")},
            hostNetwork=True,
        )
    )
    config = world.add(
        pod(
            "missing-configmap",
            {"name": "a", "image": image, "envFrom": [{"configMapRef": {"name": "absent"}}]},
            hostNetwork=True,
        )
    )
    manager.changed()
    await eventually(lambda: world.status(invalid).get("phase") == "Failed", "invalid fails")
    assert "used twice" in world.status(invalid)["message"]
    await eventually(
        lambda: (
            world.container(missing, "a").get("state", {}).get("waiting", {}).get("reason")
            == "ErrImagePull"
        ),
        "the missing image is reported",
    )
    await eventually(
        lambda: (
            world.container(config, "a").get("state", {}).get("waiting", {}).get("reason")
            == "CreateContainerConfigError"
        ),
        "the missing ConfigMap is reported",
    )
    assert "absent" in world.container(config, "a")["state"]["waiting"]["message"]


async def test_logs_rotate_by_size_and_read_back_whole(
    world: PodWorld, image: str, tmp_path: Path
) -> None:
    world.log_max_bytes = 4096
    manager = world.manager()
    manifest = world.add(
        pod(
            "chatty",
            {
                "name": "app",
                "image": image,
                "command": [
                    "sh",
                    "-c",
                    "i=0; while [ $i -lt 400 ]; do echo line $i; i=$((i+1)); done; sleep 3600",
                ],
            },
            hostNetwork=True,
        )
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run, 0.2)

        def written() -> Path | None:
            path = world.runtime.log_path(manifest, "app", 0)
            return path if path.exists() and b"line 399" in path.read_bytes() else None

        path = await eventually(written, "the last line is logged", within=20, interval=0.1)
        files = logs.log_files(path)
        world.pods.clear()
        manager.changed()
        await eventually(lambda: not manager.supervisors, "the pod has stopped", within=30)
        nursery.cancel_scope.cancel()
    assert [f.name for f in files] == ["0.log.2", "0.log.1", "0.log"]
    assert all(f.stat().st_size <= 4096 for f in files)
    kept = [m.content.decode() for f in files for m in logs.messages(f.read_bytes())]
    # The newest lines are kept, in order, whole; the oldest rotated away.
    assert kept[-1] == "line 399"
    numbers = [int(line.split()[1]) for line in kept]
    assert numbers == list(range(numbers[0], 400))
    assert numbers[0] > 0


async def test_an_unreachable_registry_is_image_pull_back_off(
    world: PodWorld, manager: PodManager
) -> None:
    manifest = world.add(
        pod("offline", {"name": "a", "image": "127.0.0.1:9/test/busybox:1.0"}, hostNetwork=True)
    )
    manager.changed()
    await eventually(
        lambda: (
            world.container(manifest, "a").get("state", {}).get("waiting", {}).get("reason")
            == "ImagePullBackOff"
        ),
        "the pull backs off",
    )


async def test_events_re_reports_and_a_deletion_within_its_grace_period(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    manifest = world.add(
        pod(
            "deleted",
            {
                "name": "app",
                "image": image,
                "command": ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"],
            },
            hostNetwork=True,
            terminationGracePeriodSeconds=30,
        )
    )
    key = "default/Pod/deleted"
    manager.changed()
    await eventually(lambda: world.container(manifest, "app").get("ready") is True, "ready")
    assert world.reasons(manifest) == ["Pulling", "Pulled", "Created", "Started"]
    pulled = next(b for _, b in world.events if b["reason"] == "Pulled")
    assert pulled["message"].startswith(f'Successfully pulled image "{image}" in ')
    assert pulled["type"] == "Normal"
    assert pulled["uid"] == manifest["metadata"]["uid"]

    # The link came back: the unchanged status goes up again.
    sent = len(world.history)
    manager.report_again()
    await eventually(lambda: len(world.history) > sent, "the status is reported again")
    assert world.history[-1] == (key, world.history[sent - 1][1])

    # The deletion's grace period (1 s) beats the spec's 30 s.
    began = trio.current_time()
    world.pods["deleted"] = {
        **manifest,
        "metadata": {
            **manifest["metadata"],
            "deletionTimestamp": "2025-01-01T00:00:00Z",
            "deletionGracePeriodSeconds": 1,
        },
    }
    manager.changed()
    await eventually(lambda: world.reports[key].get("stopped") is True, "the pod is stopped")
    assert trio.current_time() - began < 6
    assert (
        world.reports[key]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
        == 137
    )
    assert world.reasons(manifest)[-1] == "Killing"
    await eventually(lambda: not manager.supervisors, "the supervisor is gone")
    stopped = [body for k, body in world.history if k == key and body.get("stopped")]
    await trio.sleep(0.5)  # several reconciles: the deleted pod is not confirmed again
    assert [body for k, body in world.history if k == key and body.get("stopped")] == stopped
    assert len(stopped) == 1


async def exec_output(world: PodWorld, manager: PodManager, container: str, argv: list[str]):
    from edge.pods.runc import Runc

    supervisor = next(iter(manager.supervisors.values()), None)
    running = supervisor.running.get(container) if supervisor else None
    if running is None:
        return None
    result = await Runc(world.data_dir / "runc").exec(running.id, argv)
    return result.output.decode() if result.exit_code == 0 else None


async def wait_output(world: PodWorld, manager: PodManager, argv: list[str], text: str) -> None:

    async def shown() -> bool:
        return await exec_output(world, manager, "app", argv) == text

    await eventually(
        shown, f"{' '.join(argv)} in the container prints {text!r}", within=10, interval=0.1
    )


async def test_configmap_changes_reach_the_running_pods_volume(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    world.objects[("ConfigMap", "default")] = {"settings": {"data": {"mode": "eco"}}}
    world.add(
        pod(
            "watching",
            {
                "name": "app",
                "image": image,
                "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}],
            },
            volumes=[{"name": "cfg", "configMap": {"name": "settings"}}],
            hostNetwork=True,
        )
    )
    manager.changed()
    cat = ["cat", "/cfg/mode"]

    async def sees(text: str) -> None:
        await wait_output(world, manager, cat, text)

    await sees("eco")
    # Told by the store (the hub's on_applied): at once.
    world.objects[("ConfigMap", "default")] = {"settings": {"data": {"mode": "turbo"}}}
    manager.objects_changed(["default/ConfigMap/settings"])
    await sees("turbo")
    # Not told: the periodic resync finds it.
    manager.s.volume_resync_s = 0.3
    manager.objects_changed(["default/ConfigMap/settings"])  # restart its wait, now short
    world.objects[("ConfigMap", "default")] = {"settings": {"data": {"mode": "quiet"}}}
    await sees("quiet")
    # The ConfigMap is deleted: the files stay as they were.
    world.objects[("ConfigMap", "default")] = {}
    await trio.sleep(1)
    assert await exec_output(world, manager, "app", cat) == "quiet"


def token_object(manifest: dict, token: str) -> dict:
    meta = manifest["metadata"]
    return {
        "metadata": {"name": meta["name"], "namespace": "default", "uid": meta["uid"]},
        "tokens": [
            {
                "audience": "",
                "expirationSeconds": 3600,
                "token": token,
                "expirationTimestamp": "2030-01-01T00:00:00Z",
            }
        ],
    }


async def test_a_service_account_token_is_waited_for_then_projected_and_refreshed(
    world: PodWorld, manager: PodManager, image: str
) -> None:
    manager.s.crash_base_s = 60  # the start must not wait for its backoff
    manifest = world.add(
        pod(
            "tokened",
            {
                "name": "app",
                "image": image,
                "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "api", "mountPath": "/var/run/secrets/token"}],
            },
            volumes=[
                {
                    "name": "api",
                    "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
                }
            ],
            hostNetwork=True,
        )
    )
    manager.changed()
    await eventually(
        lambda: (
            "has not arrived from the cloud yet"
            in world.container(manifest, "app")
            .get("state", {})
            .get("waiting", {})
            .get("message", "")
        ),
        "the start waits for the token",
    )
    assert world.container(manifest, "app")["state"]["waiting"]["reason"] == (
        "CreateContainerConfigError"
    )
    assert "Failed" in world.reasons(manifest, "app")
    world.objects[("ServiceAccountToken", "default")] = {"tokened": token_object(manifest, "jwt-1")}
    began = trio.current_time()
    manager.objects_changed(["default/ServiceAccountToken/tokened"])
    await eventually(lambda: world.status(manifest).get("phase") == "Running", "it starts")
    assert trio.current_time() - began < 10
    cat = ["cat", "/var/run/secrets/token/token"]
    assert await exec_output(world, manager, "app", cat) == "jwt-1"
    # The cloud rotates the token.
    world.objects[("ServiceAccountToken", "default")] = {"tokened": token_object(manifest, "jwt-2")}
    manager.objects_changed(["default/ServiceAccountToken/tokened"])
    await wait_output(world, manager, cat, "jwt-2")
