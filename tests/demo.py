"""`make demo`: a local control plane with outpost-cloud connected to it, shown through kubectl.

It starts the test control plane, starts `outpost-cloud serve` against it, waits until the cloud
service reports that it reached Kubernetes, prints what kubectl sees, and stops everything.
With --keep it stays up until Ctrl-C, so a person can explore with kubectl.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

from tests.cluster import build
from tests.cluster.controlplane import ControlPlane, ControlPlaneError, free_port
from tests.processes import VENV_BIN, LineReader, start


async def _show(plane: ControlPlane, keep: bool) -> int:
    listen = f"127.0.0.1:{free_port()}"
    cloud = await start(
        VENV_BIN / "outpost-cloud", "serve", "--kubeconfig", plane.kubeconfig, "--listen", listen
    )
    try:
        with trio.move_on_after(30) as waited:
            await LineReader(cloud).wait_for(r'msg="connected to Kubernetes"')
        if waited.cancelled_caught:
            print("outpost-cloud did not reach Kubernetes within 30 s", file=sys.stderr)
            return 1
        for args in (["version"], ["get", "nodes,pods", "--all-namespaces", "-o", "wide"]):
            print(f"\n$ kubectl {' '.join(args)}", flush=True)
            result = plane.kubectl(*args, check=False)
            print(result.stdout + result.stderr, end="", flush=True)
        print(
            f"\noutpost-cloud is running and connected to {plane.server}. It does not accept"
            " edge gateways yet, so no edge node is listed.",
            flush=True,
        )
        if keep:
            print(
                f"\nexport KUBECONFIG={plane.kubeconfig}\nexport PATH={plane.bin_dir}:$PATH"
                "\nCtrl-C stops everything.",
                flush=True,
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
        return 0
    finally:
        cloud.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await cloud.wait()
        if cloud.returncode is None:
            cloud.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="stay up until Ctrl-C")
    args = parser.parse_args(argv)
    print(
        f"starting Kubernetes {build.kubernetes_version()} (etcd {build.etcd_version()})"
        " on loopback",
        flush=True,
    )
    try:
        with ControlPlane() as plane:
            return trio.run(_show, plane, args.keep)
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
