"""The standalone manifest folder: one reader, one uid rule, and a writer into the store."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from edge.manifests import ManifestWriter, desired_objects, manifest_uid, read_folder
from edge.store import Store, StoreError
from edge.store.aio import AsyncStore
from edge.wire.events import Message, Op
from tests.waiting import eventually


def model() -> dict[str, Any]:
    return {
        "kind": "DeviceModel",
        "metadata": {"name": "thermostat", "namespace": "plant"},
        "spec": {"properties": [{"name": "t", "type": "int"}]},
    }


def device(name: str, node: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"deviceModelRef": {"name": "thermostat"}, "properties": []}
    if node is not None:
        spec["nodeName"] = node
    return {"kind": "Device", "metadata": {"name": name, "namespace": "plant"}, "spec": spec}


def pod(name: str, image: str = "app:1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": image}]},
    }


def write(folder: Path, name: str, *documents: dict[str, Any]) -> None:
    (folder / name).write_text(yaml.safe_dump_all(documents))


def test_the_reader_skips_what_it_cannot_read(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", pod("p"))
    (tmp_path / "broken.yaml").write_text("kind: [\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "notes.txt").write_text("kind: Pod\n")
    (tmp_path / "b.json").write_text('{"kind": "ConfigMap", "metadata": {"name": "c"}}')
    (tmp_path / "sub.yaml").mkdir()
    assert [d["kind"] for d in read_folder(tmp_path)] == ["Pod", "ConfigMap"]


def test_devices_for_this_node_and_models_become_objects_with_a_stable_uid(
    tmp_path: Path,
) -> None:
    write(tmp_path, "devices.yaml", model(), device("t1"), device("t9", node="elsewhere"))
    objects = desired_objects(read_folder(tmp_path), "gw")
    assert sorted(objects) == ["plant/Device/t1", "plant/DeviceModel/thermostat"]
    _, body = objects["plant/Device/t1"]
    uid = body["metadata"]["uid"]
    assert uid == str(uuid.uuid5(uuid.NAMESPACE_URL, "gw/plant/t1"))
    assert body["spec"]["nodeName"] == "gw"
    edited = device("t1")
    edited["spec"]["properties"] = [{"name": "t", "collectCycle": 5_000_000_000}]
    write(tmp_path, "devices.yaml", model(), edited)
    again = desired_objects(read_folder(tmp_path), "gw")
    assert again["plant/Device/t1"][1]["metadata"]["uid"] == uid  # kept across edits
    assert again["plant/Device/t1"][0] != objects["plant/Device/t1"][0]  # a new rv


def test_a_pod_uid_follows_kubelets_static_pod_rule(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", pod("p"))
    first = desired_objects(read_folder(tmp_path), "gw")["default/Pod/p"][1]
    assert desired_objects(read_folder(tmp_path), "gw")["default/Pod/p"][1] == first
    write(tmp_path, "p.yaml", pod("p", image="app:2"))
    edited = desired_objects(read_folder(tmp_path), "gw")["default/Pod/p"][1]
    assert edited["metadata"]["uid"] != first["metadata"]["uid"]  # an edit replaces the pod
    assert first["spec"]["nodeName"] == "gw"
    # The rule as it was before the folder wrote into the store: upgrades keep the uid.
    as_read = pod("p")
    as_read["metadata"]["namespace"] = "default"
    assert first["metadata"]["uid"] == manifest_uid("gw", copy.deepcopy(as_read))
    assert manifest_uid("other", as_read) != first["metadata"]["uid"]


def test_other_kinds_and_unnamed_objects_are_skipped(tmp_path: Path) -> None:
    write(
        tmp_path,
        "x.yaml",
        {"kind": "Deployment", "metadata": {"name": "d"}},
        {"kind": "ConfigMap", "metadata": {}},
        {"kind": "Secret", "metadata": {"name": "a/b"}},
        {"kind": "Pod", "metadata": {"name": "bad"}, "spec": ["not", "a", "mapping"]},
        {"kind": "Secret", "metadata": {"name": "s", "namespace": "plant"}},
    )
    assert list(desired_objects(read_folder(tmp_path), "gw")) == ["plant/Secret/s"]


async def test_the_writer_makes_the_store_hold_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    write(folder, "a.yaml", pod("p"), {"kind": "ConfigMap", "metadata": {"name": "c"}})
    with Store(tmp_path / "store.db") as store:
        # A store that had followed a cloud: what it held goes, and so does its mark.
        store.apply_batch([Message(1, "m", Op.PUT, "ns/Pod/from-cloud", "9", {"x": 1})])
        aio = AsyncStore(store)
        writer = ManifestWriter(folder, "gw", aio, rescan_s=0.05)
        with aio.feed.subscribe() as feed:
            await feed.next()
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                assert [k for k, _, _ in store.list("Pod")] == ["default/Pod/p"]
                assert [k for k, _, _ in store.list("ConfigMap")] == ["default/ConfigMap/c"]
                assert store.hwm == 0
                changes = await feed.next()
                assert changes.objects == {
                    "default/Pod/p",
                    "default/ConfigMap/c",
                    "ns/Pod/from-cloud",
                }
                commits = store.commits
                await trio.sleep(0.3)  # several rescans of an unchanged folder
                assert store.commits == commits  # nothing written again: flash wear
                (folder / "a.yaml").unlink()
                write(folder, "b.yaml", pod("q"))
                changes = await feed.next()
                assert changes.objects == {"default/Pod/p", "default/ConfigMap/c", "default/Pod/q"}
                assert [k for k, _, _ in store.list("Pod")] == ["default/Pod/q"]
                nursery.cancel_scope.cancel()


async def test_an_edit_is_picked_up_when_the_kernel_says_so_not_at_the_next_rescan(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    with Store(tmp_path / "store.db") as store:
        aio = AsyncStore(store)
        writer = ManifestWriter(folder, "gw", aio, rescan_s=3600)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            assert store.list("Pod") == []
            with trio.fail_after(5):  # far less than the rescan
                write(folder, "a.yaml", pod("p"))
                await eventually(lambda: store.list("Pod"), "the new pod stored")
                (folder / "a.yaml").rename(folder / "a.yaml.off")  # set aside, as editors do
                await eventually(lambda: not store.list("Pod"), "the pod set aside is gone")
            nursery.cancel_scope.cancel()


async def test_a_folder_that_is_not_there_yet_is_read_until_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    with Store(tmp_path / "store.db") as store:
        aio = AsyncStore(store)
        writer = ManifestWriter(folder, "gw", aio, rescan_s=3600, unwatched_rescan_s=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            folder.mkdir()
            write(folder, "a.yaml", pod("p"))
            await eventually(lambda: store.list("Pod"), "the pod stored", within=5)
            write(folder, "b.yaml", pod("q"))  # watched from now on
            await eventually(lambda: len(store.list("Pod")) == 2, "the second pod", within=5)
            nursery.cancel_scope.cancel()


def test_yaml_values_json_cannot_hold_are_read_as_kubectl_reads_them(tmp_path: Path) -> None:
    """A timestamp and a number used as a key become strings; an alias that holds itself is
    skipped. Either way the folder's other objects are still read."""
    (tmp_path / "a.yaml").write_text(
        "kind: ConfigMap\n"
        "metadata: {name: dated, annotations: {since: 2024-01-02}}\n"
        "data: {1: one}\n"
        "---\n"
        "kind: ConfigMap\n"
        "metadata: {name: loop}\n"
        "data: &self {again: *self}\n"
    )
    write(tmp_path, "b.yaml", pod("p"))
    objects = desired_objects(read_folder(tmp_path), "gw")
    assert sorted(objects) == ["default/ConfigMap/dated", "default/Pod/p"]
    dated = objects["default/ConfigMap/dated"][1]
    assert dated["metadata"]["annotations"] == {"since": "2024-01-02"}
    assert dated["data"] == {"1": "one"}


async def test_a_bad_namespace_is_skipped_and_the_rest_still_reaches_the_store(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    bad = pod("bad")
    bad["metadata"]["namespace"] = "a/b"
    odd = pod("odd")
    odd["metadata"]["namespace"] = 7
    write(folder, "a.yaml", bad, odd, pod("good"))
    with Store(tmp_path / "store.db") as store:
        writer = ManifestWriter(folder, "gw", AsyncStore(store))
        await writer.sync()
        assert [key for key, _, _ in store.list("Pod")] == ["default/Pod/good"]


async def test_a_store_that_refuses_the_folder_gets_it_at_the_next_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    write(folder, "a.yaml", pod("p"))
    with Store(tmp_path / "store.db") as store:
        writer = ManifestWriter(folder, "gw", AsyncStore(store))
        real = store.replace_objects

        def full_disk(objects: Any) -> tuple[str, ...]:
            raise StoreError(f"{store.path}: replacing the desired objects failed: disk full")

        monkeypatch.setattr(store, "replace_objects", full_disk)
        await writer.sync()  # logged, not raised: the agent goes on
        assert store.list("Pod") == []
        monkeypatch.setattr(store, "replace_objects", real)
        await writer.sync()  # the folder did not change, but it was never stored
        assert [key for key, _, _ in store.list("Pod")] == ["default/Pod/p"]
