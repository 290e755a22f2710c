"""The ``outpost-cloud`` command: serve edge gateways, issue their join tokens, print versions."""

from __future__ import annotations

import datetime as dt
import json
import logging
from importlib import resources
from pathlib import Path

import click
import httpx2
import trio
from lightkube.core.exceptions import ApiError

from cloud import defaults, installer, kube, pki, service
from cloud.devices import crds
from cloud.hub.ownership import sanitize_id
from cloud.hub.server import HubSettings
from cloud.mirror.controller import ControllerSettings
from edge import logs
from edge.cli_shared import (
    log_level_option,
    validate_cloud_url,
    validate_node_name,
    version_info,
)
from edge.mqtt import parse_broker_url
from edge.version import __version__

log = logging.getLogger("cloud")


def validate_replica_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if sanitize_id(value) != value:
        raise click.BadParameter(
            f"{value!r} is not a valid replica id: use lower-case letters, digits, '-' and '.',"
            " starting and ending with a letter or digit"
        )
    return value


def validate_mqtt_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return None
    try:
        parse_broker_url(value)
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (for example mqtt://127.0.0.1:1883)") from exc
    return value


def _host_port(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def validate_listen(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (for example 0.0.0.0:8443)")
    return host.strip("[]"), int(port)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@log_level_option
@click.version_option(__version__, "-V", "--version", prog_name="outpost-cloud")
def cli(log_level: str) -> None:
    """Outpost cloud service: holds the edge gateways' connections and mirrors their pods,
    devices and status to and from an unmodified Kubernetes API.
    """
    logs.configure(log_level)
    # The HTTP client logs every request at info, which would drown the service's own lines.
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger().level))


@cli.command()
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Kubeconfig to reach Kubernetes with (default: in-cluster, then $KUBECONFIG).",
)
@click.option(
    "--listen",
    default=_host_port(defaults.LISTEN),
    show_default=True,
    callback=validate_listen,
    envvar="OUTPOST_CLOUD_LISTEN",
    help="HOST:PORT on which edge gateways connect.",
)
@click.option(
    "--tls-san",
    multiple=True,
    envvar="OUTPOST_CLOUD_TLS_SANS",
    help="Extra DNS name or IP address for the serving certificate: the host gateways use in"
    " their cloud URL (repeatable; localhost, 127.0.0.1 and the host name are always in).",
)
@click.option(
    "--metrics-listen",
    default=_host_port(defaults.METRICS_LISTEN),
    show_default=True,
    callback=lambda ctx, param, value: value and validate_listen(ctx, param, value),
    envvar="OUTPOST_CLOUD_METRICS_LISTEN",
    help="HOST:PORT serving Prometheus metrics at /metrics; empty to turn off.",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(0.1, 300),
    default=defaults.HEARTBEAT_S,
    show_default=True,
    help="Seconds between heartbeats on an idle session; a node silent for three is offline.",
)
@click.option(
    "--max-handshakes",
    type=click.IntRange(1, 100_000),
    default=defaults.MAX_HANDSHAKES,
    show_default=True,
    help="Connections admitted at once; more are told to retry later (reconnect storms).",
)
@click.option(
    "--report-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append every upstream report to this JSON-lines file (audit and debugging).",
)
@click.option(
    "--lease-renew-interval",
    type=click.FloatRange(0.5, 60),
    default=defaults.LEASE_RENEW_INTERVAL_S,
    show_default=True,
    help="Seconds between renewals of a connected node's Lease in kube-node-lease; keep it"
    " well under the controller-manager's --node-monitor-grace-period.",
)
@click.option(
    "--event-qps",
    type=click.FloatRange(0.1, 1000),
    default=defaults.EVENT_QPS,
    show_default=True,
    help="Events each node may write per second; more are dropped (counted in the log).",
)
@click.option(
    "--event-burst",
    type=click.IntRange(1, 10_000),
    default=defaults.EVENT_BURST,
    show_default=True,
    help="Events a node may write at once after a quiet spell.",
)
@click.option(
    "--device-status-interval",
    type=click.FloatRange(0.1, 3600),
    default=defaults.DEVICE_STATUS_INTERVAL_S,
    show_default=True,
    help="Seconds between writes of one device's DeviceStatus; reports in between are"
    " coalesced (the latest is written).",
)
@click.option(
    "--device-status-qps",
    type=click.FloatRange(0.1, 10_000),
    default=defaults.DEVICE_STATUS_QPS,
    show_default=True,
    help="DeviceStatus writes per second for all devices together.",
)
@click.option(
    "--telemetry-mqtt",
    callback=validate_mqtt_url,
    envvar="OUTPOST_CLOUD_TELEMETRY_MQTT",
    help="mqtt://HOST:PORT to publish device telemetry to (topic"
    " outpost/telemetry/NODE/NAMESPACE/DEVICE); without it telemetry is counted and dropped.",
)
@click.option(
    "--replica-id",
    callback=lambda ctx, param, value: value and validate_replica_id(ctx, param, value),
    envvar="OUTPOST_CLOUD_REPLICA_ID",
    help="This replica's name in the Leases that share the nodes between replicas"
    " (default: HOSTNAME-PID).",
)
@click.option(
    "--advertise-url",
    callback=lambda ctx, param, value: value and validate_cloud_url(ctx, param, value),
    envvar="OUTPOST_CLOUD_ADVERTISE_URL",
    help="https:// URL at which edges reach this replica, given to edges redirected here by"
    " other replicas (default: https://LISTEN-HOST-OR-HOSTNAME:PORT).",
)
@click.option(
    "--releases",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OUTPOST_CLOUD_RELEASES",
    help="Folder of releases (VERSION/outpost-linux-ARCH) to serve the one-line installer from"
    " (https://HOST:PORT/install.sh on --installer-listen); without it there is no installer.",
)
@click.option(
    "--installer-listen",
    default=_host_port(defaults.INSTALLER_LISTEN),
    show_default=True,
    callback=validate_listen,
    envvar="OUTPOST_CLOUD_INSTALLER_LISTEN",
    help="HOST:PORT serving install.sh and the releases over HTTPS (with --releases).",
)
@click.option(
    "--release-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="OUTPOST_CLOUD_RELEASE_KEY",
    help="Ed25519 private key (PEM) signing the releases' SHA256SUMS (default: the Secret"
    " outpost-system/outpost-release-key, made on first start).",
)
def serve(
    kubeconfig: Path | None,
    listen: tuple[str, int],
    tls_san: tuple[str, ...],
    metrics_listen: tuple[str, int] | None,
    heartbeat: float,
    max_handshakes: int,
    report_log: Path | None,
    lease_renew_interval: float,
    event_qps: float,
    event_burst: int,
    device_status_interval: float,
    device_status_qps: float,
    telemetry_mqtt: str | None,
    replica_id: str | None,
    advertise_url: str | None,
    releases: Path | None,
    installer_listen: tuple[str, int],
    release_key: Path | None,
) -> None:
    """Serve edge gateways until SIGTERM or Ctrl-C.

    Connects to Kubernetes first and exits with one line if it cannot. Creates the cloud's CA
    (Secret outpost-system/outpost-ca) on first start. A joined gateway becomes a Node
    (label node-role.kubernetes.io/edge) whose Lease is renewed while it is connected; pods
    scheduled to it, and the ConfigMaps, Secrets and service-account tokens they use, are
    synced to it, and their status comes back. ConfigMaps labelled outpost.io/node=NODE are
    synced to that node too. Installs (or upgrades) the device CRDs first; each node gets the
    Devices bound to it and their DeviceModels, and its twin reports become DeviceStatus.
    """
    options = service.ServeOptions(
        kubeconfig=kubeconfig,
        listen=listen,
        metrics_listen=metrics_listen or None,
        tls_sans=list(tls_san),
        report_log=report_log,
        settings=HubSettings(heartbeat_s=heartbeat, max_handshakes=max_handshakes),
        controller=ControllerSettings(
            lease_renew_interval_s=lease_renew_interval,
            event_qps=event_qps,
            event_burst=event_burst,
            device_status_interval_s=device_status_interval,
            device_status_qps=device_status_qps,
            telemetry_mqtt=telemetry_mqtt,
        ),
        replica_id=replica_id,
        advertise_url=advertise_url,
        releases=releases,
        installer_listen=installer_listen,
        release_key=release_key,
    )
    try:
        trio.run(service.serve, options)
    except (kube.KubeUnavailable, installer.KeyUnusable) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen[0]}:{listen[1]}: {exc}") from exc


@cli.command()
def rbac() -> None:
    """Print the RBAC outpost-cloud needs, as YAML for `kubectl apply -f -`.

    A namespace outpost-system, a service account outpost-cloud in it, a ClusterRole limited
    to what the edge controller does (nodes, pods on edge nodes, the ConfigMaps, Secrets and
    tokens they use, events, node Leases, the device CRDs, Devices, DeviceModels and
    DeviceStatus) and a Role for its own state in outpost-system.
    """
    click.echo(resources.files("cloud").joinpath("rbac.yaml").read_text(), nl=False)


@cli.command("install-crds")
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Kubeconfig to reach Kubernetes with (default: in-cluster, then $KUBECONFIG).",
)
@click.option(
    "--print", "print_only", is_flag=True, help="Print the CRDs as YAML instead of installing."
)
def install_crds(kubeconfig: Path | None, print_only: bool) -> None:
    """Create or upgrade the Device, DeviceModel and DeviceStatus CRDs (devices.outpost.io).

    `serve` does this itself when it starts; this is for installing them ahead of it, or with
    other credentials. A CRD already as this version defines it is left alone.
    """
    if print_only:
        click.echo(crds.yaml_text(), nl=False)
        return
    try:
        outcome = trio.run(_install_crds, kubeconfig)
    except kube.KubeUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    for name, what in outcome.items():
        click.echo(f"{name} {what}")


async def _install_crds(kubeconfig: Path | None) -> dict[str, str]:
    config = kube.load_config(kubeconfig)
    client = kube.client(config)
    try:
        return await service.install_crds(client, config.get().cluster.server)
    finally:
        await client.close()


@cli.command("release-key")
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Kubeconfig to reach Kubernetes with (default: in-cluster, then $KUBECONFIG).",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Read the key from this PEM file (as given to serve --release-key), not the Secret.",
)
@click.option(
    "--generate",
    "generate",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a new private key to this file (mode 0600; never replaces one) for"
    " serve --release-key, and print its public key.",
)
def release_key(kubeconfig: Path | None, key_file: Path | None, generate: Path | None) -> None:
    """Print the public key that signs releases (PEM), as install.sh pins it.

    Reads the Secret outpost-system/outpost-release-key, creating it if there is none yet,
    unless --key or --generate is given.
    """
    try:
        if generate is not None:
            key = installer.ReleaseKey.generate()
            try:
                key.write(generate)
            except OSError as exc:
                raise click.ClickException(f"cannot write {generate}: {exc}") from exc
        elif key_file is not None:
            key = installer.ReleaseKey.from_file(key_file)
        else:
            key = trio.run(_release_key, kubeconfig)
    except (kube.KubeUnavailable, installer.KeyUnusable) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(key.public_pem.decode(), nl=False)


async def _release_key(kubeconfig: Path | None) -> installer.ReleaseKey:
    config = kube.load_config(kubeconfig)
    client = kube.client(config)
    server = config.get().cluster.server
    try:
        return await installer.signing.load_or_create(client)
    except httpx2.TransportError as exc:
        raise kube.KubeUnavailable(f"cannot reach Kubernetes at {server}: {exc}") from exc
    except ApiError as exc:
        raise kube.KubeUnavailable(
            f"Kubernetes at {server} refused ({exc.status.code} {exc.status.reason}):"
            f" {exc.status.message}"
        ) from exc
    finally:
        await client.close()


@cli.group()
def token() -> None:
    """Bootstrap tokens that let one gateway join as one named node."""


_TTL_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def validate_ttl(ctx: click.Context, param: click.Parameter, value: str) -> dt.timedelta:
    number, unit = value[:-1], value[-1:]
    if unit not in _TTL_UNITS or not number.isdigit() or int(number) == 0:
        raise click.BadParameter(
            f"{value!r} is not a duration: a positive whole number and s, m, h or d"
            " (for example 30m, 24h or 7d)"
        )
    return dt.timedelta(**{_TTL_UNITS[unit]: int(number)})


@token.command("create")
@click.argument("node", callback=validate_node_name)
@click.option(
    "--ttl",
    default=defaults.TOKEN_TTL,
    show_default=True,
    callback=validate_ttl,
    help="How long the token may be used: 30m, 24h, 7d, ...",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Kubeconfig to reach Kubernetes with (default: in-cluster, then $KUBECONFIG).",
)
def token_create(node: str, ttl: dt.timedelta, kubeconfig: Path | None) -> None:
    """Create a single-use join token bound to NODE, and print it.

    The gateway uses it once: `outpost join --cloud URL --token TOKEN --node-name NODE`.
    The cloud's CA is created in Kubernetes first if there is none yet.
    """
    try:
        text = trio.run(_token_create, kubeconfig, node, ttl)
    except (kube.KubeUnavailable, pki.CAUnusable, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(text)


async def _token_create(kubeconfig: Path | None, node: str, ttl: dt.timedelta) -> str:
    config = kube.load_config(kubeconfig)
    client = kube.client(config)
    server = config.get().cluster.server
    try:
        ca = await pki.load_or_create_ca(client)
        return await pki.create_token(client, ca, node, ttl)
    except httpx2.TransportError as exc:
        raise kube.KubeUnavailable(f"cannot reach Kubernetes at {server}: {exc}") from exc
    except ApiError as exc:
        raise kube.KubeUnavailable(
            f"Kubernetes at {server} refused ({exc.status.code} {exc.status.reason}):"
            f" {exc.status.message}"
        ) from exc
    finally:
        await client.close()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def version(as_json: bool) -> None:
    """Print the version."""
    info = version_info()
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
    else:
        click.echo(f"outpost-cloud {info['version']} (python {info['python']}, {info['platform']})")


def main() -> None:
    cli(prog_name="outpost-cloud")
