"""The pod supervisor's hands: sandboxes, images, bundles and pod directories.

``ContainerRuntime`` turns a pod and one of its containers into a runc bundle: the image pulled
per its pull policy, an overlay root filesystem on the image's snapshots, the pod's volumes
written, and ``config.json`` from ``edge.pods.runtime_spec``. It also sets up and tears down
the pod's network (``edge.pods.network``) and its directory. Blocking disk work runs in worker
threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from edge.images import ImageError, ImageStore, credentials_for, mount_rootfs
from edge.images.errors import ImageNeverPullError, RegistryUnavailableError
from edge.images.policy import pull_policy, should_pull
from edge.mounts import unmount
from edge.pods import runtime_spec, volumes
from edge.pods.hostname import pod_hostname
from edge.pods.network import PodNetwork, host_network_sandbox
from edge.pods.resolver import ContainerConfigError, Resolver
from edge.pods.status import ContainerStatus
from edge.pods.supervisor import ANNOTATION_CONTAINER, ANNOTATION_POD
from edge.pods.validation import validate_pod
from edge.wire.keys import TOKEN_KIND

log = logging.getLogger("edge.pods")

HOST_CAPABILITIES = runtime_spec.bounding_capabilities(Path("/proc/self/status").read_text())


class PrepareError(Exception):
    """A container cannot be started now; ``reason`` is its waiting reason in the status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PodSandbox:
    ip: str
    host_ip: str
    netns_path: Path | None

    @property
    def probe_ip(self) -> str:
        return self.ip


@dataclass(frozen=True)
class Prepared:
    bundle: Path
    image_id: str


# (kind, namespace) -> {name: object}
Objects = Callable[[str, str], Awaitable[dict[str, dict[str, Any]]]]
# (reason, message): what the supervisor turns into the container's Normal events.
Notify = Callable[[str, str], Awaitable[None]]


async def _no_notify(reason: str, message: str) -> None:
    pass


class ContainerRuntime:
    def __init__(
        self,
        data_dir: Path,
        images: ImageStore,
        network: PodNetwork,
        objects: Objects,
        node_name: str,
        *,
        cloud_tokens: bool = True,
    ) -> None:
        """``cloud_tokens`` says a cloud sends ServiceAccountToken objects: a token volume then
        waits for its token. Standalone, nothing mints tokens and those files are left out."""
        self.data_dir = data_dir
        self.images = images
        self.network = network
        self.objects = objects
        self.node_name = node_name
        self.cloud_tokens = cloud_tokens
        self._oom_floor = int(Path("/proc/self/oom_score_adj").read_text())

    def layout(self, pod: dict[str, Any]) -> volumes.PodLayout:
        return volumes.PodLayout(self.data_dir / "pods" / pod["metadata"]["uid"])

    def log_path(self, pod: dict[str, Any], container: str, attempt: int) -> Path:
        meta = pod["metadata"]
        folder = f"{meta.get('namespace', 'default')}_{meta['name']}_{meta['uid']}"
        return self.data_dir / "logs" / folder / container / f"{attempt}.log"

    def validate(self, pod: dict[str, Any]) -> str | None:
        problems = validate_pod(pod)
        return "; ".join(problems) if problems else None

    # -- sandbox ----------------------------------------------------------------------------

    async def sandbox(self, pod: dict[str, Any], state: dict[str, Any]) -> PodSandbox:
        host = await host_network_sandbox()
        if pod["spec"].get("hostNetwork"):
            return PodSandbox(str(host.ip), str(host.ip), None)
        uid = pod["metadata"]["uid"]
        found = await self.network.adopt(uid)
        if found is None:
            await self.network.teardown(uid)  # a half set-up one from before a crash
            ports = [
                _port_mapping(p)
                for c in pod["spec"]["containers"]
                for p in c.get("ports", [])
                if p.get("hostPort")
            ]
            found = await self.network.setup(uid, ports)
        return PodSandbox(str(found.ip), str(host.ip), found.netns_path)

    async def teardown(self, pod: dict[str, Any]) -> None:
        """Remove the pod's network, directory and cgroups; its containers are gone. Also for
        a pod whose sandbox this agent never saw (left by an agent that crashed)."""
        if not pod["spec"].get("hostNetwork"):
            await self.network.teardown(pod["metadata"]["uid"])
        layout = self.layout(pod)
        await trio.to_thread.run_sync(volumes.release_pod_dir, layout)
        await trio.to_thread.run_sync(_remove_pod_cgroups, pod["metadata"]["uid"])

    # -- one container ----------------------------------------------------------------------

    async def _resolver(self, pod: dict[str, Any], sandbox: PodSandbox) -> Resolver:
        namespace = pod["metadata"].get("namespace", "default")
        tokens = None
        if self.cloud_tokens:
            found = await self.objects(TOKEN_KIND, namespace)
            tokens = found.get(pod["metadata"]["name"], {})
        return Resolver(
            configmaps=await self.objects("ConfigMap", namespace),
            secrets=await self.objects("Secret", namespace),
            node_name=self.node_name,
            host_ips=[sandbox.host_ip],
            pod_ips=[sandbox.ip],
            tokens=tokens,
        )

    async def refresh_volumes(self, pod: dict[str, Any], sandbox: PodSandbox) -> None:
        """Rewrite the pod's ConfigMap, Secret, downward API and projected volumes from what
        the store holds now. Each volume switches to its new files at once (``write_plan``);
        one that cannot be made now (its ConfigMap deleted, say) raises ``VolumeError`` and
        keeps its old files, as the kubelet does. Call it once the pod's containers started."""
        resolver = await self._resolver(pod, sandbox)
        layout = self.layout(pod)
        try:
            plans = volumes.volume_files(pod, resolver)
        except ContainerConfigError as exc:
            raise volumes.VolumeError(str(exc)) from exc
        for volume, plan in plans.items():
            await trio.to_thread.run_sync(volumes.write_plan, plan, layout.volume(volume))

    async def _image(
        self,
        pod: dict[str, Any],
        container: dict[str, Any],
        status: ContainerStatus,
        notify: Notify,
    ):
        ref = container["image"]
        image = await trio.to_thread.run_sync(self.images.get, ref)
        try:
            policy = pull_policy(ref, container.get("imagePullPolicy"))
            if not should_pull(policy, image is not None, ref):
                await notify("Pulled", f'Container image "{ref}" already present on machine')
                return image
        except ImageNeverPullError as exc:
            raise PrepareError("ErrImageNeverPull", str(exc)) from exc
        except ValueError as exc:
            raise PrepareError("InvalidImageName", str(exc)) from exc
        namespace = pod["metadata"].get("namespace", "default")
        secrets = await self.objects("Secret", namespace)
        pull_secrets = [
            secrets[s["name"]].get("data", {})
            for s in pod["spec"].get("imagePullSecrets", [])
            if s.get("name") in secrets
        ]
        status.waiting("ContainerCreating", f"pulling image {ref}")
        await notify("Pulling", f'Pulling image "{ref}"')
        began = trio.current_time()
        try:
            pulled = await self.images.pull(ref, credentials=credentials_for(ref, pull_secrets))
        except RegistryUnavailableError as exc:
            if image is not None:
                # Always-pull with the registry away: run what we have (offline first).
                log.warning("registry unreachable, using the local image", extra={"image": ref})
                return image
            raise PrepareError("ImagePullBackOff", str(exc)) from exc
        except ImageError as exc:
            raise PrepareError("ErrImagePull", str(exc)) from exc
        took = trio.current_time() - began
        await notify("Pulled", f'Successfully pulled image "{ref}" in {took:.3f}s')
        return pulled

    async def prepare(
        self,
        pod: dict[str, Any],
        container: dict[str, Any],
        sandbox: PodSandbox,
        attempt: int,
        status: ContainerStatus,
        notify: Notify = _no_notify,
    ) -> Prepared:
        """Everything a container needs before ``runc create``; raises ``PrepareError``.
        ``notify`` hears the image's Pulling and Pulled events."""
        image = await self._image(pod, container, status, notify)
        layout = self.layout(pod)
        resolver = await self._resolver(pod, sandbox)
        name = container["name"]
        names = pod_hostname(pod, node_hostname=os.uname().nodename)
        try:
            await trio.to_thread.run_sync(volumes.prepare_pod_dir, pod, layout)
            for volume, plan in volumes.volume_files(pod, resolver).items():
                await trio.to_thread.run_sync(volumes.write_plan, plan, layout.volume(volume))
            etc = volumes.pod_files(
                pod,
                hostname=names,
                pod_ips=[sandbox.ip],
                host_hosts=_read("/etc/hosts"),
                host_resolv=_read("/etc/resolv.conf"),
            )
            await trio.to_thread.run_sync(volumes.write_plan, etc, layout.etc)
            host_paths = await trio.to_thread.run_sync(volumes.check_host_paths, pod)
            env = runtime_spec.container_env(pod, name, resolver)
            mounts = volumes.container_volumes(
                pod, name, layout=layout, host_paths=host_paths, env=dict(env)
            )
            volumes.check_subpaths(mounts)
        except ContainerConfigError as exc:
            raise PrepareError("CreateContainerConfigError", str(exc)) from exc
        except volumes.VolumeError as exc:
            raise PrepareError("CreateContainerConfigError", str(exc)) from exc
        lowers = await self.images.snapshots(image)
        bundle = layout.root / "containers" / f"{name}-{attempt}"
        rootfs = bundle / "rootfs"
        await trio.to_thread.run_sync(_mount, lowers, bundle, rootfs)
        try:
            spec = runtime_spec.build_spec(
                pod,
                name,
                image=image.config.to_json(),
                rootfs=str(rootfs),
                volumes=mounts,
                env=env,
                hostname=names.hostname,
                netns_path=str(sandbox.netns_path) if sandbox.netns_path else None,
                ids=runtime_spec.ImageIds.parse(
                    _read(rootfs / "etc/passwd"), _read(rootfs / "etc/group")
                ),
                oom_score_floor=self._oom_floor,
                available_capabilities=HOST_CAPABILITIES,
                annotations={ANNOTATION_POD: pod["metadata"]["uid"], ANNOTATION_CONTAINER: name},
            )
        except ContainerConfigError as exc:
            await self.release(bundle)
            raise PrepareError("CreateContainerConfigError", str(exc)) from exc
        (bundle / "config.json").write_text(json.dumps(spec))
        return Prepared(bundle, image.digest)

    async def release(self, bundle: Path) -> None:
        """Unmount and remove a container's bundle (its writable layer goes with it)."""
        await trio.to_thread.run_sync(_release, bundle)


def _port_mapping(port: dict[str, Any]):
    from edge.pods.cni import PortMapping

    return PortMapping(
        host_port=port["hostPort"],
        container_port=port["containerPort"],
        protocol=port.get("protocol", "TCP").lower(),
        host_ip=port.get("hostIP", ""),
    )


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _mount(lowers: list[Path], bundle: Path, rootfs: Path) -> None:
    for sub in ("upper", "work", "rootfs"):
        (bundle / sub).mkdir(parents=True, exist_ok=True)
    unmount(rootfs)
    mount_rootfs(lowers, bundle / "upper", bundle / "work", rootfs)


def _release(bundle: Path) -> None:
    unmount(bundle / "rootfs")
    shutil.rmtree(bundle, ignore_errors=True)


def _remove_pod_cgroups(uid: str) -> None:
    """runc removes a container's cgroup, not its pod's: remove those left empty."""
    relative = runtime_spec.cgroup_path(uid, "").strip("/")
    root = Path("/sys/fs/cgroup")
    for path in [root / relative, *root.glob(f"*/{relative}")]:
        children = [c for c in path.glob("*") if c.is_dir()] if path.is_dir() else []
        for folder in [*children, path]:
            # Still in use (a container not yet gone) or already removed: leave it.
            with contextlib.suppress(OSError):
                folder.rmdir()
