import base64
import json

import pytest

from edge.images.auth import (
    Challenge,
    Credentials,
    basic_header,
    credentials_for,
    parse_challenges,
    parse_token_response,
    token_params,
)
from edge.images.errors import InvalidSecretError


def test_bearer_challenge_as_docker_hub_sends_it() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/busybox:pull",
            },
        )
    ]


def test_commas_and_escapes_inside_quotes_and_several_challenges() -> None:
    header = (
        'Basic realm="a, \\"quoted\\" realm", '
        'Bearer realm="https://t.example/token", scope="repository:a:pull,push repository:b:pull"'
        ", Negotiate"
    )
    basic, bearer, negotiate = parse_challenges(header)
    assert basic == Challenge("basic", {"realm": 'a, "quoted" realm'})
    assert bearer.params["scope"] == "repository:a:pull,push repository:b:pull"
    assert negotiate == Challenge("negotiate", {})


def test_scheme_and_names_are_case_insensitive_and_tokens_need_no_quotes() -> None:
    assert parse_challenges("BEARER Realm=https://t/token,Service=reg") == [
        Challenge("bearer", {"realm": "https://t/token", "service": "reg"})
    ]


@pytest.mark.parametrize("header", ["", "   ", '"not a scheme"'])
def test_nothing_usable(header: str) -> None:
    assert parse_challenges(header) == []


def test_token_params_default_to_pulling_the_repository() -> None:
    challenge = Challenge("bearer", {"realm": "https://t/token", "service": "reg"})
    assert token_params(challenge, "team/app") == {
        "scope": "repository:team/app:pull",
        "service": "reg",
    }
    scoped = Challenge("bearer", {"realm": "r", "scope": "repository:x:pull"})
    assert token_params(scoped, "team/app") == {"scope": "repository:x:pull"}


def test_token_response_spellings() -> None:
    assert parse_token_response(b'{"token": "abc", "expires_in": 60}') == "abc"
    assert parse_token_response(b'{"access_token": "xyz"}') == "xyz"
    for bad in (b"<html>", b"[]", b'{"token": ""}'):
        with pytest.raises(ValueError, match="token"):
            parse_token_response(bad)


def test_basic_header() -> None:
    assert (
        basic_header(Credentials("user", "p:w"))
        == "Basic " + base64.b64encode(b"user:p:w").decode()
    )


def test_credentials_repr_hides_the_password() -> None:
    assert "s3cret" not in repr(Credentials("user", "s3cret"))


def secret(auths: dict, key: str = ".dockerconfigjson") -> dict[str, str]:
    """A Secret's ``data`` as the API serves it: base64 values."""
    doc = {"auths": auths} if key == ".dockerconfigjson" else auths
    return {key: base64.b64encode(json.dumps(doc).encode()).decode()}


def auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_dockerconfigjson_for_a_registry_host() -> None:
    data = secret({"registry.example.com": auth("robot", "pw")})
    assert credentials_for("registry.example.com/team/app:1", [data]) == Credentials("robot", "pw")
    assert credentials_for("other.example.com/team/app:1", [data]) is None


def test_username_and_password_fields_and_url_keys() -> None:
    data = secret({"https://registry.example.com:5000/": {"username": "u", "password": "p"}})
    assert credentials_for("registry.example.com:5000/app", [data]) == Credentials("u", "p")
    assert credentials_for("registry.example.com/app", [data]) is None


@pytest.mark.parametrize(
    "key", ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
)
def test_docker_hub_aliases(key: str) -> None:
    data = secret({key: auth("hubuser", "pw")})
    assert credentials_for("busybox", [data]) == Credentials("hubuser", "pw")


def test_wildcards_and_path_prefixes_most_specific_first() -> None:
    data = secret(
        {
            "*.example.com": auth("any", "1"),
            "registry.example.com": auth("host", "2"),
            "registry.example.com/team": auth("team", "3"),
        }
    )
    assert credentials_for("cdn.example.com/app", [data]) == Credentials("any", "1")
    assert credentials_for("a.b.example.com/app", [data]) is None
    assert credentials_for("registry.example.com/app", [data]) == Credentials("host", "2")
    assert credentials_for("registry.example.com/team/app", [data]) == Credentials("team", "3")
    assert credentials_for("registry.example.com/teamx/app", [data]) == Credentials("host", "2")


def test_first_secret_wins_among_equals_and_other_secrets_are_ignored() -> None:
    first = secret({"r.example.com": auth("first", "1")})
    second = secret({"r.example.com": auth("second", "2")})
    opaque = {"password": base64.b64encode(b"x").decode()}
    assert credentials_for("r.example.com/a", [opaque, first, second]) == Credentials("first", "1")


def test_legacy_dockercfg_and_decoded_bytes() -> None:
    legacy = secret({"r.example.com": auth("old", "1")}, key=".dockercfg")
    assert credentials_for("r.example.com/a", [legacy]) == Credentials("old", "1")
    raw = {".dockerconfigjson": json.dumps({"auths": {"r.example.com": auth("b", "2")}}).encode()}
    assert credentials_for("r.example.com/a", [raw]) == Credentials("b", "2")


def test_entries_without_usable_credentials_are_skipped() -> None:
    data = secret({"r.example.com": {"identitytoken": "t"}, "*.example.com": auth("u", "p")})
    assert credentials_for("r.example.com/a", [data]) == Credentials("u", "p")


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        ({".dockerconfigjson": "%%%"}, "not base64"),
        ({".dockerconfigjson": base64.b64encode(b"{").decode()}, "not JSON"),
        ({".dockerconfigjson": base64.b64encode(b'{"auths": 1}').decode()}, "no 'auths'"),
    ],
)
def test_malformed_secrets_say_which_key(data: dict[str, str], complaint: str) -> None:
    with pytest.raises(InvalidSecretError, match=complaint):
        credentials_for("r.example.com/a", [data])
