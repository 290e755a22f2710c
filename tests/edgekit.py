"""Edge nodes in a real cluster: `outpost-cloud serve` and N `outpost run` agents, each agent in
its own network namespace, joined the way a person joins a gateway.

``EdgeCluster`` is what end-to-end tests, ``bench/e2e_latency.py`` and ``make demo`` use::

    async with EdgeCluster(control_plane, tmp_path, ["gw-1"]) as cluster:
        await cluster.apply(deployment("app", cluster.image, node="gw-1", replicas=2))
        await cluster.until(lambda: ..., "the pods run")
        cluster["gw-1"].cut()

What it sets up, and why that way:

- a ``Registry`` holding the busybox test image, listening on every address: an agent in a
  namespace reaches it through its link's host end. The agent pulls over plain HTTP only from
  loopback registries (anything else must be HTTPS), so each namespace runs a ``socat`` relay
  from its own 127.0.0.1:<port> to the registry; the image is then ``127.0.0.1:<port>/…`` on
  the host and in every namespace alike, and one Deployment serves every node.
- one ``EdgeLink`` per node, made before the cloud starts: the cloud's certificate must name
  every link's host end (``--tls-san``), which is the address each agent joins and connects to.
- `outpost-cloud serve` with a short Lease renewal (``--lease-renew-interval``), since the
  test cluster marks a node NotReady after 10 s without one.
- per agent, `outpost join` with a token from `outpost-cloud token create`, then `outpost run`
  with its own ``--data-dir``, ``--runc-root`` and ``--pod-subnet``.

Leaving the ``async with`` prints the tails of every log, the nodes, pods and events when the
body raised; then stops the agents, removes every container, mount and pod namespace they left
(an agent never stops its pods when it stops, by design), the namespaces, the cloud, the
registry, and deletes the Node objects so the cluster's pod GC removes their pods.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio
import yaml

from tests.channelkit import Cloud, Edge, spawn
from tests.cluster.controlplane import ControlPlane
from tests.netns import EdgeLink
from tests.podkit import IMAGE_REPOSITORY
from tests.processes import VENV_BIN
from tests.registry import Registry, build_image
from tests.waiting import eventually

T = TypeVar("T")

# The test cluster judges a node by its Lease with a 10 s grace: renew well within it.
LEASE_RENEW_S = 2
EDGE_ROLE_LABEL = "node-role.kubernetes.io/edge"
LOG_TAIL_LINES = 60


class SharedRegistry(Registry):
    """The test registry on every address (not only loopback), for agents in namespaces."""

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config["http"]["addr"] = f"0.0.0.0:{self.port}"
        return config


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` (in whatever network namespace it is) has a TCP listener on
    127.0.0.1:``port``; /proc/PID/net/tcp lists the sockets of that process's namespace."""
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    local = f"0100007F:{port:04X}"
    return any(row.split()[1] == local and row.split()[3] == "0A" for row in table)


class RuncListFailed(Exception):
    """`runc list` failed; it does when a container goes while it reads."""


class EdgeNode:
    """One gateway: its link (network namespace), its `outpost run` agent, its runc root."""

    def __init__(self, name: str, index: int, link: EdgeLink, folder: Path) -> None:
        self.name = name
        self.link = link
        self.runc_root = folder / name / "runc"
        # Every agent has a bridge of its own in its namespace; distinct ranges keep the pod
        # addresses `kubectl get pods -o wide` shows unambiguous.
        self.pod_subnet = f"10.90.{index}.0/24"
        self.edge = Edge(
            name,
            folder / "data",
            prefix=self.prefix,
            run_args=["--runc-root", self.runc_root, "--pod-subnet", self.pod_subnet],
        )
        self.relay: trio.Process | None = None

    @property
    def prefix(self) -> list[str]:
        """Put before an argv to run it in the node's network namespace, and only there.

        Not ``ip netns exec``: that also gives the process a mount namespace with a fresh
        /sys, without the cgroup file systems runc needs (``no cgroup mount found``).
        """
        return ["nsenter", f"--net=/run/netns/{self.link.netns}", "--"]

    @property
    def data_dir(self) -> Path:
        return self.edge.data_dir

    @property
    def log(self) -> Path | None:
        return self.edge.runs[-1].path if self.edge.runs else None

    def cut(self) -> None:
        """Nothing gets between this node and the cloud (or the registry) until ``restore``."""
        self.link.cut()

    def restore(self) -> None:
        self.link.restore()

    async def start_relay(self, registry_port: int, folder: Path) -> None:
        self.relay, _ = await spawn(
            folder / f"{self.name}-relay.log",
            *self.prefix,
            "socat",
            f"TCP-LISTEN:{registry_port},bind=127.0.0.1,reuseaddr,fork",
            f"TCP:{self.link.host_ip}:{registry_port}",
        )

        def listening() -> bool:
            if self.relay.returncode is not None:
                raise RuntimeError(
                    f"the registry relay in {self.link.netns} ended: "
                    + _tail(folder / f"{self.name}-relay.log")
                )
            return _listening(self.relay.pid, registry_port)

        await eventually(
            listening, f"the registry relay listens on {registry_port}", within=10, interval=0.02
        )

    async def containers(self) -> dict[str, dict[str, Any]]:
        """The containers runc knows under this agent's root: id → runc's state (``status``,
        ``pid``, …). Ids are ``<pod uid>-<container name>``."""

        async def listed() -> bytes:
            result = await trio.run_process(
                ["runc", "--root", str(self.runc_root), "list", "--format", "json"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            if result.returncode != 0:
                raise RuncListFailed(result.stderr.decode().strip())
            return result.stdout or b"null"

        # runc fails the whole list when a container goes while it reads: ask again.
        listing = await eventually(
            listed, "runc lists the containers", within=2, ignoring=(RuncListFailed,)
        )
        return {c["id"]: c for c in json.loads(listing) or []}

    async def pod_containers(self, uid: str) -> dict[str, dict[str, Any]]:
        return {i: c for i, c in (await self.containers()).items() if i.startswith(f"{uid}-")}

    async def logs(self, pod: str, namespace: str = "default", container: str = "") -> str:
        """What `outpost logs` prints for a container (from the agent's log files)."""
        result = await trio.run_process(
            [
                VENV_BIN / "outpost",
                "logs",
                pod,
                "-n",
                namespace,
                *(["-c", container] if container else []),
                "--data-dir",
                self.data_dir,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return (result.stdout + result.stderr).decode(errors="replace")

    async def status(self) -> dict[str, Any]:
        """`outpost status --json`: the link as the agent recorded it and the store's counts."""
        return await self.edge.status()

    def stored(self, kind: str) -> dict[str, Any]:
        """What the agent's store holds of ``kind``: key → body (a connection of our own)."""
        with self.edge.store() as store:
            return {key: body for key, _rv, body in store.list(kind)}

    async def force_clean(self) -> None:
        """Remove what a stopped agent left: containers, mounts, pod network namespaces."""
        for container in await self.containers():
            await trio.run_process(
                ["runc", "--root", str(self.runc_root), "delete", "--force", container],
                check=False,
                capture_stderr=True,
            )
        pods = self.data_dir / "pods"
        uids = [p.name for p in pods.iterdir()] if pods.is_dir() else []
        for uid in uids:
            if await trio.Path(f"/run/netns/outpost-{uid}").exists():
                await trio.run_process(
                    ["ip", "netns", "delete", f"outpost-{uid}"], check=False, capture_stderr=True
                )
        mounts = (await trio.Path("/proc/mounts").read_text()).splitlines()
        for target in reversed([m.split()[1] for m in mounts]):
            if target.startswith(str(self.data_dir)):
                await trio.run_process(["umount", "-l", target], check=False, capture_stderr=True)


class EdgeCluster:
    """The cloud, a registry with the busybox image and one ``EdgeNode`` per name; use with
    ``async with``. ``cloud_args`` go on `outpost-cloud serve`'s command line."""

    def __init__(
        self,
        plane: ControlPlane,
        folder: Path,
        nodes: Sequence[str],
        *,
        cloud_args: Sequence[str] = ("--lease-renew-interval", str(LEASE_RENEW_S)),
        heartbeat: float = 1,
    ) -> None:
        self.plane = plane
        self.folder = folder
        self.names = list(nodes)
        self.cloud_args = list(cloud_args)
        self.heartbeat = heartbeat
        self.nodes: dict[str, EdgeNode] = {}
        self.cloud: Cloud | None = None
        self.registry: Registry | None = None
        self.image = ""
        self._stack = contextlib.ExitStack()

    def __getitem__(self, name: str) -> EdgeNode:
        return self.nodes[name]

    async def __aenter__(self) -> EdgeCluster:
        try:
            await self._start()
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.registry = self._stack.enter_context(SharedRegistry())
        self.registry.push(IMAGE_REPOSITORY, "1.0", build_image())
        self.image = f"{self.registry.host}/{IMAGE_REPOSITORY}:1.0"
        for index, name in enumerate(self.names):
            link = self._stack.enter_context(EdgeLink("outpost-e2e"))
            self.nodes[name] = EdgeNode(name, index, link, self.folder)
        links = [node.link for node in self.nodes.values()]
        sans = [arg for link in links[1:] for arg in ("--tls-san", link.host_ip)]
        self.cloud = Cloud(
            self.plane,
            self.folder,
            host=links[0].host_ip if links else "127.0.0.1",
            heartbeat=self.heartbeat,
            extra_args=[*sans, *self.cloud_args],
        )
        await self.cloud.start()
        async with trio.open_nursery() as nursery:
            for node in self.nodes.values():
                nursery.start_soon(self._join, node)

    async def _join(self, node: EdgeNode) -> None:
        assert self.cloud is not None
        assert self.registry is not None
        await node.start_relay(self.registry.port, self.folder)
        url = f"https://{node.link.host_ip}:{self.cloud.port}"
        await node.edge.join(self.cloud, url)
        await node.edge.start()
        await node.edge.wait_online()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        # A test's fail_after shows up here as Cancelled: a timeout wants the logs too.
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            with trio.CancelScope(shield=True):
                print(await self.diagnostics(), flush=True)
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for node in self.nodes.values():
                    nursery.start_soon(self._stop_node, node)
            for name in self.nodes:
                await self.kubectl("delete", "node", name, "--ignore-not-found", check=False)
            if self.cloud is not None:
                await self.cloud.stop()
            self._stack.close()

    @staticmethod
    async def _stop_node(node: EdgeNode) -> None:
        await node.edge.stop()
        await node.force_clean()

    # -- Kubernetes ----------------------------------------------------------------------

    async def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """kubectl as the admin; with ``check`` a failure raises with kubectl's own words."""
        result = await trio.run_process(
            [self.plane.kubectl_path, f"--kubeconfig={self.plane.kubeconfig}", *args],
            stdin=input.encode() if input is not None else b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.decode().strip()}"
            )
        return result

    async def get(self, *args: str) -> dict[str, Any]:
        """``kubectl get … -o json``, parsed; ``{}`` for nothing (``--ignore-not-found``)."""
        return json.loads((await self.kubectl("get", *args, "-o", "json")).stdout or b"{}")

    async def apply(self, *objects: dict[str, Any], namespace: str = "") -> None:
        """``kubectl apply`` of ``objects``, into ``namespace`` where they name none."""
        args = ["-n", namespace] if namespace else []
        await self.kubectl("apply", *args, "-f", "-", input=yaml.safe_dump_all(objects))

    async def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        args = ["pods", "-n", namespace, *(["-l", selector] if selector else [])]
        return (await self.get(*args))["items"]

    async def node_ready(self, name: str, within: float = 30) -> dict[str, Any]:
        """Wait until the apiserver says node ``name`` is Ready; returns the Node."""

        async def check() -> dict[str, Any] | None:
            node = await self.get("node", name, "--ignore-not-found")
            return node if node and condition(node) == "True" else None

        return await self.until(check, f"node {name} is Ready", within)

    # -- waiting and diagnostics ---------------------------------------------------------

    async def until(
        self,
        check: Callable[[], Awaitable[T] | T],
        what: str,
        within: float = 30,
        interval: float = 0.25,
    ) -> T:
        """``tests.waiting.eventually`` with a cluster's pace: its checks mostly run kubectl, and
        what they wait for takes a node's round trip through the apiserver."""
        return await eventually(check, what, within=within, interval=interval)

    async def diagnostics(self) -> str:
        """The tails of the cloud's and agents' logs, and what the apiserver says."""
        parts = []
        if self.cloud is not None:
            for run in self.cloud.runs:
                parts.append(f"--- cloud log {run.path} (last lines)\n{_tail(run.path)}")
        for node in self.nodes.values():
            for run in node.edge.runs:
                parts.append(
                    f"--- agent {node.name} log {run.path} (last lines)\n{_tail(run.path)}"
                )
        for args in (
            ("get", "nodes,pods", "-A", "-o", "wide"),
            ("get", "events", "-A", "--sort-by=.lastTimestamp"),
        ):
            with trio.move_on_after(20):
                result = await self.kubectl(*args, check=False)
                text = (result.stdout + result.stderr).decode(errors="replace")
                parts.append(f"--- kubectl {' '.join(args)}\n{_tail_text(text)}")
        return "\n".join(parts)


def _tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def ready(pod: dict[str, Any]) -> bool:
    """Running, and its Ready condition True, as the apiserver says."""
    conditions = pod.get("status", {}).get("conditions", [])
    return pod.get("status", {}).get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions
    )


def condition(obj: dict[str, Any], kind: str = "Ready") -> str:
    """The status (True, False, Unknown) of a Node's or Pod's condition; "" when it has none."""
    for found in obj.get("status", {}).get("conditions", []):
        if found["type"] == kind:
            return found["status"]
    return ""


def deployment(
    name: str,
    image: str,
    *,
    namespace: str = "default",
    replicas: int = 1,
    node: str = "",
    env: dict[str, str] | None = None,
    command: str = "while true; do sleep 1; done",
    **pod_spec: Any,
) -> dict[str, Any]:
    """A busybox Deployment pinned to ``node`` (or to any edge node), grace period 1 s: ``sh``
    as PID 1 ignores SIGTERM, and every stop would otherwise take the default 30 s."""
    if node:
        placement: dict[str, Any] = {"nodeSelector": {"kubernetes.io/hostname": node}}
    else:
        # The role label's value is not part of the contract: select on its presence.
        term = {"matchExpressions": [{"key": EDGE_ROLE_LABEL, "operator": "Exists"}]}
        placement = {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
                }
            }
        }
    container = {
        "name": "main",
        "image": image,
        "command": ["sh", "-c", command],
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    **placement,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [container],
                    **pod_spec,
                },
            },
        },
    }
