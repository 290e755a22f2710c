"""``outpost device ls|get``: the devices on this gateway, their last values and their states.

Both read what the agent last saved in its store (each device's view, see
``edge.devices.manager``), so they work whether or not the agent runs; ``updated`` says how old
a view is. Expected failures (no store, an unknown device) print one line and exit 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from edge.cli_options import data_dir_option
from edge.datadir import STORE_FILE
from edge.devices.manager import load_views
from edge.store import Store, StoreError


def _views(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / STORE_FILE
    if not path.exists():
        raise click.ClickException(
            f"no store at {path}: the agent has not run with --data-dir {data_dir}"
        )
    try:
        with Store(path) as store:
            return load_views(store)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc


def _age(updated: float | None, now: float) -> str:
    if not updated:
        return "-"
    seconds = max(0, int(now - updated))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _value(prop: dict[str, Any]) -> str:
    value = prop.get("value")
    if value is None:
        return "-"
    unit = prop.get("unit") or ""
    return f"{value} {unit}".strip() if unit else value


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]).rstrip())


@click.group()
@data_dir_option("The agent's data folder, where its store is.")
@click.pass_context
def device(ctx: click.Context, data_dir: Path) -> None:
    """Show the devices on this gateway, their last values and their states."""
    ctx.obj = data_dir


@device.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def list_devices(ctx: click.Context, as_json: bool) -> None:
    """List the devices: state, protocol, last values, and what is wrong, if anything."""
    views = _views(ctx.obj)
    if as_json:
        click.echo(json.dumps(views, sort_keys=True))
        return
    if not views:
        click.echo("no devices")
        return
    now = time.time()
    rows: list[tuple[str, ...]] = [
        ("NAMESPACE", "NAME", "STATE", "PROTOCOL", "UPDATED", "VALUES", "REASON")
    ]
    for view in views:
        values = ", ".join(f"{p['name']}={_value(p)}" for p in view.get("properties", []))
        reasons = view.get("reasons") or []
        reason = ""
        if reasons:
            first = reasons[0]
            where = f"{first['property']}: " if first.get("property") else ""
            reason = f"{where}{first['reason']}" + (
                f" (+{len(reasons) - 1})" if len(reasons) > 1 else ""
            )
        rows.append(
            (
                view["namespace"],
                view["name"],
                view["state"],
                view.get("protocol") or "-",
                _age(view.get("updated"), now),
                values or "-",
                reason,
            )
        )
    _table(rows)


@device.command("get")
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def get_device(ctx: click.Context, name: str, namespace: str, as_json: bool) -> None:
    """Show one device: every property's last value, desired and observed values, and reasons."""
    views = _views(ctx.obj)
    view = next((v for v in views if (v["namespace"], v["name"]) == (namespace, name)), None)
    if view is None:
        known = ", ".join(f"{v['namespace']}/{v['name']}" for v in views) or "none"
        raise click.ClickException(
            f"no device {namespace}/{name} on this gateway (devices: {known})"
        )
    if as_json:
        click.echo(json.dumps(view, sort_keys=True))
        return
    now = time.time()
    click.echo(f"device:    {view['namespace']}/{view['name']} (uid {view.get('uid') or '-'})")
    click.echo(f"model:     {view.get('model') or '-'}   protocol: {view.get('protocol') or '-'}")
    online = view.get("lastOnlineTime") or "never"
    click.echo(f"state:     {view['state']} (last online {online})")
    click.echo(f"updated:   {_age(view.get('updated'), now)} ago")
    properties = view.get("properties") or []
    if properties:
        click.echo("")
        rows: list[tuple[str, ...]] = [
            ("PROPERTY", "TYPE", "ACCESS", "VALUE", "READ", "DESIRED", "OBSERVED", "CLOUD")
        ]
        for p in properties:
            read = _age(p["timestamp"] / 1000, now) if p.get("timestamp") else "-"
            rows.append(
                (
                    p["name"],
                    p.get("type", ""),
                    p.get("accessMode", ""),
                    _value(p),
                    read,
                    p.get("desired") or "-",
                    p.get("observedDesired") or "-",
                    "yes" if p.get("reportToCloud", True) else "no",
                )
            )
        _table(rows)
    reasons = view.get("reasons") or []
    if reasons:
        click.echo("")
        click.echo("reasons:")
        for r in reasons:
            where = r["property"] or "(device)"
            click.echo(f"  {where}: {r['reason']}: {r['message']}")
