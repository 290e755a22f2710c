"""What the agent keeps in its data directory (``--data-dir``, default ``/var/lib/outpost``) by
name, for the agent and the CLI commands that read it without starting the agent: light to
import on purpose."""

from __future__ import annotations

from pathlib import Path

STORE_FILE = "store.db"
IMAGES_DIR = "images"
CLOUD_URL_FILE = "cloud-url"


def saved_cloud_urls(data_dir: Path) -> list[str]:
    """The cloud URLs saved at join, one a line: replicas of one cloud, tried in turn."""
    path = data_dir / CLOUD_URL_FILE
    return path.read_text().split() if path.exists() else []


def saved_cloud_url(data_dir: Path) -> str | None:
    return next(iter(saved_cloud_urls(data_dir)), None)


def save_cloud_url(data_dir: Path, url: str) -> None:
    (data_dir / CLOUD_URL_FILE).write_text(url + "\n")
