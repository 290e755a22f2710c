"""Edge nodes as Kubernetes sees them, end to end: the real apiserver, scheduler and
controller-manager, `outpost-cloud serve`, and `outpost run` agents in network namespaces
running pods on real runc (``tests.edgekit``).

What a person relies on: a joined gateway is a Ready node with the usual labels and a renewed
Lease; Deployments pinned to it run, scale, roll and delete; ConfigMap changes reach the pod's
files while Secrets no pod of the node uses never reach the gateway; a gateway cut off for
longer than the eviction timeout keeps its pods, and on reconnect nothing has restarted; a bad
image is told in the pod's status and events.

On failure the kit prints the tails of the cloud's and agents' logs and what kubectl says.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.cluster.controlplane import ControlPlane
from tests.edgekit import (
    EDGE_ROLE_LABEL,
    EdgeCluster,
    EdgeNode,
    condition,
    deployment,
    ready,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.requires_root("runc and network namespaces need root"),
]

# The test cluster: a node is NotReady 10 s after its last Lease renewal, and a pod without a
# toleration of its own is evicted 10 s after that (tests/cluster/controlplane.py).
EVICTION_S = 10 + 10
NOEXECUTE_KEYS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"edge-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@asynccontextmanager
async def one_gateway(
    plane: ControlPlane, folder: Path, name: str, *others: str
) -> AsyncIterator[tuple[EdgeCluster, EdgeNode]]:
    """The cloud and joined gateways, once Kubernetes says their nodes are Ready; the first."""
    async with EdgeCluster(plane, folder, [name, *others]) as cluster:
        for node in (name, *others):
            await cluster.node_ready(node)
        yield cluster, cluster[name]


async def running_pods(
    cluster: EdgeCluster, namespace: str, app: str, count: int, within: float = 60
) -> list[dict[str, Any]]:
    """Exactly ``count`` pods of ``app``, none being deleted, every one Running and Ready."""

    async def check() -> list[dict[str, Any]] | None:
        pods = await cluster.pods(namespace, f"app={app}")
        live = [p for p in pods if ready(p) and not p["metadata"].get("deletionTimestamp")]
        if len(pods) == len(live) == count:
            return pods
        return None

    return await cluster.until(check, f"{count} pods of {app} are Running and Ready", within)


async def edge_containers(node: EdgeNode, pods: list[dict[str, Any]]) -> dict[str, dict]:
    """The node's runc containers, which must be exactly those of ``pods``, all running."""
    uids = {p["metadata"]["uid"] for p in pods}
    containers = await node.containers()
    assert owners(containers) == uids
    assert {c["status"] for c in containers.values()} == {"running"}
    return containers


async def test_a_joined_edge_is_a_ready_node_with_labels_capacity_and_a_renewed_lease(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        async with EdgeCluster(control_plane, tmp_path, ["reg-gw"]) as cluster:
            # Ready only once the edge's report is in: labels and capacity come with it.
            node = await cluster.node_ready("reg-gw")
            labels = node["metadata"]["labels"]
            assert EDGE_ROLE_LABEL in labels
            assert labels["kubernetes.io/arch"] == "amd64"
            assert labels["kubernetes.io/os"] == "linux"
            assert labels["kubernetes.io/hostname"] == "reg-gw"
            status = node["status"]
            for resources in (status["capacity"], status["allocatable"]):
                assert {"cpu", "memory", "pods"} <= set(resources)
            assert int(status["capacity"]["pods"]) > 0
            assert "outpost" in status["nodeInfo"]["kubeletVersion"]
            assert status["nodeInfo"]["containerRuntimeVersion"].startswith("runc://")
            # The gateway's address is the one it has in its namespace.
            addresses = {a["type"]: a["address"] for a in status["addresses"]}
            assert addresses.get("InternalIP") == cluster["reg-gw"].link.edge_ip
            # The gateway's own host name, which need not be its node name.
            assert addresses.get("Hostname")

            # The cloud renews the node's Lease while it is connected (every 2 s here).
            lease = await cluster.get("lease", "reg-gw", "-n", "kube-node-lease")
            assert lease["spec"]["holderIdentity"] == "reg-gw"
            first = lease["spec"]["renewTime"]

            async def renewed() -> bool:
                again = await cluster.get("lease", "reg-gw", "-n", "kube-node-lease")
                return again["spec"]["renewTime"] != first

            await cluster.until(renewed, "the Lease is renewed", within=10)

            # kubectl shows the node as a person expects.
            shown = (await cluster.kubectl("get", "node", "reg-gw", "-o", "wide")).stdout.decode()
            assert " Ready " in shown
            assert "edge" in shown


async def test_a_deployment_runs_scales_rolls_and_deletes_on_the_edge(
    control_plane: ControlPlane, tmp_path: Path, namespace: str
) -> None:
    with trio.fail_after(420):
        async with one_gateway(control_plane, tmp_path, "dep-gw") as (cluster, edge):
            app = deployment(
                "app",
                cluster.image,
                namespace=namespace,
                replicas=2,
                node="dep-gw",
                env={"VERSION": "1"},
                command='echo "version $VERSION"; while true; do sleep 1; done',
            )
            await cluster.apply(app)
            pods = await running_pods(cluster, namespace, "app", 2)
            assert {p["spec"]["nodeName"] for p in pods} == {"dep-gw"}
            # Bridged pods get addresses from the agent's --pod-subnet.
            subnet = ipaddress.ip_network(edge.pod_subnet)
            assert all(ipaddress.ip_address(p["status"]["podIP"]) in subnet for p in pods)
            await edge_containers(edge, pods)

            await cluster.kubectl("scale", "deployment", "app", "-n", namespace, "--replicas=4")
            pods = await running_pods(cluster, namespace, "app", 4)
            await edge_containers(edge, pods)

            # Scaling down: the edge stops the surplus pods, then the cloud deletes them.
            await cluster.kubectl("scale", "deployment", "app", "-n", namespace, "--replicas=1")
            pods = await running_pods(cluster, namespace, "app", 1)
            await cluster.until(
                lambda: edge_containers_match(edge, pods), "only one pod's container is left"
            )

            # A rolling update (a changed env var) replaces the pod.
            old_uid = pods[0]["metadata"]["uid"]
            await cluster.kubectl("set", "env", "deployment/app", "-n", namespace, "VERSION=2")
            rollout = await cluster.kubectl(
                "rollout", "status", "deployment/app", "-n", namespace, "--timeout=90s"
            )
            assert b"successfully rolled out" in rollout.stdout
            pods = await running_pods(cluster, namespace, "app", 1)
            assert pods[0]["metadata"]["uid"] != old_uid
            name = pods[0]["metadata"]["name"]
            await cluster.until(
                lambda: edge_containers_match(edge, pods), "the old pod's container is gone"
            )

            async def says_version_2() -> bool:
                return "version 2" in await edge.logs(name, namespace)

            await cluster.until(says_version_2, "the new pod runs with VERSION=2")

            await cluster.kubectl("delete", "deployment", "app", "-n", namespace)

            async def no_pods() -> bool:
                return not await cluster.pods(namespace, "app=app")

            await cluster.until(no_pods, "the pods are gone from the apiserver", within=60)

            async def no_containers() -> bool:
                return not await edge.containers()

            await cluster.until(no_containers, "the containers are gone from the edge")


async def edge_containers_match(node: EdgeNode, pods: list[dict[str, Any]]) -> bool:
    return owners(await node.containers()) == {p["metadata"]["uid"] for p in pods}


def owners(containers: dict[str, Any]) -> set[str]:
    """The pod UIDs of runc containers (their ids are ``<pod uid>-<container name>``)."""
    return {cid[:36] for cid in containers}


def config_pod(name: str, image: str, node: str) -> dict[str, Any]:
    """A pod printing its ConfigMap's and Secret's files every half second."""
    script = (
        "while true; do echo setpoint=$(cat /etc/site/setpoint)"
        " password=$(cat /etc/secret/password); sleep 0.5; done"
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "command": ["sh", "-c", script],
                    "volumeMounts": [
                        {"name": "site", "mountPath": "/etc/site"},
                        {"name": "secret", "mountPath": "/etc/secret"},
                    ],
                }
            ],
            "volumes": [
                {"name": "site", "configMap": {"name": "site"}},
                {"name": "secret", "secret": {"secretName": "used"}},
            ],
        },
    }


async def set_setpoint(cluster: EdgeCluster, namespace: str, value: str) -> None:
    patch = json.dumps({"data": {"setpoint": value}})
    await cluster.kubectl(
        "patch", "configmap", "site", "-n", namespace, "--type=merge", "-p", patch
    )


def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


async def test_a_configmap_change_reaches_the_pod_and_unreferenced_secrets_never_reach_the_node(
    control_plane: ControlPlane, tmp_path: Path, namespace: str
) -> None:
    with trio.fail_after(240):
        async with one_gateway(control_plane, tmp_path, "cfg-gw") as (cluster, edge):
            await cluster.kubectl(
                "create", "configmap", "site", "-n", namespace, "--from-literal=setpoint=21.5"
            )
            await cluster.apply(
                secret("used", {"password": "s3cret"}),
                secret("unused", {"password": "not-for-this-node"}),
                namespace=namespace,
            )
            await cluster.apply(config_pod("reader", cluster.image, "cfg-gw"), namespace=namespace)
            await running_pods(cluster, namespace, "reader", 1)

            async def output(text: str) -> bool:
                return text in await edge.logs("reader", namespace)

            await cluster.until(
                lambda: output("setpoint=21.5 password=s3cret"), "the pod reads its files"
            )
            await set_setpoint(cluster, namespace, "22.0")
            await cluster.until(
                lambda: output("setpoint=22.0 password=s3cret"),
                "the changed ConfigMap reaches the pod's volume",
                within=60,
            )

            # By now the cloud has sent everything this node's pods use, and nothing else.
            secrets = edge.stored("Secret")
            assert f"{namespace}/Secret/used" in secrets
            assert f"{namespace}/Secret/unused" not in secrets
            assert f"{namespace}/ConfigMap/site" in edge.stored("ConfigMap")
            status = await edge.status()
            assert status["objects"].get("Secret") == 1

            # A Secret created later and used by no pod still stays away.
            await cluster.apply(secret("later", {"token": "nope"}), namespace=namespace)
            await set_setpoint(cluster, namespace, "23.0")
            await cluster.until(lambda: output("setpoint=23.0"), "the second change arrives")
            assert set(edge.stored("Secret")) == {f"{namespace}/Secret/used"}


def tolerates_forever(pod: dict[str, Any]) -> bool:
    """Whether the pod tolerates unreachable and not-ready NoExecute taints with no limit."""
    found = {
        t.get("key"): t
        for t in pod["spec"].get("tolerations", [])
        if t.get("effect") == "NoExecute"
    }
    return all(
        key in found
        and found[key].get("operator", "Equal") == "Exists"
        and "tolerationSeconds" not in found[key]
        for key in NOEXECUTE_KEYS
    )


def container_ids(pods: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """pod uid → (its container's ID, its restart count), as the apiserver says."""
    return {
        p["metadata"]["uid"]: (
            p["status"]["containerStatuses"][0].get("containerID", ""),
            p["status"]["containerStatuses"][0]["restartCount"],
        )
        for p in pods
    }


async def test_an_edge_cut_off_past_the_eviction_timeout_keeps_its_pods_running(
    control_plane: ControlPlane, tmp_path: Path, namespace: str
) -> None:
    # Nodes earlier tests left behind are NotReady: with more than 55% of a small zone
    # NotReady, the node-lifecycle controller assumes a partial disruption and stops tainting,
    # and the test would prove nothing. This test starts from a healthy zone.
    control_plane.kubectl("delete", "nodes", "--all", "--wait=false")
    with trio.fail_after(300):
        # A second node stays connected, as a real cluster has other nodes: were every node
        # of the zone NotReady, the node-lifecycle controller would assume a disruption of its
        # own and taint nothing, and the test would prove nothing.
        async with one_gateway(control_plane, tmp_path, "off-gw", "off-peer") as (cluster, edge):
            app = deployment("app", cluster.image, namespace=namespace, replicas=2, node="off-gw")
            await cluster.apply(app)

            async def settled() -> list[dict[str, Any]] | None:
                pods = await cluster.pods(namespace, "app=app")
                if len(pods) == 2 and all(ready(p) and tolerates_forever(p) for p in pods):
                    return pods
                return None

            pods = await cluster.until(settled, "the pods run, tolerating NoExecute forever")
            before = container_ids(pods)
            assert all(cid and restarts == 0 for cid, restarts in before.values())
            pids = {cid: c["pid"] for cid, c in (await edge_containers(edge, pods)).items()}

            edge.cut()
            cut_at = trio.current_time()

            async def node_unknown() -> dict[str, Any] | None:
                node = await cluster.get("node", "off-gw")
                return node if condition(node) == "Unknown" else None

            await cluster.until(node_unknown, "the node goes NotReady", within=30)
            # The node-lifecycle controller taints it: without the pods' tolerations they
            # would be evicted 10 s later.
            await cluster.until(
                lambda: _tainted(cluster, "off-gw"), "the node is tainted unreachable", within=15
            )

            async def marked_not_ready() -> bool:
                pods = await cluster.pods(namespace, "app=app")
                return all(condition(p, "Ready") == "False" for p in pods)

            # ... and marks its pods not ready, which the edge must undo when it is back.
            await cluster.until(marked_not_ready, "the pods are marked not ready", within=15)
            await trio.sleep_until(cut_at + EVICTION_S + 10)

            during = await cluster.pods(namespace, "app=app")
            assert {p["metadata"]["uid"] for p in during} == set(before)
            assert not [p for p in during if p["metadata"].get("deletionTimestamp")]
            # The edge ran on without the cloud, nothing restarted.
            now = {cid: c["pid"] for cid, c in (await edge.containers()).items()}
            assert now == pids

            assert condition(await cluster.get("node", "off-peer")) == "True"

            edge.restore()
            # The agent reconnects with full-jitter backoff, capped at 60 s.
            await cluster.node_ready("off-gw", within=90)
            pods = await running_pods(cluster, namespace, "app", 2, within=60)
            assert container_ids(pods) == before
            assert {cid: c["pid"] for cid, c in (await edge.containers()).items()} == pids


async def _tainted(cluster: EdgeCluster, name: str) -> bool:
    node = await cluster.get("node", name)
    return any(
        t["key"] == "node.kubernetes.io/unreachable" and t["effect"] == "NoExecute"
        for t in node["spec"].get("taints", [])
    )


async def test_an_image_that_does_not_exist_shows_image_pull_backoff_and_an_event(
    control_plane: ControlPlane, tmp_path: Path, namespace: str
) -> None:
    with trio.fail_after(180):
        async with one_gateway(control_plane, tmp_path, "bad-gw") as (cluster, _):
            missing = cluster.image.replace("test/busybox:1.0", "test/missing:1.0")
            pod = config_pod("ghost", missing, "bad-gw")
            pod["spec"]["containers"][0].pop("volumeMounts")
            pod["spec"].pop("volumes")
            await cluster.apply(pod, namespace=namespace)

            async def backing_off() -> dict[str, Any] | None:
                pod = await cluster.get("pod", "ghost", "-n", namespace)
                statuses = pod.get("status", {}).get("containerStatuses", [])
                waiting = statuses[0].get("state", {}).get("waiting", {}) if statuses else {}
                if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff"):
                    return pod
                return None

            pod = await cluster.until(backing_off, "the pod says it cannot pull", within=60)
            assert pod["status"]["phase"] == "Pending"

            async def warned() -> list[dict[str, Any]]:
                events = await cluster.get(
                    "events", "-n", namespace, "--field-selector", "involvedObject.name=ghost"
                )
                return [
                    e
                    for e in events["items"]
                    if e["type"] == "Warning" and e["reason"] in ("Failed", "BackOff")
                ]

            events = await cluster.until(warned, "a Warning event tells why", within=60)
            assert any("test/missing" in e.get("message", "") for e in events)
            assert {e["involvedObject"]["uid"] for e in events} == {pod["metadata"]["uid"]}

            # A pod that never started deletes as well.
            await cluster.kubectl("delete", "pod", "ghost", "-n", namespace, "--wait=false")

            async def gone() -> bool:
                return not await cluster.get("pod", "ghost", "-n", namespace, "--ignore-not-found")

            await cluster.until(gone, "the pod is gone from the apiserver")
