"""What the two command lines, ``outpost`` (``edge.cli``) and ``outpost-cloud``
(``cloud.cli``), share: the rules for a node name and a cloud URL, the version report and the
log-level option.

Light on purpose: ``outpost version`` imports it, and must not load the agent.
"""

from __future__ import annotations

import platform
import re
import sys
from urllib.parse import urlsplit

import click

from edge.version import __version__

# Kubernetes node names are DNS-1123 subdomains.
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def version_info() -> dict[str, str]:
    """What ``version`` reports on either side; also sent to the cloud as the node's agent
    version."""
    return {
        "version": __version__,
        "python": platform.python_version(),
        "platform": f"{sys.platform}/{platform.machine()}",
    }


def validate_node_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > 253 or not _NODE_NAME.fullmatch(value):
        raise click.BadParameter(
            f"{value!r} is not a valid node name: use lower-case letters, digits, '-' and '.',"
            " starting and ending with a letter or digit, at most 253 characters"
        )
    return value


def validate_cloud_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise click.BadParameter(f"{value!r} is not an https:// URL of an outpost-cloud")
    return value


log_level_option = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="OUTPOST_LOG_LEVEL",
    help="Least severe log level written to stderr.",
)
"""Both commands' ``--log-level``: the same levels, default and environment variable."""
