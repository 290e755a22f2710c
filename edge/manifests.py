"""The standalone manifest folder: one more writer into the store, as the hub is when joined.

``read_folder`` is the one reader of the folder's YAML and JSON files; ``desired_objects`` turns
what it read into the objects the store holds (``namespace/Kind/name`` -> ``(rv, body)``), with
``manifest_uid`` as the one rule that gives an object without a uid its identity.
``ManifestWriter`` reads the folder whenever the kernel says it changed (inotify), and every
``rescan_s`` besides, and when what it read changed it makes the store's objects match it in one
commit (``Store.replace_objects``). Pods and devices then run from the store through the same
code path as a joined gateway's: they follow the store's change feed.

What a user may rely on: files that cannot be read, and documents that are not Kubernetes
objects or of a kind that does not run standalone, are logged and skipped, never fatal; an
unreadable folder leaves what runs as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import trio
import yaml
from inotify_simple import INotify, flags

from edge.store.aio import AsyncStore
from edge.store.store import StoreError
from edge.wire.keys import DEVICE_KIND, DEVICE_MODEL_KIND

log = logging.getLogger("edge.manifests")

SUFFIXES = (".yaml", ".yml", ".json")
RESCAN_S = 60.0
"""How often the folder is read again without the kernel saying it changed: a safety net for
changes inotify does not report (a folder on a network file system, one replaced whole)."""
UNWATCHED_RESCAN_S = 3.0
"""How often a folder that cannot be watched (missing, say) is read again."""
SETTLE_S = 0.05
"""How long to let a burst of changes settle (an editor's save, a copy of many files) before
reading the folder, so that it is read once."""
# What changes a folder's manifests: files added, removed, renamed, written or chmod-ed, and
# the folder itself going away.
_WATCH = (
    flags.CREATE
    | flags.DELETE
    | flags.CLOSE_WRITE
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.ATTRIB
    | flags.DELETE_SELF
    | flags.MOVE_SELF
)

STANDALONE_KINDS = ("Pod", "ConfigMap", "Secret", DEVICE_KIND, DEVICE_MODEL_KIND)
# Kinds that run on a node, so get a uid and spec.nodeName.
_BOUND_KINDS = ("Pod", DEVICE_KIND)


def read_folder(folder: Path) -> list[dict[str, Any]]:
    """Every Kubernetes object in the folder's files, in file-name order."""
    documents: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*")):
        if path.suffix not in SUFFIXES or not path.is_file():
            continue
        try:
            loaded = [d for d in yaml.safe_load_all(path.read_text()) if d]
        except (OSError, yaml.YAMLError) as exc:
            log.warning("cannot read manifest", extra={"file": str(path), "error": str(exc)})
            continue
        for loaded_document in loaded:
            try:
                # As kubectl reads YAML: JSON values only, so a timestamp is a string and a
                # number used as a key is one too; an alias that refers to itself is refused.
                document = json.loads(json.dumps(loaded_document, default=str))
            except (TypeError, ValueError) as exc:
                log.warning("not a JSON object", extra={"file": str(path), "error": str(exc)})
                continue
            if not isinstance(document, dict) or not isinstance(document.get("kind"), str):
                log.warning("not a Kubernetes object", extra={"file": str(path)})
                continue
            if not isinstance(document.setdefault("metadata", {}), dict):
                log.warning("metadata is not a mapping", extra={"file": str(path)})
                continue
            documents.append(document)
    return documents


def manifest_uid(node: str, document: dict[str, Any]) -> str:
    """The uid of an object from the folder: kubelet's rule for static pods.

    Derived from the node, the namespace and the name, so that an unchanged object keeps its
    identity across agent restarts and upgrades (its containers are adopted, a device keeps its
    twin). A Pod's also covers its whole manifest, as kubelet's does: editing a pod's manifest
    replaces the pod, while a Device keeps its identity across edits of its desired values.
    ``document`` is as read, with its namespace set.
    """
    meta = document["metadata"]
    identity = f"{node}/{meta['namespace']}/{meta.get('name')}"
    if document["kind"] == "Pod":
        digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
        identity = f"{identity}/{digest}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, identity))


def desired_objects(documents: list[dict[str, Any]], node: str) -> dict[str, tuple[str, Any]]:
    """The store's objects for ``node`` from the folder's documents, by key; the rv of each is
    a digest of its content, so an unchanged object is not written again."""
    objects: dict[str, tuple[str, Any]] = {}
    for document in documents:
        kind = document["kind"]
        if kind not in STANDALONE_KINDS:
            log.warning(
                "only Pods, ConfigMaps, Secrets, Devices and DeviceModels run standalone",
                extra={"kind": kind},
            )
            continue
        meta = document["metadata"]
        namespace = meta.setdefault("namespace", "default")
        name = meta.get("name")
        if not _usable(name) or not _usable(namespace):
            log.warning(
                "an object without a usable name or namespace",
                extra={"kind": kind, "object": name, "namespace": namespace},
            )
            continue
        if kind in _BOUND_KINDS:
            spec = document.get("spec")
            if spec is None:
                spec = {}
            elif not isinstance(spec, dict):
                log.warning("spec is not a mapping", extra={"kind": kind, "object": name})
                continue
            if kind == DEVICE_KIND and spec.get("nodeName") not in (None, "", node):
                continue  # a Device for another gateway; a Pod in this folder runs here
            # A uid written in the file is not trusted (two files could claim one).
            meta["uid"] = manifest_uid(node, document)
            document["spec"] = spec
            spec["nodeName"] = node
        body = json.dumps(document, sort_keys=True)
        rv = hashlib.sha256(body.encode()).hexdigest()[:16]
        objects[f"{namespace}/{kind}/{name}"] = (rv, document)
    return objects


def _usable(name: object) -> bool:
    """A name or namespace that can stand in a store key ``namespace/Kind/name``."""
    return isinstance(name, str) and bool(name) and "/" not in name


class ManifestWriter:
    """Keeps the store's objects equal to the folder's (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        node: str,
        aio: AsyncStore,
        *,
        rescan_s: float = RESCAN_S,
        unwatched_rescan_s: float = UNWATCHED_RESCAN_S,
    ) -> None:
        self.folder = folder
        self.node = node
        self.aio = aio
        self.rescan_s = rescan_s
        self.unwatched_rescan_s = unwatched_rescan_s
        self._last: dict[str, tuple[str, Any]] | None = None
        self._watched = True

    async def sync(self) -> None:
        """Read the folder once and write what changed."""
        documents = await trio.to_thread.run_sync(read_folder, self.folder)
        objects = desired_objects(documents, self.node)
        if objects == self._last:
            return
        try:
            changed = await self.aio.run(self.aio.store.replace_objects, objects)
        except StoreError as exc:
            log.warning("cannot store the manifests", extra={"error": str(exc)})
            return
        self._last = objects
        if changed:
            log.info("manifests changed", extra={"objects": len(objects), "changed": len(changed)})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sync now (``task_status.started`` once the store holds the folder), then each time
        the folder changes, and every ``rescan_s`` besides."""
        with INotify(nonblocking=True) as inotify:
            watched = self._watch(inotify)
            await self.sync()
            task_status.started()
            while True:
                with trio.move_on_after(self.rescan_s if watched else self.unwatched_rescan_s):
                    await trio.lowlevel.wait_readable(inotify.fileno())
                    await trio.sleep(SETTLE_S)
                inotify.read(timeout=0)
                watched = self._watch(inotify)
                await self.sync()

    def _watch(self, inotify: INotify) -> bool:
        """Watch the folder (again: it may have been replaced); False when it cannot be."""
        try:
            inotify.add_watch(self.folder, _WATCH)
        except OSError as exc:
            if self._watched:
                log.warning(
                    "cannot watch the manifests folder; reading it every few seconds",
                    extra={"folder": str(self.folder), "error": str(exc)},
                )
            self._watched = False
        else:
            self._watched = True
        return self._watched
