"""The one-line installer for real: `outpost-cloud serve --releases` on the host, and install.sh
run with `curl … | sh` inside a fresh network namespace (its only way out is a link to the host)
and a chroot assembled from busybox-static, the host's curl and openssl with their libraries.

A stand-in `outpost` (a shell script) is released: the built binary needs a glibc root and a
real join, which the binary's own smoke suite covers. The stand-in's `join` writes the identity
file the installer checks, and its `run` sleeps.

- non-systemd: installs, joins and starts once; a second run changes nothing (every file and the
  running process stay as they were); the uninstaller leaves the root exactly as before;
- systemd (a recording systemctl stands in, with --skip-start): the unit is the repository's
  systemd/outpost.service, enabled, not started; again a second run changes nothing;
- a tampered binary, and a SHA256SUMS tampered to match it, from a mirror: refused, nothing
  installed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import httpx2
import pytest
import trio

from tests.channelkit import spawn
from tests.cluster.controlplane import ControlPlane, free_port
from tests.netns import EdgeLink, skip_unless_netns_capable
from tests.processes import REPO, VENV_BIN

pytestmark = pytest.mark.cluster

VERSION = "0.9.1"
STAND_IN = """#!/bin/sh
# A stand-in for the outpost binary, release {version}.
case "$1" in
version) echo "outpost {version} (stand-in)" ;;
join)
    shift
    data=/var/lib/outpost
    while [ $# -gt 0 ]; do
        case "$1" in
        --data-dir) data="$2"; shift 2 ;;
        *) echo "$1 $2" >>/joined-with; shift 2 ;;
        esac
    done
    mkdir -p "$data/identity" && echo certificate >"$data/identity/node.crt"
    echo "joined (stand-in)"
    ;;
run) exec sleep 100000 ;;
*) exit 2 ;;
esac
"""
RECORDING_SYSTEMCTL = """#!/bin/sh
echo "$*" >>/systemctl.log
case "$1" in
is-enabled) [ -f /systemd-enabled ] ;;
enable) touch /systemd-enabled ;;
disable) rm -f /systemd-enabled ;;
is-active) exit 3 ;;
esac
"""
# Not part of what the installer changes: the test's own files.
IGNORED = {"/ca.crt", "/systemctl.log", "/joined-with", "/mirror"}


def _copy_with_libraries(program: str, root: Path) -> None:
    path = Path(shutil.which(program) or pytest.fail(f"{program} is not installed"))
    needed = [path]
    ldd = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if lib.startswith("/"):
            needed.append(Path(lib))
    for source in needed:
        target = root / source.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.resolve(), target)


def make_root(root: Path) -> None:
    """A minimal Linux root: busybox applets, curl, openssl, CA certificates, /dev/null."""
    # What any Linux root has: the installer adds files, not these folders.
    folders = ("bin", "usr/bin", "usr/local/bin", "etc/ssl/certs", "etc/systemd/system", "tmp",
               "run", "var/log", "var/lib", "dev", "root")  # fmt: skip
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    applets = subprocess.run(
        ["/bin/busybox", "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet not in ("busybox", "curl", "openssl") and not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    _copy_with_libraries("curl", root)
    _copy_with_libraries("openssl", root)
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        shutil.copy2(bundle, root / "etc/ssl/certs/ca-certificates.crt")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/urandom", 0o666 | stat.S_IFCHR, os.makedev(1, 9))
    (root / "dev/null").chmod(0o666)


def snapshot(root: Path) -> dict[str, str]:
    """Every path in the root with its type, mode and content hash (or link target)."""
    seen: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        name = "/" + str(path.relative_to(root))
        if any(name == i or name.startswith(i + "/") for i in IGNORED):
            continue
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            seen[name] = f"link {os.readlink(path)}"
        elif stat.S_ISREG(info.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[name] = f"file {oct(info.st_mode)} {digest}"
        else:
            seen[name] = f"other {oct(info.st_mode)}"
    return seen


def in_root(link: EdgeLink, root: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` with /bin/sh inside the namespace and the chroot."""
    result = subprocess.run(
        [*link.exec_prefix, shutil.which("chroot") or "chroot", str(root), "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", **env},
    )
    print(f"$ {script}\n{result.stdout}{result.stderr}(exit {result.returncode})")
    return result


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: the installer's shell is gone, so init reaps it.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture
async def cloud(control_plane: ControlPlane, tmp_path: Path):
    """A loopback cloud serving the stand-in release, reachable from an edge namespace."""
    skip_unless_netns_capable()
    releases = tmp_path / "releases"
    (releases / VERSION).mkdir(parents=True)
    binary = releases / VERSION / "outpost-linux-amd64"
    binary.write_text(STAND_IN.format(version=VERSION))
    binary.chmod(0o755)
    key = tmp_path / "release.key"
    keygen = await trio.run_process(
        [VENV_BIN / "outpost-cloud", "release-key", "--generate", key], capture_stdout=True
    )
    with EdgeLink("installer") as link:
        hub_port, installer_port = free_port(), free_port()
        process, log = await spawn(
            tmp_path / "cloud.log",
            VENV_BIN / "outpost-cloud",
            "serve",
            "--kubeconfig", control_plane.kubeconfig,
            "--listen", f"{link.host_ip}:{hub_port}",
            "--metrics-listen", "",
            "--tls-san", link.host_ip,
            "--releases", releases,
            "--release-key", key,
            "--installer-listen", f"{link.host_ip}:{installer_port}",
        )  # fmt: skip
        try:
            with trio.fail_after(60):
                await log.wait_for(r'msg="installer listening"')
            ca_b64 = control_plane.kubectl(
                "get", "secret", "outpost-ca", "-n", "outpost-system",
                "-o", "jsonpath={.data.tls\\.crt}",
            ).stdout  # fmt: skip
            token = await trio.run_process(
                [VENV_BIN / "outpost-cloud", "token", "create", "gw-install", "--kubeconfig",
                 control_plane.kubeconfig],
                capture_stdout=True,
            )  # fmt: skip
            yield {
                "link": link,
                "url": f"https://{link.host_ip}:{installer_port}",
                "hub": f"https://{link.host_ip}:{hub_port}",
                "ca": base64.b64decode(ca_b64),
                "token": token.stdout.decode().strip(),
                "public_key": keygen.stdout,
                "releases": releases,
            }
        finally:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def install_command(cloud: dict, *args: str) -> str:
    return f"curl -sfL --cacert /ca.crt {cloud['url']}/install.sh | sh -s - {' '.join(args)}"


async def test_install_twice_then_uninstall_without_systemd(cloud: dict, tmp_path: Path):
    link, root = cloud["link"], tmp_path / "root"
    make_root(root)
    (root / "ca.crt").write_bytes(cloud["ca"])
    before = snapshot(root)

    first = in_root(link, root, install_command(cloud, "--token", cloud["token"]))
    assert first.returncode == 0
    assert "installed: /usr/local/bin/outpost" in first.stderr
    assert "done:" in first.stderr
    assert (root / "usr/local/bin/outpost").read_text() == STAND_IN.format(version=VERSION)
    assert (root / "usr/local/bin/outpost").stat().st_mode & 0o777 == 0o755
    assert "OUTPOST_DATA_DIR=/var/lib/outpost" in (root / "etc/outpost/outpost.env").read_text()
    assert (root / "var/lib/outpost/identity/node.crt").exists()
    joined = (root / "joined-with").read_text()
    assert f"--cloud {cloud['hub']}" in joined
    assert f"--token {cloud['token']}" in joined
    pid = int((root / "run/outpost.pid").read_text())
    assert pid_alive(pid)
    installed = snapshot(root)

    second = in_root(link, root, install_command(cloud, "--token", cloud["token"]))
    assert second.returncode == 0
    assert f"nothing changed: Outpost {VERSION} is installed" in second.stderr
    assert "already joined" in second.stderr
    assert f"running: pid {pid}" in second.stderr
    assert snapshot(root) == installed
    assert (root / "joined-with").read_text() == joined  # no second join

    removed = in_root(link, root, "/usr/local/bin/outpost-uninstall.sh")
    assert removed.returncode == 0
    assert not pid_alive(pid)
    assert snapshot(root) == before


async def test_systemd_unit_installed_enabled_not_started(cloud: dict, tmp_path: Path):
    unit_source = REPO / "systemd" / "outpost.service"
    if not unit_source.exists():
        pytest.skip("systemd/outpost.service does not exist yet: the installer has no unit")
    link, root = cloud["link"], tmp_path / "root"
    make_root(root)
    (root / "ca.crt").write_bytes(cloud["ca"])
    (root / "usr/bin/systemctl").write_text(RECORDING_SYSTEMCTL)
    (root / "usr/bin/systemctl").chmod(0o755)
    before = snapshot(root)

    env = {"OUTPOST_TOKEN": cloud["token"], "INSTALL_OUTPOST_INIT": "systemd"}
    first = in_root(link, root, install_command(cloud, "--skip-start"), **env)
    assert first.returncode == 0
    assert (root / "etc/systemd/system/outpost.service").read_text() == unit_source.read_text()
    assert (root / "etc/outpost/outpost.env").exists()  # the unit's EnvironmentFile
    assert (root / "systemctl.log").read_text().splitlines() == [
        "daemon-reload",
        "is-enabled --quiet outpost.service",
        "enable outpost.service",
    ]
    assert "not started (--skip-start)" in first.stderr
    installed = snapshot(root)

    second = in_root(link, root, install_command(cloud), INSTALL_OUTPOST_SKIP_START="true", **env)
    assert second.returncode == 0
    assert "nothing changed" in second.stderr
    assert snapshot(root) == installed
    assert (root / "systemctl.log").read_text().splitlines()[3:] == [
        "is-enabled --quiet outpost.service"
    ]

    removed = in_root(link, root, "/usr/local/bin/outpost-uninstall.sh")
    assert removed.returncode == 0
    assert "disable --now outpost.service" in (root / "systemctl.log").read_text()
    assert snapshot(root) == before


async def test_tampered_binary_and_tampered_checksums_are_refused(cloud: dict, tmp_path: Path):
    link, root = cloud["link"], tmp_path / "root"
    make_root(root)
    (root / "ca.crt").write_bytes(cloud["ca"])
    mirror = root / "mirror" / VERSION
    mirror.mkdir(parents=True)
    context = ssl.create_default_context(cadata=cloud["ca"].decode())
    async with httpx2.AsyncClient(verify=context) as http:
        for name in ("SHA256SUMS", "SHA256SUMS.sig", "outpost-linux-amd64"):
            response = await http.get(f"{cloud['url']}/releases/{VERSION}/{name}")
            response.raise_for_status()
            (mirror / name).write_bytes(response.content)
    before = snapshot(root)
    from_mirror = install_command(
        cloud, "--token", cloud["token"], "--release-url", "file:///mirror"
    )

    # The mirror as published installs (and is uninstalled again).
    good = in_root(link, root, from_mirror, INSTALL_OUTPOST_SKIP_START="1")
    assert good.returncode == 0
    assert in_root(link, root, "/usr/local/bin/outpost-uninstall.sh").returncode == 0
    assert snapshot(root) == before

    evil = STAND_IN.format(version=VERSION).replace("exec sleep", "echo owned; exec sleep")
    (mirror / "outpost-linux-amd64").write_text(evil)
    before = snapshot(root)
    tampered = in_root(link, root, from_mirror)
    assert tampered.returncode == 1
    assert "outpost-linux-amd64 does not match its checksum" in tampered.stderr
    assert snapshot(root) == before

    sums = (mirror / "SHA256SUMS").read_text()
    good_hash = hashlib.sha256(STAND_IN.format(version=VERSION).encode()).hexdigest()
    evil_hash = hashlib.sha256(evil.encode()).hexdigest()
    (mirror / "SHA256SUMS").write_text(sums.replace(good_hash, evil_hash))
    before = snapshot(root)
    resigned = in_root(link, root, from_mirror)
    assert resigned.returncode == 1
    assert "SHA256SUMS of release 0.9.1 is not signed by this cloud's release key" in (
        resigned.stderr
    )
    assert snapshot(root) == before
