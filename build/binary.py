"""Build the ``outpost`` edge binary: a Nuitka onefile of ``edge`` only.

    python build/binary.py            # build unless cached; print the binary's path
    python build/binary.py --path     # print the cached binary's path, or exit 1 if not built
    python build/binary.py --force    # rebuild even when cached

The output is cached outside the repo at ``$OUTPOST_CACHE_DIR/binary/<key>/outpost`` (default
``~/.cache/outpost``), where ``<key>`` hashes every file under ``edge/``, pyproject's runtime
dependencies, the Nuitka version and flags, the Python version and the machine. A second run
with nothing changed prints the path in well under a second. Next to the binary:
``build-info.json`` (what ``outpost version`` prints), ``report.xml`` (Nuitka's compilation
report: every module, where it came from, its size) and ``build.log``.

How it is built (see build/README.md for why):

1. a runtime-only venv in ``$OUTPOST_CACHE_DIR/binary-build/venv``: the project's dependencies
   without extras (no pytest, no lightkube), plus Nuitka and zstandard; rebuilt when
   those dependencies change;
2. a staging copy of ``edge/`` with a generated ``edge/_build_info.py`` (version, git commit,
   build date, Python, platform) and a three-line entry script calling ``edge.cli:main``;
3. ``nuitka --onefile`` with the cloud, the tests and test-only packages not followed, the
   extraction directory cached per build (warm starts skip unpacking), ccache for the C
   compiler, and a fixed Nuitka output directory so unchanged modules are not recompiled.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUITKA = "nuitka==4.3.3"
# Packages the edge never imports at runtime (cloud code, tests, test tools, the optional BLE
# driver that is not in the runtime venv) or that only appear in code paths the agent never runs:
# anyio's asyncio backend (httpx2 runs on trio; asyncio itself stays: pymodbus's client
# imports it), multiprocessing (concurrent.futures' process
# pool), cffi (trio's fallback for platforms without os.waitid), PyYAML's C loader (the edge
# parses a few small manifests with the pure-Python one). Nuitka also bundles every standard
# library module nothing excludes; the second group is the standard library the agent never
# imports (checked with `python -X importtime` and the smoke tests).
NOFOLLOW = [
    "cloud",
    "tests",
    "pytest",
    "_pytest",
    "hypothesis",
    "lightkube",
    "prometheus_client",
    "hypercorn",
    "bluepy",
    "setuptools",
    "pip",
    "IPython",
    "anyio._backends._asyncio",
    "anyio.to_process",
    "multiprocessing",
    "concurrent.futures.process",
    "cffi",
    "pycparser",
    "yaml._yaml",
    "_yaml",
    # decimal falls back to its pure-Python twin (already bundled); only pod specs' quantities
    # use it, once per pod.
    "_decimal",
    # Codecs no gateway text is in (the agent reads UTF-8 and ASCII, HTTP adds Latin-1).
    "encodings.cp*",
    "encodings.mac_*",
    "encodings.iso2022*",
    "encodings.euc_*",
    "encodings.shift_jis*",
    "encodings.gb*",
    "encodings.big5*",
    "encodings.hz",
    "encodings.johab",
    "encodings.koi8_*",
    "encodings.kz1048",
    "encodings.ptcp154",
    "encodings.tis_620",
    "encodings.hp_roman8",
    "encodings.palmos",
    "_codecs_*",
    "_multibytecodec",
    "pydoc",
    "tkinter",
    "lib2to3",
    "distutils",
    "ensurepip",
    "idlelib",
    "test",
    "unittest",
    "doctest",
    "pdb",
    "bdb",
    "profile",
    "cProfile",
    "pstats",
    "trace",
    "tracemalloc",
    "timeit",
    "cgi",
    "cgitb",
    "ftplib",
    "imaplib",
    "poplib",
    "smtplib",
    "nntplib",
    "telnetlib",
    "mailbox",
    "mailcap",
    "socketserver",
    "http.server",
    "wsgiref",
    "xmlrpc",
    "webbrowser",
    "sndhdr",
    "imghdr",
    "uu",
    "xdrlib",
    "crypt",
    "pipes",
    "chunk",
    "aifc",
    "sunau",
    "wave",
    "audioop",
    "modulefinder",
    "pyclbr",
    "symtable",
    "tabnanny",
    "rlcompleter",
    "code",
    "codeop",
    "cmd",
    "filecmp",
    "fileinput",
    "graphlib",
    "sched",
    "colorsys",
    "zipapp",
    "turtle",
    "turtledemo",
    "curses",
    "dbm",
    "shelve",
    "sqlite3",
    "plistlib",
    "json.tool",
    "py_compile",
    "compileall",
    "venv",
]
# Packages kept as bytecode instead of compiled to C: a compiled module is several times the
# size of its bytecode, in the file and in memory, and these are not where the agent spends its
# time (HTTP for image pulls and probes, argument parsing, Modbus TCP and MQTT framing).
BYTECODE = [
    "httpx2",
    "httpcore2",
    "anyio",
    "h11",
    "h2",
    "hpack",
    "hyperframe",
    "idna",
    "truststore",
    "certifi",
    "click",
    "attr",
    "attrs",
    "tenacity",
    "yaml",
    "inotify_simple",
    "paho",
    "pymodbus",
    "minimalmodbus",
    "serial",
    "wsproto",
    "trio_websocket",
    "backports",
    "typing_extensions",
    "sniffio",
    "outcome",
    "trio",
    "sortedcontainers",
    "msgpack",
    "apsw",
]


def cache_dir() -> Path:
    return Path(os.environ.get("OUTPOST_CACHE_DIR") or Path.home() / ".cache" / "outpost")


def _inputs() -> list[Path]:
    files = [p for p in sorted((REPO / "edge").rglob("*")) if p.is_file()]
    files = [p for p in files if "__pycache__" not in p.parts and p.name != "_build_info.py"]
    return files


def source_key() -> str:
    """The cache key: a hash of what goes into the binary and how it is built."""
    h = hashlib.sha256()
    h.update(f"{sys.version_info[:3]} {platform.machine()}\n".encode())
    h.update(json.dumps(runtime_dependencies()).encode())
    # How it is built: the Nuitka pin and its flags (paths and the key itself left out), so
    # editing comments or the caching logic here does not force a rebuild.
    recipe = nuitka_command(Path("python"), Path("src"), Path("out"), "KEY", 1)
    h.update(json.dumps([NUITKA, "zstandard", recipe]).encode())
    for p in _inputs():
        h.update(str(p.relative_to(REPO)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def runtime_dependencies() -> list[str]:
    """pyproject.toml's dependencies without extras (its other tables do not matter here)."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def version() -> str:
    ns: dict[str, str] = {}
    exec((REPO / "edge" / "version.py").read_text(), ns)
    return ns["__version__"]


def binary_path() -> Path:
    """Where the binary for the current sources is (or would be) cached."""
    return cache_dir() / "binary" / source_key() / "outpost"


def extraction_dir(key: str | None = None) -> Path:
    """Where the onefile bootstrap unpacks this build (``{CACHE_DIR}`` of the running user)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "outpost" / f"{version()}-{key or source_key()}"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def build_info(key: str) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "edge", "pyproject.toml", "build"):
        commit += "-dirty"
    return {
        "version": version(),
        "commit": commit,
        "build_date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "platform": f"{sys.platform}/{platform.machine()}",
        "builder": f"nuitka {NUITKA.split('==')[1]} onefile",
        "source_key": key,
    }


def _run(cmd: list[str], log, **kw) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, **kw)


def ensure_venv(work: Path, log) -> Path:
    """The runtime-only venv; rebuilt when pyproject.toml (or the Nuitka pin) changes."""
    venv = work / "venv"
    stamp = venv / ".outpost-stamp"
    want = hashlib.sha256(json.dumps([runtime_dependencies(), NUITKA]).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)
    print(f"creating the runtime-only venv {venv}", file=sys.stderr)
    _run([sys.executable, "-m", "venv", str(venv)], log)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, "--upgrade", "pip"], log)
    # The project's dependencies without extras: what the edge needs at runtime, no pytest.
    # (Not `pip install .`: setuptools would build in-tree, in this very build/ directory.)
    _run([*pip, *runtime_dependencies(), NUITKA, "zstandard", "ordered-set"], log)
    stamp.write_text(want)
    return venv / "bin" / "python"


def stage(work: Path, key: str, info: dict[str, str]) -> Path:
    """A copy of edge/ plus the generated build-info module and the entry script."""
    src = work / "stage"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO / "edge", src / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "edge" / "_build_info.py").write_text(
        '"""Generated by build/binary.py; absent from a development checkout."""\n\n'
        f"BUILD_INFO = {json.dumps(info, indent=4, sort_keys=True)}\n"
    )
    (src / "outpost.py").write_text("import sys\n\nfrom edge.cli import main\n\nsys.exit(main())\n")
    return src


def nuitka_command(python: Path, src: Path, out: Path, key: str, jobs: int) -> list[str]:
    return [
        str(python),
        "-m",
        "nuitka",
        "--onefile",
        # Each file compressed apart: a warm start checks the unpacked files' CRC32 and skips
        # their payload, instead of decompressing the whole stream every time.
        "--onefile-as-archive",
        "--assume-yes-for-downloads",
        "--update-check=never",
        f"--jobs={jobs}",
        "--lto=no",
        "--python-flag=no_site",
        # Every edge module: device drivers are imported by name (importlib), which Nuitka
        # cannot follow; edge._build_info is generated into the staging copy.
        "--include-package=edge",
        f"--nofollow-import-to={','.join(NOFOLLOW)}",
        "--noinclude-setuptools-mode=nofollow",
        "--noinclude-pytest-mode=nofollow",
        "--noinclude-pydoc-mode=nofollow",
        "--noinclude-IPython-mode=nofollow",
        *(f"--noinclude-custom-mode={name}:bytecode" for name in BYTECODE),
        # Compiled code has importlib.metadata.version() resolved at build time; bytecode asks
        # at run time: httpx2, httpcore2 and trio-websocket call it on import (the last one
        # for trio's version).
        "--include-distribution-metadata=httpx2,httpcore2,trio-websocket,trio",
        # Nuitka leaves json's C accelerator out unless asked; the agent parses runc's and the
        # OCI files' JSON often enough to want it.
        "--include-module=_json",
        # A fixed path per build: the first start unpacks there, later starts reuse it.
        f"--onefile-tempdir-spec={{CACHE_DIR}}/outpost/{version()}-{key}",
        f"--output-dir={out}",
        "--output-filename=outpost",
        f"--report={out / 'report.xml'}",
        str(src / "outpost.py"),
    ]


def build(force: bool = False, jobs: int | None = None) -> Path:
    key = source_key()
    target = cache_dir() / "binary" / key / "outpost"
    if target.exists() and not force:
        return target
    work = cache_dir() / "binary-build"
    work.mkdir(parents=True, exist_ok=True)
    with (work / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and not force:
            return target
        started = time.monotonic()
        log_path = work / "build.log"
        with log_path.open("w") as log:
            try:
                python = ensure_venv(work, log)
                info = build_info(key)
                src = stage(work, key, info)
                out = work / "out"  # fixed, so Nuitka's scons build dir is reused
                out.mkdir(exist_ok=True)
                env = dict(os.environ, NUITKA_CACHE_DIR=str(work / "nuitka-cache"))
                env.setdefault("CCACHE_DIR", str(cache_dir() / "ccache"))
                print(f"building the outpost binary (log: {log_path})", file=sys.stderr)
                cmd = nuitka_command(python, src, out, key, jobs or os.cpu_count() or 1)
                _run(cmd, log, cwd=src, env=env)
            except subprocess.CalledProcessError as e:
                sys.exit(f"binary build failed ({e.cmd[0]} exit {e.returncode}); see {log_path}")
        dest = target.parent
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy2(out / "outpost", tmp / "outpost")
        shutil.copy2(out / "report.xml", tmp / "report.xml")
        shutil.copy2(log_path, tmp / "build.log")
        info["build_seconds"] = f"{time.monotonic() - started:.0f}"
        (tmp / "build-info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        print(f"built in {info['build_seconds']} s", file=sys.stderr)
        return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--path", action="store_true", help="print the cached path; 1 if not built")
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ap.add_argument("--jobs", type=int, help="parallel C compiler jobs (default: all CPUs)")
    args = ap.parse_args(argv)
    if args.path:
        path = binary_path()
        if not path.exists():
            print(f"not built: {path} (run `make binary`)", file=sys.stderr)
            return 1
        print(path)
        return 0
    print(build(force=args.force, jobs=args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
