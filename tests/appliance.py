"""The appliance's built artefacts, for the tests that use them: the edge binary (`make binary`)
and the gateway root filesystem (`make rootfs`).

A developer running pytest by hand gets those tests skipped, naming the make target, when the
artefact for the current sources is not built. `make test` (what CI runs) builds both first and
sets ``OUTPOST_REQUIRE_BINARY=1``: then a missing artefact fails the test instead, so CI cannot
pass by skipping the binary's smoke suite.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import NoReturn

import pytest

from tests.processes import REPO

REQUIRE_ENV = "OUTPOST_REQUIRE_BINARY"


def required() -> bool:
    """Whether a missing binary or rootfs is a failure (``OUTPOST_REQUIRE_BINARY=1``)."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def missing(reason: str) -> NoReturn:
    """Skip the test for want of a built artefact; fail it under ``OUTPOST_REQUIRE_BINARY``."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set: `make test` builds it first)", pytrace=False)
    pytest.skip(reason)


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
