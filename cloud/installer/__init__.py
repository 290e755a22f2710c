"""The one-line installer: ``curl -sfL https://CLOUD:8444/install.sh | sh -s - --token T``.

``outpost-cloud serve --releases DIR`` serves, over HTTPS on ``--installer-listen`` (a listener
of its own, with the hub's serving certificate):

- ``/install.sh``: ``install.sh`` in this package, with the release-signing public key, the
  cloud's CA, the download URL, the hub URL and the default version written into it;
- ``/releases/<version>/outpost-linux-<arch>`` (amd64, arm64, arm), ``outpost.service``;
- ``/releases/<version>/SHA256SUMS`` over those files, and ``SHA256SUMS.sig``, its raw
  Ed25519 signature (``openssl pkeyutl -verify -rawin`` checks it).

The release folder (``releases.py`` documents it) holds one folder per version. The signing key
(``signing.py``) is the Secret ``outpost-system/outpost-release-key``, made on first start, or a
PEM file given by ``--release-key``.
"""

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio
from lightkube import AsyncClient

from cloud.installer import signing
from cloud.installer.releases import Releases
from cloud.installer.server import InstallerApp, serve_installer, tls_context
from cloud.installer.signing import KeyUnusable, ReleaseKey

__all__ = ["Installer", "KeyUnusable", "ReleaseKey", "prepare"]

log = logging.getLogger("cloud.installer")


@dataclass
class Installer:
    app: InstallerApp
    context: ssl.SSLContext

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the bound port."""
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_installer, self.app, self.context, host, port)
            releases = self.app.releases
            log.info(
                "installer listening",
                extra={
                    "port": bound,
                    "releases": str(releases.root),
                    "default_version": releases.default_version() or "-",
                },
            )
            task_status.started(bound)


async def prepare(
    kube: AsyncClient,
    releases: Path,
    key_file: Path | None,
    *,
    tls: tuple[bytes, bytes, bytes],
    hub_port: int,
    advertise_url: str | None = None,
) -> Installer:
    """The installer, its key loaded (from ``key_file``, else the Secret, made if missing).

    Raises KeyUnusable if the key cannot be used, before anything listens.
    """
    if key_file is not None:
        key = ReleaseKey.from_file(key_file)
    else:
        key = await signing.load_or_create(kube)
    ca_pem, cert_pem, key_pem = tls
    if not await trio.Path(releases).is_dir():
        log.warning("the release folder does not exist (yet)", extra={"releases": str(releases)})
    app = InstallerApp(
        Releases(releases, key), ca_pem=ca_pem, hub_port=hub_port, advertise_url=advertise_url
    )
    return Installer(app, tls_context(cert_pem, key_pem, ca_pem))
