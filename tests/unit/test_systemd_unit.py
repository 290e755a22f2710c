"""systemd/outpost.service passes `systemd-analyze verify`, has the settings the appliance
relies on, and systemd/outpost.env names only variables `outpost run` reads."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from edge.cli import cli
from tests.processes import VENV_BIN

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "outpost.service"
INSTALLED_BINARY = "/usr/local/bin/outpost"


def settings(text: str) -> dict[str, list[str]]:
    """Key -> values, sections flattened (the unit uses no key in two sections)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def verify(unit_text: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of ``unit_text`` installed as ``folder/outpost.service``, with
    ExecStart's binary swapped for one that exists here (verify checks it is executable)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    assert unit_text.count(f"ExecStart={INSTALLED_BINARY} ") == 1
    placeholder = VENV_BIN / "outpost"
    assert placeholder.exists(), "the venv's outpost stands in for the installed binary"
    path = folder / "outpost.service"
    path.write_text(
        unit_text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={placeholder} ")
    )
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def complaints(result: subprocess.CompletedProcess[str]) -> list[str]:
    """What verify said about our unit (other units on the host may have warnings of their own)."""
    return [line for line in (result.stdout + result.stderr).splitlines() if "outpost" in line]


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert complaints(result) == []


def test_verify_would_notice_a_mistake(tmp_path: Path) -> None:
    """The check above checks something: a misspelt setting is reported."""
    result = verify(UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs="), tmp_path)
    assert any("WatchdogSecs" in line for line in complaints(result))


def test_the_unit_has_what_the_appliance_relies_on() -> None:
    unit = settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["always"]
    assert unit["KillMode"] == ["process"]  # pods outlive the agent
    assert unit["Delegate"] == ["yes"]
    assert unit["EnvironmentFile"] == ["-/etc/outpost/outpost.env"]
    assert unit["ExecStart"] == [f"{INSTALLED_BINARY} run $OUTPOST_RUN_ARGS"]
    assert re.fullmatch(r"\d+s", unit["WatchdogSec"][0])
    # Each of these would give containers a private view of mounts, namespaces or syscalls,
    # or clean runc's state away when the agent stops (systemd/README.md).
    for setting in (
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateNetwork",
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "NoNewPrivileges",
        "SystemCallFilter",
        "RestrictNamespaces",
        "CapabilityBoundingSet",
        "RuntimeDirectory",
    ):
        assert setting not in unit, setting


def test_the_environment_file_names_only_variables_outpost_run_reads() -> None:
    read = {"OUTPOST_RUN_ARGS"}  # the unit's own, expanded into ExecStart
    for command in (cli, cli.commands["run"]):
        read |= {p.envvar for p in command.params if isinstance(p, click.Option) and p.envvar}
    named = set(re.findall(r"^#?(OUTPOST_[A-Z_]+)=", (SYSTEMD / "outpost.env").read_text(), re.M))
    assert named
    assert named <= read, named - read
