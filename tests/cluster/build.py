"""Builds the test control plane's binaries from the Go module in ``go/``, once per version.

The binaries live outside the repository, in a folder named after the Kubernetes and etcd
versions and a hash of everything that goes into the build, so a second ``make setup`` finds
them and builds nothing, and a change to ``go.mod`` builds a fresh set beside the old one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GO_MODULE = Path(__file__).resolve().parent / "go"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
_KUBE_COMMANDS = tuple(f"k8s.io/kubernetes/cmd/{name}" for name in BINARIES[1:])


class BuildError(RuntimeError):
    """The control plane could not be built; the message says what to do."""


def cache_root() -> Path:
    """Where built artefacts are cached: ``$OUTPOST_CACHE_DIR`` or ``~/.cache/outpost``."""
    return Path(os.environ.get("OUTPOST_CACHE_DIR") or Path.home() / ".cache" / "outpost")


def _pinned(module: str) -> str:
    match = re.search(
        rf"^(?:require )?\s*{re.escape(module)} (v\S+)", (GO_MODULE / "go.mod").read_text(), re.M
    )
    if match is None:
        raise BuildError(f"{GO_MODULE / 'go.mod'} does not pin {module}")
    return match.group(1)


def kubernetes_version() -> str:
    return _pinned("k8s.io/kubernetes")


def etcd_version() -> str:
    return _pinned("go.etcd.io/etcd/server/v3")


def _ldflags() -> str:
    version = kubernetes_version()
    major, minor = version.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    # Without these the binaries call themselves v0.0.0, and kubectl warns about version skew.
    return (
        f"-s -w -X {pkg}.gitVersion={version} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor}"
        f" -X {pkg}.gitTreeState=clean"
    )


def bin_dir() -> Path:
    """The folder the binaries of the pinned versions are (or will be) in."""
    digest = hashlib.sha256(_ldflags().encode())
    for name in ("go.mod", "go.sum", "etcd/main.go"):
        digest.update((GO_MODULE / name).read_bytes())
    key = f"k8s-{kubernetes_version()}-etcd-{etcd_version()}-{digest.hexdigest()[:12]}"
    return cache_root() / "controlplane" / key


def is_built() -> bool:
    return all((bin_dir() / name).is_file() for name in BINARIES)


def build(*, log=sys.stderr) -> Path:
    """Build the binaries unless they are cached; return their folder."""
    target = bin_dir()
    if is_built():
        return target
    go = shutil.which("go")
    if go is None:
        raise BuildError("the Go toolchain is not on PATH; install Go 1.26 or newer")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the control plane into {target} (several minutes)", file=log, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        command = [
            go, "build", "-trimpath", "-buildvcs=false", "-ldflags", _ldflags(), "-o", f"{tmp}/",
            *_KUBE_COMMANDS, "./etcd",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=GO_MODULE, stdout=log, stderr=log, check=False)
        if result.returncode != 0:
            raise BuildError(f"go build failed with exit code {result.returncode} in {GO_MODULE}")
        # Rename as a whole, so an interrupted build never leaves a half-filled cache entry.
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
