"""Where the agent's desired pods come from: the store (what the cloud sent), or a folder of
manifests in standalone mode (static pods, no cloud at all)."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import trio
import yaml

from edge.pods.manager import Source
from edge.pods.runtime import Objects
from edge.store.aio import AsyncStore

log = logging.getLogger("edge.pods")


def store_pods(aio: AsyncStore, node: str) -> Source:
    """Pods in the store bound to ``node`` (or to no node), by uid."""

    async def source() -> dict[str, dict[str, Any]]:
        rows = await aio.run(aio.store.list, "Pod")
        pods = {}
        for _, _, pod in rows:
            if pod.get("spec", {}).get("nodeName") in (None, "", node):
                pods[pod["metadata"]["uid"]] = pod
        return pods

    return source


def store_objects(aio: AsyncStore) -> Objects:
    """ConfigMaps and Secrets from the store, for volumes and env."""

    async def objects(kind: str, namespace: str) -> dict[str, dict[str, Any]]:
        rows = await aio.run(aio.store.list, kind)
        prefix = f"{namespace}/{kind}/"
        return {key[len(prefix) :]: body for key, _, body in rows if key.startswith(prefix)}

    return objects


class ManifestFolder:
    """Static pods (and the ConfigMaps and Secrets they use) from YAML or JSON files.

    A pod's uid is derived from the node, its name and its manifest, as kubelet does for static
    pods: editing a manifest replaces the pod, and an unchanged one keeps its containers across
    agent restarts. Files that cannot be read are logged and skipped, never fatal.
    """

    def __init__(self, folder: Path, node: str) -> None:
        self.folder = folder
        self.node = node
        self.objects_by_kind: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}

    def _load(self) -> list[dict[str, Any]]:
        documents: list[dict[str, Any]] = []
        for path in sorted(self.folder.glob("*")):
            if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
                continue
            try:
                loaded = [d for d in yaml.safe_load_all(path.read_text()) if d]
            except (OSError, yaml.YAMLError) as exc:
                log.warning("cannot read manifest", extra={"file": str(path), "error": str(exc)})
                continue
            for document in loaded:
                if not isinstance(document, dict) or "kind" not in document:
                    log.warning("not a Kubernetes object", extra={"file": str(path)})
                    continue
                documents.append(document)
        return documents

    async def pods(self) -> dict[str, dict[str, Any]]:
        documents = await trio.to_thread.run_sync(self._load)
        pods: dict[str, dict[str, Any]] = {}
        objects: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        for document in documents:
            kind = document["kind"]
            meta = document.setdefault("metadata", {})
            meta.setdefault("namespace", "default")
            if kind in ("ConfigMap", "Secret"):
                objects.setdefault(kind, {}).setdefault(meta["namespace"], {})[
                    meta.get("name", "")
                ] = document
                continue
            if kind in ("Device", "DeviceModel"):
                continue  # edge.devices.manager.ManifestDevices runs those
            if kind != "Pod":
                log.warning(
                    "only Pods, ConfigMaps, Secrets and Devices run standalone",
                    extra={"kind": kind},
                )
                continue
            digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
            name = f"{self.node}/{meta['namespace']}/{meta.get('name')}/{digest}"
            meta["uid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, name))
            document.setdefault("spec", {})["nodeName"] = self.node
            pods[meta["uid"]] = document
        self.objects_by_kind = objects
        return pods

    async def objects(self, kind: str, namespace: str) -> dict[str, dict[str, Any]]:
        return self.objects_by_kind.get(kind, {}).get(namespace, {})
