"""Random sequences of Kubernetes changes: what the hub was told adds up to what each node
should hold, worked out from scratch, and nothing arrives before what it needs."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cloud.hub.streams import SourceObject
from cloud.mirror.edge_index import EdgeIndex
from cloud.mirror.pod_refs import object_body, pod_body, references

NS = "ns"
NODES = ("a", "b")
PODS = {"p0": "a", "p1": "a", "p2": "b", "p3": "b"}  # name -> node (nodeName is immutable)
NAMES = ("o0", "o1", "o2")
KINDS = ("ConfigMap", "Secret")
TOKEN_KIND = "ServiceAccountToken"

names = st.frozensets(st.sampled_from(NAMES), max_size=3)


class EdgeIndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.index = EdgeIndex(self.publish)
        self.replay: dict[str, dict[str, SourceObject]] = {node: {} for node in NODES}
        # The model: what Kubernetes has now.
        self.pods: dict[str, dict[str, Any]] = {}  # name -> pod
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> object
        self.tokens: dict[str, list[dict[str, Any]]] = {}  # pod uid -> tokens
        self.generation = 0

    # -- the hub ---------------------------------------------------------------------------------

    def publish(self, node: str, obj: SourceObject, deleted: bool) -> None:
        held = self.replay[node]
        kind = obj.key.split("/")[1]
        if deleted:
            assert obj.uid in held, f"{obj.key} deleted on {node} but never sent there"
            del held[obj.uid]
            current = self.index.objects.get((kind, NS, obj.key.split("/")[2]))
            if kind in KINDS and current is not None and current.obj.uid == obj.uid:
                # Still in Kubernetes: it leaves only when no pod on the node needs it.
                assert current.labelled_for != node
                for other in held.values():
                    if other.key.split("/")[1] == "Pod":
                        name = obj.key.split("/")[2]
                        assert (kind, name) not in references(other.body), (
                            f"{obj.key} taken from {node} while {other.key} needs it"
                        )
            return
        before = held.get(obj.uid)
        assert before is None or (before.key, before.body) != (obj.key, obj.body), (
            f"{obj.key} sent to {node} unchanged"
        )
        if kind == "Pod":
            # What the pod needs is there before it.
            for ref_kind, name in references(obj.body):
                current = self.index.objects.get((ref_kind, NS, name))
                if current is not None:
                    there = held.get(current.obj.uid)
                    assert there is not None, f"{obj.key} sent before {ref_kind} {name}"
                    assert there.body == current.obj.body
            token = self.index.tokens.get(obj.uid)
            if token is not None:
                assert held.get(token.uid) == token, f"{obj.key} sent before its token"
        held[obj.uid] = obj

    # -- Kubernetes changes ----------------------------------------------------------------------

    @rule(
        name=st.sampled_from(sorted(PODS)),
        secrets=names,
        configmaps=names,
        deleting=st.booleans(),
        rv=st.integers(1, 3),
    )
    def put_pod(
        self,
        name: str,
        secrets: frozenset[str],
        configmaps: frozenset[str],
        deleting: bool,
        rv: int,
    ) -> None:
        volumes = [{"name": f"s{s}", "secret": {"secretName": s}} for s in sorted(secrets)]
        volumes += [{"name": f"c{c}", "configMap": {"name": c}} for c in sorted(configmaps)]
        meta: dict[str, Any] = {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "resourceVersion": str(rv),
        }
        if deleting:
            meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
        pod = {"metadata": meta, "spec": {"nodeName": PODS[name], "volumes": volumes}}
        self.pods[name] = pod
        self.index.put_pod(pod)

    @rule(name=st.sampled_from(sorted(PODS)))
    def remove_pod(self, name: str) -> None:
        self.pods.pop(name, None)
        self.tokens.pop(f"uid-{name}", None)
        self.index.remove_pod(f"uid-{name}")

    @rule(name=st.sampled_from(sorted(PODS)), value=st.sampled_from(["jwt1", "jwt2"]))
    def put_token(self, name: str, value: str) -> None:
        tokens = [{"audience": "", "expirationSeconds": 3607, "token": value}]
        self.tokens[f"uid-{name}"] = tokens
        self.index.put_token(f"uid-{name}", NS, name, tokens, value)

    @rule(
        kind=st.sampled_from(KINDS),
        name=st.sampled_from(NAMES),
        recreated=st.booleans(),
        label=st.sampled_from([None, *NODES]),
        value=st.sampled_from(["x", "y"]),
    )
    def put_object(
        self, kind: str, name: str, recreated: bool, label: str | None, value: str
    ) -> None:
        old = self.objects.get((kind, name))
        if old is None or recreated:
            self.generation += 1
            uid = f"{kind}-{name}-{self.generation}"
        else:
            uid = old["metadata"]["uid"]
        self.generation += 1
        meta: dict[str, Any] = {
            "name": name,
            "namespace": NS,
            "uid": uid,
            "resourceVersion": str(self.generation),
        }
        if label is not None:
            meta["labels"] = {"outpost.io/node": label}
        obj = {"metadata": meta, "data": {"k": value}}
        self.objects[(kind, name)] = obj
        self.index.put_object(kind, obj)

    @rule(kind=st.sampled_from(KINDS), name=st.sampled_from(NAMES))
    def remove_object(self, kind: str, name: str) -> None:
        self.objects.pop((kind, name), None)
        self.index.remove_object(kind, NS, name)

    # -- what each node should hold ----------------------------------------------------------------

    def expected(self, node: str) -> dict[str, Any]:
        """key -> body (for tokens, the tokens) from the model alone."""
        want: dict[str, Any] = {}
        needed: set[tuple[str, str]] = set()
        for name, pod in self.pods.items():
            if PODS[name] != node:
                continue
            want[f"{NS}/Pod/{name}"] = pod_body(pod)
            needed |= references(pod)
            if f"uid-{name}" in self.tokens:
                want[f"{NS}/{TOKEN_KIND}/{name}"] = self.tokens[f"uid-{name}"]
        for (kind, name), obj in self.objects.items():
            labelled = kind == "ConfigMap" and (obj["metadata"].get("labels") or {}).get(
                "outpost.io/node"
            )
            if (kind, name) in needed or labelled == node:
                want[f"{NS}/{kind}/{name}"] = object_body(kind, obj)
        return want

    @staticmethod
    def as_held(objects: list[SourceObject]) -> dict[str, Any]:
        held: dict[str, Any] = {}
        for obj in objects:
            assert obj.key not in held, f"{obj.key} held twice"
            is_token = obj.key.split("/")[1] == TOKEN_KIND
            held[obj.key] = obj.body["tokens"] if is_token else obj.body
        return held

    @invariant()
    def the_published_stream_adds_up_to_what_is_held(self) -> None:
        for node in NODES:
            held = {obj.uid: obj for obj in self.index.objects_for(node)}
            assert self.replay[node] == held

    @invariant()
    def each_node_holds_exactly_what_its_pods_and_labels_call_for(self) -> None:
        for node in NODES:
            assert self.as_held(list(self.replay[node].values())) == self.expected(node)


EdgeIndexMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_edge_index_state_machine = EdgeIndexMachine.TestCase
