"""The version this build of Outpost carries; the cloud and the edge report the same one."""

from __future__ import annotations

__version__ = "0.1.0"


def build_info() -> dict[str, str]:
    """How this binary was built (version, git commit, build date, Python, platform).

    ``build/binary.py`` generates ``edge/_build_info.py`` into the binary it builds; a
    development checkout has no such module and reports ``{"build": "development"}``.
    """
    try:
        from edge._build_info import BUILD_INFO  # generated; absent outside a build
    except ImportError:
        return {"build": "development"}
    return {"build": "release", **BUILD_INFO}
