"""Pulling, importing, unpacking, mounting and collecting images against a real registry
(Debian's docker-registry on loopback), as root, with real overlay mounts.

Faults come from ``tests.registry.FaultyProxy``, a relay between the store and the registry
that cuts or corrupts blob downloads and records the requests it saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from edge.images import (
    AuthenticationError,
    Credentials,
    DigestMismatchError,
    ImageNotFoundError,
    ImageStore,
    Platform,
    RegistryUnavailableError,
    RetryPolicy,
    StorageFullError,
    UnsupportedImageError,
    mount_rootfs,
)
from edge.images.cli import image as image_cli
from edge.images.layers import OPAQUE_XATTR
from edge.mounts import unmount
from tests.processes import REPO
from tests.registry import (
    BuiltImage,
    Dir,
    Fault,
    FaultyProxy,
    File,
    Registry,
    TokenIssuer,
    TokenServer,
    build_image,
    build_index,
    busybox_tar,
    docker_save,
    make_tar,
    oci_archive,
)

AMD64 = Platform.parse("linux/amd64")
BUSYBOX_SIZE = os.stat("/bin/busybox").st_size
# Quick retries: the tests are about what happens, not how long the waits are.
FAST = RetryPolicy(attempts=3, initial_s=0.01, max_s=0.05, timeout_s=5)

BASE = build_image()
ARM64 = build_image(architecture="arm64")
DOCKER = build_image(docker=True, config={"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "echo hi"]})
ZSTD = build_image(compression="zstd")
# A second layer that deletes a file and makes a directory opaque.
LOWER = make_tar([Dir("etc"), File("etc/motd", b"hello"), Dir("data"), File("data/old", b"1")])
UPPER = make_tar(
    [Dir("etc"), File("etc/.wh.motd"), Dir("data"), File("data/.wh..wh..opq"), File("data/new")]
)
WHITEOUT = build_image([busybox_tar(), LOWER, UPPER])


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as reg:
        reg.push("test/busybox", "1.0", BASE)
        reg.push("test/docker", "1.0", DOCKER)
        reg.push("test/zstd", "1.0", ZSTD)
        reg.push("test/whiteout", "1.0", WHITEOUT)
        reg.push_index("test/multi", "1.0", [BASE, ARM64], build_index([BASE, ARM64]))
        docker_list = build_index([BASE, ARM64], docker=True)
        reg.push_index("test/multi-docker", "1.0", [BASE, ARM64], docker_list)
        yield reg


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ImageStore]:
    images = ImageStore(tmp_path / "images", platform=AMD64, retry=FAST)
    yield images
    images.close()


def _ingest(store: ImageStore) -> list[str]:
    return sorted(os.listdir(store.root / "ingest"))


async def test_pull_unpack_and_mount(registry: Registry, store: ImageStore, tmp_path: Path) -> None:
    ref = f"{registry.host}/test/whiteout:1.0"
    image = await store.pull(ref)
    assert image.reference == ref
    assert image.digest == WHITEOUT.manifest.digest
    assert image.platform == AMD64
    assert image.config.cmd == ("sh",)
    assert image.config.env == ("PATH=/bin",)
    assert store.get(ref) == image
    assert [i.reference for i in store.list()] == [ref]

    lowers = await store.snapshots(image)
    assert [p.name for p in lowers] == [layer.diff_id[7:] for layer in image.layers]
    assert os.getxattr(lowers[2] / "data", OPAQUE_XATTR) == b"y"

    container = tmp_path / "container"
    upper, work, rootfs = container / "upper", container / "work", container / "rootfs"
    for d in (upper, work, rootfs):
        d.mkdir(parents=True)
    await trio.to_thread.run_sync(mount_rootfs, lowers, upper, work, rootfs)
    try:
        assert os.access(rootfs / "bin/busybox", os.X_OK)
        assert os.readlink(rootfs / "bin/sh") == "busybox"
        assert not (rootfs / "etc/motd").exists()
        assert (rootfs / "etc/passwd").exists()
        assert sorted(os.listdir(rootfs / "data")) == ["new"]
        # The container writes to its upper directory; the shared snapshots stay as they are.
        (rootfs / "etc/passwd").write_text("changed\n")
        assert (upper / "etc/passwd").read_text() == "changed\n"
        assert (lowers[0] / "etc/passwd").read_text().startswith("root:")
        result = await trio.run_process(
            ["chroot", rootfs, "/bin/sh", "-c", "echo from inside; ls /data"], capture_stdout=True
        )
        assert result.stdout == b"from inside\nnew\n"
    finally:
        await trio.to_thread.run_sync(unmount, rootfs)
    assert os.listdir(rootfs) == []
    # Unmounting twice is harmless.
    await trio.to_thread.run_sync(unmount, rootfs)


@pytest.mark.parametrize(
    ("repository", "platform", "expected"),
    [
        ("test/multi", None, BASE),
        ("test/multi", "linux/arm64", ARM64),
        ("test/multi-docker", None, BASE),
        ("test/multi-docker", "linux/arm64/v8", ARM64),
    ],
)
async def test_platform_from_an_index(
    registry: Registry,
    store: ImageStore,
    repository: str,
    platform: str | None,
    expected: BuiltImage,
) -> None:
    image = await store.pull(f"{registry.host}/{repository}:1.0", platform=platform)
    assert image.digest == expected.manifest.digest
    assert image.index_digest is not None
    assert image.platform == Platform.parse(platform or "linux/amd64")


async def test_no_manifest_for_the_platform(registry: Registry, store: ImageStore) -> None:
    with pytest.raises(UnsupportedImageError, match="no manifest for linux/arm/v7"):
        await store.pull(f"{registry.host}/test/multi:1.0", platform="linux/arm/v7")
    # A single-platform image built for another architecture is refused too.
    with pytest.raises(UnsupportedImageError, match="built for linux/amd64"):
        await store.pull(f"{registry.host}/test/busybox:1.0", platform="linux/riscv64")
    assert store.list() == []


@pytest.mark.parametrize(("repository", "image"), [("test/docker", DOCKER), ("test/zstd", ZSTD)])
async def test_docker_schema2_and_zstd(
    registry: Registry, store: ImageStore, repository: str, image: BuiltImage
) -> None:
    pulled = await store.pull(f"{registry.host}/{repository}:1.0")
    assert pulled.digest == image.manifest.digest
    assert pulled.layers[0].media_type == image.layers[0].media_type
    [snapshot] = await store.snapshots(pulled)
    assert os.stat(snapshot / "bin/busybox").st_size == BUSYBOX_SIZE
    if repository == "test/docker":
        assert pulled.config.entrypoint == ("/bin/sh",)
        assert pulled.config.cmd == ("-c", "echo hi")


async def test_pull_by_digest_and_missing_images(registry: Registry, store: ImageStore) -> None:
    ref = f"{registry.host}/test/busybox@{BASE.manifest.digest}"
    assert (await store.pull(ref)).reference == ref
    with pytest.raises(ImageNotFoundError, match="MANIFEST_UNKNOWN"):
        await store.pull(f"{registry.host}/test/busybox:nope")
    with pytest.raises(ImageNotFoundError):
        await store.pull(f"{registry.host}/test/nothing-here:1.0")
    # A manifest whose layer the registry lost: nothing is recorded or left behind.
    lost = build_image([make_tar([File("lost", b"soon gone")])])
    registry.push("test/lost", "1", lost)
    registry.delete_blob("test/lost", lost.layers[0].digest)
    with pytest.raises(ImageNotFoundError, match="BLOB_UNKNOWN"):
        await store.pull(f"{registry.host}/test/lost:1")
    assert _ingest(store) == []
    assert [i.reference for i in store.list()] == [ref]


async def test_interrupted_download_resumes_with_range(
    registry: Registry, store: ImageStore
) -> None:
    layer = BASE.layers[0]
    cut = 300_000
    proxy = FaultyProxy(registry.host, faults=[Fault(layer.digest, cut_after=cut)])
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        progress: list[tuple[int, int]] = []
        image = await store.pull(
            f"{proxy.host}/test/busybox:1.0", progress=lambda d, t: progress.append((d, t))
        )
        nursery.cancel_scope.cancel()
    first, second = proxy.blob_requests(layer.digest)
    assert "range" not in first
    assert second["range"] == f"bytes={cut}-"
    # Every byte of the layer crossed the link once.
    assert proxy.body_bytes[layer.digest] == len(layer.data)
    assert image.digest == BASE.manifest.digest
    assert progress[-1] == (len(layer.data) + len(BASE.config.data),) * 2
    assert _ingest(store) == []


async def test_a_registry_that_ignores_range_sends_the_whole_blob_again(
    registry: Registry, store: ImageStore
) -> None:
    layer = BASE.layers[0]
    faults = [Fault(layer.digest, cut_after=100_000), Fault(layer.digest, drop_range=True)]
    proxy = FaultyProxy(registry.host, faults=faults)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        image = await store.pull(f"{proxy.host}/test/busybox:1.0")
        nursery.cancel_scope.cancel()
    _, second = proxy.blob_requests(layer.digest)
    assert second["range"] == "bytes=100000-"
    assert proxy.body_bytes[layer.digest] == 100_000 + len(layer.data)
    assert image.digest == BASE.manifest.digest
    assert _ingest(store) == []


async def test_a_pull_that_gave_up_resumes_on_the_next_pull(
    registry: Registry, store: ImageStore
) -> None:
    layer = BASE.layers[0]
    # The link breaks after 200 kB on every attempt of the first pull.
    proxy = FaultyProxy(registry.host, faults=[Fault(layer.digest, cut_after=200_000, times=3)])
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        ref = f"{proxy.host}/test/busybox:1.0"
        with pytest.raises(RegistryUnavailableError, match="failed 3 times") as failed:
            await store.pull(ref)
        assert failed.value.attempts == 3
        assert store.get(ref) is None
        assert _ingest(store) == [layer.digest[7:]]
        # Each attempt got 200 kB further before the link broke again.
        assert os.stat(store.root / "ingest" / layer.digest[7:]).st_size == 600_000
        await store.pull(ref)
        nursery.cancel_scope.cancel()
    ranges = [h.get("range") for h in proxy.blob_requests(layer.digest)]
    assert ranges == [None, "bytes=200000-", "bytes=400000-", "bytes=600000-"]
    assert proxy.body_bytes[layer.digest] == len(layer.data)
    assert _ingest(store) == []


async def test_a_second_pull_downloads_no_blob_again(registry: Registry, store: ImageStore) -> None:
    proxy = FaultyProxy(registry.host)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        await store.pull(f"{proxy.host}/test/busybox:1.0")
        blobs_before = len([line for line, _ in proxy.requests if "/blobs/" in line])
        await store.pull(f"{proxy.host}/test/busybox:1.0")
        nursery.cancel_scope.cancel()
    assert blobs_before == 2
    assert len([line for line, _ in proxy.requests if "/blobs/" in line]) == 2


async def test_a_corrupted_byte_is_a_digest_mismatch_that_leaves_nothing(
    registry: Registry, store: ImageStore
) -> None:
    layer = BASE.layers[0]
    proxy = FaultyProxy(registry.host, faults=[Fault(layer.digest, corrupt_at=123_456)])
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        with pytest.raises(DigestMismatchError, match=f"expected {layer.digest}"):
            await store.pull(f"{proxy.host}/test/busybox:1.0")
        nursery.cancel_scope.cancel()
    assert len(proxy.blob_requests(layer.digest)) == 1
    assert store.list() == []
    assert _ingest(store) == []
    assert not (store.root / "blobs/sha256" / layer.digest[7:]).exists()


async def test_registry_down_gives_up_after_bounded_retries(store: ImageStore) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="is unavailable") as failed:
        await store.pull(f"127.0.0.1:{closed}/test/busybox:1.0")
    assert failed.value.registry == f"127.0.0.1:{closed}"
    assert failed.value.attempts == FAST.attempts
    assert time.monotonic() - started < 5


async def test_basic_auth() -> None:
    with Registry(users={"robot": "s3cret"}) as reg:
        reg.push("private/app", "1", BASE)
        store = ImageStore(reg.dir / "store", platform=AMD64, retry=FAST)
        ref = f"{reg.host}/private/app:1"
        with pytest.raises(AuthenticationError, match="access denied"):
            await store.pull(ref)
        with pytest.raises(AuthenticationError, match="access denied"):
            await store.pull(ref, credentials=Credentials("robot", "wrong"))
        image = await store.pull(ref, credentials=Credentials("robot", "s3cret"))
        assert image.digest == BASE.manifest.digest
        store.close()


async def test_bearer_token_auth(tmp_path: Path) -> None:
    issuer = TokenIssuer(tmp_path)
    tokens = TokenServer(issuer, users={"robot": "s3cret"})
    with Registry(token=issuer) as reg:
        reg.push("private/app", "1", BASE)
        store = ImageStore(tmp_path / "store", platform=AMD64, retry=FAST)
        ref = f"{reg.host}/private/app:1"
        async with trio.open_nursery() as nursery:
            await nursery.start(tokens.serve)
            with pytest.raises(AuthenticationError, match="access denied"):
                await store.pull(ref)
            with pytest.raises(AuthenticationError, match="refused user 'robot'"):
                await store.pull(ref, credentials=Credentials("robot", "wrong"))
            image = await store.pull(ref, credentials=Credentials("robot", "s3cret"))
            nursery.cancel_scope.cancel()
        store.close()
    assert image.digest == BASE.manifest.digest
    last = tokens.requests[-1]
    assert last["scope"] == "repository:private/app:pull"
    assert last["service"] == issuer.service
    assert last["authorization"].startswith("Basic ")
    # One token served the manifest and both blobs of the successful pull.
    assert len(tokens.requests) == 3


@contextlib.asynccontextmanager
async def small_store(path: Path, size: str) -> AsyncIterator[ImageStore]:
    """A store on a tmpfs of ``size``: a disk that fills up."""
    os.mkdir(path)
    await trio.run_process(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path])
    try:
        store = ImageStore(path / "images", platform=AMD64, retry=FAST)
        try:
            yield store
        finally:
            store.close()
    finally:
        await trio.run_process(["umount", path])


async def test_disk_full_during_a_pull(registry: Registry, tmp_path: Path) -> None:
    async with small_store(tmp_path / "small", "600k") as store:
        with pytest.raises(StorageFullError, match="no space left"):
            await store.pull(f"{registry.host}/test/busybox:1.0")
        assert store.list() == []
        assert _ingest(store) == []
        # The store still works: a small image fits.
        registry.push("test/tiny", "1", build_image([make_tar([File("hello", b"hi")])]))
        tiny = await store.pull(f"{registry.host}/test/tiny:1")
        assert [i.reference for i in store.list()] == [tiny.reference]


async def test_disk_full_while_unpacking(registry: Registry, tmp_path: Path) -> None:
    # Room for the compressed layer, not for the unpacked one.
    async with small_store(tmp_path / "small", "1500k") as store:
        ref = f"{registry.host}/test/busybox:1.0"
        image = await store.pull(ref)
        with pytest.raises(StorageFullError, match=re.escape(f"while unpacking {ref}")):
            await store.snapshots(image)
        assert os.listdir(store.root / "snapshots") == []
        assert store.get(ref) == image


async def test_import_docker_save(store: ImageStore, tmp_path: Path) -> None:
    archive = tmp_path / "images.tar"
    docker_save(archive, {"plant/hmi:2.1": WHITEOUT, "busybox:1.36": BASE})
    imported = await store.import_archive(archive)
    assert [i.reference for i in imported] == [
        "docker.io/plant/hmi:2.1",
        "docker.io/library/busybox:1.36",
    ]
    hmi = store.get("plant/hmi:2.1")
    assert hmi is not None
    assert hmi.config.cmd == ("sh",)
    assert [layer.diff_id for layer in hmi.layers] == [
        layer.diff_id for layer in imported[0].layers
    ]
    lowers = await store.snapshots(hmi)
    assert (lowers[1] / "etc/motd").read_bytes() == b"hello"
    assert stat.S_ISCHR(os.lstat(lowers[2] / "etc/motd").st_mode)


async def test_import_oci_archive(store: ImageStore, tmp_path: Path) -> None:
    archive = tmp_path / "multi.tar"
    index = build_index([ARM64, BASE])
    oci_archive(archive, "registry.plant.local/hmi:3", [ARM64, BASE], index)
    [image] = await store.import_archive(archive)
    assert image.reference == "registry.plant.local/hmi:3"
    assert image.digest == BASE.manifest.digest
    assert image.index_digest == index.digest
    [snapshot] = await store.snapshots(image)
    assert (snapshot / "bin/busybox").exists()


def test_cli_pull_ls_rm(registry: Registry, tmp_path: Path) -> None:
    runner = CliRunner()
    data_dir = ["--data-dir", str(tmp_path)]
    ref = f"{registry.host}/test/busybox:1.0"
    pulled = runner.invoke(image_cli, [*data_dir, "pull", ref])
    assert pulled.exit_code == 0, pulled.output
    assert pulled.output == f"pulled {ref} (linux/amd64) {BASE.manifest.digest}\n"
    listed = runner.invoke(image_cli, [*data_dir, "ls", "--json"])
    assert [row["reference"] for row in json.loads(listed.output)] == [ref]
    missing = runner.invoke(image_cli, [*data_dir, "pull", f"{registry.host}/test/busybox:9"])
    assert missing.exit_code == 1
    assert missing.output.startswith("Error: ")
    assert len(missing.output.splitlines()) == 1
    removed = runner.invoke(image_cli, [*data_dir, "rm", ref])
    assert removed.output == f"removed {ref}\n"
    assert os.listdir(tmp_path / "images/blobs/sha256") == []


def test_cli_shows_a_progress_bar_only_on_a_terminal(registry: Registry, tmp_path: Path) -> None:
    ref = f"{registry.host}/test/busybox:1.0"
    command = "from edge.images.cli import image; image(prog_name='outpost image')"
    primary, secondary = os.openpty()
    with subprocess.Popen(
        [sys.executable, "-c", command, "--data-dir", str(tmp_path), "pull", ref],
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
        cwd=REPO,
    ) as process:
        os.close(secondary)
        output = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not select.select([primary], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the command has exited and closed the terminal
                break
            output += chunk
        os.close(primary)
    assert process.returncode == 0, output
    text = output.decode()
    assert f"{ref}  [####################################]  100%" in text
    assert text.rstrip().endswith(f"pulled {ref} (linux/amd64) {BASE.manifest.digest}")


async def test_gc_removes_unused_images_least_recently_used_first(
    registry: Registry, store: ImageStore
) -> None:
    # Three images share the busybox layer; each has 300 kB of its own.
    refs = []
    for name in ("a", "b", "c"):
        own = make_tar([File(f"{name}.bin", os.urandom(300_000))])
        registry.push(f"test/gc-{name}", "1", build_image([busybox_tar(), own]))
        refs.append(f"{registry.host}/test/gc-{name}:1")
    images = [await store.pull(ref) for ref in refs]
    for image in images:
        await store.snapshots(image)
    a, b, c = refs
    for ref, used_at in ((a, 100.0), (b, 200.0), (c, 300.0)):
        store._index.touch(ref, used_at)

    everything = store.gc(in_use=set())
    assert everything.removed_images == ()
    assert everything.swept

    # Room for two images: the least recently used of the unused ones goes; `a` is in use.
    store.budget_bytes = everything.used_bytes - 1
    result = store.gc(in_use={a})
    assert result.removed_images == (b,)
    assert result.removed_blobs == 3  # b's manifest, config and own layer
    assert result.removed_snapshots == 1
    assert result.used_bytes <= store.budget_bytes
    assert {i.reference for i in store.list()} == {a, c}

    # No room at all: everything unused goes, what pods use stays, by digest too.
    store.budget_bytes = 0
    assert store.gc(in_use={images[0].digest}).removed_images == (c,)
    assert [i.reference for i in store.list()] == [a]
    snapshots = await store.snapshots(images[0])
    assert all(p.is_dir() for p in snapshots)
    assert len(os.listdir(store.root / "snapshots")) == 2


async def test_gc_keeps_snapshots_that_a_container_has_mounted(
    registry: Registry, store: ImageStore, tmp_path: Path
) -> None:
    image = await store.pull(f"{registry.host}/test/busybox:1.0")
    [lower] = await store.snapshots(image)
    dirs = [tmp_path / d for d in ("upper", "work", "rootfs")]
    for d in dirs:
        d.mkdir()
    await trio.to_thread.run_sync(mount_rootfs, [lower], *dirs)
    try:
        store.remove(image.reference)
        assert lower.is_dir()
        assert (dirs[2] / "bin/busybox").exists()
    finally:
        await trio.to_thread.run_sync(unmount, dirs[2])
    result = store.gc(in_use=set())
    assert result.removed_snapshots == 1
    assert not lower.exists()
