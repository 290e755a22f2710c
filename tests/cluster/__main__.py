"""Command line for the test control plane: build it, or run one until Ctrl-C."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from tests.cluster import build
from tests.cluster.controlplane import ControlPlane, ControlPlaneError


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _up(args: argparse.Namespace) -> int:
    # SIGTERM takes the same path as Ctrl-C, so the control plane is stopped either way. SIGINT
    # is set explicitly too: a shell starting us in the background leaves it ignored.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    plane = ControlPlane(keep_workdir=args.keep)
    try:
        with plane:
            if args.kubeconfig_out:
                args.kubeconfig_out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(plane.kubeconfig, args.kubeconfig_out)
            kubeconfig = args.kubeconfig_out or plane.kubeconfig
            print(
                f"control plane ready: Kubernetes {build.kubernetes_version()},"
                f" etcd {build.etcd_version()}, apiserver {plane.server}\n"
                f"  export KUBECONFIG={kubeconfig.resolve()}\n"
                f"  export PATH={plane.bin_dir}:$PATH\n"
                f"  kubectl get --raw /readyz\n"
                f"logs are in {plane.kubeconfig.parent / 'logs'}; Ctrl-C stops everything",
                flush=True,
            )
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("control plane stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build and cache the binaries (no-op when cached)")
    sub.add_parser("bin-dir", help="print the folder holding the binaries")
    up = sub.add_parser("up", help="start a control plane and keep it running until Ctrl-C")
    up.add_argument("--kubeconfig-out", type=Path, help="also copy the admin kubeconfig here")
    up.add_argument("--keep", action="store_true", help="keep the work folder (logs) on exit")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build.build())
        elif args.command == "bin-dir":
            print(build.bin_dir())
        else:
            return _up(args)
    except (build.BuildError, ControlPlaneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
