"""What some tests need that a developer's machine may lack: the appliance's built artefacts
(the edge binary, `make binary`, and the gateway root filesystem, `make rootfs`) and root.

A developer running pytest by hand gets those tests skipped, saying what is missing. `make test`
(what CI runs) builds both artefacts first and sets ``OUTPOST_REQUIRE_BINARY=1`` and
``OUTPOST_REQUIRE_ROOT=1``: then a missing artefact, or a run without root, fails the tests that
need them instead, so CI cannot pass by skipping them unseen. Tests that need root say so with
the ``requires_root(reason)`` marker (tests/conftest.py applies it) or, in fixtures and kits,
by calling ``require_root``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import NoReturn

import pytest

from tests.processes import REPO

REQUIRE_ENV = "OUTPOST_REQUIRE_BINARY"
REQUIRE_ROOT_ENV = "OUTPOST_REQUIRE_ROOT"


def _set(env: str) -> bool:
    return os.environ.get(env, "") not in ("", "0")


def required() -> bool:
    """Whether a missing binary or rootfs is a failure (``OUTPOST_REQUIRE_BINARY=1``)."""
    return _set(REQUIRE_ENV)


def missing(reason: str) -> NoReturn:
    """Skip the test for want of a built artefact; fail it under ``OUTPOST_REQUIRE_BINARY``."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set: `make test` builds it first)", pytrace=False)
    pytest.skip(reason)


def lacking_root(reason: str) -> NoReturn:
    """Skip the test for want of root or of what root brings (capabilities, namespaces); fail
    it under ``OUTPOST_REQUIRE_ROOT``."""
    if _set(REQUIRE_ROOT_ENV):
        pytest.fail(
            f"{reason} ({REQUIRE_ROOT_ENV} is set: `make test` runs every test, as root)",
            pytrace=False,
        )
    pytest.skip(reason)


def require_root(reason: str) -> None:
    """Return when running as root; otherwise ``lacking_root(reason)``."""
    if os.geteuid() != 0:
        lacking_root(reason)


def built_binary() -> Path | None:
    """``$OUTPOST_BINARY``, or the binary `make binary` cached for the current sources."""
    if env := os.environ.get("OUTPOST_BINARY"):
        return Path(env)
    spec = importlib.util.spec_from_file_location("outpost_build", REPO / "build" / "binary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.binary_path()
    return path if path.exists() else None


def binary_or_missing() -> Path:
    """The built binary; skips (or fails, see ``missing``) when there is none."""
    path = built_binary()
    if path is None:
        missing("the edge binary for these sources is not built: run `make binary`")
    if not path.is_file():
        missing(f"OUTPOST_BINARY={path} is not a file")
    return path
