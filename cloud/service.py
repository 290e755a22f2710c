"""``outpost-cloud serve``: Kubernetes, the CA, the hub, the object source and the metrics
endpoint, wired into one trio program that runs until SIGTERM."""

from __future__ import annotations

import logging
import signal
import socket
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import httpx2
import trio
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError

from cloud import bootstrap, defaults, installer, kube, pki
from cloud.devices import crds
from cloud.hub.metrics import HubMetrics, serve_metrics
from cloud.hub.ownership import Ownership, default_replica_id
from cloud.hub.reports import Fanout, ReportLog, ReportSink
from cloud.hub.server import Hub, HubSettings, tune_gc
from cloud.hub.streams import NodeStreams
from cloud.hub.tls import server_context
from cloud.hub.watermarks import WatermarkStore
from cloud.mirror import controller_metrics as controller_metrics
from cloud.mirror.controller import ControllerSettings, EdgeController
from edge.identity import CA_PATH, JOIN_PATH

log = logging.getLogger("cloud")


@dataclass
class ServeOptions:
    kubeconfig: Path | None
    listen: tuple[str, int]
    metrics_listen: tuple[str, int] | None
    tls_sans: list[str] = field(default_factory=list)
    report_log: Path | None = None
    settings: HubSettings = field(default_factory=HubSettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    # Several replicas share the nodes (cloud.hub.ownership); each needs its own id, and the
    # URL by which edges redirected to it reach it.
    replica_id: str | None = None
    advertise_url: str | None = None
    # The one-line installer (cloud.installer): on only with a release folder.
    releases: Path | None = None
    installer_listen: tuple[str, int] = defaults.INSTALLER_LISTEN
    release_key: Path | None = None


def default_advertise_url(listen: tuple[str, int]) -> str:
    host, port = listen
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"


def default_sans(listen_host: str) -> list[str]:
    names = ["localhost", "127.0.0.1", socket.gethostname()]
    if listen_host not in ("0.0.0.0", "::", ""):
        names.append(listen_host)
    return names


async def install_crds(client: AsyncClient, server: str) -> dict[str, str]:
    """Create or upgrade the device CRDs; KubeUnavailable (one readable line) if refused."""
    try:
        outcome = await crds.install(client)
    except ApiError as exc:
        raise kube.KubeUnavailable(
            f"Kubernetes at {server} refused to install the device CRDs ({exc.status.code}"
            f" {exc.status.reason}): {exc.status.message}"
        ) from exc
    except httpx2.TransportError as exc:
        raise kube.KubeUnavailable(f"cannot reach Kubernetes at {server}: {exc}") from exc
    except trio.TooSlowError as exc:
        raise kube.KubeUnavailable("the device CRDs were not established within 60 s") from exc
    log.info("device CRDs installed", extra=outcome)
    return outcome


async def serve(options: ServeOptions) -> None:
    # Signals first: a SIGTERM during start-up must stop us cleanly, not kill us half-started.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        config = kube.load_config(options.kubeconfig)
        client = kube.client(config)
        report_log: ReportLog | None = None
        try:
            info = await kube.probe(client, config)
            log.info("connected to Kubernetes", extra={"server": info.server, "nodes": info.nodes})
            ca = await pki.load_or_create_ca(client)
            await install_crds(client, config.get().cluster.server)
            sans = sorted({*default_sans(options.listen[0]), *options.tls_sans})
            cert_pem, key_pem = ca.issue_server_cert(sans)
            watermarks = WatermarkStore(client)
            loaded = await watermarks.load()
            streams = NodeStreams()
            # The CRDs are installed above: the controller need not again.
            controller = EdgeController(
                client, streams, replace(options.controller, install_crds=False)
            )
            sink: ReportSink = controller.reports
            if options.report_log is not None:
                report_log = ReportLog(options.report_log)
                sink = Fanout(controller.reports, report_log)
            metrics = HubMetrics()
            controller_metrics.register(metrics.registry, controller)
            hub = Hub(
                replace(options.settings, host=options.listen[0], port=options.listen[1]),
                server_context(cert_pem, key_pem, ca.cert_pem),
                streams=streams,
                source=controller.source,
                sink=sink,
                watermarks=watermarks,
                metrics=metrics,
                lifecycle=controller.nodes,
                ownership=partial(
                    Ownership,
                    client,
                    options.replica_id or default_replica_id(),
                    options.advertise_url or default_advertise_url(options.listen),
                ),
                routes={
                    CA_PATH: partial(bootstrap.serve_ca, ca=ca),
                    JOIN_PATH: partial(bootstrap.serve_join, kube=client, ca=ca),
                },
            )
            assert hub.ownership is not None
            log.info(
                "hub state loaded",
                extra={
                    "watermarks": len(loaded),
                    "ca_hash": ca.ca_hash,
                    "tls_sans": ",".join(sans),
                },
            )
            install = None
            if options.releases is not None:
                install = await installer.prepare(
                    client,
                    options.releases,
                    options.release_key,
                    tls=(ca.cert_pem, cert_pem, key_pem),
                    hub_port=options.listen[1],
                    advertise_url=options.advertise_url,
                )
            tune_gc()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(controller.run)
                await nursery.start(hub.ownership.run)
                await nursery.start(hub.run)
                if options.metrics_listen is not None:
                    port = await nursery.start(serve_metrics, metrics, *options.metrics_listen)
                    log.info("metrics listening", extra={"port": port})
                if install is not None:
                    await nursery.start(install.serve, *options.installer_listen)
                async for signum in signals:
                    log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    nursery.cancel_scope.cancel()
                    break
        finally:
            if report_log is not None:
                report_log.close()
            await client.close()
