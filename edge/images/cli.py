"""``outpost image``: list, pull, import and remove the images on this gateway.

The commands work on the agent's image store (``<data-dir>/images``) directly, whether or not
the agent runs: the store is safe to share between processes. ``import`` is how images reach
sites without a registry: ``docker save`` and OCI-archive tarballs, carried on a USB stick.

Expected failures (an unknown image, a registry that does not answer, a corrupt archive, a
full disk) print one line and exit 1.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import trio

from edge.cli_options import data_dir_option
from edge.datadir import IMAGES_DIR
from edge.images.auth import Credentials
from edge.images.errors import ImageError
from edge.images.index import Image
from edge.images.platforms import Platform
from edge.images.reference import Reference
from edge.images.store import ImageStore

# The same default as the agent's other commands (edge.cli), which import this module.


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def _store(ctx: click.Context, plain_http: Collection[str] = ()) -> Iterator[ImageStore]:
    root: Path = ctx.obj
    try:
        store = ImageStore(root, plain_http=plain_http)
    except ImageError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield store
    except ImageError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()


@click.group()
@data_dir_option("The agent's data folder; images are kept in its images/ folder.")
@click.pass_context
def image(ctx: click.Context, data_dir: Path) -> None:
    """List, pull, import and remove the images on this gateway."""
    ctx.obj = data_dir / IMAGES_DIR


def _row(img: Image) -> dict[str, Any]:
    return {
        "reference": img.reference,
        "digest": img.digest,
        "platform": str(img.platform),
        "size": img.size,
        "last_used": img.last_used,
    }


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def list_images(ctx: click.Context, as_json: bool) -> None:
    """List the images, by reference."""
    with _store(ctx) as store:
        images = store.list()
    if as_json:
        click.echo(json.dumps([_row(i) for i in images], sort_keys=True))
        return
    rows = [("REFERENCE", "DIGEST", "PLATFORM", "SIZE", "LAST USED")]
    for img in images:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(img.last_used))
        short = img.digest.removeprefix("sha256:")[:12]
        rows.append((img.reference, short, str(img.platform), _size(img.size), used))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + row[4])


class _ProgressBar:
    """A progress bar for a pull, shown once the pull knows how much it will download."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.shown = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stdout)
        self.bar.update(done - self.shown)
        self.shown = done

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()


def _platform(ctx: click.Context, param: click.Parameter, value: str | None) -> Platform | None:
    if value is None:
        return None
    try:
        return Platform.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@image.command()
@click.argument("reference")
@click.option(
    "--platform",
    callback=_platform,
    help="os/architecture[/variant] to pull, like linux/arm/v7 (default: this machine's).",
)
@click.option("--username", "-u", envvar="OUTPOST_REGISTRY_USERNAME", help="Registry user.")
@click.option(
    "--password",
    envvar="OUTPOST_REGISTRY_PASSWORD",
    help="Registry password or token (better in OUTPOST_REGISTRY_PASSWORD than on the line).",
)
@click.option(
    "--plain-http", is_flag=True, help="Reach the registry over HTTP (loopback always is)."
)
@click.pass_context
def pull(
    ctx: click.Context,
    reference: str,
    platform: Platform | None,
    username: str | None,
    password: str | None,
    plain_http: bool,
) -> None:
    """Pull REFERENCE from its registry."""
    if (username is None) != (password is None):
        raise click.UsageError("--username and --password go together")
    credentials = None
    if username is not None and password is not None:
        credentials = Credentials(username, password)
    try:
        host = Reference.parse(reference).api_host
    except ImageError as exc:
        raise click.BadParameter(str(exc), param_hint="REFERENCE") from exc
    # A bar only on a terminal: in logs and pipes it would be noise.
    bar = _ProgressBar(reference) if sys.stdout.isatty() else None
    with _store(ctx, {host} if plain_http else ()) as store:
        pull_image = functools.partial(
            store.pull, reference, platform=platform, credentials=credentials, progress=bar
        )
        try:
            pulled = trio.run(pull_image)
        finally:
            if bar is not None:
                bar.finish()
    click.echo(f"pulled {pulled.reference} ({pulled.platform}) {pulled.digest}")


@image.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def import_(ctx: click.Context, files: tuple[Path, ...]) -> None:
    """Import the images in FILES: `docker save` or OCI-archive tarballs (gzipped too)."""
    with _store(ctx) as store:
        for path in files:
            for img in trio.run(store.import_archive, path):
                click.echo(f"imported {img.reference} ({img.platform}) {img.digest}")


@image.command("rm")
@click.argument("references", nargs=-1, required=True)
@click.pass_context
def remove(ctx: click.Context, references: tuple[str, ...]) -> None:
    """Remove images, and the content no other image uses.

    Images that a running container uses keep their files until the container is gone.
    """
    with _store(ctx) as store:
        for reference in references:
            store.remove(reference)
            click.echo(f"removed {reference}")
