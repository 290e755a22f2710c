"""A pod runtime in the test process: real runc, real images from a loopback registry, real CNI,
real overlayfs; pods come from a dict the test edits, as they would from the store."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.images import ImageStore, RetryPolicy
from edge.pods.cni import NetworkConfig
from edge.pods.manager import PodManager
from edge.pods.network import PodNetwork
from edge.pods.runc import Runc
from edge.pods.runtime import ContainerRuntime
from edge.pods.supervisor import Services
from edge.wire.keys import pod_key
from tests.registry import Registry, build_image

IMAGE_REPOSITORY = "test/busybox"


@contextmanager
def busybox_registry() -> Iterator[tuple[Registry, str]]:
    """A registry holding the busybox test image; yields it and the image reference."""
    with Registry() as registry:
        registry.push(IMAGE_REPOSITORY, "1.0", build_image())
        yield registry, f"{registry.host}/{IMAGE_REPOSITORY}:1.0"


def pod(name: str, *containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": str(uuid.uuid4())},
        # `sleep` as a container's PID 1 ignores SIGTERM: a short grace keeps tests short.
        "spec": {"containers": list(containers), "terminationGracePeriodSeconds": 1, **spec},
    }


@dataclass
class PodWorld:
    """The runtime and what it reports, for one test."""

    data_dir: Path
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[tuple[str, str], dict[str, dict[str, Any]]] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Every report in order, and every event: (key, body).
    history: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    crash_base_s: float = 10.0
    log_max_bytes: int = 10 * 1024 * 1024
    volume_resync_s: float = 60.0
    cloud_tokens: bool = True

    def services(self, subnet: str = "10.215.0.0/24") -> Services:
        # Few, quick retries: a test about an unreachable registry must not wait for long.
        self.images = ImageStore(
            self.data_dir / "images", retry=RetryPolicy(attempts=2, initial_s=0.1, max_s=0.2)
        )
        network = PodNetwork(
            self.data_dir / "network",
            NetworkConfig(
                name="outpost-test", bridge="otptest0", subnet=ipaddress.ip_network(subnet)
            ),
        )

        async def objects(kind: str, namespace: str) -> dict[str, dict[str, Any]]:
            return self.objects.get((kind, namespace), {})

        runtime = ContainerRuntime(
            self.data_dir,
            self.images,
            network,
            objects,
            "test-node",
            cloud_tokens=self.cloud_tokens,
        )

        async def save(key: str, value: Any) -> None:
            if value is None:
                self.state.pop(key, None)
            else:
                self.state[key] = value

        async def load(key: str) -> Any:
            return self.state.get(key)

        async def report(key: str, body: dict[str, Any]) -> None:
            self.reports[key] = body
            self.history.append((key, body))

        async def event(key: str, body: dict[str, Any]) -> None:
            self.events.append((key, body))

        self.runtime = runtime
        return Services(
            data_dir=self.data_dir,
            runc=Runc(self.data_dir / "runc"),
            runtime=runtime,
            save_state=save,
            load_state=load,
            report=report,
            event=event,
            crash_base_s=self.crash_base_s,
            volume_resync_s=self.volume_resync_s,
            log_max_bytes=self.log_max_bytes,
        )

    def manager(self) -> PodManager:
        async def source() -> dict[str, dict[str, Any]]:
            return {p["metadata"]["uid"]: p for p in self.pods.values()}

        return PodManager(self.services(), source)

    def add(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.pods[manifest["metadata"]["name"]] = manifest
        return manifest

    def status(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.reports.get(pod_key(manifest), {}).get("status", {})

    def reasons(self, manifest: dict[str, Any], container: str | None = None) -> list[str]:
        """The reasons of the pod's events, in order; only one container's when named."""
        uid = manifest["metadata"]["uid"]
        return [
            body["reason"]
            for _, body in self.events
            if body["uid"] == uid
            and (container is None or body["fieldPath"].endswith(f"{{{container}}}"))
        ]

    def container(self, manifest: dict[str, Any], name: str) -> dict[str, Any]:
        for c in self.status(manifest).get("containerStatuses", []):
            if c["name"] == name:
                return c
        return {}
