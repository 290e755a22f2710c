"""The installer's server side: the release folder, signed sums, install.sh rendering, and the
HTTPS listener, fetched with a real client and checked with the host's openssl as install.sh
checks them."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx2
import pytest
import trio

from cloud.installer import server as installer_server
from cloud.installer.releases import Releases, valid_version
from cloud.installer.server import InstallerApp, render, serve_installer, split_host, tls_context
from cloud.installer.signing import KeyUnusable, ReleaseKey, verify
from cloud.pki import CertificateAuthority


def make_release(root: Path, version: str, arches=("amd64", "arm64"), unit: bool = True) -> None:
    folder = root / version
    folder.mkdir(parents=True)
    for arch in arches:
        (folder / f"outpost-linux-{arch}").write_bytes(f"binary {version} {arch}\n".encode())
    if unit:
        (folder / "outpost.service").write_text("[Service]\nExecStart=/usr/local/bin/outpost\n")


def test_versions_default_and_invalid_names(tmp_path: Path):
    for version in ("1.2.0", "1.10.0", "1.9.3"):
        make_release(tmp_path, version)
    (tmp_path / "empty").mkdir()
    (tmp_path / "..hidden").mkdir()
    releases = Releases(tmp_path, ReleaseKey.generate(), fallback_unit=None)
    assert releases.versions() == ["1.2.0", "1.9.3", "1.10.0"]
    assert releases.default_version() == "1.10.0"
    (tmp_path / "latest").write_text("1.9.3\n")
    assert releases.default_version() == "1.9.3"
    assert releases.files("../etc") == {}
    assert not valid_version("../x")
    assert not valid_version("")
    assert releases.signed("9.9.9") is None
    assert releases.signed("empty") is None


def test_sums_list_every_file_and_verify_and_follow_changes(tmp_path: Path):
    make_release(tmp_path, "1.0.0")
    key = ReleaseKey.generate()
    releases = Releases(tmp_path, key, fallback_unit=None)
    signed = releases.signed("1.0.0")
    assert signed is not None
    lines = signed.sums.decode().splitlines()
    assert [line.split("  ")[1] for line in lines] == [
        "outpost-linux-amd64",
        "outpost-linux-arm64",
        "outpost.service",
    ]
    assert verify(key.public_pem, signed.sums, signed.signature)
    assert not verify(key.public_pem, signed.sums + b"x", signed.signature)
    assert not verify(ReleaseKey.generate().public_pem, signed.sums, signed.signature)
    binary = tmp_path / "1.0.0" / "outpost-linux-amd64"
    binary.write_bytes(b"a new build, of another size\n")
    os.utime(binary, ns=(1, 1))
    again = releases.signed("1.0.0")
    assert again is not None
    assert again.sums != signed.sums


def test_the_unit_falls_back_to_the_repository_s(tmp_path: Path):
    make_release(tmp_path, "1.0.0", unit=False)
    fallback = tmp_path / "repo.service"
    fallback.write_text("[Unit]\n")
    assert "outpost.service" not in Releases(
        tmp_path, ReleaseKey.generate(), fallback_unit=None
    ).files("1.0.0")
    files = Releases(tmp_path, ReleaseKey.generate(), fallback_unit=fallback).files("1.0.0")
    assert files["outpost.service"] == fallback


def test_release_key_files(tmp_path: Path):
    key = ReleaseKey.generate()
    path = tmp_path / "release.key"
    key.write(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert ReleaseKey.from_file(path).public_pem == key.public_pem
    with pytest.raises(FileExistsError):
        key.write(path)
    ca = CertificateAuthority.generate()
    (tmp_path / "ec.key").write_bytes(ca.key_pem)
    with pytest.raises(KeyUnusable, match="not an Ed25519 key"):
        ReleaseKey.from_file(tmp_path / "ec.key")
    (tmp_path / "junk.key").write_text("junk")
    with pytest.raises(KeyUnusable, match="no usable PEM"):
        ReleaseKey.from_file(tmp_path / "junk.key")


def test_render_pins_everything_and_the_script_parses():
    key = ReleaseKey.generate()
    ca = CertificateAuthority.generate()
    text = render(
        base_url="https://cloud.example:8444",
        cloud_url="https://cloud.example:8443",
        version="1.2.3",
        public_pem=key.public_pem,
        ca_pem=ca.cert_pem,
    )
    assert "@@" not in text
    assert "pinned_version='1.2.3'" in text
    assert key.public_pem.decode().strip() in text
    assert text.rstrip().splitlines()[-1] == 'outpost_install "$@"'
    subprocess.run(["sh", "-n"], input=text, text=True, check=True)
    # Cut anywhere inside the function, the script runs nothing: the shell sees an unfinished
    # function definition, a syntax error, before executing a line.
    body = text[: text.index("outpost_install() {")]
    for cut in range(len(body) + 40, len(text) - 25, 997):
        result = subprocess.run(
            ["sh", "-c", text[:cut] + "\necho RAN-SOMETHING"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "RAN-SOMETHING" not in result.stdout
        assert "[outpost]" not in result.stderr
    with pytest.raises(ValueError, match="cannot be put"):
        render(
            base_url="https://x'y",
            cloud_url="https://c",
            version="1",
            public_pem=key.public_pem,
            ca_pem=ca.cert_pem,
        )


def test_split_host():
    assert split_host("cloud:8444") == "cloud"
    assert split_host("[::1]:8444") == "[::1]"
    assert split_host("10.0.0.1:8444") == "10.0.0.1"


async def test_served_over_https_and_verifiable_by_openssl(tmp_path: Path):
    make_release(tmp_path / "releases", "1.0.0")
    key = ReleaseKey.generate()
    ca = CertificateAuthority.generate()
    cert_pem, key_pem = ca.issue_server_cert(["localhost", "127.0.0.1"])
    app = InstallerApp(
        Releases(tmp_path / "releases", key, fallback_unit=None), ca_pem=ca.cert_pem, hub_port=8443
    )
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            serve_installer, app, tls_context(cert_pem, key_pem, ca.cert_pem), "127.0.0.1", 0
        )
        base = f"https://127.0.0.1:{port}"
        async with httpx2.AsyncClient(
            verify=ssl.create_default_context(cafile=tmp_path / "ca.crt")
        ) as http:
            script = await http.get(f"{base}/install.sh")
            sums = await http.get(f"{base}/releases/1.0.0/SHA256SUMS")
            sig = await http.get(f"{base}/releases/1.0.0/SHA256SUMS.sig")
            binary = await http.get(f"{base}/releases/1.0.0/outpost-linux-amd64")
            head = await http.head(f"{base}/releases/1.0.0/outpost-linux-amd64")
            missing = await http.get(f"{base}/releases/1.0.0/outpost-linux-riscv64")
            no_version = await http.get(f"{base}/releases/2.0.0/SHA256SUMS")
            escape = await http.get(f"{base}/releases/..%2F..%2Fetc/passwd")
            other = await http.get(f"{base}/")
            post = await http.post(f"{base}/install.sh")
        nursery.cancel_scope.cancel()
    assert script.status_code == 200
    assert f"pinned_base_url='https://127.0.0.1:{port}'" in script.text
    assert "pinned_cloud_url='https://127.0.0.1:8443'" in script.text
    assert "pinned_version='1.0.0'" in script.text
    assert binary.content == b"binary 1.0.0 amd64\n"
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(binary.content))
    assert [r.status_code for r in (missing, no_version, escape, other)] == [404] * 4
    assert post.status_code == 405
    assert len(sig.content) == 64
    # What install.sh runs, with the host's openssl.
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    (tmp_path / "release.pub").write_bytes(key.public_pem)
    (tmp_path / "SHA256SUMS").write_bytes(sums.content)
    (tmp_path / "SHA256SUMS.sig").write_bytes(sig.content)
    verify_cmd = [
        "openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "release.pub"),
        "-rawin", "-in", str(tmp_path / "SHA256SUMS"), "-sigfile", str(tmp_path / "SHA256SUMS.sig"),
    ]  # fmt: skip
    assert (
        await trio.run_process(verify_cmd, capture_stdout=True, capture_stderr=True, check=False)
    ).returncode == 0
    (tmp_path / "SHA256SUMS").write_bytes(sums.content.replace(b"a", b"b", 1))
    assert (
        await trio.run_process(verify_cmd, capture_stdout=True, capture_stderr=True, check=False)
    ).returncode != 0


async def test_no_release_is_a_clear_503(tmp_path: Path):
    app = InstallerApp(
        Releases(tmp_path, ReleaseKey.generate(), fallback_unit=None), ca_pem=b"", hub_port=1
    )
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/install.sh", "headers": [(b"host", b"c")]}
    await app(scope, None, send)
    assert sent[0]["status"] == 503
    assert b"no release to install" in sent[1]["body"]
    assert installer_server.SCRIPT_PATH == "/install.sh"
