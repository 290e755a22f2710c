"""The image store: pulls and imports images, unpacks them into snapshots for containers, and
keeps the disk they take within a budget.

On disk, under ``root``:

- ``blobs/sha256/<hex>``: manifests, configs and layers as downloaded, by digest
  (``edge.images.blobs``); ``ingest/``: downloads in progress, kept for resuming.
- ``snapshots/<hex>``: each layer unpacked on its own, named by its diff-id (the digest of the
  uncompressed layer, which does not depend on the layers below, so one directory serves every
  image that has the layer); read-only lower directories of containers' overlays
  (``edge.images.layers``, ``edge.images.mount``).
- ``index.db``: which image each reference names (``edge.images.index``).
- ``lock``: pulls, imports and unpacking hold it shared; deleting unreferenced content needs it
  exclusively, and is put off when it cannot have it, so nothing is deleted that a pull in
  another process (an ``outpost image`` command beside the agent) has stored but not yet
  recorded.

What callers may rely on: an image that ``get`` returns has all its blobs verified and on disk;
a snapshot that exists is complete; a failed pull or import records nothing and leaves no
corrupt content (a partial download stays in ``ingest/`` to be resumed, unless it was the one
that failed its digest check or filled the disk). ``get``, ``list``, ``remove`` and ``gc`` block
on the disk: trio code calls them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from edge.images import archive, layers, manifest
from edge.images.auth import Credentials
from edge.images.blobs import BlobStore
from edge.images.digest import digest_hex
from edge.images.errors import (
    DigestMismatchError,
    ImageError,
    InvalidReferenceError,
    ManifestError,
    NoSuchImageError,
    PullError,
    UnsupportedImageError,
)
from edge.images.files import disk_full, fsync_dir, is_disk_full, syncfs
from edge.images.index import Image, ImageIndex, Layer
from edge.images.manifest import Index, Manifest, ParsedConfig
from edge.images.mount import mounted_lowerdirs
from edge.images.platforms import Platform, compatible, host_platform
from edge.images.policy import DEFAULT_RETRY, RetryPolicy
from edge.images.reference import Reference, normalize

if TYPE_CHECKING:
    from edge.images.registry import RegistryClient

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 2 * 1024**3
"""Disk the store may use for images before ``gc`` removes unused ones."""

# A partial download is worth keeping while the pod that wants the image keeps retrying; one
# nobody has touched for a day is abandoned.
_KEEP_PARTIAL_S = 24 * 3600

Progress = Callable[[int, int], None]
"""Called with ``(bytes done, bytes in total)`` as a pull makes progress."""


@dataclass(frozen=True, slots=True)
class GcResult:
    """What ``gc`` did. ``swept`` is False when a pull or unpacking was in progress, so that
    unreferenced content stays until the next run."""

    removed_images: tuple[str, ...]
    removed_blobs: int
    removed_snapshots: int
    freed_bytes: int
    used_bytes: int
    swept: bool


class _Tracker:
    def __init__(self, callback: Progress | None) -> None:
        self.callback = callback
        self.done = 0
        self.total = 0

    def advance(self, delta: int) -> None:
        self.done += delta
        if self.callback is not None:
            self.callback(self.done, self.total)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class ImageStore:
    """Images under ``root``, using at most ``budget_bytes`` of disk once ``gc`` has run.

    ``platform`` is the node's (default: this machine's); ``plain_http`` lists registry
    hosts to reach over HTTP (loopback registries always are); ``ssl_context`` verifies HTTPS
    registries (default: the system's trust store); ``retry`` bounds the retries against a
    registry that does not answer.
    """

    def __init__(
        self,
        root: Path,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        *,
        platform: Platform | None = None,
        plain_http: Collection[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        concurrent_downloads: int = 3,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must not be negative, got {budget_bytes}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.root = root.resolve()
            self._blobs = BlobStore(self.root)
            self._snapshots = self.root / "snapshots"
            self._snapshots.mkdir(exist_ok=True)
        except OSError as exc:
            raise ImageError(f"cannot use {root} for images: {exc.strerror}") from exc
        self._index = ImageIndex(self.root / "index.db")
        self._lock_path = self.root / "lock"
        self.budget_bytes = budget_bytes
        self.platform = platform or host_platform()
        self._plain_http = frozenset(plain_http)
        self._ssl_context = ssl_context
        self._retry = retry
        self._concurrent_downloads = concurrent_downloads
        # One task at a time per blob digest or diff-id; the others wait, then find it done.
        self._busy: dict[str, trio.Event] = {}

    def close(self) -> None:
        self._index.close()

    # -- reading the index ---------------------------------------------------------------------

    def get(self, ref: str) -> Image | None:
        """The image stored under ``ref`` (any form of it: ``busybox`` finds
        ``docker.io/library/busybox:latest``), or None."""
        return self._index.get(normalize(ref))

    def list(self) -> list[Image]:
        """Every image, by reference."""
        return self._index.all()

    def remove(self, ref: str) -> None:
        """Forget the image under ``ref`` and delete the content no other image uses (unless a
        pull is in progress; ``gc`` deletes it later then). Snapshots that a mounted container
        uses stay until it is gone."""
        reference = normalize(ref)
        try:
            if not self._index.delete(reference):
                raise NoSuchImageError(f"there is no image {reference} in {self.root}")
            self._sweep()
        except OSError as exc:
            raise self._failure(f"removing {reference}", exc) from exc

    # -- locks ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _content_in_use(self) -> AsyncIterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Blocks only while another process deletes unreferenced content: briefly.
            await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _content_unused(self) -> Iterator[bool]:
        """True if no pull, import or unpacking is in progress anywhere, and none can start
        until the block ends."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                acquired = True
            except BlockingIOError:
                acquired = False
            yield acquired
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str) -> AsyncIterator[None]:
        while (event := self._busy.get(key)) is not None:
            await event.wait()
        event = self._busy[key] = trio.Event()
        try:
            yield
        finally:
            del self._busy[key]
            event.set()

    def _failure(self, what: str, exc: OSError) -> ImageError:
        if is_disk_full(exc):
            return disk_full(self.root, what, exc)
        return ImageError(f"{self.root}: {what}: {exc}")

    # -- pulling -------------------------------------------------------------------------------

    async def pull(
        self,
        ref: str,
        *,
        platform: Platform | str | None = None,
        credentials: Credentials | None = None,
        progress: Progress | None = None,
    ) -> Image:
        """Pull ``ref`` for ``platform`` (default: the node's) and record it.

        Blobs already stored are not downloaded again; an interrupted download resumes.
        Raises ``PullError`` (``RegistryUnavailableError`` after bounded retries,
        ``AuthenticationError``, ``ImageNotFoundError``, ``UnsupportedImageError``,
        ``ManifestError``), ``DigestMismatchError`` or ``StorageFullError``.
        """
        reference = Reference.parse(ref)
        wanted = Platform.parse(platform) if isinstance(platform, str) else platform
        tracker = _Tracker(progress)
        # Imported on the first pull: a gateway whose images are all in place never loads the
        # HTTP stack (some 100 modules, several MiB of the agent's memory).
        from edge.images.registry import RegistryClient

        try:
            async with (
                self._content_in_use(),
                RegistryClient(
                    reference,
                    credentials=credentials,
                    plain_http=self._plain_http,
                    ssl_context=self._ssl_context,
                    retry=self._retry,
                ) as client,
            ):
                image = await self._pull(client, reference, wanted or self.platform, tracker)
        except OSError as exc:
            raise self._failure(f"pulling {reference}", exc) from exc
        log.info("image pulled", extra={"image": image.reference, "digest": image.digest})
        return image

    async def _pull(
        self, client: RegistryClient, reference: Reference, wanted: Platform, tracker: _Tracker
    ) -> Image:
        body, content_type, digest = await client.get_manifest(reference.target)
        parsed = manifest.parse(body, content_type, what=f"{reference}: {digest}")
        documents = {digest: body}
        index_digest = None
        if isinstance(parsed, Index):
            index_digest = digest
            try:
                chosen = parsed.choose(wanted)
            except UnsupportedImageError as exc:
                raise UnsupportedImageError(f"{reference}: {exc}") from exc
            body, content_type, digest = await client.get_manifest(chosen.digest, chosen.size)
            what = f"{reference}: {digest}"
            parsed = manifest.parse(body, content_type or chosen.media_type, what=what)
            if isinstance(parsed, Index):
                raise UnsupportedImageError(f"{what} is an index inside an index")
            documents[digest] = body
        tracker.total = parsed.config.size + sum(layer.size for layer in parsed.layers)
        config_path = await self._download(client, parsed.config, tracker)
        config_bytes = await trio.to_thread.run_sync(config_path.read_bytes)
        config = manifest.parse_config(config_bytes, what=f"{reference}: config")
        self._check_config(reference, parsed, config, wanted)

        failures: list[Exception] = []

        async def download(layer: manifest.Descriptor, limiter: trio.CapacityLimiter) -> None:
            try:
                async with limiter:
                    await self._download(client, layer, tracker)
            except Exception as exc:
                # The first failure is the one to report; the other downloads stop.
                failures.append(exc)
                nursery.cancel_scope.cancel()

        limiter = trio.CapacityLimiter(self._concurrent_downloads)
        async with trio.open_nursery() as nursery:
            for layer in parsed.layers:
                nursery.start_soon(download, layer, limiter)
        if failures:
            raise failures[0]
        for document_digest, document in documents.items():
            await trio.to_thread.run_sync(self._blobs.write, document_digest, document)
        image = self._image(str(reference), digest, index_digest, parsed, config)
        await trio.to_thread.run_sync(self._index.put, image)
        return image

    def _check_config(
        self, reference: object, parsed: Manifest, config: ParsedConfig, wanted: Platform
    ) -> None:
        if len(config.diff_ids) != len(parsed.layers):
            raise ManifestError(
                f"{reference}: the manifest has {len(parsed.layers)} layers, the config"
                f" {len(config.diff_ids)} diff_ids"
            )
        if config.platform not in compatible(wanted):
            raise UnsupportedImageError(
                f"{reference} is built for {config.platform}, which does not run on {wanted}"
            )

    async def _download(
        self, client: RegistryClient, descriptor: manifest.Descriptor, tracker: _Tracker
    ) -> Path:
        path = self._blobs.path(descriptor.digest)
        async with self._exclusive(descriptor.digest):
            if await trio.to_thread.run_sync(path.is_file):
                tracker.advance(descriptor.size)
                return path
            partial_path = self._blobs.ingest_path(descriptor.digest)
            async with await trio.open_file(partial_path, "a+b") as partial:
                try:
                    fcntl.flock(partial.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise PullError(
                        f"another process is downloading {descriptor.digest} into"
                        f" {partial_path}; try again when it has finished"
                    ) from None
                try:
                    await client.fetch_blob(descriptor, partial, tracker.advance)
                    await trio.to_thread.run_sync(
                        self._blobs.commit, descriptor.digest, partial.wrapped, partial_path
                    )
                except BaseException as exc:
                    # Content that failed its check is not kept, a full disk is relieved, and
                    # an attempt that received nothing leaves nothing; any other partial
                    # download stays for the next pull to resume. (Quick system calls: this
                    # may run while cancelled.)
                    if (
                        isinstance(exc, DigestMismatchError)
                        or is_disk_full(exc)
                        or os.fstat(partial.fileno()).st_size == 0
                    ):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(partial_path)
                    raise
        return path

    def _image(
        self,
        reference: str,
        digest: str,
        index_digest: str | None,
        parsed: Manifest,
        config: ParsedConfig,
    ) -> Image:
        return Image(
            reference=reference,
            digest=digest,
            platform=config.platform,
            config=config.config,
            config_digest=parsed.config.digest,
            layers=tuple(
                Layer(d.digest, diff_id, d.media_type, d.size)
                for d, diff_id in zip(parsed.layers, config.diff_ids, strict=True)
            ),
            size=parsed.config.size + sum(d.size for d in parsed.layers),
            last_used=time.time(),
            index_digest=index_digest,
        )

    # -- importing -----------------------------------------------------------------------------

    async def import_archive(self, path: Path) -> list[Image]:
        """Import every image of a ``docker save`` or OCI archive (``edge.images.archive``),
        under each name the archive gives it. Raises ``ArchiveError``,
        ``UnsupportedImageError`` (built for another platform), ``DigestMismatchError`` or
        ``StorageFullError``; then nothing is recorded."""
        try:
            async with self._content_in_use():
                found = await trio.to_thread.run_sync(
                    archive.read_archive, Path(path), self._blobs, self.platform
                )
                images = []
                for item in found:
                    self._check_config(
                        item.references[0], item.manifest, item.config, self.platform
                    )
                    images += [
                        self._image(ref, item.digest, item.index_digest, item.manifest, item.config)
                        for ref in item.references
                    ]
                for image in images:
                    await trio.to_thread.run_sync(self._index.put, image)
        except OSError as exc:
            raise self._failure(f"importing {path}", exc) from exc
        return images

    # -- snapshots -----------------------------------------------------------------------------

    def _snapshot_path(self, diff_id: str) -> Path:
        return self._snapshots / digest_hex(diff_id)

    async def snapshots(self, image: Image) -> list[Path]:
        """The snapshot directories of ``image``'s layers, bottom first: the lower directories
        of a container's overlay (``edge.images.mount.mount_rootfs``). Layers are unpacked the
        first time an image needs them. Marks the image used, for ``gc``."""
        paths = []
        try:
            async with self._content_in_use():
                for layer in image.layers:
                    path = self._snapshot_path(layer.diff_id)
                    async with self._exclusive(layer.diff_id):
                        if not await trio.to_thread.run_sync(path.is_dir):
                            await trio.to_thread.run_sync(self._unpack, image, layer, path)
                    paths.append(path)
                await trio.to_thread.run_sync(self._index.touch, image.reference)
        except OSError as exc:
            raise self._failure(f"unpacking {image.reference}", exc) from exc
        return paths

    def _unpack(self, image: Image, layer: Layer, path: Path) -> None:
        blob = self._blobs.path(layer.digest)
        if not blob.is_file():
            raise NoSuchImageError(
                f"layer {layer.digest} of {image.reference} is no longer in {self.root}: the image"
                " was removed; pull it again"
            )
        tmp = self._snapshots / f".tmp-{path.name}-{secrets.token_hex(4)}"
        try:
            layers.unpack(blob, layer.diff_id, tmp)
            syncfs(tmp)
            try:
                os.rename(tmp, path)
            except OSError as exc:
                # Another process unpacked the same layer first; its copy is as good.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            fsync_dir(self._snapshots)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # -- garbage collection --------------------------------------------------------------------

    def gc(self, in_use: Collection[str]) -> GcResult:
        """Keep the store within ``budget_bytes``: remove the images nobody uses (``in_use``
        holds the references or manifest digests that pods use), least recently used first,
        until what the remaining images take fits; then delete every blob and snapshot no
        image refers to."""
        try:
            return self._gc(in_use)
        except OSError as exc:
            raise self._failure("collecting garbage", exc) from exc

    def _gc(self, in_use: Collection[str]) -> GcResult:
        keep = set()
        for item in in_use:
            keep.add(item)
            with contextlib.suppress(InvalidReferenceError):
                keep.add(normalize(item))
        images = self._index.all()
        blob_sizes = self._blobs.digests()
        snapshot_sizes = {
            f"sha256:{entry.name}": _tree_size(Path(entry.path))
            for entry in os.scandir(self._snapshots)
            if not entry.name.startswith(".")
        }

        def used(kept: list[Image]) -> int:
            blobs = set().union(*(i.blobs for i in kept))
            diff_ids = {layer.diff_id for i in kept for layer in i.layers}
            return sum(blob_sizes.get(b, 0) for b in blobs) + sum(
                snapshot_sizes.get(d, 0) for d in diff_ids
            )

        remaining = list(images)
        removed = []
        unused = [i for i in images if i.reference not in keep and i.digest not in keep]
        for image in sorted(unused, key=lambda i: i.last_used):
            if used(remaining) <= self.budget_bytes:
                break
            self._index.delete(image.reference)
            remaining.remove(image)
            removed.append(image.reference)
            log.info(
                "image removed to stay within the disk budget", extra={"image": image.reference}
            )
        swept = self._sweep()
        return GcResult(
            removed_images=tuple(removed),
            removed_blobs=swept[0] if swept else 0,
            removed_snapshots=swept[1] if swept else 0,
            freed_bytes=swept[2] if swept else 0,
            used_bytes=used(remaining),
            swept=swept is not None,
        )

    def _sweep(self) -> tuple[int, int, int] | None:
        """Delete unreferenced blobs and snapshots and abandoned downloads: ``(blobs,
        snapshots, bytes)``, or None when content is in use and nothing was deleted."""
        with self._content_unused() as unused:
            if not unused:
                return None
            images = self._index.all()
            wanted_blobs = set().union(*(i.blobs for i in images))
            wanted_snapshots = {digest_hex(layer.diff_id) for i in images for layer in i.layers}
            mounted = mounted_lowerdirs()
            blobs = snapshots = freed = 0
            for digest, size in self._blobs.digests().items():
                if digest not in wanted_blobs:
                    self._blobs.delete(digest)
                    blobs += 1
                    freed += size
            for entry in os.scandir(self._snapshots):
                path = Path(entry.path)
                if entry.name in wanted_snapshots or path in mounted:
                    continue
                freed += _tree_size(path)
                shutil.rmtree(path)
                snapshots += 1
            stale = time.time() - _KEEP_PARTIAL_S
            for entry in self._blobs.ingest_entries():
                # Under the exclusive lock nobody writes here: temporary files are leftovers of
                # a crash, and partial downloads are kept a while for resuming.
                if entry.name.endswith(".tmp") or entry.stat().st_mtime < stale:
                    freed += entry.stat().st_size
                    self._blobs.clear_ingest(entry)
            if blobs or snapshots:
                fsync_dir(self._blobs.dir)
                fsync_dir(self._snapshots)
            return blobs, snapshots, freed
