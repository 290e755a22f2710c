"""The gateway root filesystem (`make rootfs`), booted far enough to matter: a chroot with /proc,
/sys, /dev and a fresh /run mounted in a private mount namespace.

Skipped when the image of the current inputs is not built (failed instead under
OUTPOST_REQUIRE_BINARY=1, as `make test` runs them: tests/appliance.py), or without root (chroot,
mounts).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from edge.datadir import CLOUD_URL_FILE
from rootfs import build
from tests.appliance import missing, require_root
from tests.channelkit import Cloud
from tests.cluster.controlplane import ControlPlane

pytestmark = pytest.mark.rootfs

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MOUNT_AND_CHROOT = """
set -e
root=$1; shift
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
exec chroot "$root" "$@"
"""


@pytest.fixture(scope="module")
def image_dir() -> Path:
    """The image built from the current inputs (the binary and unit included)."""
    try:
        directory = build.out_dir()
    except build.BuildError as exc:
        missing(f"{exc}: fix it, then run `make rootfs`")
    if not build.is_built(directory):
        missing(f"no rootfs for the current inputs in {directory}: run `make rootfs`")
    return directory


@pytest.fixture(scope="module")
def manifest(image_dir: Path) -> dict:
    return json.loads((image_dir / build.MANIFEST).read_text())


@pytest.fixture(scope="module")
def tree(
    image_dir: Path, manifest: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The image's tarball unpacked: the tests may change it. Removed afterwards (150 MB)."""
    require_root("booting the rootfs in a chroot takes root")
    if shutil.which("unshare") is None:
        pytest.skip("booting the rootfs in a chroot takes unshare (util-linux)")
    root = tmp_path_factory.mktemp("rootfs")
    subprocess.run(
        ["tar", "--numeric-owner", "-xzf", str(image_dir / build.TARBALL), "-C", str(root)],
        check=True,
    )
    yield root
    shutil.rmtree(root, ignore_errors=True)


def in_chroot(root: Path, *command: str, env: dict[str, str] | None = None, **kwargs):
    """Run ``command`` inside the rootfs as its own mount namespace sees it."""
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", MOUNT_AND_CHROOT, "sh", str(root), *command],
        env={"PATH": SYSTEMD_PATH, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


def test_image_holds_the_runtime_and_the_first_boot_join(tree: Path, manifest: dict) -> None:
    for path in ("usr/sbin/runc", "usr/sbin/mosquitto", "usr/bin/ip", "usr/sbin/iptables",
                 "lib/systemd/systemd", "etc/ssl/certs/ca-certificates.crt"):  # fmt: skip
        assert (tree / path).exists(), path
    assert os.readlink(tree / "sbin/init").endswith("systemd")
    for plugin in build.CNI_PLUGINS:
        assert os.access(tree / "usr/lib/cni" / plugin, os.X_OK), plugin

    join_env = tree / "etc/outpost/join.env"
    assert stat.S_IMODE(join_env.stat().st_mode) == 0o600
    assert (join_env.stat().st_uid, join_env.stat().st_gid) == (0, 0)
    assert "OUTPOST_URL=\n" in join_env.read_text()
    assert "OUTPOST_TOKEN=\n" in join_env.read_text()
    assert (tree / "etc/outpost/outpost.env").is_file() == build.UNIT_ENV.is_file()
    assert (tree / "etc/outpost/pods").is_dir()
    assert os.access(tree / "usr/lib/outpost/first-boot-join", os.X_OK)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "outpost-join.service").is_symlink()
    assert (tree / "etc/machine-id").read_text() == ""  # systemd's first boot

    assert manifest["unit"] == build.UNIT.is_file()
    if manifest["unit"]:
        assert (wants / "outpost.service").is_symlink()
    if manifest["binary"]:
        assert os.access(tree / manifest["binary"].lstrip("/"), os.X_OK)

    # The units as the image's own systemd reads them.
    units = ["/etc/systemd/system/outpost-join.service"]
    if manifest["unit"] and manifest["binary"]:  # verify checks that ExecStart exists
        units.append("/etc/systemd/system/outpost.service")
    verified = in_chroot(tree, "systemd-analyze", "verify", *units)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_ext4_image_is_clean_and_holds_the_same_files(image_dir: Path) -> None:
    if shutil.which("e2fsck") is None or shutil.which("debugfs") is None:
        pytest.skip("e2fsprogs is not installed")
    image = image_dir / build.IMAGE
    checked = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = subprocess.run(
        ["debugfs", "-R", "ls -l /etc/outpost", str(image)], capture_output=True, text=True
    )
    join_env = [line for line in listed.stdout.splitlines() if line.endswith(" join.env")]
    assert len(join_env) == 1, listed.stdout
    assert "100600" in join_env[0]
    label = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True)
    assert f"Filesystem volume name:   {build.LABEL}" in label.stdout


def test_first_boot_join_runs_once_and_removes_the_token(tree: Path) -> None:
    """The join script against a stand-in `outpost` that records how it was called."""
    fake = tree / "tmp/fake-outpost"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "$* url=$OUTPOST_URL token=$OUTPOST_TOKEN node=${OUTPOST_NODE_NAME:-}"'
        " >> /tmp/calls\n"
        'exit "${FAKE_EXIT:-0}"\n'
    )
    fake.chmod(0o755)
    join_env = tree / "tmp/join.env"
    join_env.write_text(
        "# a comment\nOUTPOST_URL=https://cloud.example:8443\n"
        'OUTPOST_TOKEN="OPT1.secret"\nOUTPOST_NODE_NAME=gw-17\n'
    )
    join_env.chmod(0o600)
    calls = tree / "tmp/calls"
    script = ("/usr/lib/outpost/first-boot-join", "/tmp/join.env")
    env = {"OUTPOST_BIN": "/tmp/fake-outpost"}

    failed = in_chroot(tree, *script, env={**env, "FAKE_EXIT": "1"})
    assert failed.returncode != 0
    assert "OPT1.secret" in join_env.read_text()  # kept for the unit's next try

    first = in_chroot(tree, *script, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert calls.read_text().splitlines()[-1] == (
        "join url=https://cloud.example:8443 token=OPT1.secret node=gw-17"
    )
    assert "OPT1" not in join_env.read_text()
    assert "OUTPOST_URL=https://cloud.example:8443\n" in join_env.read_text()
    assert stat.S_IMODE(join_env.stat().st_mode) == 0o600

    second = in_chroot(tree, *script, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert len(calls.read_text().splitlines()) == 2  # the failed try and the join
    assert "already joined, or standalone" in second.stdout


@pytest.fixture(scope="module")
def binary(tree: Path, manifest: dict) -> str:
    if not manifest["binary"]:
        missing("the rootfs was built without the binary: run `make binary`, then `make rootfs`")
    return manifest["binary"]


def test_outpost_version_runs_in_the_image(tree: Path, binary: str) -> None:
    result = in_chroot(tree, binary, "version", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads(result.stdout)
    assert info["version"], info
    assert info["platform"] == f"linux/{os.uname().machine}", info


def _unit(tree: Path) -> dict[str, str]:
    path = tree / "etc/systemd/system/outpost.service"
    if not path.is_file():
        pytest.skip("the rootfs has no outpost.service (systemd/outpost.service): `make rootfs`")
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


def test_unit_exec_start_runs_standalone_and_stops_on_sigterm(tree: Path, binary: str) -> None:
    unit = _unit(tree)
    # A system service without User= gets no $HOME from systemd: neither does the agent here.
    env = {"OUTPOST_DATA_DIR": "/tmp/outpost-data"}
    environment_file = unit.get("EnvironmentFile", "").lstrip("-")
    if environment_file and (tree / environment_file.lstrip("/")).is_file():
        for line in (tree / environment_file.lstrip("/")).read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.strip().startswith("#"):
                env[key.strip()] = value.strip().strip("\"'")
    (tree / "tmp/pods").mkdir()  # the empty manifest folder
    argv = [
        part
        for word in shlex.split(unit["ExecStart"].lstrip("@-:+!"))
        for part in _expand(word, env)
    ]
    if "--standalone" not in argv:
        argv += ["--standalone", "--manifests", "/tmp/pods"]

    notify_path = tree / "tmp/notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(1)
    env["NOTIFY_SOCKET"] = "/tmp/notify.sock"
    agent = subprocess.Popen(
        # Its own network namespace too: whatever it sets up stays off the host.
        ["unshare", "--mount", "--net", "sh", "-c", MOUNT_AND_CHROOT, "sh", str(tree), *argv],
        env={"PATH": SYSTEMD_PATH, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and agent.poll() is None:
            try:
                messages.append(notify.recv(4096).decode())
            except TimeoutError:
                continue
            if any("READY=1" in m.split("\n") for m in messages):
                break
        assert agent.poll() is None, agent.communicate()[0]
        if unit.get("Type") == "notify":
            assert any("READY=1" in m.split("\n") for m in messages), messages
        else:
            time.sleep(3)
            assert agent.poll() is None, agent.communicate()[0]
        assert (tree / "tmp/outpost-data").is_dir()

        agent.send_signal(signal.SIGTERM)
        output = agent.communicate(timeout=30)[0]
        assert agent.returncode == 0, output
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        notify.close()


def _expand(word: str, env: dict[str, str]) -> list[str]:
    """systemd's expansion of an ExecStart word: a lone $VAR splits into words (none when
    unset), ${VAR} is replaced in place."""
    lone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
    if lone:
        return env.get(lone.group(1), "").split()
    return [re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word)]


@pytest.mark.cluster
async def test_first_boot_join_in_the_image_joins_a_loopback_cloud(
    tree: Path, binary: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The image's own join unit command, with the real binary, against `outpost-cloud serve`
    on loopback (the chroot shares the host's network)."""
    # Asked for here, not as an argument: a session fixture would be set up before the module's
    # fixtures get the chance to skip (no image, no root).
    control_plane: ControlPlane = request.getfixturevalue("control_plane")
    cloud = Cloud(control_plane, tmp_path)
    await cloud.start()
    join_env = tree / "etc/outpost/join.env"
    shipped = join_env.read_text()
    identity = tree / "var/lib/outpost/identity"
    try:
        token = await cloud.token("rootfs-gw")
        join_env.write_text(
            f"OUTPOST_URL={cloud.url}\nOUTPOST_TOKEN={token}\nOUTPOST_NODE_NAME=rootfs-gw\n"
        )
        joined = await trio.to_thread.run_sync(
            lambda: in_chroot(tree, "/usr/lib/outpost/first-boot-join")
        )
        assert joined.returncode == 0, joined.stdout + joined.stderr
        assert (identity / "node.crt").is_file()
        assert token not in join_env.read_text()
        cert = x509.load_pem_x509_certificate((identity / "node.crt").read_bytes())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [n.value for n in names] == ["rootfs-gw"]
        assert (tree / "var/lib/outpost" / CLOUD_URL_FILE).read_text() == cloud.url + "\n"
    finally:
        await cloud.stop()
        join_env.write_text(shipped)
        shutil.rmtree(identity, ignore_errors=True)
        (tree / "var/lib/outpost" / CLOUD_URL_FILE).unlink(missing_ok=True)
