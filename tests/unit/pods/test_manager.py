"""The pod manager without runc: deleted pods it never ran, which pods hear of object changes,
and the deletion's grace period."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from edge.hub.link import LINK_STATE_KEY
from edge.pods import process
from edge.pods.manager import PodManager
from edge.pods.supervisor import Services
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.wire.events import Message, Op
from tests.waiting import eventually


class NoContainers:
    """runc with nothing running."""

    async def list(self) -> list[Any]:
        return []


def pod(name: str, uid: str, **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "plant", "uid": uid, **meta},
        "spec": {
            "containers": [{"name": "main", "image": "app:1"}],
            "volumes": [{"name": "cfg", "configMap": {"name": "settings"}}],
        },
    }


@pytest.fixture
def reports() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture
def services(tmp_path: Path, reports: list) -> Services:
    async def report(key: str, body: dict[str, Any]) -> None:
        reports.append((key, body))

    async def nothing(*_: Any) -> None:
        return None

    return Services(
        data_dir=tmp_path,
        runc=NoContainers(),  # type: ignore[arg-type]
        runtime=None,
        save_state=nothing,
        load_state=nothing,
        report=report,
    )


async def test_a_deleted_pod_never_run_here_is_confirmed_stopped_once(
    services: Services, reports: list
) -> None:
    pods = {"u-1": pod("gone", "u-1", deletionTimestamp="2025-01-01T00:00:00Z")}

    async def source() -> dict[str, dict[str, Any]]:
        return pods

    manager = PodManager(services, source)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run, 0.01)
        await manager.adopted_ready.wait()
        await trio.sleep(0.1)  # many reconciles
        assert [(key, body["uid"], body["stopped"]) for key, body in reports] == [
            ("plant/Pod/gone", "u-1", True)
        ]
        assert reports[0][1]["status"]["phase"] == "Pending"
        assert manager.supervisors == {}
        # Forgotten once the cloud removed it; a pod of the same uid would be confirmed again.
        del pods["u-1"]
        await trio.sleep(0.05)
        assert manager.confirmed == set()
        nursery.cancel_scope.cancel()


class Listener:
    def __init__(self, manifest: dict[str, Any]) -> None:
        self.pod = manifest
        self.key = f"plant/Pod/{manifest['metadata']['name']}"
        self.told = 0
        self.again = 0

    def objects_changed(self) -> None:
        self.told += 1

    def report_again(self) -> None:
        self.again += 1


async def test_object_changes_reach_the_pods_of_that_namespace_that_use_them(
    services: Services,
) -> None:
    async def source() -> dict[str, dict[str, Any]]:
        return {}

    manager = PodManager(services, source)
    uses = Listener(pod("a", "u-a"))
    other_ns = Listener({**pod("b", "u-b"), "metadata": {"name": "b", "namespace": "x"}})
    token = Listener(pod("c", "u-c"))
    token.pod["spec"]["volumes"] = [
        {"name": "api", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}
    ]
    manager.supervisors = {"u-a": uses, "u-b": other_ns, "u-c": token}  # type: ignore[dict-item]
    manager.objects_changed(["plant/ConfigMap/settings", "plant/Pod/a", "x/Secret/settings"])
    manager.objects_changed(["plant/ServiceAccountToken/c"])
    manager.objects_changed(["plant/ConfigMap/unrelated", "/Node/gw"])
    assert (uses.told, other_ns.told, token.told) == (1, 0, 1)
    manager.report_again()
    assert (uses.again, other_ns.again, token.again) == (1, 1, 1)


async def test_deletion_grace_period_overrides_the_spec(services: Services) -> None:
    stopped: list[float | None] = []
    pods = {"u-1": pod("app", "u-1")}

    async def source() -> dict[str, dict[str, Any]]:
        return pods

    class Stoppable(Listener):
        async def stop(self, grace_s: float | None = None) -> None:
            stopped.append(grace_s)

    manager = PodManager(services, source)
    async with trio.open_nursery() as nursery:
        manager._nursery = nursery
        manager.supervisors = {"u-1": Stoppable(pods["u-1"])}  # type: ignore[dict-item]
        pods["u-1"] = pod(
            "app", "u-1", deletionTimestamp="2025-01-01T00:00:00Z", deletionGracePeriodSeconds=7
        )
        await manager.reconcile()
    assert stopped == [7.0]
    assert manager.supervisors == {}
    # The supervisor's own last report said stopped: nothing more to confirm.
    assert manager.confirmed == {"u-1"}


async def test_following_the_store_pods_that_changed_objects_and_the_link(
    services: Services, tmp_path: Path
) -> None:
    """What the feed says reaches the manager: a changed Pod reconciles, a changed ConfigMap
    reaches the pods using it, and every pod reports again each time the link comes back."""
    with Store(tmp_path / "store.db") as store:
        aio = AsyncStore(store)
        reads = 0
        uses = Listener(pod("a", "u-a"))

        async def source() -> dict[str, dict[str, Any]]:
            nonlocal reads
            reads += 1
            return {"u-a": uses.pod}

        manager = PodManager(services, source, follow=aio)
        manager.supervisors = {"u-a": uses}  # type: ignore[dict-item]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.run, 3600)
            await manager.adopted_ready.wait()
            before = reads
            await aio.run(store.apply_batch, [Message(1, "m1", Op.PUT, "plant/Pod/b", "", {})])
            await eventually(lambda: reads > before, "a reconcile for the changed pod")
            await aio.run(
                store.apply_batch, [Message(2, "m2", Op.PUT, "plant/ConfigMap/settings", "", {})]
            )
            await eventually(lambda: uses.told == 1, "the pod told its ConfigMap changed")
            up = {"online": True, "since": 0.0, "reason": "", "connects": 1}
            await aio.set_state(LINK_STATE_KEY, up)
            await eventually(lambda: uses.again == 1, "a report again once the link is up")
            await aio.set_state(LINK_STATE_KEY, {**up, "online": False})
            # Back before the manager saw it drop: the count of connects tells it all the same.
            await aio.set_state(LINK_STATE_KEY, {**up, "connects": 2})
            await eventually(lambda: uses.again == 2, "a report again once it is back")
            await aio.set_state(LINK_STATE_KEY, {**up, "connects": 2, "reason": "same session"})
            await trio.sleep(0.1)
            assert uses.again == 2
            nursery.cancel_scope.cancel()


ORPHAN = """
import ctypes, os, time
pid = os.fork()
if pid == 0:
    ctypes.CDLL(None).prctl(15, b"runc:[1:CHILD]", 0, 0, 0)  # PR_SET_NAME
    time.sleep(0.3)
    os._exit(0)
print(pid, flush=True)
"""


async def test_runc_helpers_orphaned_onto_the_agent_are_reaped_as_they_end(
    services: Services,
) -> None:
    """runc's helpers that end after their parent are reparented to the agent (a subreaper):
    they are reaped as they end, not at the next sweep a minute later."""
    manager = PodManager(services, trio.sleep_forever)  # type: ignore[arg-type]
    process.become_subreaper()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager._reap)
        done = await trio.run_process([sys.executable, "-c", ORPHAN], capture_stdout=True)
        orphan = Path(f"/proc/{int(done.stdout)}")
        assert "runc:[1:CHILD]" in (orphan / "stat").read_text()  # alive, and ours now
        await eventually(lambda: not orphan.exists(), "the orphan reaped", within=5)
        nursery.cancel_scope.cancel()
