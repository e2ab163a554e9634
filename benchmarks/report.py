"""`make bench`: run the shared side-by-side harness and write BENCHMARKS.md.

The harness (`../shared/bench/run`) measures tlsproxy and its peers in one
run on one machine and prints ratios to the best peer; this script runs it
once per certificate type with every target, keeps the raw JSON lines under
`benchmarks/results/`, and writes `BENCHMARKS.md` at the repository root:
the machine, the versions, the exact commands, the harness's tables, and
the hand-written notes of `benchmarks/notes.md` (comparisons that need two
builds, such as memory BIO against socket BIO).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import ssl
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT.parent / "shared" / "bench" / "run"
RESULTS = ROOT / "benchmarks" / "results"
NOTES = ROOT / "benchmarks" / "notes.md"
TARGETS = "stunnel,haproxy,hitch,tlsproxy"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cert", action="append", choices=("ecdsa", "rsa"))
    parser.add_argument("--quick", action="store_true", help="the harness's 1-minute smoke run")
    parser.add_argument(
        "--rewrite", metavar="DATE", help="rebuild BENCHMARKS.md from the results of DATE only"
    )
    args = parser.parse_args()
    certs = args.cert or ["ecdsa", "rsa"]
    if args.rewrite:
        sections = [_section(cert, RESULTS / f"{args.rewrite}-{cert}") for cert in certs]
        (ROOT / "BENCHMARKS.md").write_text(_document(sections))
        return 0
    if not HARNESS.exists():
        print(f"the shared harness is missing: {HARNESS}", file=sys.stderr)
        return 2
    env = {**os.environ, "TLSPROXY_CMD": str(Path(sys.executable).parent / "tlsproxy")}
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    sections = []
    for cert in certs:
        out = RESULTS / f"{stamp}-{cert}"
        shutil.rmtree(out, ignore_errors=True)
        command = [str(HARNESS), "--targets", TARGETS, "--cert", cert, "--out", str(out)]
        if args.quick:
            command.append("--quick")
        print("running:", " ".join(command), file=sys.stderr)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        _relative_paths(out)
        sections.append(_section(cert, out))
    (ROOT / "BENCHMARKS.md").write_text(_document(sections))
    return 0


def _relative_paths(out: Path) -> None:
    """The results name this checkout's location; keep them relative to it."""
    for name in ("results.md", "results.jsonl"):
        path = out / name
        path.write_text(path.read_text().replace(f"{ROOT}/", ""))


def _section(cert: str, out: Path) -> str:
    shown = f"../shared/bench/run --targets {TARGETS} --cert {cert}"
    table = (out / "results.md").read_text()
    return f"## {cert.upper()} certificate\n\nCommand: `{shown}`\n\n{table}"


def _document(sections: list[str]) -> str:
    versions = "\n".join(f"- {line}" for line in _versions())
    notes = NOTES.read_text() if NOTES.exists() else ""
    return (
        "# Benchmarks\n\n"
        "Written by `make bench` (benchmarks/report.py) from runs of the shared\n"
        "harness; raw JSON lines in `benchmarks/results/`. Ratios are to the best\n"
        "peer of the same run; compare within a run only.\n\n"
        f"Machine: {_machine()}\n\n{versions}\n\n{notes}\n" + "\n".join(sections)
    )


def _machine() -> str:
    memory = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return (
        f"{os.cpu_count()} CPUs, {int(memory) // 1024 // 1024} GiB, "
        f"{platform.system()} {platform.release()}, {platform.machine()}"
    )


def _versions() -> list[str]:
    return [
        f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}",
        _first_line(["haproxy", "-v"]),
        _first_line(["stunnel", "-version"]),
        _first_line(["hitch", "--version"]),
    ]


def _first_line(command: list[str]) -> str:
    """The line of a `--version` output that names the program."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return f"{command[0]}: not installed"
    lines = (done.stdout + done.stderr).strip().splitlines()
    named = [line for line in lines if command[0].lower() in line.lower()]
    return (named or lines or [command[0]])[0]


if __name__ == "__main__":
    sys.exit(main())
