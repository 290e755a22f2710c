"""edge.mounts against the kernel: unmount leaves nothing mounted, whatever was stacked there
or already gone, and mount errors carry the kernel's errno. Needs root."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from edge.mounts import MountError, mount, mount_points, unmount

pytestmark = pytest.mark.requires_root("mounting needs root")


def test_mount_then_unmount(tmp_path: Path) -> None:
    mount("tmpfs", tmp_path, "tmpfs", options="size=1m")
    assert tmp_path in mount_points()
    unmount(tmp_path)
    assert tmp_path not in mount_points()


def test_unmount_removes_every_stacked_copy(tmp_path: Path) -> None:
    for _ in range(3):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tmp_path], check=True)
    assert Path("/proc/self/mountinfo").read_text().count(f" {tmp_path} ") == 3
    unmount(tmp_path)
    assert tmp_path not in mount_points()


def test_unmounting_what_is_not_mounted_or_not_there_is_nothing_to_do(tmp_path: Path) -> None:
    unmount(tmp_path)
    unmount(tmp_path / "gone")


def test_a_busy_mount_is_an_error_and_stays(tmp_path: Path) -> None:
    mount("tmpfs", tmp_path, "tmpfs", options="size=1m")
    try:
        with open(tmp_path / "held", "w"), pytest.raises(MountError) as caught:
            unmount(tmp_path)
        assert caught.value.errno == errno.EBUSY
        assert "a process still uses it" in str(caught.value)
        assert tmp_path in mount_points()
    finally:
        unmount(tmp_path)


def test_mount_errors_say_what_and_why(tmp_path: Path) -> None:
    with pytest.raises(MountError) as caught:
        mount("none", tmp_path, "no-such-fs", what="a test", hints={errno.ENODEV: "no such type"})
    assert caught.value.errno == errno.ENODEV
    assert caught.value.strerror == (
        f"cannot mount a test at {tmp_path}: {os.strerror(errno.ENODEV)} (no such type)"
    )
