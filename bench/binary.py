"""The edge binary's budgets: file size, cold and warm start, idle memory of the running agent.

Usage: .venv/bin/python bench/binary.py [--runs N] [--settle S] [--binary PATH]   (as root)

The binary is the one `make binary` cached for the current sources (or ``--binary``). It is a
Nuitka onefile: a small bootstrap that unpacks the payload (the compiled program and its
extension modules) into a fixed folder under ``~/.cache/outpost/`` on its first start, then
runs it as a child process and waits for it.

- size_mb: the file's size in MB (10^6 bytes: of the two readings of the budgets' "MB", the
  stricter one; idle_pss_mb likewise). The human-readable lines above it use MiB.
- cold_start_ms: ``outpost version`` right after the extraction folder was deleted: unpacking
  included.
- warm_start_ms: the median of ``--runs`` runs of ``outpost version`` with the folder in place.
  The child alone (the extracted program run directly, without the bootstrap) is printed apart,
  so the bootstrap's share shows.
- idle_pss_mb: ``outpost run --standalone`` with an empty manifest folder, ``--settle`` seconds
  after its ``pods adopted`` line: the sum of PSS (/proc/PID/smaps_rollup) of the bootstrap and
  of the agent child.

Before the last line: the payload's largest files (uncompressed) and how much zstd saves, i.e.
where the bytes go. The last line is
``binary size_mb=… cold_start_ms=… warm_start_ms=… idle_pss_mb=…``.
Budgets: 15 MB, 300 ms warm, 30 MB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
MB = 1000 * 1000


def load_build_module():
    spec = importlib.util.spec_from_file_location("outpost_build", REPO / "build" / "binary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - started) * 1000


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(p) for p in text)
    return found


def idle_agent(binary: Path, settle: float) -> tuple[float, float, float]:
    """PSS (MiB) of the bootstrap, of the agent child, and their sum."""
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmp:
        folder = Path(tmp)
        (folder / "manifests").mkdir()
        log = folder / "agent.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(binary),
                    "run",
                    "--standalone",
                    "--manifests",
                    str(folder / "manifests"),
                    "--data-dir",
                    str(folder / "data"),
                    "--runc-root",
                    str(folder / "runc"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 30
            while 'msg="pods adopted"' not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the agent did not start:\n{log.read_text(errors='replace')}")
                time.sleep(0.05)
            time.sleep(settle)
            kids = children(proc.pid)
            parent = pss_kib(proc.pid) / 1024
            child = sum(pss_kib(k) for k in kids) / 1024
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return parent, child, parent + child


def payload_report(extracted: Path, size: int, top: int = 12) -> None:
    files = [p for p in extracted.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    print(
        f"payload: {len(files)} files, {total / MIB:.1f} MiB unpacked;"
        f" the onefile is {size / MIB:.1f} MiB ({size / total:.0%} of it, zstd)"
    )
    for p in sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:top]:
        print(f"  {p.stat().st_size / MIB:6.2f} MiB  {p.relative_to(extracted)}")


def report_modules(report: Path, top: int = 8) -> None:
    """How many modules went in compiled to C and as bytecode, and the biggest packages."""
    if not report.exists():
        return
    modules = re.findall(r'<module name="([^"]+)" kind="(\w+)"', report.read_text(errors="replace"))
    compiled = [name for name, kind in modules if kind.startswith("Compiled")]
    bytecode = [name for name, kind in modules if kind.startswith("Uncompiled")]
    counts: dict[str, int] = {}
    for name, _ in modules:
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:top]
    compiled_top = sorted({n.split(".")[0] for n in compiled})
    print(
        f"modules: {len(modules)}, {len(compiled)} compiled to C ({', '.join(compiled_top)}),"
        f" {len(bytecode)} as bytecode; most per package: "
        + ", ".join(f"{k} {v}" for k, v in ranked)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="warm runs (default 15)")
    ap.add_argument("--settle", type=float, default=5.0, help="idle seconds before PSS")
    ap.add_argument("--binary", type=Path, help="default: the one `make binary` cached")
    args = ap.parse_args(argv)

    build = load_build_module()
    binary = args.binary or build.binary_path()
    if not binary.exists():
        sys.exit(f"no binary at {binary}: run `make binary`")
    info_file = binary.parent / "build-info.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    extracted = build.extraction_dir(info.get("source_key"))
    size = binary.stat().st_size
    print(f"binary: {binary} ({info.get('commit', '?')}, built {info.get('build_date', '?')})")

    shutil.rmtree(extracted, ignore_errors=True)
    cold = timed([str(binary), "version"])
    if not extracted.is_dir():
        sys.exit(f"the binary did not unpack into {extracted}")
    warm_runs = [timed([str(binary), "version"]) for _ in range(args.runs)]
    warm = statistics.median(warm_runs)
    child = extracted / "outpost.bin"  # what the bootstrap runs
    direct = statistics.median(timed([str(child), "version"]) for _ in range(args.runs))
    print(
        f"start: cold {cold:.0f} ms (unpacking included); warm median {warm:.0f} ms"
        f" (min {min(warm_runs):.0f}, max {max(warm_runs):.0f}, {args.runs} runs);"
        f" the unpacked program alone {direct:.0f} ms, so the bootstrap adds {warm - direct:.0f} ms"
    )

    parent_pss, child_pss, pss = idle_agent(binary, args.settle)
    print(
        f"idle agent PSS: bootstrap {parent_pss:.1f} MiB + agent {child_pss:.1f} MiB"
        f" = {pss:.1f} MiB ({args.settle:.0f} s after 'pods adopted', no pods)"
    )
    payload_report(extracted, size)
    report_modules(binary.parent / "report.xml")
    size_mb, pss_mb = size / MB, pss * MIB / MB
    budgets = [
        ("size", size_mb, 15),
        ("warm start", warm, 300),
        ("idle PSS", pss_mb, 30),
    ]
    missed = [f"{n} {v:.1f} > {b}" for n, v, b in budgets if v > b]
    print("budgets: " + ("all met" if not missed else "MISSED " + "; ".join(missed)))
    print(
        f"binary size_mb={size_mb:.1f} cold_start_ms={cold:.0f} warm_start_ms={warm:.0f}"
        f" idle_pss_mb={pss_mb:.1f}"
    )
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("note: not root; `outpost run` may fail to set up runc", file=sys.stderr)
    sys.exit(main())
