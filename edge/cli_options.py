"""Options several `outpost` commands share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edge import defaults


def data_dir_option(help_text: str = "The agent's data folder.") -> Callable[[Any], Any]:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=defaults.DATA_DIR,
        show_default=True,
        envvar="OUTPOST_DATA_DIR",
        help=help_text,
    )
