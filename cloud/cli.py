"""The ``outpost-cloud`` command: serve edge gateways, issue their join tokens, print versions."""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
from pathlib import Path

import click
import httpx2
import trio
from lightkube.core.exceptions import ApiError

from cloud import kube, pki
from edge import logs
from edge.cli import validate_node_name, version_info
from edge.version import __version__

log = logging.getLogger("cloud")


def validate_listen(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (for example 0.0.0.0:8443)")
    return host.strip("[]"), int(port)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="OUTPOST_LOG_LEVEL",
    help="Least severe log level written to stderr.",
)
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
    default="0.0.0.0:8443",
    show_default=True,
    callback=validate_listen,
    envvar="OUTPOST_CLOUD_LISTEN",
    help="HOST:PORT on which edge gateways connect.",
)
def serve(kubeconfig: Path | None, listen: tuple[str, int]) -> None:
    """Serve edge gateways until SIGTERM or Ctrl-C.

    Connects to Kubernetes first and exits with one line if it cannot.
    """
    try:
        trio.run(_serve, kubeconfig, listen)
    except kube.KubeUnavailable as exc:
        raise click.ClickException(str(exc)) from exc


async def _serve(kubeconfig: Path | None, listen: tuple[str, int]) -> None:
    # Listen for signals before anything else: a SIGTERM during start-up must stop us cleanly,
    # not kill us with the default handler.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        config = kube.load_config(kubeconfig)
        client = kube.client(config)
        try:
            info = await kube.probe(client, config)
            log.info("connected to Kubernetes", extra={"server": info.server, "nodes": info.nodes})
            log.warning(
                "edge hub not implemented yet: not accepting gateways",
                extra={"listen": f"{listen[0]}:{listen[1]}"},
            )
            async for signum in signals:
                log.info("stopping", extra={"signal": signal.Signals(signum).name})
                break
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
    default="24h",
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
