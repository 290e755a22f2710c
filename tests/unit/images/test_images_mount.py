from pathlib import Path

import pytest

from edge.images.mount import overlay_lowerdirs, overlay_options
from edge.mounts import parse_mountinfo


def test_options_put_the_top_layer_first() -> None:
    options = overlay_options([Path("/s/base"), Path("/s/app")], Path("/c/upper"), Path("/c/work"))
    assert options == "lowerdir=/s/app:/s/base,upperdir=/c/upper,workdir=/c/work"


@pytest.mark.parametrize("bad", ["/s/a:b", "/s/a,b", "/s/a\\b"])
def test_paths_the_option_syntax_cannot_carry_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot be used in an overlay mount"):
        overlay_options([Path(bad)], Path("/u"), Path("/w"))


def test_too_many_layers_for_one_page() -> None:
    lowers = [Path(f"/var/lib/outpost/images/snapshots/{i:064x}") for i in range(60)]
    with pytest.raises(ValueError, match="more than the 4095"):
        overlay_options(lowers, Path("/u"), Path("/w"))


def test_no_layers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        overlay_options([], Path("/u"), Path("/w"))


def test_lowerdirs_of_mounted_overlays() -> None:
    mountinfo = (
        "22 1 253:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "46 27 0:39 / /run/c1/rootfs rw,relatime - overlay overlay"
        " rw,lowerdir=/s/app:/s/base,upperdir=/c1/u,workdir=/c1/w,uuid=on\n"
        "47 27 0:40 / /run/c2/rootfs rw - overlay overlay"
        " rw,lowerdir+=/s/with\\040space,upperdir=/c2/u,workdir=/c2/w\n"
    )
    assert overlay_lowerdirs(parse_mountinfo(mountinfo)) == {
        Path("/s/app"),
        Path("/s/base"),
        Path("/s/with space"),
    }
