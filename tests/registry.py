"""A real OCI registry on loopback for tests, small busybox images to put in it, image archives,
and the faulty network pieces that pull tests need.

- ``Registry``: Debian's ``docker-registry`` (distribution v2) in a temporary directory on
  127.0.0.1, anonymous, with htpasswd basic auth (``users=``), or with token auth
  (``token=TokenIssuer(...)``), the token service then being ``TokenServer``, served by the test.
- ``build_image``/``build_index``: images made from ``/bin/busybox`` (busybox-static) and
  files given by the test, pushed with the distribution API (``Registry.push``).
- ``docker_save``/``oci_archive``: the archives ``docker save`` and ``skopeo … oci-archive:``
  write, for import tests.
- ``FaultyProxy``: an HTTP relay in front of the registry that records every request head and
  can cut a blob download short or flip one of its bytes.

The registry is started by synchronous code, so a module-scoped fixture can share it; the
proxy and token service are trio servers, started in a test's nursery.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import gzip
import hashlib
import io
import json
import secrets
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import h11
import httpx2
import trio
from backports import zstd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.waiting import eventually_sync

REGISTRY_BIN = Path("/usr/bin/docker-registry")
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh",
    "sleep",
    "echo",
    "cat",
    "ls",
    "wget",
    "nc",
    "httpd",
    "true",
    "false",
    "test",
    "touch",
    "rm",
    "env",
    "id",
    "mkdir",
    "grep",
    "date",
)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- building images ---------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    path: str
    data: bytes = b""
    mode: int = 0o644


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Hardlink:
    path: str
    target: str


Entry = File | Dir | Symlink | Hardlink


def make_tar(entries: Iterable[Entry]) -> bytes:
    """An uncompressed layer tar of ``entries``, in order, owned by root, mtime 0."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path)
            info.mtime = 0
            if isinstance(entry, File):
                info.size, info.mode = len(entry.data), entry.mode
                tar.addfile(info, io.BytesIO(entry.data))
                continue
            if isinstance(entry, Dir):
                info.type, info.mode = tarfile.DIRTYPE, entry.mode
            elif isinstance(entry, Symlink):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
            else:
                info.type, info.linkname, info.mode = tarfile.LNKTYPE, entry.target, 0o644
            tar.addfile(info)
    return out.getvalue()


@functools.cache
def busybox_tar() -> bytes:
    """The base layer: /bin/busybox and its applets as symlinks, /etc/passwd, /tmp."""
    entries: list[Entry] = [Dir("bin"), File("bin/busybox", BUSYBOX.read_bytes(), 0o755)]
    entries += [Symlink(f"bin/{name}", "busybox") for name in BUSYBOX_APPLETS]
    entries += [
        Dir("etc"),
        File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        Dir("tmp", 0o1777),
    ]
    return make_tar(entries)


@functools.cache
def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstd.compress(data)
    return data


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.data),
            **extra,
        }


@dataclass(frozen=True)
class BuiltImage:
    """An image as a registry holds it; ``tars`` are its layers uncompressed."""

    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    tars: tuple[bytes, ...]
    platform: dict[str, str]

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]


def build_image(
    tars: Sequence[bytes] = (),
    *,
    architecture: str = "amd64",
    variant: str = "",
    docker: bool = False,
    compression: str = "gzip",
    config: dict[str, Any] | None = None,
) -> BuiltImage:
    """An image of ``tars`` (default: the busybox layer alone), OCI or Docker schema2."""
    tars = tuple(tars) or (busybox_tar(),)
    if compression == "none":
        layer_type = "application/vnd.docker.image.rootfs.diff.tar" if docker else OCI_LAYER
    elif docker:
        layer_type = DOCKER_LAYER if compression == "gzip" else f"{DOCKER_LAYER[:-5]}.{compression}"
    else:
        layer_type = f"{OCI_LAYER}+{compression}"
    layers = tuple(Blob(layer_type, _compress(tar, compression)) for tar in tars)
    platform = {"os": "linux", "architecture": architecture}
    if variant:
        platform["variant"] = variant
    image_config = {
        **platform,
        "config": config
        if config is not None
        else {"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar) for tar in tars]},
    }
    config_blob = Blob(DOCKER_CONFIG if docker else OCI_CONFIG, json.dumps(image_config).encode())
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    return BuiltImage(
        Blob(manifest_type, json.dumps(manifest).encode()), config_blob, layers, tars, platform
    )


def build_index(images: Sequence[BuiltImage], *, docker: bool = False) -> Blob:
    """A multi-platform index (or Docker manifest list) of ``images``."""
    media_type = DOCKER_LIST if docker else OCI_INDEX
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [i.manifest.descriptor(platform=i.platform) for i in images],
    }
    return Blob(media_type, json.dumps(doc).encode())


# -- archives ----------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def docker_save(path: Path, images: dict[str, BuiltImage]) -> None:
    """What ``docker save TAG…`` writes (the classic layout): ``<config hex>.json``,
    ``<id>/layer.tar`` uncompressed, ``manifest.json`` and ``repositories``."""
    with tarfile.open(path, "w") as tar:
        entries = []
        written: set[str] = set()
        for tag, image in images.items():
            config_name = f"{image.config.digest.removeprefix('sha256:')}.json"
            layer_names = [f"{hashlib.sha256(t).hexdigest()}/layer.tar" for t in image.tars]
            for name, data in [
                (config_name, image.config.data),
                *zip(layer_names, image.tars, strict=True),
            ]:
                if name not in written:
                    _add(tar, name, data)
                    written.add(name)
            entries.append({"Config": config_name, "RepoTags": [tag], "Layers": layer_names})
        _add(tar, "manifest.json", json.dumps(entries).encode())
        _add(tar, "repositories", b"{}")


def oci_archive(
    path: Path, name: str, images: Sequence[BuiltImage], index: Blob | None = None
) -> None:
    """An OCI image layout in a tar, naming ``index`` (or the one image) ``name``."""
    with tarfile.open(path, "w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        blobs = {b.digest: b for i in images for b in (i.manifest, *i.blobs)}
        if index is not None:
            blobs[index.digest] = index
        for digest, blob in blobs.items():
            _add(tar, f"blobs/sha256/{digest.removeprefix('sha256:')}", blob.data)
        top = index or images[0].manifest
        annotations = {"org.opencontainers.image.ref.name": name}
        doc = {"schemaVersion": 2, "manifests": [top.descriptor(annotations=annotations)]}
        _add(tar, "index.json", json.dumps(doc).encode())


# -- token auth ----------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Signs registry tokens (ES256 JWTs carrying their certificate in ``x5c``) that a
    registry configured with ``rootcertbundle`` accepts."""

    issuer = "outpost-test-issuer"
    service = "outpost-test-registry"

    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outpost test tokens")])
        now = time.time()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_datetime(now - 3600))
            .not_valid_after(_datetime(now + 86400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = directory / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.realm_port = free_port()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.realm_port}/token"

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _datetime(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


@dataclass
class TokenServer:
    """The token service of the Docker token spec on ``issuer.realm``: grants the requested
    scope to ``users`` (name → password), and an empty one to anyone else."""

    issuer: TokenIssuer
    users: dict[str, str]
    requests: list[dict[str, str]] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.issuer.realm_port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if not isinstance(event, h11.Request):
                    return
                status, body = self._answer(event)
                headers = [("content-type", "application/json"), ("connection", "close")]
                headers.append(("content-length", str(len(body))))
                for out in (h11.Response(status_code=status, headers=headers), h11.Data(data=body)):
                    await stream.send_all(conn.send(out))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                return

    def _answer(self, request: h11.Request) -> tuple[int, bytes]:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.target.decode()).query))
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self.requests.append({**query, "authorization": headers.get("authorization", "")})
        subject, access = "anonymous", []
        if auth := headers.get("authorization"):
            user, _, password = (
                base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
            )
            if self.users.get(user) != password:
                return 401, b'{"details": "invalid credentials"}'
            subject = user
            _, name, actions = query.get("scope", "::").split(":", 2)
            access = [{"type": "repository", "name": name, "actions": actions.split(",")}]
        token = self.issuer.token(subject, access)
        return 200, json.dumps({"token": token, "expires_in": 300}).encode()


# -- the registry ------------------------------------------------------------------------------


class RegistryExited(Exception):
    """The registry process ended while it was awaited."""


class Registry:
    """``docker-registry serve`` on 127.0.0.1:<free port>, its storage in a temporary
    directory; use as a context manager."""

    def __init__(
        self, *, users: dict[str, str] | None = None, token: TokenIssuer | None = None
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="outpost-registry-")
        self.dir = Path(self._tmp.name)
        self.port = free_port()
        self.users = users
        self.token = token
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._process: subprocess.Popen[bytes] | None = None

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.dir / "storage")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if self.users is not None:
            lines = [
                f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}"
                for user, pw in self.users.items()
            ]
            (self.dir / "htpasswd").write_text("\n".join(lines) + "\n")
            config["auth"] = {
                "htpasswd": {"realm": "outpost-test", "path": str(self.dir / "htpasswd")}
            }
        elif self.token is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": self.token.service,
                    "issuer": self.token.issuer,
                    "rootcertbundle": str(self.token.bundle),
                }
            }
        return config

    def __enter__(self) -> Registry:
        config = self.dir / "config.yml"
        # JSON is YAML.
        config.write_text(json.dumps(self._config()))
        with open(self.dir / "registry.log", "wb") as log:
            self._process = subprocess.Popen(
                [REGISTRY_BIN, "serve", config], stdout=log, stderr=subprocess.STDOUT
            )

        def answers() -> bool:
            if self._process.poll() is not None:
                raise RegistryExited
            return httpx2.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401)

        try:
            eventually_sync(
                answers,
                f"the registry answers on {self.url}/v2/",
                within=15,
                ignoring=(httpx2.TransportError,),
            )
        except (AssertionError, RegistryExited) as exc:
            self.__exit__(None, None, None)
            raise RuntimeError(f"the registry did not start: {self.log()}") from exc
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._tmp.cleanup()

    def log(self) -> str:
        return (self.dir / "registry.log").read_text(errors="replace")

    @contextlib.contextmanager
    def _client(self, repository: str) -> Iterator[httpx2.Client]:
        headers = {}
        auth = None
        if self.users:
            auth = httpx2.BasicAuth(*next(iter(self.users.items())))
        elif self.token is not None:
            access = [{"type": "repository", "name": repository, "actions": ["pull", "push"]}]
            headers["Authorization"] = f"Bearer {self.token.token('pusher', access)}"
        with httpx2.Client(base_url=self.url, auth=auth, headers=headers, timeout=30) as client:
            yield client

    def push(self, repository: str, tag: str, image: BuiltImage) -> str:
        """Push ``image`` as ``repository:tag``; returns its manifest digest."""
        with self._client(repository) as client:
            for blob in image.blobs:
                self._upload(client, repository, blob)
            self._put_manifest(client, repository, tag, image.manifest)
        return image.manifest.digest

    def push_index(
        self, repository: str, tag: str, images: Sequence[BuiltImage], index: Blob
    ) -> str:
        """Push ``images`` by digest and ``index`` as ``repository:tag``."""
        with self._client(repository) as client:
            for image in images:
                for blob in image.blobs:
                    self._upload(client, repository, blob)
                self._put_manifest(client, repository, image.manifest.digest, image.manifest)
            self._put_manifest(client, repository, tag, index)
        return index.digest

    def delete_blob(self, repository: str, digest: str) -> None:
        """Make the registry lose a blob, as a registry with a broken storage would."""
        with self._client(repository) as client:
            client.delete(f"/v2/{repository}/blobs/{digest}").raise_for_status()

    @staticmethod
    def _upload(client: httpx2.Client, repository: str, blob: Blob) -> None:
        if client.head(f"/v2/{repository}/blobs/{blob.digest}").status_code == 200:
            return
        started = client.post(f"/v2/{repository}/blobs/uploads/")
        started.raise_for_status()
        location = started.headers["location"]
        separator = "&" if "?" in location else "?"
        done = client.put(
            f"{location}{separator}{urllib.parse.urlencode({'digest': blob.digest})}",
            content=blob.data,
            headers={"Content-Type": "application/octet-stream"},
        )
        done.raise_for_status()

    @staticmethod
    def _put_manifest(client: httpx2.Client, repository: str, tag: str, blob: Blob) -> None:
        response = client.put(
            f"/v2/{repository}/manifests/{tag}",
            content=blob.data,
            headers={"Content-Type": blob.media_type},
        )
        response.raise_for_status()


# -- a faulty network --------------------------------------------------------------------------


@dataclass
class Fault:
    """What to do to the next ``times`` requests for a blob: cut the connection after
    ``cut_after`` bytes of the answer's body, flip the body's byte at ``corrupt_at``, or (with
    ``drop_range``) forward the request without its ``Range`` header, as a registry that does
    not do ranges would answer it."""

    digest: str
    cut_after: int | None = None
    corrupt_at: int | None = None
    drop_range: bool = False
    times: int = 1


@dataclass
class FaultyProxy:
    """A relay to ``upstream`` (host:port) on 127.0.0.1:``port``, one request per connection.

    ``requests`` holds every request's head as ``(request line, {header: value})``;
    ``body_bytes`` counts the body bytes relayed per blob digest.
    """

    upstream: str
    port: int = field(default_factory=free_port)
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    body_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def blob_requests(self, digest: str) -> list[dict[str, str]]:
        return [h for line, h in self.requests if f"/blobs/{digest} " in line]

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await client.receive_some(65536)
                if not chunk:
                    return
                head += chunk
            raw, rest = head.split(b"\r\n\r\n", 1)
            line, *header_lines = raw.decode("latin-1").split("\r\n")
            headers = {}
            for header in header_lines:
                name, _, value = header.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.requests.append((line, headers))
            fault = self._take_fault(line)
            dropped = ("connection:", "range:") if fault and fault.drop_range else ("connection:",)
            kept = [h for h in header_lines if not h.lower().startswith(dropped)]
            forwarded = "\r\n".join([line, *kept, "Connection: close"]) + "\r\n\r\n"
            host, port = self.upstream.rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as upstream:
                await upstream.send_all(forwarded.encode("latin-1") + rest)
                await self._relay(upstream, client, line, fault)

    def _take_fault(self, line: str) -> Fault | None:
        for fault in self.faults:
            if f"/blobs/{fault.digest} " in line and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    async def _relay(
        self,
        upstream: trio.SocketStream,
        client: trio.SocketStream,
        line: str,
        fault: Fault | None,
    ) -> None:
        digest = line.split("/blobs/", 1)[1].split(" ")[0] if "/blobs/" in line else None
        head = b""
        sent = 0
        while chunk := await upstream.receive_some(65536):
            if b"\r\n\r\n" not in head:
                head += chunk
                if b"\r\n\r\n" not in head:
                    continue
                response_head, chunk = head.split(b"\r\n\r\n", 1)
                await client.send_all(response_head + b"\r\n\r\n")
            if fault is not None and fault.corrupt_at is not None:
                offset = fault.corrupt_at - sent
                if 0 <= offset < len(chunk):
                    chunk = chunk[:offset] + bytes([chunk[offset] ^ 0xFF]) + chunk[offset + 1 :]
            if (
                fault is not None
                and fault.cut_after is not None
                and sent + len(chunk) >= fault.cut_after
            ):
                chunk = chunk[: fault.cut_after - sent]
                await client.send_all(chunk)
                self._count(digest, len(chunk))
                return
            await client.send_all(chunk)
            sent += len(chunk)
            self._count(digest, len(chunk))

    def _count(self, digest: str | None, n: int) -> None:
        if digest is not None and n:
            self.body_bytes[digest] = self.body_bytes.get(digest, 0) + n
