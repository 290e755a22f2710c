"""``outpost image`` without a registry: import, list, remove, and the one-line errors."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edge.images.cli import image
from tests.registry import build_image, docker_save, oci_archive


def run(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(image, ["--data-dir", str(tmp_path / "data"), *args])


def test_import_ls_rm(tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    built = build_image(config={"Cmd": ["httpd", "-f"]})
    docker_save(archive, {"plant/app:1": built})
    imported = run(tmp_path, "import", str(archive))
    assert imported.exit_code == 0, imported.output
    assert imported.output.startswith("imported docker.io/plant/app:1 (linux/")

    listed = run(tmp_path, "ls")
    header, row = listed.output.splitlines()
    assert header.split() == ["REFERENCE", "DIGEST", "PLATFORM", "SIZE", "LAST", "USED"]
    assert row.startswith("docker.io/plant/app:1")
    [entry] = json.loads(run(tmp_path, "ls", "--json").output)
    assert entry["reference"] == "docker.io/plant/app:1"
    assert entry["size"] > 1_000_000

    removed = run(tmp_path, "rm", "plant/app:1")
    assert removed.output == "removed plant/app:1\n"
    assert json.loads(run(tmp_path, "ls", "--json").output) == []
    assert list((tmp_path / "data/images/blobs/sha256").iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rm", "plant/none:1"], "Error: there is no image docker.io/plant/none:1 in"),
        (["rm", "Bad//Name"], "Error: 'Bad//Name': the repository name"),
        (["import", "missing.tar"], "Error: cannot read missing.tar: No such file or directory"),
        (["pull", "app:"], "Invalid value for REFERENCE: 'app:': '' is not a valid tag"),
        (["pull", "app", "--platform", "linux/"], "Invalid value for '--platform'"),
        (["pull", "app", "--username", "u"], "--username and --password go together"),
    ],
)
def test_expected_failures_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = run(tmp_path, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_an_archive_that_is_not_one(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"no tar here" * 100)
    result = run(tmp_path, "import", str(junk))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {junk} is not a tar archive (plain, or compressed with gzip, bzip2 or xz)\n"
    )


def test_oci_archive_naming_only_a_tag_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "oci.tar"
    built = build_image()
    oci_archive(archive, "1.0", [built])
    result = run(tmp_path, "import", str(archive))
    assert result.exit_code == 1
    assert "is named '1.0', not an image name with a repository" in result.output
