"""A test that needs root is skipped without it when run by hand, and fails under `make test`
(OUTPOST_REQUIRE_ROOT=1), so that CI cannot pass by skipping it unseen."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import conftest
from tests.appliance import REQUIRE_ROOT_ENV, lacking_root, require_root

REPO = Path(__file__).resolve().parents[2]


class MarkedItem:
    """What ``pytest_runtest_setup`` reads of a test item: its markers."""

    def __init__(self, *markers: pytest.Mark) -> None:
        self.markers = markers

    def iter_markers(self, name: str) -> list[pytest.Mark]:
        return [m for m in self.markers if m.name == name]


def as_user(monkeypatch: pytest.MonkeyPatch, required: bool) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    if required:
        monkeypatch.setenv(REQUIRE_ROOT_ENV, "1")
    else:
        monkeypatch.delenv(REQUIRE_ROOT_ENV, raising=False)


def test_without_root_a_test_is_skipped_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    as_user(monkeypatch, required=False)
    with pytest.raises(pytest.skip.Exception, match=r"^runc needs root$"):
        require_root("runc needs root")


def test_without_root_a_test_fails_under_make_test(monkeypatch: pytest.MonkeyPatch) -> None:
    as_user(monkeypatch, required=True)
    with pytest.raises(pytest.fail.Exception, match=r"runc needs root \(OUTPOST_REQUIRE_ROOT"):
        require_root("runc needs root")


@pytest.mark.parametrize("value", ["", "0"])
def test_an_empty_or_zero_variable_does_not_require_root(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    as_user(monkeypatch, required=False)
    monkeypatch.setenv(REQUIRE_ROOT_ENV, value)
    with pytest.raises(pytest.skip.Exception):
        require_root("runc needs root")


def test_as_root_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setenv(REQUIRE_ROOT_ENV, "1")
    require_root("runc needs root")


def test_what_root_brings_is_required_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_ROOT_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="lacks CAP_NET_ADMIN"):
        lacking_root("this process lacks CAP_NET_ADMIN")


def test_the_marker_applies_the_rule_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    item = MarkedItem(pytest.mark.requires_root("runc needs root").mark)
    as_user(monkeypatch, required=False)
    with pytest.raises(pytest.skip.Exception, match=r"^runc needs root$"):
        conftest.pytest_runtest_setup(item)  # type: ignore[arg-type]
    as_user(monkeypatch, required=True)
    with pytest.raises(pytest.fail.Exception, match="runc needs root"):
        conftest.pytest_runtest_setup(item)  # type: ignore[arg-type]
    conftest.pytest_runtest_setup(MarkedItem(pytest.mark.binary.mark))  # type: ignore[arg-type]


def test_make_test_requires_root() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^test: export {REQUIRE_ROOT_ENV} := 1$", makefile, re.M)


def test_no_test_skips_on_its_own_for_want_of_root() -> None:
    """Every root check goes through the rule: a bare skip would pass `make test` unseen."""
    bare = re.compile(r"skipif\(\s*os\.geteuid\(\)|geteuid\(\) != 0:\s*\n\s*pytest\.skip")
    found = [
        str(path.relative_to(REPO))
        for folder in ("tests", "hw-tests")
        for path in (REPO / folder).rglob("*.py")
        if "tests/cluster/go" not in str(path) and bare.search(path.read_text())
    ]
    assert found == []
