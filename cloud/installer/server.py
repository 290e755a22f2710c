"""Serving the installer: plain HTTPS GETs on a listener of its own.

The hub's port speaks WebSocket only (every request there is a WebSocket handshake), so the
installer gets its own hypercorn listener, as the metrics do, with the hub's serving certificate.
``install.sh`` is rendered per request: the host the gateway used becomes the download URL and,
unless ``--advertise-url`` says otherwise, the host of the hub URL it joins.
"""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from cloud.hub.tls import server_context
from cloud.installer.releases import SIG_NAME, SUMS_NAME, Releases

log = logging.getLogger("cloud.installer")

SCRIPT_PATH = "/install.sh"
RELEASES_PREFIX = "/releases/"
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_BINARY = b"application/octet-stream"
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


def template() -> str:
    return resources.files("cloud.installer").joinpath("install.sh").read_text()


def render(*, base_url: str, cloud_url: str, version: str, public_pem: bytes, ca_pem: bytes) -> str:
    """install.sh with its pinned values written in (each between single quotes there)."""
    values = {
        "BASE_URL": base_url,
        "CLOUD_URL": cloud_url,
        "DEFAULT_VERSION": version,
        "RELEASE_PUBKEY": public_pem.decode("ascii").strip(),
        "CLOUD_CA": ca_pem.decode("ascii").strip(),
    }
    for name, value in values.items():
        if "'" in value or "\\" in value:
            raise ValueError(f"{name} cannot be put in the script: {value!r}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template())


def split_host(host: str) -> str:
    """The host part of a Host header (``[::1]:8444`` → ``[::1]``)."""
    if host.startswith("["):
        return host[: host.index("]") + 1]
    return host.rsplit(":", 1)[0]


@dataclass
class InstallerApp:
    """The ASGI application."""

    releases: Releases
    ca_pem: bytes
    hub_port: int
    advertise_url: str | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        head = scope["method"] == "HEAD"
        if scope["method"] not in ("GET", "HEAD"):
            await _reply(send, 405, b"only GET and HEAD\n", head=False)
            return
        path: str = scope["path"]
        if path == SCRIPT_PATH:
            await self._script(scope, send, head)
        elif path.startswith(RELEASES_PREFIX):
            await self._release_file(path[len(RELEASES_PREFIX) :], send, head)
        else:
            await _reply(send, 404, b"unknown path: try /install.sh\n", head=head)

    async def _script(self, scope: dict[str, Any], send: Any, head: bool) -> None:
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not _HOST.fullmatch(host):
            await _reply(send, 400, b"a Host header naming this cloud is needed\n", head=head)
            return
        version = await trio.to_thread.run_sync(self.releases.default_version)
        if version is None:
            await _reply(
                send,
                503,
                f"no release to install: the release folder {self.releases.root} has no"
                " <version>/outpost-linux-<arch>\n".encode(),
                head=head,
            )
            return
        text = render(
            base_url=f"https://{host}",
            cloud_url=self.advertise_url or f"https://{split_host(host)}:{self.hub_port}",
            version=version,
            public_pem=self.releases.key.public_pem,
            ca_pem=self.ca_pem,
        )
        await _reply(send, 200, text.encode(), head=head, content_type=b"text/x-shellscript")

    async def _release_file(self, rest: str, send: Any, head: bool) -> None:
        version, _, name = rest.partition("/")
        signed = await trio.to_thread.run_sync(self.releases.signed, version)
        if signed is None:
            await _reply(send, 404, f"no release {version!r}\n".encode(), head=head)
            return
        if name == SUMS_NAME:
            await _reply(send, 200, signed.sums, head=head)
        elif name == SIG_NAME:
            await _reply(send, 200, signed.signature, head=head, content_type=_BINARY)
        elif name in signed.files:
            await _send_file(send, signed.files[name], head)
        else:
            await _reply(send, 404, f"release {version} has no {name!r}\n".encode(), head=head)


async def _reply(
    send: Any, status: int, body: bytes, *, head: bool, content_type: bytes = b"text/plain"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _send_file(send: Any, path: Path, head: bool) -> None:
    async with await trio.open_file(path, "rb") as src:
        size = (await trio.Path(path).stat()).st_size
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", _BINARY),
                    (b"content-length", str(size).encode()),
                ],
            }
        )
        if head:
            await send({"type": "http.response.body", "body": b""})
            return
        while chunk := await src.read(1 << 16):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


class _TLSConfig(Config):
    """hypercorn's Config reads its certificate from files; this one takes a ready context."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._context = context

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self._context


def tls_context(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    context = server_context(cert_pem, key_pem, ca_pem)
    context.verify_mode = ssl.CERT_NONE  # anyone may download the installer
    context.set_alpn_protocols(["http/1.1"])
    return context


async def serve_installer(
    app: InstallerApp,
    context: ssl.SSLContext,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the installer over HTTPS until cancelled; reports the bound port."""
    config = _TLSConfig(context)
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
