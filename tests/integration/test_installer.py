"""The one-line installer for real: `outpost-cloud serve --releases` on the host, and install.sh
run with `curl … | sh` inside a fresh network namespace (its only way out is a link to the host)
and a chroot assembled from busybox-static, the host's curl and openssl with their libraries,
with /proc mounted in a mount namespace of its own.

Most tests release a stand-in `outpost` (a shell script): quick, and enough for what the script
itself does. Its `join` writes the identity file the installer checks, and its `run` sleeps.

- non-systemd: installs, joins and starts once; a second run changes nothing (every file and the
  running process stay as they were); the uninstaller leaves the root exactly as before;
- systemd, detected (a recording systemctl stands in, with --skip-start): the unit is the
  repository's systemd/outpost.service, enabled, not started; again a second run changes nothing;
- the environment variables instead of options: OUTPOST_TOKEN, OUTPOST_URL,
  INSTALL_OUTPOST_VERSION, INSTALL_OUTPOST_BIN_DIR, INSTALL_OUTPOST_SKIP_START;
- the machine's architecture picks the binary; an unsupported one is one line of error;
- a script cut short anywhere runs nothing;
- a tampered binary, and a SHA256SUMS tampered to match it, from a mirror: refused, nothing
  installed.

And one releases the built binary (`make binary`; skipped without it, failed under
OUTPOST_REQUIRE_BINARY=1) into a chroot that also holds the glibc libraries the binary and its
unpacked payload load: the real `outpost join` joins the cloud with a real token, the agent the
script starts comes online, a second run changes nothing, the uninstaller restores the root.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import platform
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import httpx2
import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.channelkit import spawn
from tests.cluster.controlplane import ControlPlane, free_port
from tests.netns import EdgeLink, require_netns
from tests.processes import REPO, VENV_BIN
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

VERSION = "0.9.1"
OLDER = "0.9.0"  # also released: INSTALL_OUTPOST_VERSION picks it
BROKEN = "0.8.0"  # released too, a binary that does not run here
# The release folder's names for `uname -m` (cloud/installer/releases.py).
RELEASE_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}
ARCH = RELEASE_ARCH.get(platform.machine(), platform.machine())
NODE = "gw-install"
STAND_IN = """#!/bin/sh
# A stand-in for the outpost binary, release {version}.
# Like the onefile binary, every run unpacks into its build's own folder.
[ -n "${{XDG_CACHE_HOME:-}}" ] && mkdir -p "$XDG_CACHE_HOME/outpost/{version}-{key}"
case "$1" in
version)
    if [ "${{2:-}}" = --json ]; then
        echo '{{"build": "release", "source_key": "{key}", "version": "{version}"}}'
    else
        echo "outpost {version} (stand-in)"
    fi
    ;;
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


def stand_in(version: str) -> str:
    return STAND_IN.format(version=version, key=build_key(version))


def build_key(version: str) -> str:
    """The stand-in's build key, as the real binary's 16 hex digits."""
    return hashlib.sha256(version.encode()).hexdigest()[:16]


NOT_FOR_THIS_MACHINE = """#!/bin/sh
echo "outpost: cannot execute binary file: Exec format error" >&2
exit 126
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


def libraries(*programs: Path) -> set[Path]:
    """The shared libraries ``programs`` load (ldd), the dynamic loader included."""
    needed: set[Path] = set()
    for program in programs:
        ldd = subprocess.run(["ldd", str(program)], capture_output=True, text=True, check=False)
        for line in ldd.stdout.splitlines():
            parts = line.split()
            lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts else ""
            if lib.startswith("/"):
                needed.add(Path(lib))
    return needed


def copy_into(root: Path, *sources: Path) -> None:
    """Each file at the same path in ``root`` (symbolic links followed)."""
    for source in sources:
        target = root / source.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.resolve(), target)


def _copy_with_libraries(program: str, root: Path) -> None:
    path = Path(shutil.which(program) or pytest.fail(f"{program} is not installed"))
    copy_into(root, path, *libraries(path))


def make_root(root: Path) -> None:
    """A minimal Linux root: busybox applets, curl, openssl, CA certificates, /dev/null."""
    # What any Linux root has: the installer adds files, not these folders.
    folders = ("bin", "usr/bin", "usr/local/bin", "etc/ssl/certs", "etc/systemd/system", "tmp",
               "run", "var/log", "var/lib", "var/cache", "dev", "proc", "root", "opt")  # fmt: skip
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


# /proc in the chroot (the onefile binary finds itself through /proc/self/exe), mounted in a
# mount namespace of the command's own: it goes away with the last process in it.
MOUNT_PROC_AND_CHROOT = 'mount -t proc proc "$1/proc" && exec "$2" "$1" /bin/sh -c "$3"'


def in_root(link: EdgeLink, root: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` with /bin/sh inside the namespace and the chroot."""
    unshare, sh, chroot = (shutil.which(tool) or tool for tool in ("unshare", "sh", "chroot"))
    argv = [unshare, "--mount", sh, "-c", MOUNT_PROC_AND_CHROOT, "sh", str(root), chroot, script]
    result = subprocess.run(
        [*link.exec_prefix, *argv],
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


def release(releases: Path, version: str, binary: bytes) -> Path:
    """``binary`` as the release ``version`` for this machine's architecture."""
    path = releases / version / f"outpost-linux-{ARCH}"
    path.parent.mkdir(parents=True)
    path.write_bytes(binary)
    path.chmod(0o755)
    return path


@pytest.fixture
async def cloud(control_plane: ControlPlane, tmp_path: Path):
    """A loopback cloud serving the stand-in releases, reachable from an edge namespace."""
    releases = tmp_path / "releases"
    for version in (OLDER, VERSION):
        release(releases, version, stand_in(version).encode())
    release(releases, BROKEN, NOT_FOR_THIS_MACHINE.encode())
    async with serving(control_plane, tmp_path, releases) as served:
        yield served


@contextlib.asynccontextmanager
async def serving(control_plane: ControlPlane, tmp_path: Path, releases: Path, node: str = NODE):
    """`outpost-cloud serve --releases` on the host end of a fresh edge namespace's link, and a
    join token for ``node``."""
    require_netns()
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
                [VENV_BIN / "outpost-cloud", "token", "create", node, "--kubeconfig",
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
    assert (root / "usr/local/bin/outpost").read_text() == stand_in(VERSION)
    assert (root / "usr/local/bin/outpost").stat().st_mode & 0o777 == 0o755
    assert "OUTPOST_DATA_DIR=/var/lib/outpost" in (root / "etc/outpost/outpost.env").read_text()
    assert stat.S_IMODE((root / "etc/outpost/outpost.env").stat().st_mode) == 0o600
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
    (root / "run/systemd/system").mkdir(parents=True)  # what systemd as init makes
    before = snapshot(root)

    env = {"OUTPOST_TOKEN": cloud["token"]}
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

    env["INSTALL_OUTPOST_INIT"] = "systemd"  # said, not detected, this time: the same
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
        for name in ("SHA256SUMS", "SHA256SUMS.sig", f"outpost-linux-{ARCH}"):
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

    evil = stand_in(VERSION).replace("exec sleep", "echo owned; exec sleep")
    (mirror / f"outpost-linux-{ARCH}").write_text(evil)
    before = snapshot(root)
    tampered = in_root(link, root, from_mirror)
    assert tampered.returncode == 1
    assert f"outpost-linux-{ARCH} does not match its checksum" in tampered.stderr
    assert snapshot(root) == before

    sums = (mirror / "SHA256SUMS").read_text()
    good_hash = hashlib.sha256(stand_in(VERSION).encode()).hexdigest()
    evil_hash = hashlib.sha256(evil.encode()).hexdigest()
    (mirror / "SHA256SUMS").write_text(sums.replace(good_hash, evil_hash))
    before = snapshot(root)
    resigned = in_root(link, root, from_mirror)
    assert resigned.returncode == 1
    assert "SHA256SUMS of release 0.9.1 is not signed by this cloud's release key" in (
        resigned.stderr
    )
    assert snapshot(root) == before


async def test_a_binary_that_does_not_run_here_replaces_nothing(cloud: dict, tmp_path: Path):
    link, root = cloud["link"], tmp_path / "root"
    make_root(root)
    (root / "ca.crt").write_bytes(cloud["ca"])
    before = snapshot(root)

    result = in_root(
        link, root, install_command(cloud, "--token", cloud["token"], "--version", BROKEN)
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"[outpost] error: the outpost binary of release {BROKEN} does not run on this machine:"
        " outpost: cannot execute binary file: Exec format error"
    )
    assert snapshot(root) == before


async def test_environment_variables_instead_of_options(cloud: dict, tmp_path: Path):
    link, root = cloud["link"], tmp_path / "root"
    make_root(root)
    (root / "ca.crt").write_bytes(cloud["ca"])
    before = snapshot(root)

    env = {
        "OUTPOST_TOKEN": cloud["token"],
        "OUTPOST_URL": "https://cloud.example:8443",
        "INSTALL_OUTPOST_VERSION": OLDER,
        "INSTALL_OUTPOST_BIN_DIR": "/opt/outpost",
        "INSTALL_OUTPOST_SKIP_START": "yes",
    }
    first = in_root(link, root, install_command(cloud), **env)
    assert first.returncode == 0
    assert f"release {OLDER} for linux-{ARCH} from {cloud['url']}/releases" in first.stderr
    assert "installed: /opt/outpost/outpost" in first.stderr
    assert (root / "opt/outpost/outpost").read_text() == stand_in(OLDER)
    assert not (root / "usr/local/bin/outpost").exists()
    joined = (root / "joined-with").read_text()
    assert "--cloud https://cloud.example:8443" in joined
    assert f"--token {cloud['token']}" in joined
    assert "not started (--skip-start)" in first.stderr
    assert not (root / "run/outpost.pid").exists()

    removed = in_root(link, root, "/opt/outpost/outpost-uninstall.sh")
    assert removed.returncode == 0
    assert snapshot(root) == before  # /opt/outpost too: it was the installer's


async def test_an_upgrade_removes_the_unpacked_copy_of_the_earlier_build(
    cloud: dict, tmp_path: Path
):
    link, root = cloud["link"], tmp_path / "root"
    make_root(root)
    (root / "ca.crt").write_bytes(cloud["ca"])
    unpacked = root / "var/cache/outpost"

    older = in_root(
        link, root, install_command(cloud, "--token", cloud["token"], "--version", OLDER)
    )
    assert older.returncode == 0, older.stderr
    assert [p.name for p in unpacked.iterdir()] == [f"{OLDER}-{build_key(OLDER)}"]
    first_pid = int((root / "run/outpost.pid").read_text())

    newer = in_root(link, root, install_command(cloud, "--token", cloud["token"]))
    assert newer.returncode == 0, newer.stderr
    assert (root / "usr/local/bin/outpost").read_text() == stand_in(VERSION)
    assert not pid_alive(first_pid)  # the agent now runs the new build
    assert [p.name for p in unpacked.iterdir()] == [f"{VERSION}-{build_key(VERSION)}"]
    assert "removed the unpacked copy of an earlier build" in newer.stderr

    again = in_root(link, root, install_command(cloud, "--token", cloud["token"]))
    assert f"nothing changed: Outpost {VERSION} is installed" in again.stderr
    assert [p.name for p in unpacked.iterdir()] == [f"{VERSION}-{build_key(VERSION)}"]
    assert in_root(link, root, "/usr/local/bin/outpost-uninstall.sh").returncode == 0


FAKE_UNAME = """#!/bin/sh
if [ "$1" = -m ]; then echo "$FAKE_MACHINE"; else exec /bin/busybox uname "$@"; fi
"""


async def test_the_machine_picks_the_binary_and_an_unknown_one_is_one_line(
    cloud: dict, tmp_path: Path
):
    link, root = cloud["link"], tmp_path / "root"
    make_root(root)
    (root / "ca.crt").write_bytes(cloud["ca"])
    # busybox sh runs its own uname applet whatever PATH says: this runs the script with dash
    # (Debian's /bin/sh), which finds the fake uname first on PATH.
    _copy_with_libraries("dash", root)
    (root / "usr/local/bin/uname").write_text(FAKE_UNAME)
    (root / "usr/local/bin/uname").chmod(0o755)
    before = snapshot(root)
    command = install_command(cloud, "--token", cloud["token"]).replace("| sh -s", "| dash -s")

    # Only this machine's architecture is released: the others are looked for and not found.
    for machine, arch in RELEASE_ARCH.items():
        result = in_root(link, root, command, FAKE_MACHINE=machine)
        assert f"release {VERSION} for linux-{arch} from" in result.stderr
        if arch != ARCH:
            assert result.returncode == 1
            error = f"[outpost] error: release {VERSION} has no binary for linux-{arch}"
            assert result.stderr.splitlines()[-1] == error
    in_root(link, root, "/usr/local/bin/outpost-uninstall.sh")
    assert snapshot(root) == before

    result = in_root(link, root, command, FAKE_MACHINE="armv8l")  # 32-bit userland, 64-bit CPU
    assert "for linux-arm from" in result.stderr
    for machine in ("mips64", "armv6l", "i686"):
        result = in_root(link, root, command, FAKE_MACHINE=machine)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"[outpost] error: no Outpost build for this machine ({machine}): there are"
            " amd64 (x86_64), arm64 (aarch64) and arm (armv7l)"
        ]
    assert snapshot(root) == before


async def test_a_script_cut_short_runs_nothing(cloud: dict, tmp_path: Path):
    """The body is one function called on the last line: a download cut anywhere before that
    line's end defines nothing, or calls nothing, and so changes nothing."""
    link, root = cloud["link"], tmp_path / "root"
    make_root(root)
    (root / "ca.crt").write_bytes(cloud["ca"])
    context = ssl.create_default_context(cadata=cloud["ca"].decode())
    async with httpx2.AsyncClient(verify=context) as http:
        response = await http.get(f"{cloud['url']}/install.sh")
    response.raise_for_status()
    script = response.content
    (root / "mirror").mkdir()
    (root / "mirror/install.sh").write_bytes(script)
    before = snapshot(root)

    start = script.index(b"outpost_install() {")
    call = script.rindex(b'outpost_install "$@"')
    cuts = [start // 2, start + 1, *range(start + 40, call, (call - start) // 12), call, call + 10]
    for cut in cuts:
        command = f"head -c {cut} /mirror/install.sh | sh -s - --token {cloud['token']}"
        result = in_root(link, root, command)
        assert "[outpost]" not in result.stdout + result.stderr, cut
        assert snapshot(root) == before, cut
    whole = in_root(link, root, f"sh /mirror/install.sh --token {cloud['token']} --skip-start")
    assert whole.returncode == 0  # what was cut short does run whole
    assert "[outpost] done:" in whole.stderr


# -- the built binary ------------------------------------------------------------------------

REAL_NODE = "gw-install-real"


@pytest.fixture(scope="module")
def binary_libraries(outpost_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> set[Path]:
    """The libraries the binary loads: its onefile bootstrap only libc, the payload it unpacks
    on the first start (Python's extension modules) libm, libz, libgcc_s and so on."""
    unpacked = tmp_path_factory.mktemp("unpacked")
    try:
        subprocess.run(
            [outpost_binary, "version"],
            env={**os.environ, "XDG_CACHE_HOME": str(unpacked)},
            capture_output=True,
            check=True,
        )
        elves = []
        for path in unpacked.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with path.open("rb") as f:
                    if f.read(4) == b"\x7fELF":
                        elves.append(path)
        assert elves, f"nothing unpacked into {unpacked}"
        found = libraries(outpost_binary, *elves)
        return {lib for lib in found if unpacked not in lib.parents}
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)


@pytest.fixture
def real_releases(outpost_binary: Path, tmp_path: Path) -> tuple[Path, str]:
    """A release folder holding the built binary as the version it says it is."""
    built = subprocess.run(
        [outpost_binary, "version", "--json"], capture_output=True, text=True, check=True
    )
    version = json.loads(built.stdout)["version"]
    releases = tmp_path / "releases"
    release(releases, version, outpost_binary.read_bytes())
    return releases, version


@pytest.fixture
async def real_cloud(
    outpost_binary: Path,
    real_releases: tuple[Path, str],
    control_plane: ControlPlane,
    tmp_path: Path,
):
    """A loopback cloud serving the built binary's release."""
    releases, version = real_releases
    try:
        async with serving(control_plane, tmp_path, releases, REAL_NODE) as served:
            yield {**served, "version": version, "binary": outpost_binary}
    finally:
        control_plane.kubectl("delete", "node", REAL_NODE, "--ignore-not-found", check=False)


# What the running agent itself changes between two runs of the installer: its store and log.
AGENT_STATE = ("/var/lib/outpost/store.db", "/var/log/outpost.log")


def without_agent_state(seen: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in seen.items() if not k.startswith(AGENT_STATE)}


@pytest.mark.binary
async def test_the_built_binary_installs_joins_runs_and_uninstalls(
    real_cloud: dict, binary_libraries: set[Path], control_plane: ControlPlane, tmp_path: Path
):
    cloud = real_cloud
    link, root = cloud["link"], tmp_path / "root"
    make_root(root)
    copy_into(root, *binary_libraries)
    # A used system's root has a ~/.cache: `outpost` run by hand as root unpacks itself there.
    (root / "root/.cache").mkdir()
    (root / "ca.crt").write_bytes(cloud["ca"])
    before = snapshot(root)
    command = install_command(cloud, "--token", cloud["token"], "--node-name", REAL_NODE)

    first = await trio.to_thread.run_sync(lambda: in_root(link, root, command))
    assert first.returncode == 0
    assert f"release {cloud['version']} for linux-{ARCH}" in first.stderr
    assert "installed: /usr/local/bin/outpost" in first.stderr
    digest = hashlib.sha256(cloud["binary"].read_bytes()).hexdigest()
    assert hashlib.sha256((root / "usr/local/bin/outpost").read_bytes()).hexdigest() == digest

    # The real join: the gateway's own key, a certificate naming the node from the cloud's CA.
    identity = root / "var/lib/outpost/identity"
    assert stat.S_IMODE((identity / "node.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((identity / "node.crt").read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [n.value for n in names] == [REAL_NODE]
    assert (identity / "ca.crt").read_bytes().strip() == cloud["ca"].strip()
    assert (root / "var/lib/outpost/cloud-url").read_text() == cloud["hub"] + "\n"
    # Everything the script ran unpacked itself under /var/cache, none of it in root's home.
    assert len(list((root / "var/cache/outpost").iterdir())) == 1
    assert list((root / "root/.cache").iterdir()) == []
    assert "XDG_CACHE_HOME=/var/cache" in (root / "etc/outpost/outpost.env").read_text()

    version = in_root(link, root, "outpost version")
    assert version.returncode == 0
    assert version.stdout.startswith(f"outpost {cloud['version']} (python ")

    # The agent the script started (no systemd here) reaches the cloud over mutual TLS.
    pid = int((root / "run/outpost.pid").read_text())
    assert pid_alive(pid)

    def online() -> bool:
        status = in_root(link, root, "outpost status --json")
        return status.returncode == 0 and json.loads(status.stdout)["link"]["online"]

    def node_ready() -> bool:
        ready = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
        got = control_plane.kubectl("get", "node", REAL_NODE, "-o", ready, check=False)
        return got.stdout == "True"

    await eventually(
        online, "`outpost status` in the chroot shows the link online", within=60, interval=0.5
    )
    status = json.loads(in_root(link, root, "outpost status --json").stdout)
    assert status["node"] == REAL_NODE
    assert status["cloud"] == cloud["hub"]
    await eventually(
        node_ready, f"the Node {REAL_NODE} is Ready in Kubernetes", within=60, interval=0.5
    )
    installed = snapshot(root)

    second = await trio.to_thread.run_sync(lambda: in_root(link, root, command))
    assert second.returncode == 0
    assert f"nothing changed: Outpost {cloud['version']} is installed" in second.stderr
    assert "already joined" in second.stderr
    assert f"running: pid {pid}" in second.stderr
    assert without_agent_state(snapshot(root)) == without_agent_state(installed)

    removed = in_root(link, root, "/usr/local/bin/outpost-uninstall.sh")
    assert removed.returncode == 0
    assert not pid_alive(pid)
    assert snapshot(root) == before
