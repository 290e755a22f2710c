"""The edge controller's view of Kubernetes: what each edge node must hold.

Informers watch the Outpost nodes (label ``outpost.io/edge``), the pods bound to any node,
the ConfigMaps and Secrets, and the Devices and DeviceModels; ``cloud.mirror.edge_index.EdgeIndex``
decides which of them each node holds and hands every change to the hub. Three things happen
on the way:

- Pods whose projected volumes need service-account tokens wait until their tokens have been
  issued (the TokenRequest API, bound to the pod), so the edge gets token and pod together.
  Tokens are renewed at 80% of their lifetime. A token that cannot be issued (no such service
  account, say) does not hold the pod back for more than one attempt: the edge then reports
  why the volume cannot be made.
- A Device whose DeviceModel does not exist still goes to its node (which reports why it
  cannot use it); ``on_device_problem`` is told once per device and missing model, for a
  Warning event on the Device.
- Pods on Outpost nodes are given an unlimited NoExecute toleration of the unreachable and
  not-ready taints, so a gateway that goes offline keeps its pods (see ``pod_refs``).

``positions`` says, for each kind, up to which resourceVersion every change has been handed to
the hub; the pods' is held below any pod still waiting for its tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx2
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.operators import not_equal
from lightkube.resources.core_v1 import ConfigMap, Node, Pod, Secret, ServiceAccountToken
from lightkube.types import PatchType

from cloud.devices import Device, DeviceModel
from cloud.hub.streams import Positions, SourceObject, rv_number
from cloud.mirror.edge_index import DEVICE_MODEL, DeviceEntry, EdgeIndex
from cloud.mirror.informer import Informer
from cloud.mirror.pod_refs import TokenSpec, autonomous_tolerations, token_specs

log = logging.getLogger("cloud.mirror")

EDGE_LABEL = "outpost.io/edge"
TOKEN_REFRESH_FRACTION = 0.8
TOKEN_RETRY_S = 10.0


class EdgeSource:
    """Watches Kubernetes into ``index``, which publishes every change to what a node holds.

    ``on_node_deleted(node)``: an edge Node was deleted. ``on_device_problem(device, reason,
    message)``: a Device its node cannot use as it stands. ``on_device_deleted(namespace,
    name)``: a Device was deleted.
    """

    def __init__(
        self,
        kube: AsyncClient,
        index: EdgeIndex,
        *,
        on_node_deleted: Callable[[str], None],
        on_device_problem: Callable[[DeviceEntry, str, str], None],
        on_device_deleted: Callable[[str, str], None],
    ) -> None:
        self.kube = kube
        self.index = index
        self.ready = trio.Event()
        self.edge_nodes: set[str] = set()
        self.on_node_deleted = on_node_deleted
        self.on_device_problem = on_device_problem
        self.on_device_deleted = on_device_deleted
        self._missing_model: dict[str, str] = {}  # device uid -> the missing model, once said
        # Pods waiting for their tokens: uid -> latest version seen.
        self.waiting: dict[str, dict[str, Any]] = {}
        self._token_due: dict[str, float] = {}  # pod uid -> when to renew (trio clock)
        self._token_send, self._token_receive = trio.open_memory_channel[str](10_000)
        self._toleration_send, self._toleration_receive = trio.open_memory_channel[str](10_000)
        self._toleration_pending: set[str] = set()
        self.informers = [
            Informer(kube, Pod, put=self._put_pod, delete=self._delete_pod,
                     fields={"spec.nodeName": not_equal("")}),
            Informer(kube, ConfigMap, put=lambda o: self._put_object("ConfigMap", o),
                     delete=lambda o: self._delete_object("ConfigMap", o)),
            Informer(kube, Secret, put=lambda o: self._put_object("Secret", o),
                     delete=lambda o: self._delete_object("Secret", o)),
            Informer(kube, Device, put=self._put_device, delete=self._delete_device),
            Informer(kube, DeviceModel, put=self._put_model, delete=self._delete_model),
        ]  # fmt: skip
        self.nodes_informer = Informer(
            kube,
            Node,
            put=self._put_node,
            delete=self._delete_node,
            namespaced=False,
            labels={EDGE_LABEL: "true"},
        )

    # -- what the hub asks ------------------------------------------------------------------

    @property
    def positions(self) -> Positions:
        """Each watched kind's position; a pod waiting for its tokens holds the pods' back.
        Tokens have none: a restarted cloud always sends them again."""
        marks = {informer.kind: informer.rv for informer in self.informers}
        for pod in self.waiting.values():
            number = rv_number(pod["metadata"]["resourceVersion"])
            if number is not None:
                marks["Pod"] = min(marks["Pod"], number - 1)
        return marks

    def objects(self, node: str) -> list[SourceObject]:
        return self.index.objects_for(node)

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for informer in (self.nodes_informer, *self.informers):
                nursery.start_soon(informer.run)
            nursery.start_soon(self._issue_tokens)
            nursery.start_soon(self._renew_tokens)
            nursery.start_soon(self._add_tolerations)
            for informer in (self.nodes_informer, *self.informers):
                await informer.ready.wait()
            self.ready.set()
            for device in list(self.index.devices.values()):
                self._check_model(device)
            log.info(
                "edge source synced",
                extra={
                    "pods": len(self.index.pods),
                    "objects": len(self.index.objects),
                    "devices": len(self.index.devices),
                },
            )

    # -- nodes --------------------------------------------------------------------------------

    def _put_node(self, node: dict[str, Any]) -> None:
        name = node["metadata"]["name"]
        if name not in self.edge_nodes:
            self.edge_nodes.add(name)
            for pod in self.index.pods_on(name):
                self._want_tolerations(pod.uid)

    def _delete_node(self, node: dict[str, Any]) -> None:
        name = node["metadata"]["name"]
        self.edge_nodes.discard(name)
        self.on_node_deleted(name)

    # -- pods ---------------------------------------------------------------------------------

    def _put_pod(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        entry = self.index.pods.get(uid)
        # Only a pod never tried waits: one whose tokens failed goes on, to show why.
        if entry is None and uid not in self._token_due and _needs_tokens(pod):
            first = uid not in self.waiting
            self.waiting[uid] = pod
            if first:
                self._token_send.send_nowait(uid)
            return
        if uid in self.waiting:
            self.waiting[uid] = pod
            return
        entry = self.index.put_pod(pod)
        if entry is not None and entry.node in self.edge_nodes and not entry.deleting:
            self._want_tolerations(uid, pod)

    def _delete_pod(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        self.waiting.pop(uid, None)
        self._token_due.pop(uid, None)
        self.index.remove_pod(uid)

    # -- ConfigMaps and Secrets -----------------------------------------------------------------

    def _put_object(self, kind: str, obj: dict[str, Any]) -> None:
        self.index.put_object(kind, obj)

    def _delete_object(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.index.remove_object(kind, meta.get("namespace", "default"), meta["name"])

    # -- devices and their models -------------------------------------------------------------

    def _put_device(self, device: dict[str, Any]) -> None:
        entry = self.index.put_device(device)
        if entry is None:
            self._missing_model.pop(device["metadata"]["uid"], None)
        else:
            self._check_model(entry)

    def _delete_device(self, device: dict[str, Any]) -> None:
        meta = device["metadata"]
        self._missing_model.pop(meta["uid"], None)
        self.index.remove_device(meta["uid"])
        self.on_device_deleted(meta.get("namespace", "default"), meta["name"])

    def _put_model(self, model: dict[str, Any]) -> None:
        self.index.put_object(DEVICE_MODEL, model)
        meta = model["metadata"]
        for device in self.index.devices_using(meta.get("namespace", "default"), meta["name"]):
            self._check_model(device)

    def _delete_model(self, model: dict[str, Any]) -> None:
        meta = model["metadata"]
        namespace = meta.get("namespace", "default")
        self.index.remove_object(DEVICE_MODEL, namespace, meta["name"])
        for device in self.index.devices_using(namespace, meta["name"]):
            self._check_model(device)

    def _check_model(self, device: DeviceEntry) -> None:
        """Tell ``on_device_problem`` once when a device's model is missing (only once every
        kind is listed: before that, a model not seen yet may just not be listed yet)."""
        if not self.ready.is_set():
            return
        if not self.index.missing_model(device):
            self._missing_model.pop(device.uid, None)
            return
        if self._missing_model.get(device.uid) == device.model:
            return
        self._missing_model[device.uid] = device.model
        if device.model:
            message = (
                f"DeviceModel {device.namespace}/{device.model} does not exist; the device is"
                f" sent to node {device.node}, which cannot use it until the model exists"
            )
        else:
            message = "spec.deviceModelRef.name is empty; the device cannot be used without a model"
        log.warning("device model missing", extra={"device": device.key, "model": device.model})
        self.on_device_problem(device, "ModelNotFound", message)

    # -- tokens -------------------------------------------------------------------------------

    async def _issue_tokens(self) -> None:
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(16)
            async for uid in self._token_receive:
                nursery.start_soon(self._issue, uid, limiter)

    async def _issue(self, uid: str, limiter: trio.CapacityLimiter) -> None:
        pod = self.waiting.get(uid)
        entry = self.index.pods.get(uid)
        if pod is not None:
            meta, spec = pod["metadata"], pod.get("spec") or {}
            target = (meta.get("namespace", "default"), meta["name"])
            account, specs = spec.get("serviceAccountName") or "default", token_specs(pod)
        elif entry is not None:
            target = (entry.namespace, entry.name)
            account, specs = entry.service_account, entry.tokens
        else:
            return
        async with limiter:
            tokens, lifetime = await self._request_tokens(target, uid, account, specs)
        if tokens is not None:
            self.index.put_token(uid, *target, tokens, f"t{time.time_ns()}")
        self._token_due[uid] = trio.current_time() + lifetime * TOKEN_REFRESH_FRACTION
        waiting = self.waiting.pop(uid, None)
        if waiting is not None:
            self._put_pod(waiting)

    async def _request_tokens(
        self, target: tuple[str, str], uid: str, account: str, specs: frozenset[TokenSpec]
    ) -> tuple[list[dict[str, Any]] | None, float]:
        """The pod's tokens and the shortest lifetime among them, or None and when to retry."""
        namespace, name = target
        tokens = []
        lifetime = float("inf")
        for audience, seconds in sorted(specs):
            request = ServiceAccountToken(
                metadata=ObjectMeta(name=account, namespace=namespace),
                spec=TokenRequestSpec(
                    audiences=[audience] if audience else [],
                    expirationSeconds=seconds,
                    boundObjectRef=BoundObjectReference(
                        kind="Pod", apiVersion="v1", name=name, uid=uid
                    ),
                ),
            )
            try:
                issued = await self.kube.create(request, name=account, namespace=namespace)
            except (ApiError, httpx2.TransportError) as exc:
                log.warning(
                    "cannot issue a service-account token",
                    extra={
                        "pod": f"{namespace}/{name}",
                        "service_account": account,
                        "error": str(exc),
                    },
                )
                return None, TOKEN_RETRY_S / TOKEN_REFRESH_FRACTION
            tokens.append(
                {
                    "audience": audience,
                    "expirationSeconds": seconds,
                    "token": issued.status.token,
                    "expirationTimestamp": issued.status.expirationTimestamp.isoformat(),
                }
            )
            lifetime = min(lifetime, seconds)
        return tokens, lifetime

    async def _renew_tokens(self) -> None:
        while True:
            await trio.sleep(5)
            now = trio.current_time()
            for uid, due in list(self._token_due.items()):
                if due > now:
                    continue
                entry = self.index.pods.get(uid)
                if entry is None or entry.deleting or not entry.tokens:
                    del self._token_due[uid]
                    continue
                self._token_due[uid] = float("inf")  # until this renewal is done
                self._token_send.send_nowait(uid)

    # -- tolerations ----------------------------------------------------------------------------

    def _want_tolerations(self, uid: str, pod: dict[str, Any] | None = None) -> None:
        if uid in self._toleration_pending:
            return
        if pod is not None and autonomous_tolerations(pod) is None:
            return
        self._toleration_pending.add(uid)
        self._toleration_send.send_nowait(uid)

    async def _add_tolerations(self) -> None:
        async for uid in self._toleration_receive:
            self._toleration_pending.discard(uid)
            entry = self.index.pods.get(uid)
            if entry is None or entry.deleting or entry.node not in self.edge_nodes:
                continue
            try:
                pod = (await self.kube.get(Pod, entry.name, namespace=entry.namespace)).to_dict()
            except (ApiError, httpx2.TransportError) as exc:
                log.warning("cannot read pod", extra={"pod": entry.key, "error": str(exc)})
                continue
            tolerations = autonomous_tolerations(pod)
            if tolerations is None or pod["metadata"]["uid"] != uid:
                continue
            patch = {
                "metadata": {"resourceVersion": pod["metadata"]["resourceVersion"]},
                "spec": {"tolerations": tolerations},
            }
            try:
                await self.kube.patch(
                    Pod, entry.name, patch, namespace=entry.namespace, patch_type=PatchType.MERGE
                )
            except ApiError as exc:
                # 409: it changed meanwhile; its next watch event brings it back here.
                if exc.status.code not in (404, 409):
                    log.warning(
                        "cannot make the pod tolerate its node going offline",
                        extra={"pod": entry.key, "error": str(exc)},
                    )
            except httpx2.TransportError as exc:
                log.warning("Kubernetes unreachable", extra={"error": str(exc)})
            else:
                log.info("pod made to stay on its node offline", extra={"pod": entry.key})


def _needs_tokens(pod: dict[str, Any]) -> bool:
    return bool(token_specs(pod)) and not pod["metadata"].get("deletionTimestamp")
