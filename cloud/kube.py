"""The cloud's Kubernetes client: lightkube's AsyncClient, which runs natively under trio.

Two lightkube features reach for asyncio and so must not be used here: exec-credential
kubeconfigs, and the watch ``on_error`` retry that sleeps. Watches back off on their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import httpx2
from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Node

log = logging.getLogger(__name__)
FIELD_MANAGER = "outpost-cloud"


class KubeUnavailable(RuntimeError):
    """Kubernetes cannot be used: no usable kubeconfig, unreachable, or credentials refused."""


@dataclass(frozen=True)
class ClusterInfo:
    server: str
    nodes: int


def load_config(kubeconfig: Path | None) -> KubeConfig:
    """The kubeconfig at ``kubeconfig``, else the in-cluster or ``$KUBECONFIG`` one."""
    try:
        if kubeconfig is not None:
            return KubeConfig.from_file(kubeconfig)
        return KubeConfig.from_env()
    except (ConfigError, OSError) as exc:
        where = kubeconfig or "$KUBECONFIG, ~/.kube/config or the in-cluster service account"
        raise KubeUnavailable(f"no usable kubeconfig at {where}: {exc}") from exc


def client(config: KubeConfig) -> AsyncClient:
    # trust_env=False: proxy variables meant for people must not reroute the apiserver traffic.
    return AsyncClient(config, field_manager=FIELD_MANAGER, trust_env=False)


async def probe(kube: AsyncClient, config: KubeConfig) -> ClusterInfo:
    """Check that the apiserver answers and accepts our credentials."""
    server = config.get().cluster.server
    try:
        nodes = [node async for node in kube.list(Node)]
    except httpx2.TransportError as exc:
        raise KubeUnavailable(f"cannot reach Kubernetes at {server}: {exc}") from exc
    except ApiError as exc:
        raise KubeUnavailable(
            f"Kubernetes at {server} refused to list nodes ({exc.status.code}"
            f" {exc.status.reason}): {exc.status.message}"
        ) from exc
    return ClusterInfo(server=server, nodes=len(nodes))


async def ensure_namespace(
    kube: AsyncClient, name: str, labels: dict[str, str] | None = None
) -> None:
    """Create the namespace unless it exists. Read first: the service account that
    ``outpost-cloud rbac`` sets up may read its namespace but not create namespaces."""
    try:
        await kube.get(Namespace, name)
    except ApiError as exc:
        if exc.status.code != 404:
            raise
    else:
        return
    try:
        await kube.create(Namespace(metadata=ObjectMeta(name=name, labels=labels)))
    except ApiError as exc:
        if exc.status.code != 409:
            raise


async def delete_if(
    kube: AsyncClient,
    resource: type,
    name: str,
    *,
    namespace: str | None = None,
    uid: str,
    resource_version: str | None = None,
    grace_period: int | None = None,
) -> None:
    """Delete the object only if it is still the one meant (same uid, and same
    resourceVersion when given); else ApiError 409, or 404 if it is gone.

    lightkube's ``delete`` sends no body, and preconditions travel only in the body, so the
    request is built through lightkube's own request machinery with the body added.
    """
    generic = kube._client
    request = generic.prepare_request("delete", resource, name=name, namespace=namespace)
    preconditions = {"uid": uid}
    if resource_version is not None:
        preconditions["resourceVersion"] = resource_version
    options: dict[str, object] = {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "preconditions": preconditions,
    }
    if grace_period is not None:
        options["gracePeriodSeconds"] = grace_period
    request.data = options
    response = await generic.send(generic.build_adapter_request(request))
    generic.handle_response("delete", response, request)
