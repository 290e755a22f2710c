"""The generated config.json runs under the real runc and does what the pod asked.

A busybox root filesystem, a pod with env, a ConfigMap volume written by ``write_plan``, an
emptyDir, a read-only root and a memory limit, on the host network: the container prints what
it sees and the test reads it. Then a dropped capability, a device passed through, and a
privileged container. Needs root and runc (``make setup`` installs runc and busybox-static).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from edge.pods import runtime_spec, volumes
from edge.pods.hostname import pod_hostname
from edge.pods.resolver import Resolver
from edge.pods.validation import validate_pod

RUNC = shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "env", "id", "ls", "chown", "touch", "grep", "hostname", "stat")

# What the agent would read from the host once, at start.
HOST_CAPABILITIES = runtime_spec.bounding_capabilities(Path("/proc/self/status").read_text())
[HOST_BOUNDING_MASK] = [
    int(line.split()[1], 16)
    for line in Path("/proc/self/status").read_text().splitlines()
    if line.startswith("CapBnd:")
]
AGENT_OOM_SCORE_ADJ = Path("/proc/self/oom_score_adj").read_text()
HOST_HOSTS = Path("/etc/hosts").read_text()

pytestmark = [
    pytest.mark.requires_root("runc needs root"),
    pytest.mark.skipif(not Path(RUNC).exists(), reason="runc is not installed (make setup)"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed"),
]


class Bundle:
    """A bundle directory with a busybox rootfs, and the pod directory it mounts from."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "bundle"
        self.rootfs = self.dir / "rootfs"
        (self.rootfs / "bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, self.rootfs / "bin" / "busybox")
        for applet in APPLETS:
            (self.rootfs / "bin" / applet).symlink_to("busybox")
        for folder in ("proc", "sys", "dev", "etc", "tmp"):
            (self.rootfs / folder).mkdir()
        self.layout = volumes.PodLayout(root / "pod")
        self.runc_root = root / "runc"
        self.uids: list[str] = []
        self.containers: list[str] = []

    async def run(
        self,
        pod: dict[str, Any],
        resolver: Resolver | None = None,
        host_paths: dict[str, volumes.HostPathInfo] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Prepare the pod's directory, write the spec of its only container, run it."""
        assert validate_pod(pod) == []
        resolver = resolver or Resolver()
        name = pod["spec"]["containers"][0]["name"]
        self.uids.append(pod["metadata"]["uid"])
        volumes.prepare_pod_dir(pod, self.layout)
        for volume, plan in volumes.volume_files(pod, resolver).items():
            volumes.write_plan(plan, self.layout.volume(volume))
        names = pod_hostname(pod, node_hostname=os.uname().nodename)
        volumes.write_plan(
            volumes.pod_files(
                pod,
                hostname=names,
                pod_ips=["10.88.0.5"],
                host_hosts=HOST_HOSTS,
                host_resolv="nameserver 127.0.0.53\n",
            ),
            self.layout.etc,
        )
        env = runtime_spec.container_env(pod, name, resolver)
        mounts = volumes.container_volumes(
            pod, name, layout=self.layout, host_paths=host_paths or {}, env=dict(env)
        )
        volumes.check_subpaths(mounts)
        spec = runtime_spec.build_spec(
            pod,
            name,
            image={"Env": ["PATH=/bin", "FROM_IMAGE=yes"], "Cmd": ["sh"]},
            rootfs=str(self.rootfs),
            volumes=mounts,
            env=env,
            hostname=names.hostname,
            oom_score_floor=int(AGENT_OOM_SCORE_ADJ),
            available_capabilities=HOST_CAPABILITIES,
        )
        (self.dir / "config.json").write_text(json.dumps(spec))
        container = f"outpost-spec-test-{uuid.uuid4().hex[:12]}"
        self.containers.append(container)
        with trio.fail_after(20):
            return await trio.run_process(
                [RUNC, "--root", str(self.runc_root), "run", "--bundle", str(self.dir), container],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=b"",
            )

    def cleanup(self) -> None:
        for container in self.containers:
            subprocess.run(
                [RUNC, "--root", str(self.runc_root), "delete", "-f", container],
                capture_output=True,
                check=False,
            )
        volumes.release_pod_dir(self.layout)
        # runc removes the container's cgroup, not the pod's: that is the supervisor's job.
        for uid in self.uids:
            relative = runtime_spec.cgroup_path(uid, "").strip("/")
            for pod_cgroup in Path("/sys/fs/cgroup").glob(f"{relative}"):
                pod_cgroup.rmdir()
            for pod_cgroup in Path("/sys/fs/cgroup").glob(f"*/{relative}"):
                pod_cgroup.rmdir()


@pytest.fixture
def bundle(tmp_path: Path) -> Iterator[Bundle]:
    made = Bundle(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def make_pod(container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "namespace": "plant", "uid": uuid.uuid4().hex},
        "spec": {"containers": [{"name": "main", "image": "busybox", **container}], **spec},
    }


def lines(result: subprocess.CompletedProcess[bytes]) -> dict[str, str]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = {}
    for line in result.stdout.decode().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


SCRIPT = """
echo "GREETING=$GREETING"
echo "FROM_IMAGE=$FROM_IMAGE"
echo "POD=$POD_NAME/$POD_NAMESPACE"
echo "CONFIG=$(cat /config/app.conf)"
echo scratch > /scratch/file && echo "SCRATCH=$(cat /scratch/file)"
touch /not-here 2>/dev/null && echo "ROOT=writable" || echo "ROOT=read-only"
echo "UID=$(id -u):$(id -g)"
if [ -f /sys/fs/cgroup/memory.max ]; then echo "MEMORY=$(cat /sys/fs/cgroup/memory.max)";
else echo "MEMORY=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"; fi
echo "HOSTNAME=$(hostname)"
echo "HOSTS=$(grep -c . /etc/hosts)"
"""


async def test_pod_runs_under_runc(bundle: Bundle) -> None:
    pod = make_pod(
        {
            "command": ["sh", "-c", SCRIPT],
            "env": [
                {"name": "WHO", "value": "plant"},
                {"name": "GREETING", "value": "hello $(WHO)"},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {
                    "name": "POD_NAMESPACE",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                },
            ],
            "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}},
            "securityContext": {"readOnlyRootFilesystem": True, "runAsUser": 1000},
            "volumeMounts": [
                {"name": "config", "mountPath": "/config"},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        },
        hostNetwork=True,
        securityContext={"runAsGroup": 3000},
        volumes=[
            {"name": "config", "configMap": {"name": "app"}},
            {"name": "scratch", "emptyDir": {}},
        ],
    )
    resolver = Resolver(configmaps={"app": {"data": {"app.conf": "rate=9600"}}})

    seen = lines(await bundle.run(pod, resolver))

    assert seen["GREETING"] == "hello plant"
    assert seen["FROM_IMAGE"] == "yes"
    assert seen["POD"] == "probe/plant"
    assert seen["CONFIG"] == "rate=9600"
    assert seen["SCRATCH"] == "scratch"
    assert seen["ROOT"] == "read-only"
    assert seen["UID"] == "1000:3000"
    assert seen["MEMORY"] == str(64 * 1024 * 1024)
    # hostNetwork: the host's UTS namespace, so the node's own hostname.
    assert seen["HOSTNAME"] == os.uname().nodename
    assert int(seen["HOSTS"]) >= 1


CHOWN = "touch /scratch/f && chown 1234 /scratch/f && echo CHOWN=ok || echo CHOWN=denied"


@pytest.mark.parametrize(("drop", "expected"), [([], "ok"), (["CHOWN"], "denied")])
async def test_dropped_capability_is_gone(bundle: Bundle, drop: list[str], expected: str) -> None:
    pod = make_pod(
        {
            "command": ["sh", "-c", CHOWN],
            "securityContext": {"capabilities": {"drop": drop}},
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        },
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )

    assert lines(await bundle.run(pod))["CHOWN"] == expected


async def test_device_passthrough(bundle: Bundle, tmp_path: Path) -> None:
    # A stand-in for /dev/ttyUSB0: a character device node with the null device's numbers.
    serial = tmp_path / "ttyUSB0"
    os.mknod(serial, 0o660 | 0o020000, os.makedev(1, 3))
    pod = make_pod(
        {
            "command": [
                "sh",
                "-c",
                "echo x > /dev/ttyUSB0 && echo WRITE=ok;"
                " echo KIND=$(stat -c %F:%t:%T /dev/ttyUSB0)",
            ],
            "volumeMounts": [{"name": "serial", "mountPath": "/dev/ttyUSB0"}],
        },
        volumes=[{"name": "serial", "hostPath": {"path": str(serial), "type": "CharDevice"}}],
    )

    seen = lines(await bundle.run(pod, host_paths=volumes.check_host_paths(pod)))

    assert seen["WRITE"] == "ok"
    assert seen["KIND"] == "character special file:1:3"


async def test_privileged_container_gets_every_available_capability(bundle: Bundle) -> None:
    pod = make_pod(
        {
            "command": ["sh", "-c", "echo CAPS=$(grep CapEff /proc/self/status | cut -f2)"],
            "securityContext": {"privileged": True},
        }
    )
    (bundle.rootfs / "bin" / "cut").symlink_to("busybox")

    seen = lines(await bundle.run(pod))

    # Every capability the agent may hand on: its own bounding set, as the kernel shows it.
    assert int(seen["CAPS"], 16) == HOST_BOUNDING_MASK


def mount_options(path: Path) -> str | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == str(path):
            return line.split(" - ", 1)[1]
    return None


def test_pod_dir_memory_volumes_are_mounted_and_released(tmp_path: Path) -> None:
    pod = make_pod(
        {},
        volumes=[
            {"name": "ram", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "disk", "emptyDir": {}},
        ],
    )
    layout = volumes.PodLayout(tmp_path / "pod")
    volumes.prepare_pod_dir(pod, layout)
    try:
        volumes.prepare_pod_dir(pod, layout)  # again, as after an agent restart: no new mounts
        assert "size=8192k" in (mount_options(layout.volume("ram")) or "")
        assert (mount_options(layout.volume("creds")) or "").startswith("tmpfs ")
        assert "size=65536k" in (mount_options(layout.shm) or "")
        assert mount_options(layout.volume("disk")) is None
        assert layout.volume("disk").stat().st_mode & 0o777 == 0o777
        assert layout.termination_log("main").stat().st_mode & 0o777 == 0o666
        mounted = Path("/proc/self/mountinfo").read_text().count(str(layout.root))
        assert mounted == 3
    finally:
        volumes.release_pod_dir(layout)
    assert str(layout.root) not in Path("/proc/self/mountinfo").read_text()
    assert not layout.root.exists()


def test_release_unmounts_stacked_mounts_and_ones_already_gone(tmp_path: Path) -> None:
    """Mount propagation can stack copies of a mount on one path, which the mount table lists
    once; and a mount can go away between reading the table and unmounting."""
    layout = volumes.PodLayout(tmp_path / "pod")
    stacked = layout.root / "stacked"
    stacked.mkdir(parents=True)
    for _ in range(3):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", stacked], check=True)
    assert Path("/proc/self/mountinfo").read_text().count(str(stacked)) == 3
    volumes.release_pod_dir(layout)
    assert str(layout.root) not in Path("/proc/self/mountinfo").read_text()
    assert not layout.root.exists()
