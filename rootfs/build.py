"""Builds the gateway root filesystem: a minimal Debian with Outpost preinstalled.

``make rootfs`` runs this as root. It debootstraps Debian bookworm (``--variant=minbase``) with
systemd, runc, the CNI plugins the pod network uses, mosquitto and iproute2, adds the
``outpost`` binary (from the ``make binary`` cache), its unit, ``/etc/outpost/`` and the
first-boot join unit, and writes a tarball and an ext4 image.

The outputs are cached outside the repository, in a folder named after a hash of every input
(this script, the files it copies, the package list, the binary's bytes), so a second run with
nothing changed builds nothing, and a rebuilt binary or an edited unit gives a fresh image beside
the old one. Packages are fetched from the mirror as they are on the day of the build; their
versions are recorded in the folder's ``manifest.json``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FILES = HERE / "files"
UNIT = REPO / "systemd" / "outpost.service"
UNIT_ENV = REPO / "systemd" / "outpost.env"
BINARY_SCRIPT = REPO / "build" / "binary.py"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd",
    "systemd-sysv",  # /sbin/init
    "runc",
    "containernetworking-plugins",
    "iptables",  # the portmap plugin and the pods' NAT
    "mosquitto",  # the local eventbus (device twins on $hw/events/...)
    "iproute2",
    "ca-certificates",
    "netbase",
)
# Installed with apt after debootstrap: systemd-resolved's postinst, which turns
# /etc/resolv.conf into a symlink, fails inside debootstrap.
LATER_PACKAGES = (
    "systemd-resolved",  # DNS for what networkd's DHCP hands out
    "systemd-timesyncd",  # boards without a battery-backed clock: TLS needs the date
)
# The pod network's conflist (edge/pods/cni.py) runs these; the other plugins Debian ships
# (about 30 MB) are left out of the image.
CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
# Left out of the image, now and by later `apt-get install`s (dpkg path-exclude).
EXCLUDED_PATHS = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)

BINARY_PATH = "/usr/local/bin/outpost"  # where the installer puts it too
TARBALL = "outpost-rootfs.tar.gz"
IMAGE = "outpost-rootfs.ext4"
MANIFEST = "manifest.json"
LABEL = "outpost-root"
_CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"

# File in FILES -> (path in the image, mode).
_FILES = {
    "outpost-join.service": ("/etc/systemd/system/outpost-join.service", 0o644),
    "first-boot-join": ("/usr/lib/outpost/first-boot-join", 0o755),
    "join.env": ("/etc/outpost/join.env", 0o600),  # will hold a token
    "80-dhcp.network": ("/etc/systemd/network/80-dhcp.network", 0o644),
    "README.etc": ("/etc/outpost/README", 0o644),
}


class BuildError(RuntimeError):
    """The rootfs could not be built; the message says what to do."""


def cache_root() -> Path:
    """Where built artefacts are cached: ``$OUTPOST_CACHE_DIR`` or ``~/.cache/outpost``."""
    return Path(os.environ.get("OUTPOST_CACHE_DIR") or Path.home() / ".cache" / "outpost")


def find_binary() -> Path | None:
    """The ``outpost`` binary to put in the image, or None when it has not been built.

    ``$OUTPOST_BINARY`` wins; otherwise the ``make binary`` build of the current sources
    (``build/binary.py --path``: ``<cache>/binary/<hash>/outpost``). Without that script, the
    newest build in the cache.
    """
    given = os.environ.get("OUTPOST_BINARY")
    if given:
        path = Path(given)
        if not path.is_file():
            raise BuildError(f"OUTPOST_BINARY={given} is not a file")
        return path
    if BINARY_SCRIPT.is_file():
        found = subprocess.run(
            [sys.executable, str(BINARY_SCRIPT), "--path"],
            capture_output=True, text=True, check=False, env={**os.environ,
            "OUTPOST_CACHE_DIR": str(cache_root())},
        )  # fmt: skip
        path = Path(found.stdout.strip())
        return path if found.returncode == 0 and path.is_file() else None
    built = [Path(p) for p in glob.glob(str(cache_root() / "binary" / "*" / "outpost"))]
    built = [p for p in built if p.is_file() and os.access(p, os.X_OK)]
    return max(built, key=lambda p: p.stat().st_mtime) if built else None


def _inputs(binary: Path | None) -> dict[str, str]:
    """What goes into the image, each as a hash (or "absent"): the cache key is made of these."""

    def digest(path: Path) -> str:
        if not path.is_file():
            return "absent"
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    inputs = {
        "suite": SUITE,
        "mirror": MIRROR,
        "packages": ",".join(PACKAGES + LATER_PACKAGES),
        "build.py": digest(Path(__file__)),
        "outpost.service": digest(UNIT),
        "outpost.env": digest(UNIT_ENV),
        "binary": digest(binary) if binary else "absent",
    }
    for name in sorted(_FILES):
        inputs[f"files/{name}"] = digest(FILES / name)
    return inputs


def out_dir(binary: Path | None = None, *, find: bool = True) -> Path:
    """The cache folder of the image built from the current inputs."""
    if binary is None and find:
        binary = find_binary()
    blob = json.dumps(_inputs(binary), sort_keys=True).encode()
    return cache_root() / "rootfs" / f"{SUITE}-{hashlib.sha256(blob).hexdigest()[:12]}"


def is_built(directory: Path | None = None) -> bool:
    directory = directory or out_dir()
    return all((directory / name).is_file() for name in (TARBALL, IMAGE, MANIFEST))


def latest() -> Path | None:
    """The most recently built image folder, whatever its inputs (what the tests use)."""
    built = [p for p in (cache_root() / "rootfs").glob(f"{SUITE}-*") if is_built(p)]
    return max(built, key=lambda p: (p / MANIFEST).stat().st_mtime) if built else None


def _run(command: list[str], *, log, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, stdout=log, stderr=log, check=False, **kwargs)
    if result.returncode != 0:
        raise BuildError(f"{command[0]} failed with exit code {result.returncode}: {command}")
    return result


def _chroot(tree: Path, *command: str, log) -> None:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    _run([_CHROOT, str(tree), *command], log=log, env=env)


def _put(tree: Path, source: Path, target: str, mode: int) -> None:
    path = tree / target.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    path.chmod(mode)


def _exec_path(unit: Path) -> str | None:
    """The program of the unit's ExecStart (without systemd's prefixes), if it has one."""
    for line in unit.read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() == "ExecStart" and value.strip():
            return value.split()[0].lstrip("@-:+!")
    return None


def _customize(tree: Path, binary: Path | None, *, log) -> dict[str, object]:
    """Everything after debootstrap; returns facts for the manifest."""
    facts: dict[str, object] = {}
    _chroot(tree, "apt-get", "install", "-y", "-q", "--no-install-recommends", *LATER_PACKAGES,
            log=log)  # fmt: skip
    # Slim: no docs, man pages or translations, now or after a later apt-get install.
    dpkg_cfg = tree / "etc/dpkg/dpkg.cfg.d/outpost-minimal"
    dpkg_cfg.write_text(
        "# The Outpost gateway image carries no documentation.\n"
        + "".join(f"path-exclude={p}\n" for p in EXCLUDED_PATHS)
        + "path-include=/usr/share/doc/*/copyright\n"
    )
    for pattern in EXCLUDED_PATHS:
        for path in map(Path, glob.glob(str(tree) + pattern)):
            if path.parent.name == "doc" and path.is_dir() and not path.is_symlink():
                for inner in path.iterdir():  # keep the licences
                    if inner.name != "copyright":
                        _remove(inner)
            else:
                _remove(path)
    for plugin in (tree / "usr/lib/cni").iterdir():
        if plugin.name not in CNI_PLUGINS:
            plugin.unlink()

    for name, (target, mode) in _FILES.items():
        _put(tree, FILES / name, target, mode)
    if UNIT_ENV.is_file():  # the documented example of the unit's EnvironmentFile
        _put(tree, UNIT_ENV, "/etc/outpost/outpost.env", 0o644)
    (tree / "etc/outpost/pods").mkdir(mode=0o755, exist_ok=True)
    (tree / "var/lib/outpost").mkdir(mode=0o700, exist_ok=True)

    binary_target = BINARY_PATH
    units = ["outpost-join.service", "systemd-networkd.service", "systemd-resolved.service"]
    if UNIT.is_file():
        _put(tree, UNIT, "/etc/systemd/system/outpost.service", 0o644)
        units.append("outpost.service")
        exec_path = _exec_path(UNIT)
        if exec_path and exec_path.endswith("/outpost"):
            binary_target = exec_path
    else:
        print("WARNING: systemd/outpost.service does not exist yet: the image has no agent unit",
              file=log, flush=True)  # fmt: skip
    facts["unit"] = UNIT.is_file()
    if binary is not None:
        _put(tree, binary, binary_target, 0o755)
        if binary_target != BINARY_PATH:
            (tree / BINARY_PATH.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (tree / BINARY_PATH.lstrip("/")).symlink_to(binary_target)
    facts["binary"] = binary_target if binary is not None else None
    _chroot(tree, "systemctl", "enable", *units, log=log)

    (tree / "etc/hostname").write_text("outpost\n")
    (tree / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\toutpost\n::1\tlocalhost\n")
    (tree / "etc/fstab").write_text(f"LABEL={LABEL}\t/\text4\tdefaults,noatime\t0\t1\n")
    # Empty: systemd makes a machine ID on first boot (and treats it as the first boot).
    (tree / "etc/machine-id").write_text("")
    dbus_id = tree / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    resolv = tree / "etc/resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")

    versions = subprocess.run(
        [_CHROOT, str(tree), "dpkg-query", "-W", "-f", "${Package} ${Version}\n",
         *PACKAGES, *LATER_PACKAGES],
        capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin"},
    ).stdout  # fmt: skip
    facts["packages"] = dict(line.split(" ", 1) for line in versions.splitlines() if " " in line)

    _chroot(tree, "apt-get", "clean", log=log)
    for folder in ("var/lib/apt/lists", "tmp", "var/tmp"):
        for path in (tree / folder).glob("*"):
            _remove(path)
    # Logs go, their folders stay (mosquitto, for one, logs to /var/log/mosquitto/).
    for path in (tree / "var/log").rglob("*"):
        if path.is_file() or path.is_symlink():
            path.unlink()
    return facts


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _tree_bytes(tree: Path) -> int:
    out = subprocess.run(["du", "-sb", str(tree)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def build(*, log=sys.stderr, require_binary: bool = False) -> Path:
    """Build the image unless it is cached; return its folder."""
    binary = find_binary()
    if binary is None:
        if require_binary:
            raise BuildError("the outpost binary is not built: run `make binary` first")
        print(
            "WARNING: the outpost binary is not built (`make binary`): building the image"
            " WITHOUT it. Run `make binary` and `make rootfs` again for a complete image.",
            file=log,
            flush=True,
        )
    target = out_dir(binary, find=False)
    if is_built(target):
        print(f"rootfs is up to date: {target}", file=log, flush=True)
        return target
    if os.geteuid() != 0:
        raise BuildError("building the rootfs takes root (debootstrap, chroot): run it with sudo")
    for tool in ("debootstrap", "mkfs.ext4", "chroot", "tar"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is not on PATH: run `make setup` (Debian packages)")

    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    debs = cache_root() / "debootstrap-debs"  # downloaded .debs, reused by later builds
    debs.mkdir(parents=True, exist_ok=True)
    print(f"building the rootfs into {target} (a few minutes)", file=log, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        tree = tmp / "tree"
        _run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
             f"--cache-dir={debs}", SUITE, str(tree), MIRROR],
            log=log,
        )  # fmt: skip
        bootstrapped = time.monotonic()
        facts = _customize(tree, binary, log=log)
        tree_bytes = _tree_bytes(tree)

        _run(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(tree),
             "-czf", str(tmp / TARBALL), "."],
            log=log,
        )  # fmt: skip
        # Room for the store, images and logs; grow it to the disk with resize2fs when flashed.
        size_mib = (tree_bytes * 5 // 4 >> 20) + 256
        _run(
            ["mkfs.ext4", "-q", "-F", "-L", LABEL, "-d", str(tree), "-E", "root_owner=0:0",
             str(tmp / IMAGE), f"{size_mib}M"],
            log=log,
        )  # fmt: skip
        shutil.rmtree(tree)
        manifest = {
            "suite": SUITE,
            "inputs": _inputs(binary),
            "binary_source": str(binary) if binary else None,
            **facts,
            "tree_mb": round(tree_bytes / 1e6, 1),
            "tarball_mb": round((tmp / TARBALL).stat().st_size / 1e6, 1),
            "image_mib": size_mib,
            "debootstrap_s": round(bootstrapped - started, 1),
            "build_s": round(time.monotonic() - started, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Rename as a whole, so an interrupted build never leaves a half-filled cache entry.
        if target.exists():
            shutil.rmtree(target)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a sudo-built image from its user
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: manifest[k] for k in ("binary", "unit", "tree_mb", "tarball_mb",
                                               "image_mib", "build_s")}),
          file=log, flush=True)  # fmt: skip
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rootfs.build", description=__doc__)
    parser.add_argument(
        "--require-binary",
        action="store_true",
        help="fail instead of building an image without the outpost binary",
    )
    parser.add_argument(
        "--print-dir", action="store_true", help="print the cache folder of the current inputs"
    )
    args = parser.parse_args(argv)
    try:
        if args.print_dir:
            print(out_dir())
            return 0
        target = build(require_binary=args.require_binary)
    except BuildError as exc:
        print(f"make rootfs: {exc}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
