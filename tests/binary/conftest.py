"""The built edge binary, for the smoke tests; they skip when it has not been built."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.processes import REPO


def built_binary() -> Path | None:
    """``$OUTPOST_BINARY``, or the binary `make binary` cached for the current sources."""
    if env := os.environ.get("OUTPOST_BINARY"):
        return Path(env)
    spec = importlib.util.spec_from_file_location("outpost_build", REPO / "build" / "binary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.binary_path()
    return path if path.exists() else None


@pytest.fixture(scope="session")
def outpost_binary() -> Path:
    path = built_binary()
    if path is None:
        pytest.skip("the edge binary for these sources is not built: run `make binary`")
    return path
