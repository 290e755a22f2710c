"""Watermarks persisted to the real apiserver: in batches, never one write per ack, and read
back by a restarted hub so that it resumes instead of resending everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.resources.core_v1 import ConfigMap

from cloud.hub.server import Hub, HubSettings
from cloud.hub.source import MemorySource
from cloud.hub.streams import NodeStream, NodeStreams
from cloud.hub.watermarks import WatermarkStore, shard_name, shard_of
from edge.hub.client import EdgeHub
from edge.store import Store
from edge.store.aio import AsyncStore
from tests.cluster.controlplane import ControlPlane, free_port
from tests.hubkit import Pki
from tests.waiting import eventually

pytestmark = pytest.mark.cluster


async def test_watermarks_are_written_in_batches_and_resume_a_restarted_hub(
    kube: AsyncClient, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki")
    namespace = "outpost-wm-test"
    streams = NodeStreams()
    source = MemorySource(streams)
    marks = WatermarkStore(kube, namespace=namespace)
    await marks.load()
    hub = Hub(
        HubSettings(host="127.0.0.1", port=0, flush_interval_s=0.5),
        pki.server_context(),
        streams=streams,
        source=source,
        watermarks=marks,
    )
    nodes = [f"wm-{i}" for i in range(3)]
    async with trio.open_nursery() as cloud:
        await cloud.start(hub.run)
        async with trio.open_nursery() as edges:
            stores = []
            for node in nodes:
                store = Store(tmp_path / f"{node}.db")
                stores.append(store)
                edge = EdgeHub(AsyncStore(store), pki.edge_config(node, hub.port))
                edges.start_soon(edge.run)
            await eventually(lambda: len(hub.sessions) == 3, "three sessions")
            for round_ in range(10):
                for node in nodes:
                    for i in range(100):
                        source.put(node, f"ns/ConfigMap/o{i}", {"r": round_}, uid=f"{node}-{i}")
                await trio.sleep(0.05)
            await eventually(
                lambda: all(hub.streams[n].depth == 0 for n in nodes), "everything acknowledged"
            )
            await trio.sleep(1.2)  # two flushes
            edges.cancel_scope.cancel()
        cloud.cancel_scope.cancel()
    writes = marks.writes
    acked = sum(hub.streams[n].inflight.acked for n in nodes)
    print(f"watermarks: {writes} Kubernetes writes for {acked} acknowledged messages")
    assert acked >= 3 * 100
    assert writes <= 3 * 12, "watermarks must be written in batches, not per ack"

    # What Kubernetes holds is what the hub knew.
    for node in nodes:
        cm = await kube.get(ConfigMap, shard_name(shard_of(node)), namespace=namespace)
        stored = json.loads(cm.data[node])
        assert stored["acked"] == hub.streams[node].inflight.acked
        assert stored["rv"] == {"*": source.rv}

    # A new hub (a restarted cloud) resumes each node with nothing to resend.
    reloaded = WatermarkStore(kube, namespace=namespace)
    assert set(nodes) <= set(await reloaded.load())
    second = Hub(
        HubSettings(host="127.0.0.1", port=0),
        pki.server_context(),
        source=source,
        watermarks=reloaded,
    )
    async with trio.open_nursery() as cloud:
        await cloud.start(second.run)
        async with trio.open_nursery() as edges:
            for node, store in zip(nodes, stores, strict=True):
                edges.start_soon(EdgeHub(AsyncStore(store), pki.edge_config(node, second.port)).run)
            await eventually(lambda: len(second.sessions) == 3, "three sessions again")
            await eventually(
                lambda: all(second.streams[n].depth == 0 for n in nodes), "in sync again"
            )
            edges.cancel_scope.cancel()
        cloud.cancel_scope.cancel()
    assert second.resent == 0
    for store in stores:
        store.close()


async def test_watermarks_wait_out_an_unreachable_apiserver_and_are_written_after(
    control_plane: ControlPlane, kube: AsyncClient, tmp_path: Path
) -> None:
    config = json.loads(control_plane.kubeconfig.read_text())
    real = config["clusters"][0]["cluster"]["server"]
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    dead = tmp_path / "dead.kubeconfig"
    dead.write_text(json.dumps(config))
    namespace = "outpost-wm-outage"
    marks = WatermarkStore(AsyncClient(KubeConfig.from_file(dead), trust_env=False), namespace)
    hub = Hub(
        HubSettings(host="127.0.0.1", port=0, flush_interval_s=0.2),
        Pki.create(tmp_path / "pki").server_context(),
        watermarks=marks,
    )
    hub.streams["gw-x"] = NodeStream.fresh("gw-x", capacity=10, window=10, next_seq=42)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await trio.sleep(0.7)  # several failed rounds
        assert marks.writes == 0
        # Kubernetes is back: the same marks, kept meanwhile, are written.
        config["clusters"][0]["cluster"]["server"] = real
        dead.write_text(json.dumps(config))
        marks.kube = AsyncClient(KubeConfig.from_file(dead), trust_env=False)
        await marks.ensure_namespace()
        await eventually(lambda: marks.writes >= 1, "the kept watermarks are written")
        nursery.cancel_scope.cancel()
    cm = await kube.get(ConfigMap, shard_name(shard_of("gw-x")), namespace=namespace)
    assert json.loads(cm.data["gw-x"])["next"] == 42
