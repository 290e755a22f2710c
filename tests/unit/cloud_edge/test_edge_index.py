"""Which objects each edge node holds, and the order the hub is told about them: pods, the
ConfigMaps and Secrets they need (only while they need them), their tokens and ConfigMaps
labelled for the node."""

from __future__ import annotations

from typing import Any

import pytest

from cloud.hub.streams import SourceObject
from cloud.mirror.edge_index import EdgeIndex

NS = "ns"


class Recorder:
    """The hub's side: every publish, and what each node holds if it applies them in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, SourceObject, bool]] = []
        self.held: dict[str, dict[str, SourceObject]] = {}

    def __call__(self, node: str, obj: SourceObject, deleted: bool) -> None:
        self.calls.append((node, obj, deleted))
        if deleted:
            self.held.get(node, {}).pop(obj.uid, None)
        else:
            self.held.setdefault(node, {})[obj.uid] = obj

    def keys(self, node: str) -> set[str]:
        return {obj.key for obj in self.held.get(node, {}).values()}

    def log(self) -> list[tuple[str, str, bool]]:
        """(node, key, deleted) of every call so far."""
        return [(node, obj.key, deleted) for node, obj, deleted in self.calls]

    def take(self) -> list[tuple[str, str, bool]]:
        log = self.log()
        self.calls.clear()
        return log


def make_pod(
    name: str,
    node: str = "a",
    *,
    uid: str | None = None,
    secrets: tuple[str, ...] = (),
    configmaps: tuple[str, ...] = (),
    rv: str = "1",
    namespace: str = NS,
    deleting: bool = False,
    tokens: bool = False,
) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {"name": f"s-{s}", "secret": {"secretName": s}} for s in secrets
    ] + [{"name": f"c-{c}", "configMap": {"name": c}} for c in configmaps]
    if tokens:
        volumes.append(
            {
                "name": "kube-api-access",
                "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607}}]},
            }
        )
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid or f"uid-{name}",
        "resourceVersion": rv,
    }
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
        meta["deletionGracePeriodSeconds"] = 30
    return {
        "metadata": meta,
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}], "volumes": volumes},
    }


def make_object(
    name: str,
    *,
    uid: str | None = None,
    rv: str = "1",
    data: dict[str, str] | None = None,
    node_label: str | None = None,
    namespace: str = NS,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid or f"uid-{name}",
        "resourceVersion": rv,
    }
    if node_label is not None:
        meta["labels"] = {"outpost.io/node": node_label}
    return {"metadata": meta, "data": data or {"k": "v"}}


def pod_key(name: str) -> str:
    return f"{NS}/Pod/{name}"


def secret_key(name: str) -> str:
    return f"{NS}/Secret/{name}"


def cm_key(name: str) -> str:
    return f"{NS}/ConfigMap/{name}"


@pytest.fixture
def hub() -> Recorder:
    return Recorder()


@pytest.fixture
def index(hub: Recorder) -> EdgeIndex:
    return EdgeIndex(hub)


def held_keys(index: EdgeIndex, node: str) -> set[str]:
    return {obj.key for obj in index.objects_for(node)}


# -- pods --------------------------------------------------------------------------------------


def test_each_node_gets_its_own_pods(index: EdgeIndex, hub: Recorder) -> None:
    index.put_pod(make_pod("p1", "a"))
    index.put_pod(make_pod("p2", "a"))
    index.put_pod(make_pod("q", "b"))
    assert held_keys(index, "a") == {pod_key("p1"), pod_key("p2")}
    assert held_keys(index, "b") == {pod_key("q")}
    assert hub.keys("a") == {pod_key("p1"), pod_key("p2")}
    assert hub.keys("b") == {pod_key("q")}
    assert index.objects_for("c") == []


def test_a_pod_not_bound_to_a_node_is_nobodys(index: EdgeIndex, hub: Recorder) -> None:
    unbound = make_pod("p")
    del unbound["spec"]["nodeName"]
    assert index.put_pod(unbound) is None
    assert hub.calls == []


def test_a_removed_pod_leaves_its_node(index: EdgeIndex, hub: Recorder) -> None:
    index.put_pod(make_pod("p"))
    hub.take()
    index.remove_pod("uid-p")
    assert hub.take() == [("a", pod_key("p"), True)]
    assert index.objects_for("a") == []


def test_a_pod_update_that_only_moves_the_resource_version_is_not_sent(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_pod(make_pod("p", rv="1"))
    hub.take()
    update = make_pod("p", rv="2")
    update["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    index.put_pod(update)
    assert hub.take() == []


def test_a_pod_being_deleted_is_sent_again(index: EdgeIndex, hub: Recorder) -> None:
    index.put_pod(make_pod("p", rv="1"))
    hub.take()
    index.put_pod(make_pod("p", rv="2", deleting=True))
    (call,) = hub.calls
    node, obj, deleted = call
    assert (node, obj.key, deleted) == ("a", pod_key("p"), False)
    assert obj.body["metadata"]["deletionTimestamp"] == "2024-01-01T00:00:00Z"
    assert index.pod(NS, "p").deleting


# -- ConfigMaps and Secrets, by reference -------------------------------------------------------


def test_a_secret_reaches_a_node_only_with_a_pod_that_needs_it(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("Secret", make_object("s"))
    assert hub.calls == []
    index.put_pod(make_pod("p", secrets=("s",)))
    assert secret_key("s") in hub.keys("a")


def test_a_secret_is_sent_before_the_pod_that_needs_it(index: EdgeIndex, hub: Recorder) -> None:
    index.put_object("Secret", make_object("s"))
    index.put_object("ConfigMap", make_object("c"))
    index.put_pod(make_pod("p", secrets=("s",), configmaps=("c",)))
    log = hub.take()
    assert log[-1] == ("a", pod_key("p"), False)
    assert sorted(log[:-1]) == [("a", cm_key("c"), False), ("a", secret_key("s"), False)]


def test_a_reference_added_by_an_update_is_sent_before_the_update(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("Secret", make_object("old"))
    index.put_object("Secret", make_object("new"))
    index.put_pod(make_pod("p", secrets=("old",)))
    hub.take()
    index.put_pod(make_pod("p", secrets=("new",), rv="2"))
    log = hub.take()
    assert log.index(("a", secret_key("new"), False)) < log.index(("a", pod_key("p"), False))
    # The one it stopped needing goes, after the pod no longer names it.
    assert log.index(("a", pod_key("p"), False)) < log.index(("a", secret_key("old"), True))
    assert held_keys(index, "a") == {pod_key("p"), secret_key("new")}


def test_a_secret_created_after_its_pod_is_sent_when_it_appears(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_pod(make_pod("p", secrets=("late",)))
    hub.take()
    index.put_object("Secret", make_object("late"))
    assert hub.take() == [("a", secret_key("late"), False)]


def test_a_shared_secret_stays_until_the_last_pod_that_needs_it_goes(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("Secret", make_object("s"))
    index.put_pod(make_pod("p1", secrets=("s",)))
    index.put_pod(make_pod("p2", secrets=("s",)))
    assert [c for c in hub.take() if c[1] == secret_key("s")] == [("a", secret_key("s"), False)]

    index.remove_pod("uid-p1")
    assert hub.take() == [("a", pod_key("p1"), True)]
    assert secret_key("s") in held_keys(index, "a")

    index.remove_pod("uid-p2")
    assert hub.take() == [("a", pod_key("p2"), True), ("a", secret_key("s"), True)]
    assert index.objects_for("a") == []


def test_a_pod_that_stops_naming_a_shared_secret_does_not_take_it_from_the_other(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("Secret", make_object("s"))
    index.put_pod(make_pod("p1", secrets=("s",)))
    index.put_pod(make_pod("p2", secrets=("s",)))
    index.put_pod(make_pod("p1", rv="2"))
    assert secret_key("s") in held_keys(index, "a")
    index.put_pod(make_pod("p2", rv="2"))
    assert secret_key("s") not in held_keys(index, "a")


def test_a_secret_needed_on_one_node_never_reaches_another(index: EdgeIndex, hub: Recorder) -> None:
    index.put_object("Secret", make_object("s"))
    index.put_pod(make_pod("on-a", "a"))
    index.put_pod(make_pod("on-b", "b", secrets=("s",)))
    index.put_object("Secret", make_object("s", rv="2", data={"k": "changed"}))
    assert all(key != secret_key("s") for node, key, _ in hub.log() if node == "a")
    assert secret_key("s") in held_keys(index, "b")
    assert secret_key("s") not in held_keys(index, "a")


def test_a_secret_of_the_same_name_in_another_namespace_is_not_sent(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("Secret", make_object("s", namespace="other", uid="other-s"))
    index.put_pod(make_pod("p", secrets=("s",)))
    assert hub.keys("a") == {pod_key("p")}


def test_a_change_to_a_held_secret_is_sent_to_every_node_that_holds_it(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("Secret", make_object("s"))
    index.put_pod(make_pod("p", "a", secrets=("s",)))
    index.put_pod(make_pod("q", "b", secrets=("s",)))
    hub.take()
    index.put_object("Secret", make_object("s", rv="2", data={"k": "new"}))
    assert sorted(hub.take()) == [("a", secret_key("s"), False), ("b", secret_key("s"), False)]
    assert hub.held["a"]["uid-s"].body["data"] == {"k": "new"}


def test_a_deleted_secret_leaves_the_nodes_and_returns_when_made_again(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("Secret", make_object("s"))
    index.put_pod(make_pod("p", secrets=("s",)))
    hub.take()
    index.remove_object("Secret", NS, "s")
    assert hub.take() == [("a", secret_key("s"), True)]
    index.put_object("Secret", make_object("s", uid="uid-s2"))
    assert hub.take() == [("a", secret_key("s"), False)]
    assert hub.held["a"].keys() == {"uid-p", "uid-s2"}


def test_a_configmap_recreated_under_the_same_name_replaces_the_old_one(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("ConfigMap", make_object("c", uid="first"))
    index.put_pod(make_pod("p", configmaps=("c",)))
    hub.take()
    # Deleted and made again while the watch was away: only the new one is seen.
    index.put_object("ConfigMap", make_object("c", uid="second", data={"k": "2"}))
    log = hub.calls
    assert [(obj.uid, deleted) for _, obj, deleted in log] == [("first", True), ("second", False)]
    assert {obj.uid for obj in index.objects_for("a")} == {"uid-p", "second"}
    assert hub.held["a"].keys() == {"uid-p", "second"}


# -- ConfigMaps labelled for a node ---------------------------------------------------------------


def test_a_configmap_labelled_for_a_node_reaches_it_without_any_pod(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("ConfigMap", make_object("gw-config", node_label="a"))
    assert hub.take() == [("a", cm_key("gw-config"), False)]
    assert held_keys(index, "b") == set()


def test_the_node_label_on_a_secret_means_nothing(index: EdgeIndex, hub: Recorder) -> None:
    index.put_object("Secret", make_object("s", node_label="a"))
    assert hub.calls == []


def test_relabelling_a_configmap_moves_it_to_the_new_node(index: EdgeIndex, hub: Recorder) -> None:
    index.put_object("ConfigMap", make_object("gw-config", node_label="a"))
    hub.take()
    index.put_object("ConfigMap", make_object("gw-config", rv="2", node_label="b"))
    assert sorted(hub.take()) == [
        ("a", cm_key("gw-config"), True),
        ("b", cm_key("gw-config"), False),
    ]
    assert held_keys(index, "a") == set()
    assert held_keys(index, "b") == {cm_key("gw-config")}


def test_a_labelled_configmap_stays_when_the_pod_that_also_named_it_goes(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("ConfigMap", make_object("c", node_label="a"))
    index.put_pod(make_pod("p", configmaps=("c",)))
    index.remove_pod("uid-p")
    assert held_keys(index, "a") == {cm_key("c")}
    assert hub.keys("a") == {cm_key("c")}


def test_unlabelling_a_configmap_a_pod_still_needs_keeps_it_there(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("ConfigMap", make_object("c", node_label="a"))
    index.put_pod(make_pod("p", configmaps=("c",)))
    index.put_object("ConfigMap", make_object("c", rv="2"))
    assert cm_key("c") in held_keys(index, "a")
    index.remove_pod("uid-p")
    assert held_keys(index, "a") == set()
    assert hub.keys("a") == set()


# -- tokens -------------------------------------------------------------------------------------

TOKENS = [{"audience": "", "expirationSeconds": 3607, "token": "jwt"}]


def test_tokens_issued_before_the_pod_is_put_are_sent_just_before_it(
    index: EdgeIndex, hub: Recorder
) -> None:
    index.put_object("Secret", make_object("s"))
    index.put_token("uid-p", NS, "p", TOKENS, "t1")
    assert hub.calls == []
    index.put_pod(make_pod("p", secrets=("s",), tokens=True))
    assert hub.take() == [
        ("a", secret_key("s"), False),
        ("a", f"{NS}/ServiceAccountToken/p", False),
        ("a", pod_key("p"), False),
    ]
    token = hub.held["a"]["token-uid-p"]
    assert token.body["tokens"] == TOKENS


def test_renewed_tokens_are_sent_to_the_pods_node(index: EdgeIndex, hub: Recorder) -> None:
    index.put_token("uid-p", NS, "p", TOKENS, "t1")
    index.put_pod(make_pod("p", tokens=True))
    hub.take()
    renewed = [{**TOKENS[0], "token": "jwt2"}]
    index.put_token("uid-p", NS, "p", renewed, "t2")
    (call,) = hub.calls
    assert (call[0], call[1].key, call[2]) == ("a", f"{NS}/ServiceAccountToken/p", False)
    assert call[1].body["tokens"] == renewed


def test_removing_the_pod_removes_its_token(index: EdgeIndex, hub: Recorder) -> None:
    index.put_token("uid-p", NS, "p", TOKENS, "t1")
    index.put_pod(make_pod("p", tokens=True))
    hub.take()
    index.remove_pod("uid-p")
    assert sorted(hub.take()) == [
        ("a", f"{NS}/Pod/p", True),
        ("a", f"{NS}/ServiceAccountToken/p", True),
    ]
    assert index.objects_for("a") == []
    # A pod of that name made again does not get the old pod's token.
    index.put_pod(make_pod("p", uid="uid-p-again", tokens=True))
    assert hub.keys("a") == {pod_key("p")}


def test_a_pod_update_does_not_resend_its_unchanged_token(index: EdgeIndex, hub: Recorder) -> None:
    index.put_token("uid-p", NS, "p", TOKENS, "t1")
    index.put_pod(make_pod("p", tokens=True))
    hub.take()
    index.put_pod(make_pod("p", tokens=True, rv="2", deleting=True))
    assert hub.take() == [("a", pod_key("p"), False)]
