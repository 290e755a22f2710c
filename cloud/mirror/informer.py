"""List, then watch, one kind of Kubernetes object, handing each change on as a plain dict.

After the first list ``ready`` is set. A watch resumes from the last resourceVersion it
processed; on 410 Gone (the apiserver no longer has that history) it lists again and hands on
the difference, deletions included. ``rv`` is the last resourceVersion processed, as an
integer, for the hub's resume watermark.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx2
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.core.selector import build_selector

from cloud.hub.streams import rv_number

log = logging.getLogger("cloud.mirror")

Handler = Callable[[dict[str, Any]], None]
LIST_PAGE = 500


class WatchError(Exception):
    """An error the apiserver sent inside a watch stream (410 Gone above all)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Informer:
    def __init__(
        self,
        kube: AsyncClient,
        resource: type,
        *,
        put: Handler,
        delete: Handler,
        namespaced: bool = True,
        labels: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
        retry_s: float = 1.0,
    ) -> None:
        self.kube = kube
        self.resource = resource
        self.put = put
        self.delete = delete
        self.scope: dict[str, Any] = {"namespace": "*"} if namespaced else {}
        if labels:
            self.scope["labels"] = labels
        if fields:
            self.scope["fields"] = fields
        self.retry_s = retry_s
        self.ready = trio.Event()
        self.rv = 0
        self.relists = 0
        self._rv_text: str | None = None
        # uid -> the identity of the last version handed on (enough to hand on its deletion)
        self._known: dict[str, dict[str, Any]] = {}

    @property
    def kind(self) -> str:
        return self.resource.__name__

    def _advance(self, rv: str | None) -> None:
        if not rv:
            return
        self._rv_text = rv
        number = rv_number(rv)
        if number is not None:
            self.rv = max(self.rv, number)

    def _request(self, watch: bool, params: dict[str, Any]) -> Any:
        # lightkube decodes into its models, which cannot express a watch bookmark (a Pod with
        # only a resourceVersion fails to decode) and cost a copy per object; the requests are
        # built through lightkube (auth, TLS, URLs) and the JSON is read as it comes.
        generic = self.kube._client
        if "labels" in self.scope:
            params["labelSelector"] = build_selector(self.scope["labels"])
        if "fields" in self.scope:
            params["fieldSelector"] = build_selector(self.scope["fields"], for_fields=True)
        request = generic.prepare_request(
            "list",
            res=self.resource,
            namespace=self.scope.get("namespace"),
            watch=watch,
            params={k: v for k, v in params.items() if v is not None},
        )
        if watch:
            request.timeout = generic._watch_timeout
        return generic, generic.build_adapter_request(request)

    async def _list(self) -> None:
        seen: dict[str, dict[str, Any]] = {}
        token: str | None = None
        while True:
            generic, request = self._request(False, {"limit": LIST_PAGE, "continue": token})
            response = await generic.send(request)
            generic.raise_for_status(response)
            page = json.loads(response.content)
            for obj in page.get("items") or ():
                seen[obj["metadata"]["uid"]] = obj
            token = page["metadata"].get("continue")
            if not token:
                break
        for uid in set(self._known) - set(seen):
            self.delete(self._known.pop(uid))
        for uid, obj in seen.items():
            known = self._known.get(uid)
            if known is None or known["metadata"]["resourceVersion"] != _rv(obj):
                self._known[uid] = _stub(obj)
                self.put(obj)
        self._advance(page["metadata"].get("resourceVersion"))
        self.relists += 1

    async def _watch(self) -> None:
        """Watch from the last resourceVersion until the apiserver ends the request. Bookmarks
        (about once a minute) move ``rv`` on while this kind is quiet, so that a kind that
        rarely changes does not hold every node's resume watermark back."""
        generic, request = self._request(
            True, {"resourceVersion": self._rv_text, "allowWatchBookmarks": "true"}
        )
        response = await generic.send(request, stream=True)
        try:
            if response.status_code >= 400:
                await response.aread()
                generic.raise_for_status(response)
            async for line in response.aiter_lines():
                if line:
                    self._event(json.loads(line))
        finally:
            await response.aclose()

    def _event(self, event: dict[str, Any]) -> None:
        change, obj = event.get("type"), event.get("object") or {}
        if change == "ERROR":
            raise WatchError(int(obj.get("code") or 0), str(obj.get("message", "")))
        if change == "BOOKMARK":
            self._advance(obj["metadata"].get("resourceVersion"))
            return
        uid = obj["metadata"]["uid"]
        if change == "DELETED":
            self._known.pop(uid, None)
            self.delete(obj)
        else:
            self._known[uid] = _stub(obj)
            self.put(obj)
        self._advance(_rv(obj))

    async def run(self) -> None:
        """List, then watch forever; failures are logged and retried."""
        while True:
            try:
                if self._rv_text is None:
                    await self._list()
                    if not self.ready.is_set():
                        self.ready.set()
                        log.info(
                            "informer synced",
                            extra={"kind": self.kind, "objects": len(self._known)},
                        )
                await self._watch()
            except WatchError as exc:
                if exc.code == 410:
                    log.info("watch expired, listing again", extra={"kind": self.kind})
                    self._rv_text = None
                    continue
                log.warning(
                    "watch failed", extra={"kind": self.kind, "code": exc.code, "error": str(exc)}
                )
                await trio.sleep(self.retry_s)
            except ApiError as exc:
                if exc.status.code == 410:
                    log.info("watch expired, listing again", extra={"kind": self.kind})
                    self._rv_text = None
                    continue
                log.warning(
                    "watch failed",
                    extra={"kind": self.kind, "code": exc.status.code, "error": str(exc)},
                )
                await trio.sleep(self.retry_s)
            except httpx2.TransportError as exc:
                log.warning("Kubernetes unreachable", extra={"kind": self.kind, "error": str(exc)})
                await trio.sleep(self.retry_s)


def _rv(obj: dict[str, Any]) -> str:
    return obj["metadata"].get("resourceVersion", "")


def _stub(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta["uid"],
            "resourceVersion": _rv(obj),
        }
    }
