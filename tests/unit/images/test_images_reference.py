import pytest

from edge.images.errors import InvalidReferenceError
from edge.images.reference import Reference, normalize

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
        ("grafana/agent:v0.40", "docker.io/grafana/agent:v0.40"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app:v1", "localhost:5000/app:v1"),
        ("127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:latest"),
        ("registry.example.com/a/b/c:1.0-rc_1", "registry.example.com/a/b/c:1.0-rc_1"),
        (f"ghcr.io/org/app@{DIGEST}", f"ghcr.io/org/app@{DIGEST}"),
        (f"ghcr.io/org/app:v2@{DIGEST}", f"ghcr.io/org/app:v2@{DIGEST}"),
        ("[::1]:5000/app", "[::1]:5000/app:latest"),
        ("Example.com/app", "Example.com/app:latest"),
    ],
)
def test_canonical_forms(text: str, canonical: str) -> None:
    assert normalize(text) == canonical


def test_parts_and_api_host() -> None:
    ref = Reference.parse("busybox:1.36")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "docker.io",
        "library/busybox",
        "1.36",
        None,
    )
    assert ref.api_host == "registry-1.docker.io"
    assert ref.target == "1.36"
    assert Reference.parse("127.0.0.1:5000/app").api_host == "127.0.0.1:5000"
    assert Reference.parse("app").target == "latest"


def test_digest_is_the_target_when_both_are_given() -> None:
    assert Reference.parse(f"app:v2@{DIGEST}").target == DIGEST


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "repository name"),
        ("app/Upper", "repository name"),
        ("app:", "not a valid tag"),
        ("app:-x", "not a valid tag"),
        ("app@sha256:abc", "sha256 digest"),
        ("app@md5:" + "a" * 32, "sha256 digest"),
        ("a//b", "repository name"),
        ("a/../b", "repository name"),
        ("bad_host.:5000/app", "registry host"),
        ("x" * 300, "longer than"),
    ],
)
def test_invalid_references_say_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(InvalidReferenceError, match=complaint):
        Reference.parse(text)
