"""The edge controller against the real apiserver, with the edge played by the test.

The cloud side is real and in-process (``EdgeController`` + ``Hub`` over TLS WebSockets); each
edge is a real ``EdgeHub`` on a real store, but no agent: the test reads what reached the store
and writes the reports an agent would. This is where node authorization, the Secret isolation
and the deletion hand-shake are checked precisely; tests/integration/test_edge_nodes.py runs
the whole system with runc. The controller runs as the service account of `outpost-cloud
rbac`, so these tests also show that its RBAC suffices.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import (
    ConfigMap,
    Event,
    Namespace,
    Node,
    Pod,
    PodStatus,
    Secret,
)
from lightkube.types import PatchType
from prometheus_client import CollectorRegistry, generate_latest

from cloud.mirror import controller_metrics as controller_metrics
from cloud.mirror.controller import ControllerSettings
from edge.wire.events import Op
from tests.controllerkit import Cloud, agent, start_controller
from tests.waiting import eventually

pytestmark = pytest.mark.usefixtures("control_plane")


@pytest.fixture
async def cloud(cloud_kube: AsyncClient, tmp_path: Path, nursery: trio.Nursery) -> Cloud:
    settings = ControllerSettings(lease_renew_interval_s=0.5, event_qps=1.0, event_burst=5)
    return await start_controller(cloud_kube, tmp_path, nursery, settings)


@pytest.fixture
async def namespace(kube: AsyncClient) -> AsyncIterator[str]:
    name = f"ctl-{secrets.token_hex(3)}"
    await kube.create(Namespace.from_dict({"metadata": {"name": name}}))
    yield name
    await kube.delete(Namespace, name)


def node_name() -> str:
    return f"ctl-{secrets.token_hex(3)}"


def pod(name: str, node: str, **spec: Any) -> Pod:
    return Pod.from_dict(
        {
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "main", "image": "example.org/busybox:1"}],
                **spec,
            },
        }
    )


async def is_running(kube: AsyncClient, name: str, namespace: str) -> bool:
    return (await kube.get(Pod, name, namespace=namespace)).status.phase == "Running"


# -- nodes ------------------------------------------------------------------------------------


async def test_a_connected_node_is_registered_and_its_lease_renewed_until_it_leaves(
    cloud: Cloud, kube: AsyncClient, tmp_path: Path
) -> None:
    node = node_name()
    async with agent(cloud, tmp_path / "a.db", node) as edge:

        async def registered() -> Any:
            try:
                return await kube.get(Node, node)
            except ApiError:
                return None

        found = await eventually(registered, "the node is registered")
        labels = found.metadata.labels
        assert labels["node-role.kubernetes.io/edge"] == ""
        assert labels["outpost.io/edge"] == "true"
        # Not Ready (so not schedulable) before the edge has said what it has.
        await trio.sleep(0.5)
        found = await kube.get(Node, node)
        assert "Ready" not in {c.type for c in found.status.conditions or []}

        edge.report(
            Op.STATUS,
            f"/Node/{node}",
            {
                "labels": {"kubernetes.io/arch": "arm64", "kubernetes.io/os": "linux"},
                "capacity": {"cpu": "4", "memory": "2Gi", "pods": "110"},
                "allocatable": {"cpu": "4", "memory": "1900Mi", "pods": "110"},
                "nodeInfo": {"kubeletVersion": "v0.1.0-outpost", "architecture": "arm64"},
                "addresses": [{"type": "InternalIP", "address": "192.0.2.7"}],
                "conditions": [{"type": "DiskPressure", "status": "True", "reason": "Full"}],
            },
        )

        async def reported() -> Any:
            found = await kube.get(Node, node)
            return found.status.capacity and found.status.capacity.get("cpu") == "4" and found

        found = await eventually(reported, "the node report is on the Node")
        assert found.metadata.labels["kubernetes.io/arch"] == "arm64"
        assert found.status.nodeInfo.kubeletVersion == "v0.1.0-outpost"
        assert [a.address for a in found.status.addresses] == ["192.0.2.7"]
        conditions = {c.type: c for c in found.status.conditions}
        assert conditions["DiskPressure"].status == "True"
        assert conditions["Ready"].status == "True"

        # Deleted while its gateway is connected, the Node comes back (as with a kubelet).
        uid = found.metadata.uid
        await kube.delete(Node, node)

        async def recreated() -> bool:
            try:
                return (await kube.get(Node, node)).metadata.uid != uid
            except ApiError:
                return False

        await eventually(recreated, "the deleted Node is registered again")

        first = (await kube.get(Lease, node, namespace="kube-node-lease")).spec.renewTime
        await eventually(
            lambda: _renewed_after(kube, node, first), "the lease is renewed", within=5
        )
    # Gone: renewal stops (the node lifecycle controller then judges the node on its own).
    await eventually(lambda: node not in cloud.controller.nodes.online, "the session ends")
    await trio.sleep(0.6)
    last = (await kube.get(Lease, node, namespace="kube-node-lease")).spec.renewTime
    await trio.sleep(1.5)
    assert (await kube.get(Lease, node, namespace="kube-node-lease")).spec.renewTime == last


async def _renewed_after(kube: AsyncClient, node: str, first: Any) -> bool:
    return (await kube.get(Lease, node, namespace="kube-node-lease")).spec.renewTime > first


# -- downstream ----------------------------------------------------------------------------------


async def test_a_node_gets_its_pods_and_only_the_objects_they_use(
    cloud: Cloud, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    a, b = node_name(), node_name()
    for name, value in (("used", "dXNlZA=="), ("elsewhere", "b3RoZXI="), ("unused", "bm8=")):
        await kube.create(
            Secret.from_dict({"metadata": {"name": name}, "data": {"v": value}}),
            namespace=namespace,
        )
    await kube.create(
        ConfigMap.from_dict({"metadata": {"name": "settings"}, "data": {"mode": "fast"}}),
        namespace=namespace,
    )
    async with (
        agent(cloud, tmp_path / "a.db", a) as edge_a,
        agent(cloud, tmp_path / "b.db", b) as edge_b,
    ):
        main = {
            "name": "main",
            "image": "example.org/busybox:1",
            "env": [{"name": "V", "valueFrom": {"secretKeyRef": {"name": "used", "key": "v"}}}],
        }
        await kube.create(
            pod(
                "app",
                a,
                containers=[main],
                volumes=[{"name": "cfg", "configMap": {"name": "settings"}}],
            ),
            namespace=namespace,
        )
        await kube.create(
            pod(
                "other",
                b,
                volumes=[{"name": "s", "secret": {"secretName": "elsewhere"}}],
            ),
            namespace=namespace,
        )
        await eventually(
            lambda: (
                f"{namespace}/Pod/app" in edge_a.keys("Pod")
                and f"{namespace}/Secret/used" in edge_a.keys("Secret")
            ),
            "node A has its pod and its Secret",
        )
        await eventually(
            lambda: f"{namespace}/Secret/elsewhere" in edge_b.keys("Secret"), "node B has its own"
        )
        assert {k for k in edge_a.keys("Secret") if k.startswith(namespace)} == {
            f"{namespace}/Secret/used"
        }
        assert {k for k in edge_b.keys("Secret") if k.startswith(namespace)} == {
            f"{namespace}/Secret/elsewhere"
        }
        assert f"{namespace}/Pod/other" not in edge_a.keys("Pod")
        assert edge_a.get(f"{namespace}/ConfigMap/settings")["data"] == {"mode": "fast"}
        body = edge_a.get(f"{namespace}/Pod/app")
        assert body["kind"] == "Pod"
        assert body["spec"]["nodeName"] == a
        assert "managedFields" not in body["metadata"]

        # A change reaches the node; the pod's end takes its objects away.
        await kube.patch(ConfigMap, "settings", {"data": {"mode": "slow"}}, namespace=namespace)
        await eventually(
            lambda: edge_a.get(f"{namespace}/ConfigMap/settings")["data"] == {"mode": "slow"},
            "the ConfigMap change reaches the node",
        )
        await kube.delete(Pod, "app", namespace=namespace, grace_period=0)
        await eventually(
            lambda: (
                f"{namespace}/Secret/used" not in edge_a.keys("Secret")
                and f"{namespace}/ConfigMap/settings" not in edge_a.keys("ConfigMap")
                and f"{namespace}/Pod/app" not in edge_a.keys("Pod")
            ),
            "the pod and what only it used leave the node",
        )


async def test_projected_service_account_tokens_are_issued_for_the_pod(
    cloud: Cloud, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    node = node_name()
    async with agent(cloud, tmp_path / "a.db", node) as edge:
        projected = {
            "name": "token",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"path": "token", "audience": "vault"}},
                    {"serviceAccountToken": {"path": "api", "expirationSeconds": 3607}},
                ]
            },
        }
        # The namespace's default ServiceAccount is made by the controller-manager.
        await eventually(
            lambda: _has_default_account(kube, namespace), "the default ServiceAccount exists"
        )
        created = await kube.create(pod("tokens", node, volumes=[projected]), namespace=namespace)
        key = f"{namespace}/ServiceAccountToken/tokens"
        body = await eventually(lambda: edge.get(key), "the tokens reach the node")
        assert body["metadata"]["uid"] == created.metadata.uid
        by_audience = {t["audience"]: t for t in body["tokens"]}
        assert set(by_audience) == {"vault", ""}
        assert by_audience["vault"]["expirationSeconds"] == 3600
        assert by_audience[""]["expirationSeconds"] == 3607
        for token in body["tokens"]:
            assert token["token"].count(".") == 2  # a JWT
        await eventually(lambda: f"{namespace}/Pod/tokens" in edge.keys("Pod"), "the pod too")


async def _has_default_account(kube: AsyncClient, namespace: str) -> bool:
    from lightkube.resources.core_v1 import ServiceAccount

    try:
        await kube.get(ServiceAccount, "default", namespace=namespace)
    except ApiError:
        return False
    return True


async def test_pods_on_edge_nodes_tolerate_the_node_going_offline_without_limit(
    cloud: Cloud, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    node = node_name()
    async with agent(cloud, tmp_path / "a.db", node):
        await eventually(lambda: node in cloud.controller.source.edge_nodes, "node is known")
        created = await kube.create(pod("stay", node), namespace=namespace)
        # The DefaultTolerationSeconds admission plugin gave it time-limited ones.
        assert any(t.tolerationSeconds for t in created.spec.tolerations or [])

        async def unlimited() -> bool:
            found = await kube.get(Pod, "stay", namespace=namespace)
            offline = [
                t
                for t in found.spec.tolerations or []
                if t.key in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")
            ]
            return len(offline) == 2 and all(
                t.effect == "NoExecute" and t.tolerationSeconds is None for t in offline
            )

        await eventually(unlimited, "the pod tolerates its node going offline without limit")


# -- upstream ------------------------------------------------------------------------------------


def _running(uid: str) -> dict[str, Any]:
    return {
        "uid": uid,
        "status": {
            "phase": "Running",
            "podIP": "10.88.0.5",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


async def test_a_node_writes_only_its_own_pods_and_node(
    cloud: Cloud, kube: AsyncClient, namespace: str, tmp_path: Path, caplog: Any
) -> None:
    a, b = node_name(), node_name()
    mine = await kube.create(pod("mine", a), namespace=namespace)
    theirs = await kube.create(pod("theirs", b), namespace=namespace)
    async with agent(cloud, tmp_path / "a.db", a) as edge:
        await eventually(lambda: f"{namespace}/Pod/mine" in edge.keys("Pod"), "pod arrives")
        refused_before = cloud.controller.reports.refused
        edge.report(Op.STATUS, f"{namespace}/Pod/theirs", _running(theirs.metadata.uid))
        edge.report(Op.STATUS, f"/Node/{b}", {"capacity": {"cpu": "64"}})
        edge.report(
            Op.EVENT,
            f"{namespace}/Pod/theirs",
            {"uid": theirs.metadata.uid, "reason": "Started", "message": "forged"},
            coalesce_key="e1",
        )
        # A condition someone else owns (a readiness gate's) must survive the edge's writes.
        await kube.patch(
            PodStatus,
            "mine",
            {"status": {"conditions": [{"type": "example.com/Gate", "status": "True"}]}},
            namespace=namespace,
            patch_type=PatchType.STRATEGIC,
        )
        edge.report(Op.STATUS, f"{namespace}/Pod/mine", _running(mine.metadata.uid))
        await eventually(
            lambda: is_running(kube, "mine", namespace),
            "its own pod's status is written",
            within=30,
        )
        found = await kube.get(Pod, "mine", namespace=namespace)
        assert found.status.phase == "Running"
        assert found.status.podIP == "10.88.0.5"
        types = {c.type for c in found.status.conditions}
        assert {"example.com/Gate", "Ready"} <= types
        await eventually(
            lambda: cloud.controller.reports.refused - refused_before == 3,
            "the three foreign reports are refused",
        )
    assert (await kube.get(Pod, "theirs", namespace=namespace)).status.phase == "Pending"
    with pytest.raises(ApiError):
        await kube.get(Node, b)
    registry = CollectorRegistry()
    controller_metrics.register(registry, cloud.controller)
    scraped = generate_latest(registry).decode()
    refused = cloud.controller.reports.refused
    assert f"outpost_edge_reports_refused_total {float(refused)}" in scraped
    refusals = [r for r in caplog.records if r.getMessage() == "report refused"]
    assert {r.key for r in refusals} >= {f"{namespace}/Pod/theirs", f"/Node/{b}"}


async def test_deletion_finishes_once_the_edge_says_the_pod_stopped(
    cloud: Cloud, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    node = node_name()
    created = await kube.create(pod("going", node), namespace=namespace)
    uid = created.metadata.uid
    async with agent(cloud, tmp_path / "a.db", node) as edge:
        key = f"{namespace}/Pod/going"
        await eventually(lambda: key in edge.keys("Pod"), "pod arrives")
        # A stop report without a deletion (a pod that ended) deletes nothing.
        edge.report(Op.STATUS, key, {**_running(uid), "stopped": True})
        await eventually(lambda: is_running(kube, "going", namespace), "status written")
        await trio.sleep(0.5)
        assert (await kube.get(Pod, "going", namespace=namespace)).metadata.uid == uid

        await kube.delete(Pod, "going", namespace=namespace, grace_period=30)
        await eventually(
            lambda: (edge.get(key) or {}).get("metadata", {}).get("deletionTimestamp"),
            "the edge learns the deletion",
        )
        assert edge.get(key)["metadata"]["deletionGracePeriodSeconds"] == 30
        # Terminating until the edge confirms.
        await trio.sleep(1)
        assert (await kube.get(Pod, "going", namespace=namespace)).metadata.deletionTimestamp
        started = time.monotonic()
        edge.report(Op.STATUS, key, {**_running(uid), "stopped": True})

        async def gone() -> bool:
            try:
                await kube.get(Pod, "going", namespace=namespace)
            except ApiError as exc:
                return exc.status.code == 404
            return False

        await eventually(gone, "the pod is deleted once the edge stopped it")
        assert time.monotonic() - started < 5
        await eventually(lambda: key not in edge.keys("Pod"), "and leaves the node's store")


async def test_events_are_aggregated_and_rate_limited_per_node(
    cloud: Cloud, kube: AsyncClient, namespace: str, tmp_path: Path
) -> None:
    node = node_name()
    created = await kube.create(pod("noisy", node), namespace=namespace)
    uid = created.metadata.uid
    key = f"{namespace}/Pod/noisy"
    async with agent(cloud, tmp_path / "a.db", node) as edge:
        await eventually(lambda: key in edge.keys("Pod"), "pod arrives")
        for n in range(3):
            edge.report(
                Op.EVENT,
                key,
                {
                    "uid": uid,
                    "reason": "BackOff",
                    "message": "Back-off restarting failed container main",
                    "type": "Warning",
                    "fieldPath": "spec.containers{main}",
                },
                coalesce_key=f"same-{n}",
            )
            await trio.sleep(0.1)

        async def aggregated() -> Any:
            events = [
                e
                async for e in kube.list(Event, namespace=namespace)
                if e.involvedObject.name == "noisy" and e.reason == "BackOff"
            ]
            return len(events) == 1 and events[0].count == 3 and events[0]

        event = await eventually(aggregated, "three repeats make one Event with count 3")
        assert event.type == "Warning"
        assert event.source.host == node
        assert event.involvedObject.uid == uid
        assert event.involvedObject.fieldPath == "spec.containers{main}"

        # A burst of 40 different events: the bucket (burst 5, 1/s) lets only a few through.
        dropped_before = cloud.controller.events.dropped
        for n in range(40):
            edge.report(
                Op.EVENT,
                key,
                {"uid": uid, "reason": "Unhealthy", "message": f"probe failed {n}"},
                coalesce_key=f"burst-{n}",
            )
        await eventually(
            lambda: cloud.controller.events.dropped - dropped_before >= 30,
            "most of the burst is dropped",
        )
        written = [
            e async for e in kube.list(Event, namespace=namespace) if e.reason == "Unhealthy"
        ]
        assert 1 <= len(written) <= 10
