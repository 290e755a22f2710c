import json

import pytest

from edge.images import manifest
from edge.images.errors import ManifestError, UnsupportedImageError
from edge.images.manifest import Index, Manifest, parse, parse_config
from edge.images.platforms import Platform

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def desc(media_type: str, digest: str = D1, size: int = 10, **extra: object) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def oci_manifest(**overrides: object) -> dict:
    doc = {
        "schemaVersion": 2,
        "mediaType": manifest.OCI_MANIFEST,
        "config": desc(manifest.OCI_CONFIG, D1),
        "layers": [desc(f"{manifest.OCI_LAYER}+gzip", D2), desc(manifest.OCI_LAYER, D3)],
    }
    return {**doc, **overrides}


def test_oci_manifest() -> None:
    parsed = parse(json.dumps(oci_manifest()).encode())
    assert isinstance(parsed, Manifest)
    assert parsed.config.digest == D1
    assert [layer.digest for layer in parsed.layers] == [D2, D3]


def test_docker_schema2_manifest() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": manifest.DOCKER_MANIFEST,
        "config": desc(manifest.DOCKER_CONFIG, D1),
        "layers": [desc(manifest.DOCKER_LAYER, D2)],
    }
    parsed = parse(json.dumps(doc).encode())
    assert isinstance(parsed, Manifest)
    assert parsed.media_type == manifest.DOCKER_MANIFEST


@pytest.mark.parametrize("media_type", [manifest.OCI_INDEX, manifest.DOCKER_LIST])
def test_indexes_and_choosing_from_them(media_type: str) -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            desc(manifest.OCI_MANIFEST, D1, platform={"os": "linux", "architecture": "amd64"}),
            desc(
                manifest.OCI_MANIFEST,
                D2,
                platform={"os": "linux", "architecture": "arm64", "variant": "v8"},
            ),
            desc(manifest.OCI_MANIFEST, D3),
        ],
    }
    parsed = parse(json.dumps(doc).encode())
    assert isinstance(parsed, Index)
    assert parsed.choose(Platform.parse("linux/arm64")).digest == D2
    assert parsed.choose(Platform.parse("linux/amd64")).digest == D1
    with pytest.raises(
        UnsupportedImageError, match=r"no manifest for linux/arm/v7.*amd64, linux/arm64"
    ):
        parsed.choose(Platform.parse("linux/arm/v7"))


def test_media_type_from_the_header_or_the_shape() -> None:
    doc = oci_manifest()
    del doc["mediaType"]
    assert isinstance(parse(json.dumps(doc).encode(), manifest.OCI_MANIFEST), Manifest)
    assert isinstance(parse(json.dumps(doc).encode()), Manifest)
    assert isinstance(parse(b'{"schemaVersion": 2, "manifests": []}'), Index)


def test_schema1_is_refused_with_advice() -> None:
    with pytest.raises(UnsupportedImageError, match=r"schema1.*push the image again"):
        parse(b'{"schemaVersion": 1, "name": "x", "fsLayers": []}')


def test_artifacts_and_unknown_layers_are_refused() -> None:
    helm = oci_manifest(config=desc("application/vnd.cncf.helm.config.v1+json"))
    with pytest.raises(UnsupportedImageError, match="not a container image"):
        parse(json.dumps(helm).encode())
    wasm = oci_manifest(layers=[desc("application/wasm", D2)])
    with pytest.raises(UnsupportedImageError, match="not a tar layer"):
        parse(json.dumps(wasm).encode())


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"not json", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (json.dumps(oci_manifest(layers=None)).encode(), "'layers' list"),
        (json.dumps(oci_manifest(config="x")).encode(), "descriptor must be a JSON object"),
        (
            json.dumps(oci_manifest(layers=[desc(manifest.OCI_LAYER, size=-1)])).encode(),
            "no valid size",
        ),
        (b" " * (manifest.MAX_MANIFEST_BYTES + 1), "more than"),
    ],
)
def test_malformed_manifests(body: bytes, complaint: str) -> None:
    with pytest.raises(ManifestError, match=complaint):
        parse(body)


def test_a_digest_of_another_algorithm_is_unsupported() -> None:
    doc = oci_manifest(layers=[desc(manifest.OCI_LAYER, "sha512:" + "a" * 128)])
    with pytest.raises(UnsupportedImageError, match="not a sha256 digest"):
        parse(json.dumps(doc).encode())


def test_config_parts_the_runtime_needs() -> None:
    config = {
        "architecture": "arm",
        "variant": "v7",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--serve"],
            "Env": ["PATH=/bin", "MODE=edge"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}, "502/tcp": {}},
            "Labels": {"ignored": "yes"},
        },
        "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
    }
    parsed = parse_config(json.dumps(config).encode())
    assert parsed.platform == Platform("linux", "arm", "v7")
    assert parsed.diff_ids == (D1, D2)
    c = parsed.config
    assert (c.entrypoint, c.cmd, c.env) == (("/bin/app",), ("--serve",), ("PATH=/bin", "MODE=edge"))
    assert (c.working_dir, c.user, c.exposed_ports) == (
        "/srv",
        "1000:1000",
        ("502/tcp", "8080/tcp"),
    )
    assert manifest.image_config_from_json(c.to_json()) == c


def test_config_with_nulls_has_empty_defaults() -> None:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": None, "Cmd": None, "ExposedPorts": None},
        "rootfs": {"diff_ids": []},
    }
    c = parse_config(json.dumps(config).encode()).config
    assert (c.entrypoint, c.cmd, c.env, c.working_dir, c.user) == ((), (), (), "", "")


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({"os": "linux", "rootfs": {"diff_ids": []}}, "architecture"),
        ({"os": "linux", "architecture": "amd64"}, "diff_ids"),
        (
            {
                "os": "linux",
                "architecture": "amd64",
                "rootfs": {"diff_ids": []},
                "config": {"Cmd": "sh"},
            },
            "Cmd must be a list",
        ),
    ],
)
def test_malformed_configs(config: dict, complaint: str) -> None:
    with pytest.raises(ManifestError, match=complaint):
        parse_config(json.dumps(config).encode())
