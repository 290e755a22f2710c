"""Starts and stops a real Kubernetes control plane on loopback for tests and for people.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as child processes on free
loopback ports, with a PKI made fresh for each start. What callers may rely on:

- ``start()`` returns only once the apiserver answers ``/readyz``, the controller-manager and
  scheduler answer ``/healthz``, and the ``default`` service account exists (so pods can be
  created at once);
- ``stop()`` ends every process it started, SIGTERM first and SIGKILL after a grace period, and
  it runs on exceptions and Ctrl-C when the control plane is used as a context manager;
- if the Python process dies without running ``stop()`` (kill -9), the kernel sends every child
  SIGKILL, because each child is started with a parent-death signal.

Node health is judged on short timers (a node is NotReady about 10 s after its Lease stops, and
NoExecute tolerations default to 10 s) so offline tests take seconds rather than minutes.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster import build
from tests.cluster.certs import CertificateAuthority, service_account_keys

LOOPBACK = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 10.0


class ControlPlaneError(RuntimeError):
    """The control plane failed to start; the message names the component and its log."""


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class _Child:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class ControlPlane:
    """One control plane. Use as a context manager, or call ``start()`` and ``stop()``."""

    workdir: Path | None = None
    keep_workdir: bool = False
    bin_dir: Path = field(default_factory=build.bin_dir)
    children: list[_Child] = field(default_factory=list, init=False)
    server: str = field(default="", init=False)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> Path:
        """An admin kubeconfig (group system:masters) with the credentials embedded."""
        return self._dir / "admin.kubeconfig"

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def ca_path(self) -> Path:
        return self._dir / "pki" / "ca.crt"

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the admin against this control plane."""
        return subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def start(self, timeout: float = 120.0) -> None:
        missing = [n for n in build.BINARIES if not (self.bin_dir / n).is_file()]
        if missing:
            raise ControlPlaneError(
                f"control-plane binaries missing from {self.bin_dir}: {', '.join(missing)};"
                " run `make setup` (or `python -m tests.cluster build`)"
            )
        self._dir = Path(self.workdir or tempfile.mkdtemp(prefix="outpost-cluster-"))
        (self._dir / "logs").mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        try:
            self._write_pki()
            self._start_all(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        if not self.keep_workdir and self.workdir is None and hasattr(self, "_dir"):
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- start-up -------------------------------------------------------------------------

    def _write_pki(self) -> None:
        pki = self._dir / "pki"
        pki.mkdir(exist_ok=True)
        ca = CertificateAuthority("outpost-test-ca")
        ca.pair.write(pki, "ca")
        ca.issue(
            "kube-apiserver",
            server_names=(
                LOOPBACK, "localhost", "10.0.0.1", "kubernetes", "kubernetes.default",
                "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
            ),
        ).write(pki, "apiserver")  # fmt: skip
        for component in ("kube-controller-manager", "kube-scheduler"):
            ca.issue(component, server_names=(LOOPBACK, "localhost")).write(
                pki, f"{component}-serving"
            )
        sa_private, sa_public = service_account_keys()
        (pki / "sa.key").write_bytes(sa_private)
        (pki / "sa.pub").write_bytes(sa_public)
        self._clients = {
            "admin": ca.issue("outpost-admin", organizations=("system:masters",), client=True),
            "kube-controller-manager": ca.issue("system:kube-controller-manager", client=True),
            "kube-scheduler": ca.issue("system:kube-scheduler", client=True),
        }
        self._clients["admin"].write(pki, "admin")
        self._ca_pem = ca.pair.cert_pem

    def _write_kubeconfig(self, path: Path, user: str) -> None:
        pair = self._clients[user]

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        # JSON is valid YAML, and kubectl, client-go and lightkube all read it.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "outpost-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(self._ca_pem),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(pair.cert_pem),
                        "client-key-data": b64(pair.key_pem),
                    },
                }
            ],
            "contexts": [
                {"name": "outpost-test", "context": {"cluster": "outpost-test", "user": user}}
            ],
            "current-context": "outpost-test",
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)

    def _spawn(self, name: str, args: list[str]) -> _Child:
        log_path = self._dir / "logs" / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                # Own session: a Ctrl-C in the terminal reaches only us, and we stop children
                # in order rather than all at once.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = _Child(name, process, log_path)
        self.children.append(child)
        return child

    def _start_all(self, deadline: float) -> None:
        pki = self._dir / "pki"
        etcd_port, etcd_peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://{LOOPBACK}:{etcd_port}"
        etcd_peer = f"http://{LOOPBACK}:{etcd_peer_port}"
        etcd = self._spawn(
            "etcd",
            [
                "--name=outpost-test",
                f"--data-dir={self._dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={etcd_peer}",
                f"--initial-advertise-peer-urls={etcd_peer}",
                f"--initial-cluster=outpost-test={etcd_peer}",
                # Test data is thrown away: skip fsync, which dominates start-up on slow disks.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait(etcd, deadline, lambda: _http_ok(f"{etcd_url}/health"))

        self.server = f"https://{LOOPBACK}:{api_port}"
        self._write_kubeconfig(self.kubeconfig, "admin")
        for component in ("kube-controller-manager", "kube-scheduler"):
            self._write_kubeconfig(self._dir / f"{component}.kubeconfig", component)
        apiserver = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--secure-port={api_port}",
                f"--cert-dir={self._dir / 'apiserver'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                # The loopback advertise address is not a valid endpoint for the kubernetes
                # Service; nothing here routes to it, so do not reconcile it.
                "--endpoint-reconciler-type=none",
                "--default-not-ready-toleration-seconds=10",
                "--default-unreachable-toleration-seconds=10",
                "--profiling=false",
            ],
        )
        self._wait(apiserver, deadline, lambda: self._api_ok("/readyz"))

        kcm_port, scheduler_port = free_port(), free_port()
        kcm = self._spawn(
            "kube-controller-manager",
            [
                *self._component_args("kube-controller-manager", kcm_port),
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--use-service-account-credentials=true",
                "--controllers=*,bootstrapsigner,tokencleaner",
                "--node-monitor-period=1s",
                "--node-monitor-grace-period=10s",
                "--node-startup-grace-period=10s",
            ],
        )
        scheduler = self._spawn(
            "kube-scheduler", self._component_args("kube-scheduler", scheduler_port)
        )
        for child, port in ((kcm, kcm_port), (scheduler, scheduler_port)):
            self._wait(child, deadline, lambda port=port: self._component_ok(port))
        self._wait(
            kcm,
            deadline,
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
            what="the default service account",
        )

    def _component_args(self, component: str, port: int) -> list[str]:
        kubeconfig = self._dir / f"{component}.kubeconfig"
        pki = self._dir / "pki"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={port}",
            f"--tls-cert-file={pki / f'{component}-serving.crt'}",
            f"--tls-private-key-file={pki / f'{component}-serving.key'}",
            "--leader-elect=false",
        ]

    # -- readiness ------------------------------------------------------------------------

    def _wait(
        self, child: _Child, deadline: float, ready: Callable[[], bool], what: str = ""
    ) -> None:
        what = what or child.name
        while True:
            if child.process.poll() is not None:
                raise ControlPlaneError(
                    f"{child.name} exited with code {child.process.returncode} before"
                    f" {what} was ready; its log ({child.log_path}) ends:\n{child.log_tail()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{what} was not ready in time; {child.name}'s log ({child.log_path})"
                    f" ends:\n{child.log_tail()}"
                )
            time.sleep(0.2)

    def _tls(self, client: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        if client:
            pki = self._dir / "pki"
            context.load_cert_chain(pki / "admin.crt", pki / "admin.key")
        return context

    def _api_ok(self, path: str) -> bool:
        return _http_ok(self.server + path, self._tls(client=True))

    def _component_ok(self, port: int) -> bool:
        return _http_ok(f"https://{LOOPBACK}:{port}/healthz", self._tls(client=False))


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
