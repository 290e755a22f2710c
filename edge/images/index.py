"""The image index: which images the store holds, under which references, last used when.

One SQLite database (``<root>/index.db``, WAL, ``synchronous=FULL``) so that an index written
by the agent and by an ``outpost image`` command at the same time stays consistent, and so
that a power cut or kill -9 in the middle of a write leaves either the old or the new state.
The images' content (blobs, snapshots) is on disk beside it; a row only says what is needed.

Methods block on the disk; one lock serializes the store's threads on the connection.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import apsw

from edge.images.errors import ImageError
from edge.images.manifest import ImageConfig, image_config_from_json
from edge.images.platforms import Platform

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    reference TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    index_digest TEXT,
    platform TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    config TEXT NOT NULL,
    layers TEXT NOT NULL,
    size INTEGER NOT NULL,
    last_used REAL NOT NULL
);
PRAGMA user_version = 1;
"""


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer: the blob as stored (``digest``, compressed or not) and the digest of its
    uncompressed tar (``diff_id``), which names its snapshot."""

    digest: str
    diff_id: str
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class Image:
    """An image in the store.

    ``reference`` is canonical (``docker.io/library/busybox:latest``); ``digest`` is the
    digest of the platform's manifest (for a multi-platform image, ``index_digest`` is the
    index it was chosen from); ``config`` is what the pod runtime builds the process from.
    ``size`` counts the image's blobs as downloaded; ``last_used`` is a Unix time.
    """

    reference: str
    digest: str
    platform: Platform
    config: ImageConfig
    config_digest: str
    layers: tuple[Layer, ...]
    size: int
    last_used: float
    index_digest: str | None = None

    @property
    def blobs(self) -> set[str]:
        """Every blob the image needs kept: manifests, config and layers."""
        found = {self.digest, self.config_digest, *(layer.digest for layer in self.layers)}
        if self.index_digest:
            found.add(self.index_digest)
        return found


class ImageIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = apsw.Connection(str(path))
            self._db.setbusytimeout(5000)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            with self._db:
                self._db.execute(_SCHEMA)
        except apsw.Error as exc:
            raise ImageError(f"cannot open the image index {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def _run(self, what: str, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                with self._db:
                    return self._db.execute(sql, args).fetchall()
            except apsw.FullError as exc:
                raise OSError(errno.ENOSPC, f"the image index {self.path} is full: {what}") from exc
            except apsw.Error as exc:
                raise ImageError(f"image index {self.path}: {what}: {exc}") from exc

    def put(self, image: Image) -> None:
        layers = [[la.digest, la.diff_id, la.media_type, la.size] for la in image.layers]
        self._run(
            f"recording {image.reference}",
            "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                image.reference,
                image.digest,
                image.index_digest,
                json.dumps(
                    [image.platform.os, image.platform.architecture, image.platform.variant]
                ),
                image.config_digest,
                json.dumps(image.config.to_json()),
                json.dumps(layers),
                image.size,
                image.last_used,
            ),
        )

    def get(self, reference: str) -> Image | None:
        rows = self._run(
            f"reading {reference}", "SELECT * FROM images WHERE reference = ?", (reference,)
        )
        return _image(rows[0]) if rows else None

    def all(self) -> list[Image]:
        return [_image(row) for row in self._run("listing", "SELECT * FROM images ORDER BY 1")]

    def delete(self, reference: str) -> bool:
        return bool(
            self._run(
                f"removing {reference}",
                "DELETE FROM images WHERE reference = ? RETURNING reference",
                (reference,),
            )
        )

    def touch(self, reference: str, when: float | None = None) -> None:
        self._run(
            f"marking {reference} used",
            "UPDATE images SET last_used = ? WHERE reference = ?",
            (time.time() if when is None else when, reference),
        )


def _image(row: tuple) -> Image:
    reference, digest, index_digest, plat, config_digest, config, layers, size, last_used = row
    return Image(
        reference=reference,
        digest=digest,
        platform=Platform(*json.loads(plat)),
        config=image_config_from_json(json.loads(config)),
        config_digest=config_digest,
        layers=tuple(Layer(*layer) for layer in json.loads(layers)),
        size=size,
        last_used=last_used,
        index_digest=index_digest,
    )
