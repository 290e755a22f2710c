"""`outpost-cloud`: real command structure, `version`, and one-line errors for bad input."""

from __future__ import annotations

import subprocess

import pytest
from click.testing import CliRunner

from cloud.cli import cli, validate_listen
from edge.version import __version__
from tests.processes import VENV_BIN


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="outpost-cloud")


@pytest.mark.parametrize("command", [["serve"], ["token"], ["token", "create"], ["version"]])
def test_every_command_has_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: outpost-cloud {' '.join(command)} [OPTIONS]")


def test_version_matches_the_edge():
    result = invoke("version")
    assert result.exit_code == 0
    assert result.output.startswith(f"outpost-cloud {__version__} ")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.0.0.0:8443", ("0.0.0.0", 8443)), ("[::1]:9000", ("::1", 9000))],
)
def test_listen_address_is_parsed(value, expected):
    assert validate_listen(None, None, value) == expected


@pytest.mark.parametrize("value", ["8443", ":8443", "host:", "host:http", "host:70000", "host:0"])
def test_bad_listen_address_is_refused(value):
    result = invoke("serve", "--listen", value)
    assert result.exit_code == 2
    assert f"{value!r} is not HOST:PORT" in result.output


def test_token_for_an_invalid_node_name_is_refused():
    result = invoke("token", "create", "UPPER")
    assert result.exit_code == 2
    assert "'UPPER' is not a valid node name" in result.output


def test_serve_without_a_kubeconfig_is_one_line(tmp_path):
    missing = tmp_path / "nope.kubeconfig"
    result = subprocess.run(
        [VENV_BIN / "outpost-cloud", "serve", "--kubeconfig", missing],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert (
        result.stderr
        == f"Error: no usable kubeconfig at {missing}: Configuration file {missing} not found\n"
    )
