"""The ``outpost`` command: run the edge agent, join a cloud, inspect the agent, print versions.

Expected failures (a bad flag, an invalid name, a part not built yet) print one line and exit
non-zero; only a bug prints a traceback.
"""

from __future__ import annotations

import importlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import click

from edge import defaults, logs
from edge.cli_options import data_dir_option
from edge.cli_shared import (
    log_level_option,
    validate_cloud_url,
    validate_node_name,
    version_info,
)
from edge.version import __version__, build_info
from edge.wire.keys import split_key

# The agent, images and devices are imported by the commands that use them, not here: the native
# binary's `outpost version` would otherwise load some 900 modules to print one line.


class NotImplementedYet(click.ClickException):
    """A command whose structure is final but whose behaviour is not built yet."""

    exit_code = 3

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not implemented yet in outpost {__version__}")


class LazyGroup(click.Group):
    """A group whose subgroups are imported only when one of them is run or listed."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy  # command name -> "module:attribute"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attribute = self.lazy[cmd_name].split(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy={"image": "edge.images.cli:image", "device": "edge.devices.cli:device"},
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@log_level_option
@click.version_option(__version__, "-V", "--version", prog_name="outpost")
def cli(log_level: str) -> None:
    """Outpost edge agent: runs pods on runc, talks to field devices, and keeps working while
    the cloud is away.

    A gateway joins an outpost-cloud once (`outpost join`) and then runs the agent as a service
    (`outpost run`, started by systemd).
    """
    logs.configure(log_level)


@cli.command()
@data_dir_option("Folder for the store, images, pod state and logs.")
@click.option(
    "--standalone",
    is_flag=True,
    help="Run without a cloud: pods come from --manifests instead.",
)
@click.option(
    "--manifests",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="OUTPOST_MANIFESTS",
    help="Folder of manifests (YAML) run in standalone mode: Pods with their ConfigMaps and"
    " Secrets, and Devices with their DeviceModels. Watched: changes take effect at once.",
)
@click.option(
    "--cloud",
    multiple=True,
    callback=lambda ctx, param, value: tuple(validate_cloud_url(ctx, param, v) for v in value),
    envvar="OUTPOST_URL",
    help="https:// URL of the outpost-cloud (default: the one given to `outpost join`);"
    " repeat it for several replicas of the cloud, tried in turn.",
)
@click.option(
    "--runc-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=defaults.RUNC_ROOT,
    show_default=True,
    envvar="OUTPOST_RUNC_ROOT",
    help="runc's state folder for Outpost's containers (on tmpfs: a reboot clears it).",
)
@click.option(
    "--pod-subnet",
    default=defaults.POD_SUBNET,
    show_default=True,
    envvar="OUTPOST_POD_SUBNET",
    help="Addresses for pods that do not use the host network.",
)
@click.option(
    "--eventbus",
    default=defaults.EVENTBUS,
    show_default=True,
    envvar="OUTPOST_EVENTBUS",
    help="mqtt:// URL of the local broker where device twins are published on KubeEdge's"
    " $hw/events/... topics (for mapper-style apps); empty to turn it off.",
)
@click.option(
    "--outbox-budget",
    type=click.IntRange(1, 1 << 20),
    default=defaults.OUTBOX_BUDGET >> 20,
    show_default=True,
    envvar="OUTPOST_OUTBOX_BUDGET",
    help="MiB of reports kept for the cloud while it is away; over it, device telemetry history"
    " goes first, and the latest status of every pod and device is always kept.",
)
def run(
    data_dir: Path,
    standalone: bool,
    manifests: Path | None,
    cloud: tuple[str, ...],
    runc_root: Path,
    pod_subnet: str,
    eventbus: str,
    outbox_budget: int,
) -> None:
    """Run the agent in the foreground.

    It runs until SIGTERM or Ctrl-C, and keeps running while the cloud is unreachable,
    reconnecting with backoff. Stopping or restarting the agent never stops the pods it runs:
    they are adopted again on the next start. After a reboot every pod in the store is started
    again, without the cloud.
    """
    import trio

    from edge import agent
    from edge.store import StoreError

    if manifests is not None and not standalone:
        raise click.UsageError("--manifests applies only with --standalone")
    if standalone and manifests is None:
        raise click.UsageError("--standalone needs --manifests DIR: the pods to run")
    options = agent.RunOptions(
        data_dir=data_dir,
        cloud_urls=cloud,
        manifests=manifests,
        runc_root=runc_root,
        pod_subnet=pod_subnet,
        eventbus=eventbus or None,
        outbox_budget=outbox_budget << 20,
    )
    try:
        trio.run(agent.run, options)
    except (agent.AgentError, StoreError) as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.option(
    "--cloud",
    required=True,
    callback=validate_cloud_url,
    envvar="OUTPOST_URL",
    help="https:// URL of the outpost-cloud to join.",
)
@click.option(
    "--token",
    required=True,
    envvar="OUTPOST_TOKEN",
    help="Bootstrap token from `outpost-cloud token create NODE`.",
)
@click.option(
    "--node-name",
    callback=validate_node_name,
    envvar="OUTPOST_NODE_NAME",
    help="Name of this node in Kubernetes (default: the host name, lower-cased).",
)
@data_dir_option(
    "Folder for the store, images, pod state and logs; the identity goes in identity/."
)
def join(cloud: str, token: str, node_name: str | None, data_dir: Path) -> None:
    """Join this gateway to an outpost-cloud.

    Trades the bootstrap token for a node certificate bound to the node name. The private key
    is made here and never leaves this gateway.
    """
    import trio

    from edge import datadir, identity

    node = node_name or _host_node_name()
    try:
        saved = trio.run(identity.join, cloud, token, node, data_dir)
        datadir.save_cloud_url(data_dir, cloud)
    except identity.IdentityError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot save the cloud URL in {data_dir}: {exc}") from exc
    click.echo(f"joined {cloud} as node {saved.node}; identity saved in {saved.key_path.parent}")


def _host_node_name() -> str:
    name = socket.gethostname().lower()
    try:
        validate_node_name(None, None, name)
    except click.BadParameter as exc:
        raise click.UsageError(f"the host name: {exc.message}; pass --node-name") from exc
    return name


@cli.command()
@data_dir_option()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(data_dir: Path, as_json: bool) -> None:
    """Show the node, its cloud link as the agent last recorded it, and the store's contents.

    Reads the agent's store, so it works whether or not the agent is running.
    """
    from edge.status import StatusError, read_status
    from edge.store import StoreError

    try:
        info = read_status(data_dir)
    except (StatusError, StoreError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    link = info["link"]
    since = (
        f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(link['since']))} "
        if link["since"]
        else ""
    )
    objects = ", ".join(f"{n} {kind}" for kind, n in sorted(info["objects"].items())) or "none"
    dropped = ", ".join(f"{n} {op}" for op, n in sorted(info["dropped"].items()) if n) or "none"
    click.echo(f"node:      {info['node'] or '(not joined)'}")
    click.echo(f"cloud:     {info['cloud'] or '(none)'}")
    click.echo(f"link:      {'online' if link['online'] else 'offline'} {since}({link['reason']})")
    click.echo(f"objects:   {objects} (applied up to message {info['hwm']})")
    click.echo(f"pods:      {len(info['pods']) or 'none'}")
    for key, pod in sorted(info["pods"].items()):
        namespace, _, name = split_key(key)
        click.echo(
            f"  {namespace}/{name}  {pod['phase']}  ready {pod['ready']}/{pod['containers']}"
            f"  restarts {pod['restarts']}"
        )
    click.echo(
        f"outbox:    {info['outbox']['entries']} reports, {info['outbox']['bytes']} bytes;"
        f" dropped for lack of space: {dropped}"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def version(as_json: bool) -> None:
    """Print the version and build information."""
    info = {**build_info(), **version_info()}
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    click.echo(f"outpost {info['version']} (python {info['python']}, {info['platform']})")
    if info["build"] == "development":
        click.echo("build:    development (not a built binary)")
    else:
        click.echo(f"commit:   {info['commit']}")
        click.echo(f"built:    {info['build_date']} with {info['builder']}")


@cli.command("logs")
@click.argument("pod")
@click.option("-c", "--container", help="The container (needed when the pod has several).")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@data_dir_option()
def logs_command(
    pod: str, container: str | None, namespace: str, follow: bool, data_dir: Path
) -> None:
    """Print a container's output, from the log files the agent keeps (with or without it
    running), including its rotated files."""
    import trio

    from edge.pods import logs as pod_logs

    try:
        folder = pod_logs.container_log_dir(data_dir, namespace, pod, container)
        path = pod_logs.current_log(folder)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from exc
    for file in pod_logs.log_files(path):
        _print_messages(file.read_bytes())
    if follow:
        try:
            trio.run(_follow, folder, path)
        except KeyboardInterrupt:
            return


def _print_messages(data: bytes) -> None:
    from edge.pods import logs as pod_logs

    for entry in pod_logs.messages(data):
        stream = sys.stderr.buffer if entry.stream == "stderr" else sys.stdout.buffer
        stream.write(entry.content + b"\n")
        stream.flush()


async def _follow(folder: Path, path: Path) -> None:
    """Print what is appended, across rotations and container restarts."""
    import trio

    offset = path.stat().st_size  # noqa: ASYNC240 - one stat before the loop
    pending = b""
    while True:
        await trio.sleep(0.25)
        path, offset, chunk = await trio.to_thread.run_sync(_poll, folder, path, offset)
        data = pending + chunk
        complete = data.rfind(b"\n") + 1
        pending = data[complete:]
        _print_messages(data[:complete])


def _poll(folder: Path, path: Path, offset: int) -> tuple[Path, int, bytes]:
    """What was appended to the latest log since ``offset``."""
    from edge.pods import logs as pod_logs

    latest = pod_logs.current_log(folder)
    if latest != path:  # the container restarted: its new run has a new file
        path, offset = latest, 0
    size = path.stat().st_size if path.exists() else 0
    if size < offset:  # rotated: the file started again
        offset = 0
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read(size - offset)
    return path, size, chunk


def main() -> None:
    cli(prog_name="outpost")
