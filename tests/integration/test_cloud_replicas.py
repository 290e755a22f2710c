"""Several outpost-cloud replicas sharing the nodes through Kubernetes Leases.

First the ownership rules against the real apiserver (two ``Ownership`` objects in one
process), then an edge redirected between two in-process hubs, then the acceptance test: two
real `outpost-cloud serve` processes, four real edges, one replica killed with -9 mid-stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from lightkube import AsyncClient
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap, Namespace
from lightkube.types import PatchType

from cloud.hub.ownership import (
    NODE_PREFIX,
    URL_ANNOTATION,
    Elsewhere,
    Owned,
    Ownership,
    lease_name,
)
from cloud.hub.server import Hub, HubSettings
from cloud.hub.source import MemorySource
from cloud.hub.streams import NodeStreams
from edge.hub.client import EdgeHub
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.wire.events import Op
from tests.channelkit import Cloud, Edge, cloud_objects, configmap, spawn
from tests.cluster.controlplane import ControlPlane, free_port
from tests.hubkit import Pki
from tests.processes import VENV_BIN
from tests.waiting import eventually

pytestmark = pytest.mark.cluster


@pytest.fixture
async def namespace(kube: AsyncClient, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    name = f"replicas-{abs(hash(request.node.name)) % 10**8}"
    await kube.create(Namespace(metadata=ObjectMeta(name=name)))
    yield name
    await kube.delete(Namespace, name)


def replica(
    kube: AsyncClient,
    namespace: str,
    name: str,
    duration_s: int = 3,
    before_release: Callable[[list[str]], Awaitable[bool]] | None = None,
) -> Ownership:
    return Ownership(
        kube,
        name,
        f"https://{name}.example:8443",
        namespace=namespace,
        duration_s=duration_s,
        before_release=before_release,
    )


async def holder(kube: AsyncClient, namespace: str, node: str) -> str | None:
    lease = await kube.get(Lease, lease_name(NODE_PREFIX, node), namespace=namespace)
    return lease.spec.holderIdentity if lease.spec else None


async def until_released(kube: AsyncClient, namespace: str, node: str) -> None:
    async def released() -> bool:
        return await holder(kube, namespace, node) is None

    await eventually(released, f"the lease of {node} is released", within=5, interval=0.1)


# -- the ownership rules, against the apiserver -----------------------------------------------


async def test_a_node_is_served_by_one_replica_and_redirected_by_the_other(
    kube: AsyncClient, namespace: str, nursery: trio.Nursery
) -> None:
    a, b = replica(kube, namespace, "ra"), replica(kube, namespace, "rb")
    await nursery.start(a.run)
    await nursery.start(b.run)

    assert await a.claim("gw-1") == Owned(continuous=False)
    verdict = await b.claim("gw-1")
    assert isinstance(verdict, Elsewhere)
    assert (verdict.replica, verdict.url) == ("ra", "https://ra.example:8443")
    assert 1 <= verdict.retry_after_s <= 3
    lease = await kube.get(Lease, lease_name(NODE_PREFIX, "gw-1"), namespace=namespace)
    assert lease.spec.holderIdentity == "ra"
    assert lease.metadata.annotations[URL_ANNOTATION] == "https://ra.example:8443"
    # A second connection for the node at its owner needs no apiserver round trip.
    assert await a.claim("gw-1") == Owned(continuous=True)
    assert a.owns("gw-1")
    assert not b.owns("gw-1")


async def test_a_node_whose_connections_ended_is_released_after_its_watermark_is_written(
    kube: AsyncClient, namespace: str, nursery: trio.Nursery
) -> None:
    flushed: list[list[str]] = []

    async def before_release(nodes: list[str]) -> bool:
        # Still held while its watermark is written: nobody else can have read an older one.
        assert [await holder(kube, namespace, n) for n in nodes] == ["ra"] * len(nodes)
        flushed.append(nodes)
        return True

    a = replica(kube, namespace, "ra", before_release=before_release)
    b = replica(kube, namespace, "rb")
    await nursery.start(a.run)
    await nursery.start(b.run)
    await a.claim("gw-1")
    await a.claim("gw-1")
    a.unclaim("gw-1")
    await trio.sleep(a.renew_interval_s * 2)
    assert await holder(kube, namespace, "gw-1") == "ra", "one connection is still open"

    a.unclaim("gw-1")
    await until_released(kube, namespace, "gw-1")
    assert flushed == [["gw-1"]]
    assert not a.owns("gw-1")
    # Nobody served it since: the replica that released it may trust what it remembers.
    assert await a.claim("gw-1") == Owned(continuous=True)
    a.unclaim("gw-1")
    await until_released(kube, namespace, "gw-1")

    # Once another replica has served it, it may not.
    assert await b.claim("gw-1") == Owned(continuous=False)
    b.unclaim("gw-1")
    await until_released(kube, namespace, "gw-1")
    assert await a.claim("gw-1") == Owned(continuous=False)


async def test_the_nodes_of_a_replica_that_stopped_renewing_are_taken_over_after_its_lease(
    kube: AsyncClient, namespace: str, nursery: trio.Nursery
) -> None:
    a, b = replica(kube, namespace, "ra"), replica(kube, namespace, "rb")
    async with trio.open_nursery() as doomed:
        await doomed.start(a.run)
        await a.claim("gw-1")
        doomed.cancel_scope.cancel()  # as if killed: no release, no resignation
    stopped = trio.current_time()
    await nursery.start(b.run)
    verdict = await b.claim("gw-1")
    assert isinstance(verdict, Elsewhere)
    # It stops counting itself the owner before anyone may take over.
    await eventually(lambda: not a.owns("gw-1"), "the owner gives up")
    owner_gave_up = trio.current_time()

    async def owned() -> Owned | None:
        verdict = await b.claim("gw-1")
        return verdict if isinstance(verdict, Owned) else None

    verdict = await eventually(
        owned, "the other replica takes the node", within=a.duration_s + 5, interval=0.1
    )
    taken = trio.current_time()
    assert verdict == Owned(continuous=False)
    assert owner_gave_up < taken <= stopped + a.duration_s + 1
    assert await holder(kube, namespace, "gw-1") == "rb"


async def test_a_replica_that_resigns_lets_its_nodes_go_at_once(
    kube: AsyncClient, namespace: str, nursery: trio.Nursery
) -> None:
    a, b = replica(kube, namespace, "ra", duration_s=60), replica(kube, namespace, "rb")
    await nursery.start(a.run)
    await nursery.start(b.run)
    await a.claim("gw-1")
    assert isinstance(await b.claim("gw-1"), Elsewhere)
    await a.resign()
    assert await b.claim("gw-1") == Owned(continuous=False)


async def test_two_replicas_racing_for_a_node_do_not_both_win(
    kube: AsyncClient, namespace: str, nursery: trio.Nursery
) -> None:
    replicas = [replica(kube, namespace, f"r{i}") for i in range(4)]
    for r in replicas:
        await nursery.start(r.run)
    verdicts: list[Owned | Elsewhere] = []

    async def claim(r: Ownership) -> None:
        verdicts.append(await r.claim("gw-race"))

    async with trio.open_nursery() as racing:
        for r in replicas:
            racing.start_soon(claim, r)
    assert sum(isinstance(v, Owned) for v in verdicts) == 1
    winner = await holder(kube, namespace, "gw-race")
    assert {v.replica for v in verdicts if isinstance(v, Elsewhere)} == {winner}


# -- an edge redirected between two in-process hubs -------------------------------------------


async def test_an_edge_that_reaches_the_wrong_replica_is_redirected_to_the_owner(
    kube: AsyncClient, namespace: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki")
    hubs = {}
    for name in ("ra", "rb"):
        port = free_port()
        streams = NodeStreams()
        source = MemorySource(streams)
        hub = Hub(
            HubSettings(host="127.0.0.1", port=port, heartbeat_s=1),
            pki.server_context(),
            streams=streams,
            source=source,
            ownership=partial(
                Ownership, kube, name, f"https://127.0.0.1:{port}", namespace=namespace
            ),
        )
        assert hub.ownership is not None
        await nursery.start(hub.ownership.run)
        await nursery.start(hub.run)
        source.put("gw-1", "ns/ConfigMap/from", {"replica": name}, uid=f"{name}-1")
        hubs[name] = hub
    a, b = hubs["ra"], hubs["rb"]
    # ra serves gw-1 (a connection of its is open).
    assert await a.ownership.claim("gw-1") == Owned(continuous=False)

    with Store(tmp_path / "gw-1.db") as store, Store(tmp_path / "gw-1.db") as reader:
        edge = EdgeHub(AsyncStore(store), pki.edge_config("gw-1", b.port))
        async with trio.open_nursery() as edges:
            edges.start_soon(edge.run)
            await eventually(lambda: "gw-1" in a.sessions, "the owner serves the edge")
            await eventually(lambda: reader.get("ns/ConfigMap/from") is not None, "it syncs")
            edges.cancel_scope.cancel()
    assert reader_body(tmp_path / "gw-1.db", "ns/ConfigMap/from") == {"replica": "ra"}
    assert "gw-1" not in b.sessions
    assert b.metrics.rejected.labels("elsewhere")._value.get() == 1
    # The owner is dialled first from now on.
    assert edge.targets.first() == f"https://127.0.0.1:{a.port}"


def reader_body(path: Path, key: str) -> object:
    with Store(path) as store:
        found = store.get(key)
        assert found is not None
        return found[1]


# -- the acceptance test: real processes ------------------------------------------------------

# The replicas' lease is 15 s (cloud.hub.ownership.DEFAULT_DURATION_S), renewed every 5 s: a
# killed replica's nodes may be taken 10 to 15 s after the kill; the edges, told so by the
# other replica, come back within 2 s of that; the handshake and the resync add little.
FAILOVER_BOUND_S = 20.0


class Replica(Cloud):
    """An `outpost-cloud serve` process with a fixed replica id and advertised URL."""

    def __init__(self, plane: ControlPlane, folder: Path, replica_id: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(plane, folder, heartbeat=1)
        self.id = replica_id

    async def start(self) -> None:
        self.process, output = await spawn(
            self.folder / f"cloud-{len(self.runs)}.log",
            VENV_BIN / "outpost-cloud",
            "serve",
            "--kubeconfig",
            self.plane.kubeconfig,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--metrics-listen",
            "",
            "--heartbeat",
            str(self.heartbeat),
            "--report-log",
            self.report_log,
            "--replica-id",
            self.id,
            "--advertise-url",
            self.url,
        )
        self.runs.append(output)
        with trio.fail_after(30):
            await output.wait_for(r"msg=\"hub listening\"")


def logged_reports(*replicas: Replica) -> list[dict]:
    """The test's reports in the replicas' logs (the agents report their nodes' status too)."""
    records = []
    for r in replicas:
        if r.report_log.exists():
            for line in r.report_log.read_text().splitlines():
                record = json.loads(line)
                if "phase" in (record.get("body") or {}):
                    records.append(record)
    return records


async def start_edge(edge: Edge, urls: list[str]) -> None:
    args = [arg for url in urls for arg in ("--cloud", url)]
    edge.process, output = await spawn(
        edge.data_dir.parent / f"{edge.node}-{len(edge.runs)}.log",
        VENV_BIN / "outpost",
        "--log-level",
        "debug",
        "run",
        "--data-dir",
        edge.data_dir,
        *args,
    )
    edge.runs.append(output)


async def test_a_killed_replica_loses_no_message_and_its_nodes_reconnect_to_the_other(
    control_plane: ControlPlane, kube: AsyncClient, tmp_path: Path
) -> None:
    ns_name = "replicas-e2e"
    await kube.create(Namespace(metadata=ObjectMeta(name=ns_name)))
    a = Replica(control_plane, tmp_path / "ra", "e2e-ra")
    b = Replica(control_plane, tmp_path / "rb", "e2e-rb")
    await a.start()
    await b.start()
    edges = [Edge(f"gw-rep-{i}", tmp_path / "edges") for i in range(4)]
    try:
        for i, edge in enumerate(edges):
            await edge.join(a)
            # Half dial a first, half b: each replica takes the nodes that reach it.
            urls = [a.url, b.url] if i % 2 == 0 else [b.url, a.url]
            await start_edge(edge, urls)
        for edge in edges:
            await edge.wait_online()
        owners = {e.node: await holder(kube, "outpost-system", e.node) for e in edges}
        assert sorted(owners.values()) == ["e2e-ra", "e2e-ra", "e2e-rb", "e2e-rb"], owners
        on_a = [e for e in edges if owners[e.node] == "e2e-ra"]
        queued: set[tuple[str, int, int, int]] = set()
        reconnected: dict[str, float] = {}

        async def traffic(phase: int, rounds: int) -> None:
            """Each round: every edge's ConfigMap changes, and every edge queues 5 reports."""
            for round_ in range(rounds):
                for edge in edges:
                    name = f"cm-{edge.node}"
                    if phase == round_ == 0:
                        await kube.create(configmap(name, edge.node, {"r": "0"}, ns_name))
                    else:
                        await kube.patch(
                            ConfigMap,
                            name,
                            {"data": {"r": f"{phase}.{round_}"}},
                            namespace=ns_name,
                            patch_type=PatchType.MERGE,
                        )
                    with edge.store() as store:
                        for k in range(5):
                            body = {"phase": phase, "round": round_, "k": k}
                            store.report(
                                Op.EVENT, f"{ns_name}/Pod/p", body, coalesce_key=json.dumps(body)
                            )
                            queued.add((edge.node, phase, round_, k))
                await trio.sleep(0.2)

        async def reconnects(edge: Edge, killed: float) -> None:
            await edge.runs[-1].wait_for(rf"msg=\"cloud link up\" url={re.escape(b.url)}")
            reconnected[edge.node] = trio.current_time() - killed

        await traffic(0, 5)
        await a.kill()
        killed = trio.current_time()
        with trio.fail_after(FAILOVER_BOUND_S + 10):
            async with trio.open_nursery() as waiting:
                for edge in on_a:
                    waiting.start_soon(reconnects, edge, killed)
                # Traffic goes on while the nodes move.
                await traffic(1, 5)
        print(f"replica failover: seconds from kill -9 to the link up at the other: {reconnected}")
        assert max(reconnected.values()) < FAILOVER_BOUND_S
        for edge in edges:
            assert await holder(kube, "outpost-system", edge.node) == "e2e-rb"

        await traffic(2, 3)
        for edge in edges:
            expected = await cloud_objects(kube, edge.node)
            await eventually(lambda e=edge, x=expected: e.objects() == x, f"{edge.node} converges")

        def delivered() -> set[tuple[str, int, int, int]]:
            return {
                (rec["node"], rec["body"]["phase"], rec["body"]["round"], rec["body"]["k"])
                for rec in logged_reports(a, b)
            }

        await eventually(lambda: delivered() == queued, "every queued report is logged")
        records = logged_reports(a, b)
        print(
            f"reports: {len(queued)} queued, {len(records)} logged by the two replicas"
            f" ({len(records) - len(queued)} logged by both, around the kill)"
        )
        for edge in edges:
            with edge.store() as store:
                await eventually(lambda s=store: s.outbox_size()[1] == 0, "the outboxes drain")
    finally:
        for edge in edges:
            await edge.stop()
        await a.stop()
        await b.stop()
        await kube.delete(Namespace, ns_name)


async def test_a_replica_stopped_cleanly_hands_its_nodes_over_at_once(
    control_plane: ControlPlane, kube: AsyncClient, tmp_path: Path
) -> None:
    a = Replica(control_plane, tmp_path / "ra", "stop-ra")
    b = Replica(control_plane, tmp_path / "rb", "stop-rb")
    await a.start()
    await b.start()
    edges = [Edge(f"gw-stop-{i}", tmp_path / "edges") for i in range(2)]
    try:
        for edge in edges:
            await edge.join(a)
            await start_edge(edge, [a.url, b.url])
            await edge.wait_online()
        for edge in edges:
            assert await holder(kube, "outpost-system", edge.node) == "stop-ra"
        await a.stop()
        stopped = trio.current_time()
        # It wrote its last watermarks and deleted its replica lease: nothing to wait out.
        with trio.fail_after(10):
            for edge in edges:
                await edge.runs[-1].wait_for(rf"msg=\"cloud link up\" url={re.escape(b.url)}")
        elapsed = trio.current_time() - stopped
        print(f"clean replica stop: nodes served by the other after {elapsed:.1f} s")
        assert elapsed < 5
        for edge in edges:
            assert await holder(kube, "outpost-system", edge.node) == "stop-rb"
        assert not any("redirecting" in line for line in b.runs[-1].lines)
    finally:
        for edge in edges:
            await edge.stop()
        await a.stop()
        await b.stop()
