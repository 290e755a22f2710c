"""The test control plane is a real Kubernetes: lightkube's AsyncClient, under trio, sees it
store objects, stream watch events, run controllers and schedule pods."""

from __future__ import annotations

import uuid

import pytest
import trio
from lightkube import AsyncClient
from lightkube.models.apps_v1 import DeploymentSpec
from lightkube.models.core_v1 import Container, PodSpec, PodTemplateSpec
from lightkube.models.meta_v1 import LabelSelector, ObjectMeta
from lightkube.resources.apps_v1 import Deployment, ReplicaSet
from lightkube.resources.core_v1 import ConfigMap, Namespace, Node, Pod

from tests.waiting import eventually

pytestmark = pytest.mark.cluster


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _next_events(watch, count: int) -> list[tuple[str, object]]:
    """The next ``count`` events of a watch, within 30 seconds."""
    events = []
    with trio.fail_after(30):
        async for event_type, obj in watch:
            events.append((event_type, obj))
            if len(events) == count:
                return events
    raise AssertionError(f"watch ended after {events!r}")


async def test_namespace_is_created_watched_and_finalized_by_the_controller(kube: AsyncClient):
    name = _unique("ns")
    await kube.create(Namespace(metadata=ObjectMeta(name=name)))
    watch = kube.watch(Namespace, fields={"metadata.name": name})

    [(kind, ns)] = await _next_events(watch, 1)
    assert (kind, ns.metadata.name, ns.status.phase) == ("ADDED", name, "Active")

    await kube.delete(Namespace, name)
    # The namespace controller (in kube-controller-manager) empties and finalizes it.
    seen = []
    with trio.fail_after(60):
        async for kind, ns in watch:
            seen.append((kind, ns.status.phase))
            if kind == "DELETED":
                break
    assert ("MODIFIED", "Terminating") in seen
    assert seen[-1][0] == "DELETED"


async def test_configmap_watch_resumes_from_a_resource_version(kube: AsyncClient):
    namespace = _unique("cm")
    await kube.create(Namespace(metadata=ObjectMeta(name=namespace)))
    try:
        created = await kube.create(
            ConfigMap(metadata=ObjectMeta(name="settings", namespace=namespace), data={"a": "1"})
        )
        await kube.patch(ConfigMap, "settings", {"data": {"a": "2"}}, namespace=namespace)
        await kube.delete(ConfigMap, "settings", namespace=namespace)

        # Resuming from the creation's version replays exactly what happened after it. Only
        # this object: the controller-manager adds kube-root-ca.crt to every new namespace, at
        # a moment of its own choosing.
        watch = kube.watch(
            ConfigMap,
            namespace=namespace,
            fields={"metadata.name": "settings"},
            resource_version=created.metadata.resourceVersion,
        )
        events = await _next_events(watch, 2)
        assert [(kind, cm.data) for kind, cm in events] == [
            ("MODIFIED", {"a": "2"}),
            ("DELETED", {"a": "2"}),
        ]
    finally:
        await kube.delete(Namespace, namespace)


async def test_node_object_round_trips_through_a_watch(kube: AsyncClient):
    name = _unique("edge")
    await kube.create(
        Node(metadata=ObjectMeta(name=name, labels={"node-role.kubernetes.io/edge": ""}))
    )
    try:
        watch = kube.watch(Node, fields={"metadata.name": name})
        [(kind, node)] = await _next_events(watch, 1)
        assert kind == "ADDED"
        assert "node-role.kubernetes.io/edge" in node.metadata.labels

        await kube.patch(Node, name, {"metadata": {"labels": {"outpost.test/zone": "a"}}})
        # The node-lifecycle controller may modify the node too (taints); find our change.
        with trio.fail_after(30):
            async for kind, node in watch:
                assert kind == "MODIFIED"
                if node.metadata.labels.get("outpost.test/zone") == "a":
                    break
    finally:
        await kube.delete(Node, name)


async def test_deployment_gets_a_replicaset_and_pending_unschedulable_pods(kube: AsyncClient):
    namespace = _unique("deploy")
    await kube.create(Namespace(metadata=ObjectMeta(name=namespace)))
    labels = {"app": "web"}
    try:
        await kube.create(
            Deployment(
                metadata=ObjectMeta(name="web", namespace=namespace),
                spec=DeploymentSpec(
                    replicas=2,
                    selector=LabelSelector(matchLabels=labels),
                    template=PodTemplateSpec(
                        metadata=ObjectMeta(labels=labels),
                        spec=PodSpec(
                            # Another test may have left a Node object behind; a selector no
                            # node carries keeps these pods unschedulable whatever the order.
                            nodeSelector={"outpost.test/nowhere": "true"},
                            containers=[Container(name="web", image="registry.invalid/web:1")],
                        ),
                    ),
                ),
            )
        )

        async def both_looked_at() -> tuple[list, list, list] | None:
            sets = [rs async for rs in kube.list(ReplicaSet, namespace=namespace)]
            pods = [pod async for pod in kube.list(Pod, namespace=namespace)]
            scheduled = [
                c for pod in pods for c in (pod.status.conditions or []) if c.type == "PodScheduled"
            ]
            if sets and len(pods) == 2 and len(scheduled) == 2:
                return sets, pods, scheduled
            return None

        sets, pods, scheduled = await eventually(
            both_looked_at,
            "the Deployment's two pods exist and the scheduler has looked at both",
            within=60,
            interval=0.5,
        )

        [replica_set] = sets
        assert replica_set.metadata.ownerReferences[0].kind == "Deployment"
        assert replica_set.metadata.ownerReferences[0].name == "web"
        for pod in pods:
            assert pod.metadata.ownerReferences[0].name == replica_set.metadata.name
            assert pod.status.phase == "Pending"
            assert pod.spec.nodeName is None
        # The scheduler looked at them and found no node: proof it runs.
        assert {(c.status, c.reason) for c in scheduled} == {("False", "Unschedulable")}
    finally:
        await kube.delete(Namespace, namespace)
