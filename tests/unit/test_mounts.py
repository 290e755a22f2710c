"""edge.mounts reads the mount table as the kernel writes it."""

from __future__ import annotations

from pathlib import Path

from edge.mounts import MountInfo, mount_points, parse_mountinfo

TABLE = (
    "22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro\n"
    "46 22 0:39 / /var/lib/outpost/pods/u-1/shm rw,nosuid,nodev - tmpfs tmpfs rw,size=65536k\n"
    "47 46 0:40 / /var/lib/outpost/pods/u-1/shm rw,nosuid,nodev - tmpfs tmpfs rw,size=65536k\n"
    "48 22 0:41 / /srv/with\\040space\\011tab rw master:3 - tmpfs my\\134source rw\n"
)


def test_each_line_is_one_mount_in_table_order() -> None:
    assert parse_mountinfo(TABLE) == [
        MountInfo(Path("/"), "ext4", "/dev/vda1", ("rw", "errors=remount-ro")),
        MountInfo(Path("/var/lib/outpost/pods/u-1/shm"), "tmpfs", "tmpfs", ("rw", "size=65536k")),
        MountInfo(Path("/var/lib/outpost/pods/u-1/shm"), "tmpfs", "tmpfs", ("rw", "size=65536k")),
        MountInfo(Path("/srv/with space\ttab"), "tmpfs", "my\\source", ("rw",)),
    ]


def test_lines_without_the_separator_or_fields_are_skipped() -> None:
    assert parse_mountinfo("garbage\n22 1 253:0 / / rw - ext4\n\n") == []


def test_the_table_of_this_process_has_its_root() -> None:
    assert Path("/") in mount_points()
