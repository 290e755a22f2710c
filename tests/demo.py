"""`make demo`: a local control plane, outpost-cloud, and one edge gateway joined to it.

It starts the test control plane and `outpost-cloud serve`, creates a join token, joins an edge
(`outpost join`, then `outpost run` with its own data folder), creates a ConfigMap labelled for
that node with kubectl, and shows it arriving in the edge's store (`outpost status`), then
stops everything. With --keep it stays up until Ctrl-C, so a person can explore.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

import trio

from tests.channelkit import Cloud, Edge
from tests.cluster import build
from tests.cluster.controlplane import ControlPlane, ControlPlaneError
from tests.processes import VENV_BIN

NODE = "demo-gateway"


def _run(*args: str | Path) -> None:
    print(f"\n$ {' '.join(str(a) for a in args)}", flush=True)


async def _show(plane: ControlPlane, keep: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="outpost-demo-") as folder:
        cloud = Cloud(plane, Path(folder), heartbeat=5)
        edge = Edge(NODE, Path(folder))
        try:
            await cloud.start()
            print(f"outpost-cloud listening on {cloud.url} (log: {cloud.runs[-1].path})")
            _run("outpost-cloud", "token", "create", NODE)
            _run("outpost", "join", "--cloud", cloud.url, "--token", "…", "--node-name", NODE)
            await edge.join(cloud)
            _run("outpost", "run", "--data-dir", edge.data_dir)
            await edge.start()
            await edge.wait_online()
            print(f"edge online (log: {edge.runs[-1].path})", flush=True)
            for args in (
                ["create", "configmap", "site-config", "--from-literal=setpoint=21.5"],
                ["label", "configmap", "site-config", f"outpost.io/node={NODE}"],
            ):
                _run("kubectl", *args)
                result = plane.kubectl(*args, check=False)
                print(result.stdout + result.stderr, end="", flush=True)
            with trio.fail_after(30):
                while "default/ConfigMap/site-config" not in edge.objects():  # noqa: ASYNC110
                    await trio.sleep(0.1)
            _run("outpost", "status", "--data-dir", edge.data_dir)
            result = await trio.run_process(
                [VENV_BIN / "outpost", "status", "--data-dir", edge.data_dir],
                capture_stdout=True,
            )
            print(result.stdout.decode(), end="", flush=True)
            print(f"\nthe edge holds: {edge.objects()}", flush=True)
            if keep:
                print(
                    f"\nexport KUBECONFIG={plane.kubeconfig}\nexport PATH={plane.bin_dir}:$PATH"
                    f"\nLabel ConfigMaps outpost.io/node={NODE} to send them to the gateway;"
                    f" `.venv/bin/outpost status --data-dir {edge.data_dir}` shows it."
                    "\nCtrl-C stops everything.",
                    flush=True,
                )
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
        except trio.TooSlowError:
            print("the demo timed out; see the logs above", file=sys.stderr)
            return 1
        else:
            return 0
        finally:
            await edge.stop()
            await cloud.stop()


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
