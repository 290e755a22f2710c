"""Layer unpacking with whiteouts. Runs as root, like the agent: it writes owners, device
nodes and trusted extended attributes."""

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path, PurePosixPath

import pytest
from backports import zstd

from edge.images.errors import DigestMismatchError, InvalidLayerError
from edge.images.layers import OPAQUE_XATTR, Whiteout, classify, clean_path, unpack
from tests.registry import Dir, File, Hardlink, Symlink, make_tar


def diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


def unpack_bytes(tmp_path: Path, blob: bytes, tar: bytes | None = None) -> Path:
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "layer.blob"
    source.write_bytes(blob)
    dest = tmp_path / "snapshot"
    unpack(source, diff_id(tar if tar is not None else blob), dest)
    return dest


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("etc/.wh.passwd", Whiteout(PurePosixPath("etc/passwd"), opaque=False)),
        ("./.wh.top", Whiteout(PurePosixPath("top"), opaque=False)),
        ("var/cache/.wh..wh..opq", Whiteout(PurePosixPath("var/cache"), opaque=True)),
        (".wh..wh..opq", Whiteout(PurePosixPath(""), opaque=True)),
        ("etc/passwd", None),
        ("etc/x.wh.y", None),
        ("a/.wh..wh.plnk", None),
    ],
)
def test_classify(name: str, expected: Whiteout | None) -> None:
    assert classify(name) == expected


def test_clean_path() -> None:
    assert clean_path("/./usr//bin/") == PurePosixPath("usr/bin")
    assert clean_path("./") == PurePosixPath("")
    with pytest.raises(InvalidLayerError, match="climbs out"):
        clean_path("usr/../../etc")


def test_files_dirs_links_and_their_attributes(tmp_path: Path) -> None:
    tar = make_tar(
        [
            Dir("bin"),
            File("bin/tool", b"#!/bin/sh\n", 0o4755),
            Symlink("bin/sh", "tool"),
            Hardlink("bin/tool2", "bin/tool"),
            Dir("ro", 0o555),
            File("ro/inside", b"x", 0o400),
            File("deep/parents/made.txt", b"no dir entries before me"),
        ]
    )
    dest = unpack_bytes(tmp_path, tar)
    tool = dest / "bin/tool"
    assert tool.read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o4755
    assert os.readlink(dest / "bin/sh") == "tool"
    assert (dest / "bin/tool2").stat().st_ino == tool.stat().st_ino
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert (dest / "ro/inside").read_bytes() == b"x"
    assert (dest / "deep/parents/made.txt").exists()
    assert tool.stat().st_mtime == 0
    assert (dest / "bin").stat().st_mtime == 0


def test_owners_devices_and_xattrs(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        owned = tarfile.TarInfo("owned")
        owned.uid, owned.gid, owned.size = 1000, 2000, 0
        owned.pax_headers = {
            "SCHILY.xattr.user.note": "kept",
            "SCHILY.xattr.trusted.overlay.opaque": "y",
        }
        archive.addfile(owned, io.BytesIO())
        null = tarfile.TarInfo("dev/null")
        null.type, null.devmajor, null.devminor, null.mode = tarfile.CHRTYPE, 1, 3, 0o666
        archive.addfile(null)
        fifo = tarfile.TarInfo("run/pipe")
        fifo.type = tarfile.FIFOTYPE
        archive.addfile(fifo)
    dest = unpack_bytes(tmp_path, out.getvalue())
    info = (dest / "owned").stat()
    assert (info.st_uid, info.st_gid) == (1000, 2000)
    assert os.getxattr(dest / "owned", "user.note") == b"kept"
    # Only the unpacker decides what is opaque to overlayfs.
    assert "trusted.overlay.opaque" not in os.listxattr(dest / "owned")
    dev = (dest / "dev/null").stat()
    assert stat.S_ISCHR(dev.st_mode)
    assert (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (1, 3)
    assert stat.S_ISFIFO((dest / "run/pipe").stat().st_mode)


def test_whiteouts_become_overlayfs_whiteouts(tmp_path: Path) -> None:
    tar = make_tar(
        [
            Dir("etc"),
            File("etc/.wh.hosts"),
            File(".wh.gone"),
            Dir("data"),
            File("data/.wh..wh..opq"),
            File("data/new", b"fresh"),
            File("etc/.wh..wh.plnk"),
        ]
    )
    dest = unpack_bytes(tmp_path, tar)
    for deleted in (dest / "etc/hosts", dest / "gone"):
        info = os.lstat(deleted)
        assert stat.S_ISCHR(info.st_mode)
        assert info.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dest / "data", OPAQUE_XATTR) == b"y"
    assert (dest / "data/new").read_bytes() == b"fresh"
    assert sorted(os.listdir(dest / "etc")) == ["hosts"]
    assert not (dest / "etc/.wh.hosts").exists()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_layers(tmp_path: Path, compression: str) -> None:
    tar = make_tar([File("hello", b"world")])
    blob = gzip.compress(tar) if compression == "gzip" else zstd.compress(tar)
    dest = unpack_bytes(tmp_path, blob, tar)
    assert (dest / "hello").read_bytes() == b"world"


def test_a_layer_that_does_not_match_its_diff_id(tmp_path: Path) -> None:
    blob = tmp_path / "layer"
    blob.write_bytes(make_tar([File("a", b"1")]))
    with pytest.raises(DigestMismatchError, match="unpacks to content with digest"):
        unpack(blob, "sha256:" + "0" * 64, tmp_path / "out")


def test_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(InvalidLayerError, match="not a readable tar archive"):
        unpack_bytes(tmp_path, gzip.compress(b"plain text, not a tar" * 100))


def test_truncated_gzip(tmp_path: Path) -> None:
    tar = make_tar([File("big", os.urandom(100_000))])
    with pytest.raises(InvalidLayerError, match="not a readable tar archive"):
        unpack_bytes(tmp_path, gzip.compress(tar)[:-5000], tar)


def test_writing_through_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tar = make_tar([Symlink("escape", str(outside)), File("escape/planted", b"gotcha")])
    with pytest.raises(InvalidLayerError, match="not a directory"):
        unpack_bytes(tmp_path, tar)
    assert list(outside.iterdir()) == []


def test_a_file_replaces_an_earlier_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    tar = make_tar([Symlink("f", str(target)), File("f", b"new")])
    dest = unpack_bytes(tmp_path, tar)
    assert target.read_bytes() == b"keep me"
    assert not (dest / "f").is_symlink()
    assert (dest / "f").read_bytes() == b"new"


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    tar = make_tar([File("x/y", b"1"), File("x", b"now a file"), Dir("z"), Symlink("z", "x")])
    dest = unpack_bytes(tmp_path, tar)
    assert (dest / "x").read_bytes() == b"now a file"
    assert os.readlink(dest / "z") == "x"


def test_climbing_out_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidLayerError, match="climbs out"):
        unpack_bytes(tmp_path, make_tar([File("../evil", b"x")]))
    with pytest.raises(InvalidLayerError, match="climbs out"):
        unpack_bytes(tmp_path / "2", make_tar([File("a"), Hardlink("b", "../../etc/passwd")]))


def test_hard_links_to_symlinks_link_the_symlink_itself(tmp_path: Path) -> None:
    tar = make_tar([Symlink("ln", "/etc/shadow"), Hardlink("hard", "ln")])
    dest = unpack_bytes(tmp_path, tar)
    assert os.readlink(dest / "hard") == "/etc/shadow"


def test_hard_link_to_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidLayerError, match="comes nowhere before it"):
        unpack_bytes(tmp_path, make_tar([Dir("a"), Hardlink("b", "a/missing")]))
