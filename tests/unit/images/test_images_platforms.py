import pytest

from edge.images import platforms
from edge.images.platforms import Platform, choose, compatible, normalize


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("amd64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/arm64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/arm", Platform("linux", "arm", "v7")),
        ("linux/arm/7", Platform("linux", "arm", "v7")),
        ("linux/arm/v6", Platform("linux", "arm", "v6")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("Linux/ARM64", Platform("linux", "arm64")),
    ],
)
def test_parse_normalizes(text: str, expected: Platform) -> None:
    assert Platform.parse(text) == expected


@pytest.mark.parametrize("text", ["", "linux/", "a/b/c/d", "/amd64"])
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="not a platform"):
        Platform.parse(text)


def test_str_round_trips() -> None:
    for text in ("linux/amd64", "linux/arm/v7", "linux/arm64"):
        assert str(Platform.parse(text)) == text


@pytest.mark.parametrize(
    ("machine", "expected"),
    [("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"), ("armv7l", "linux/arm/v7")],
)
def test_host_platform(monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    monkeypatch.setattr(platforms._platform, "machine", lambda: machine)
    assert str(platforms.host_platform()) == expected


def test_from_json_reads_index_entries_and_configs() -> None:
    assert platforms.from_json({"os": "linux", "architecture": "arm", "variant": "v6"}) == (
        Platform("linux", "arm", "v6")
    )
    with pytest.raises(ValueError, match="architecture"):
        platforms.from_json({"os": "linux"})


ENTRIES = [
    (normalize("linux", "amd64"), "amd64"),
    (normalize("linux", "arm64", "v8"), "arm64"),
    (normalize("linux", "arm", "v6"), "armv6"),
    (normalize("linux", "arm", "v7"), "armv7"),
    (None, "attestation"),
    (normalize("unknown", "unknown"), "unknown"),
]


@pytest.mark.parametrize(
    ("wanted", "chosen"),
    [
        ("linux/amd64", "amd64"),
        ("linux/arm64", "arm64"),
        ("linux/arm/v7", "armv7"),
        ("linux/arm/v6", "armv6"),
        ("windows/amd64", None),
        ("linux/riscv64", None),
    ],
)
def test_choose_the_exact_platform(wanted: str, chosen: str | None) -> None:
    assert choose(ENTRIES, Platform.parse(wanted)) == chosen


def test_choose_falls_back_to_what_the_platform_also_runs() -> None:
    only_v6 = [(normalize("linux", "arm", "v6"), "v6"), (normalize("linux", "arm", "v5"), "v5")]
    assert choose(only_v6, Platform.parse("linux/arm/v7")) == "v6"
    assert choose(only_v6, Platform.parse("linux/arm64")) == "v6"
    assert choose(only_v6, Platform.parse("linux/arm/v5")) == "v5"
    assert choose([(normalize("linux", "386"), "x")], Platform.parse("linux/amd64")) == "x"


def test_choose_takes_the_first_of_equals() -> None:
    twice = [(normalize("linux", "amd64"), "first"), (normalize("linux", "amd64"), "second")]
    assert choose(twice, Platform.parse("linux/amd64")) == "first"


def test_compatible_starts_with_the_platform_itself() -> None:
    wanted = Platform.parse("linux/arm/v7")
    assert compatible(wanted)[0] == wanted
    assert Platform.parse("linux/arm/v8") not in compatible(wanted)
