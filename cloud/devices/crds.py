"""Installing the device CRDs: create them when missing, replace them when ``crds.yaml``
changed, leave them alone otherwise, then wait until the apiserver serves them.

Each CRD carries the hash of its definition in an annotation, so a start that finds the same
definition writes nothing (many replicas starting at once do not fight), and an upgraded
``outpost-cloud`` brings its schema along. A CRD whose hash differs is replaced as a whole
(the definition in this package is the only source of truth for it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from importlib import resources
from typing import Any

import trio
import yaml
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition

log = logging.getLogger("cloud.devices")

HASH_ANNOTATION = "outpost.io/definition-hash"


def definitions() -> list[dict[str, Any]]:
    """The CRDs of ``crds.yaml``, each annotated with the hash of its definition."""
    text = resources.files("cloud.devices").joinpath("crds.yaml").read_text()
    crds = [doc for doc in yaml.safe_load_all(text) if doc]
    for crd in crds:
        digest = hashlib.sha256(json.dumps(crd, sort_keys=True).encode()).hexdigest()[:16]
        crd["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = digest
    return crds


def yaml_text() -> str:
    """The CRDs as YAML for ``kubectl apply -f -``, hashes included."""
    return yaml.safe_dump_all(definitions(), sort_keys=False)


async def install(kube: AsyncClient, *, timeout_s: float = 60.0) -> dict[str, str]:
    """Create or upgrade every CRD; returns name -> "created" | "upgraded" | "unchanged".
    Waits until each is Established (served), up to ``timeout_s`` in all."""
    outcome: dict[str, str] = {}
    for crd in definitions():
        name = crd["metadata"]["name"]
        outcome[name] = await _install_one(kube, crd)
    with trio.fail_after(timeout_s):
        for name in outcome:
            await _established(kube, name)
    return outcome


async def _install_one(kube: AsyncClient, crd: dict[str, Any]) -> str:
    name = crd["metadata"]["name"]
    want = crd["metadata"]["annotations"][HASH_ANNOTATION]
    for _ in range(5):  # 409: someone else (another replica) wrote it meanwhile; read again
        try:
            current = await kube.get(CustomResourceDefinition, name)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            try:
                await kube.create(CustomResourceDefinition.from_dict(copy.deepcopy(crd)))
            except ApiError as exc:
                if exc.status.code == 409:
                    continue
                raise
            log.info("CRD created", extra={"crd": name})
            return "created"
        have = (current.metadata.annotations or {}).get(HASH_ANNOTATION)
        if have == want:
            return "unchanged"
        body = copy.deepcopy(crd)
        body["metadata"]["resourceVersion"] = current.metadata.resourceVersion
        try:
            await kube.replace(CustomResourceDefinition.from_dict(body))
        except ApiError as exc:
            if exc.status.code == 409:
                continue
            raise
        log.info("CRD upgraded", extra={"crd": name, "from": have or "?", "to": want})
        return "upgraded"
    raise RuntimeError(f"CRD {name} kept changing while it was being installed")


async def _established(kube: AsyncClient, name: str) -> None:
    while True:
        crd = await kube.get(CustomResourceDefinition, name)
        conditions = (crd.status and crd.status.conditions) or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        await trio.sleep(0.2)
