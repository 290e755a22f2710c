"""`outpost`: the command structure is real, `version` works, and every expected failure is one
line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from edge.cli import cli
from edge.version import __version__
from tests.processes import VENV_BIN


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="outpost")


@pytest.mark.parametrize("command", ["run", "join", "status", "version"])
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: outpost {command} [OPTIONS]")


def test_top_level_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "join", "status", "version"):
        assert f"\n  {command} " in result.output


def test_version_prints_the_package_version():
    result = invoke("version")
    assert result.exit_code == 0
    assert result.output.startswith(f"outpost {__version__} (python 3.")


def test_version_json_is_machine_readable():
    info = json.loads(invoke("version", "--json").output)
    assert info["version"] == __version__
    assert set(info) == {"version", "python", "platform", "build"}
    assert info["build"] == "development"


def test_installed_console_script_runs():
    result = subprocess.run(
        [VENV_BIN / "outpost", "version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith(f"outpost {__version__} ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["join", "--cloud", "http://cloud.example", "--token", "t"], "is not an https:// URL"),
        (["join", "--cloud", "https://", "--token", "t"], "is not an https:// URL"),
        (
            ["join", "--cloud", "https://cloud.example", "--token", "t", "--node-name", "Bad_Name"],
            "'Bad_Name' is not a valid node name",
        ),
        (["join", "--cloud", "https://cloud.example"], "Missing option '--token'"),
        (["run", "--manifests", "."], "--manifests applies only with --standalone"),
        (["run", "--standalone"], "--standalone needs --manifests"),
        (["run", "--frobnicate"], "No such option '--frobnicate'"),
        (["--log-level", "loud", "version"], "Invalid value for '--log-level'"),
    ],
)
def test_bad_input_is_a_usage_error(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_options_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("OUTPOST_URL", "http://not-tls.example")
    monkeypatch.setenv("OUTPOST_TOKEN", "t")
    result = invoke("join")
    assert result.exit_code == 2
    assert "'http://not-tls.example' is not an https:// URL" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "has not joined a cloud"),
        (["status"], "the agent has not run"),
        (["join", "--cloud", "https://cloud.example", "--token", "t"], "bootstrap token"),
    ],
)
def test_expected_failures_are_one_line(args, message, tmp_path):
    result = subprocess.run(
        [VENV_BIN / "outpost", *args, "--data-dir", tmp_path],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def last_line_of(code: str) -> str:
    """The last line ``code`` prints, run in a fresh interpreter (nothing imported yet)."""
    out = subprocess.run(
        [str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()[-1]


def test_version_and_command_help_load_neither_the_agent_nor_trio():
    # A warm start of the native binary is mostly imports: `outpost version` must stay light.
    probe = (
        "import sys\n"
        "from edge.cli import cli\n"
        "for argv in (['version'], ['run', '--help'], ['join', '--help'], ['status', '--help']):\n"
        "    try:\n"
        "        cli(argv, prog_name='outpost')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('edge.agent', 'edge.pods.manager', 'edge.hub', 'trio', 'httpx2', 'apsw')\n"
        "print('heavy:' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "      or any(m == h or m.startswith(h + '.') for h in heavy))))\n"
    )
    assert last_line_of(probe) == "heavy:"


def test_subgroups_load_when_used():
    result = invoke("image", "--help")
    assert result.exit_code == 0
    assert "pull" in result.output
    result = invoke("device", "--help")
    assert result.exit_code == 0
    assert "ls" in result.output


def test_the_agent_loads_the_http_stack_only_to_pull_or_probe():
    # Most of an idle gateway's memory is imported modules: httpx2 and its ~100 are needed
    # only for a pull or an HTTP probe, not to run the pods already in place.
    probe = (
        "import sys\n"
        "import edge.agent, edge.pods.probes, edge.images.store\n"
        "print('http:' + ','.join(sorted(m for m in sys.modules if m.split('.')[0]\n"
        "      in ('httpx2', 'httpcore2', 'anyio', 'h11'))))\n"
    )
    assert last_line_of(probe) == "http:"
