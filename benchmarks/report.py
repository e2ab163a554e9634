"""`make bench`: run the shared side-by-side harness and write BENCHMARKS.md.

The harness (`../shared/bench/run`) measures tlsproxy and its peers in one
run on one machine and prints ratios to the best peer; this script runs it
once per direction and certificate type with every target: ingress (TLS in,
plaintext to the backend; stunnel, HAProxy, hitch) into
`benchmarks/results/DATE-CERT/`, then egress (plaintext in, TLS out to the
backend; stunnel and HAProxy, hitch having no client mode) into
`benchmarks/results/DATE-egress-CERT/`, and writes `BENCHMARKS.md` at the
repository root: the machine, the versions, the hand-written notes of
`benchmarks/notes.md` (comparisons that need two builds, such as memory BIO
against socket BIO), then per direction and certificate the exact command
and the harness's tables: of this run, and of any other part run the same
day (`--direction`, `--cert` run a part). The tlsproxy measured is this
checkout's, or the command in TLSPROXY_CMD (as the harness reads it).
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
# The harness's targets per direction: hitch has no TLS client mode.
TARGETS = {"ingress": "stunnel,haproxy,hitch,tlsproxy", "egress": "stunnel,haproxy,tlsproxy"}
DIRECTIONS = ("ingress", "egress")
TITLES = {
    "ingress": "Ingress: TLS in, plaintext to the backend",
    "egress": "Egress: plaintext in, TLS out to the backend",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cert", action="append", choices=("ecdsa", "rsa"))
    parser.add_argument(
        "--direction", action="append", choices=DIRECTIONS, help="default: both, ingress first"
    )
    parser.add_argument("--quick", action="store_true", help="the harness's 1-minute smoke run")
    parser.add_argument(
        "--rewrite", metavar="DATE", help="rebuild BENCHMARKS.md from the results of DATE only"
    )
    args = parser.parse_args()
    certs = args.cert or ["ecdsa", "rsa"]
    directions = [d for d in DIRECTIONS if d in (args.direction or DIRECTIONS)]
    runs = [(direction, cert) for direction in directions for cert in certs]
    if args.rewrite:
        return _write(args.rewrite, runs)
    if not HARNESS.exists():
        print(f"the shared harness is missing: {HARNESS}", file=sys.stderr)
        return 2
    # This checkout's tlsproxy, unless TLSPROXY_CMD names another build.
    own = str(Path(sys.executable).parent / "tlsproxy")
    env = {**os.environ, "TLSPROXY_CMD": os.environ.get("TLSPROXY_CMD", own)}
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    for direction, cert in runs:
        out = _results(stamp, direction, cert)
        shutil.rmtree(out, ignore_errors=True)
        command = [str(HARNESS), *_options(direction, cert), "--out", str(out)]
        if args.quick:
            command.append("--quick")
        print("running:", " ".join(command), file=sys.stderr)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        _relative_paths(out)
    everything = [(direction, cert) for direction in DIRECTIONS for cert in ("ecdsa", "rsa")]
    return _write(stamp, everything)


def _write(stamp: str, runs: list[tuple[str, str]]) -> int:
    """BENCHMARKS.md from the results of `stamp` among `runs` that exist:
    after a partial run (one direction, one certificate), also the other
    parts already run that day."""
    found = [(d, c) for d, c in runs if _results(stamp, d, c).exists()]
    if not found:
        print(f"no results of {stamp} in {RESULTS}", file=sys.stderr)
        return 2
    sections = [_section(d, c, _results(stamp, d, c)) for d, c in found]
    (ROOT / "BENCHMARKS.md").write_text(_document(sections))
    return 0


def _results(stamp: str, direction: str, cert: str) -> Path:
    """Where one run's raw results live: DATE-CERT (ingress, as before the
    egress direction existed) or DATE-egress-CERT."""
    infix = "" if direction == "ingress" else f"{direction}-"
    return RESULTS / f"{stamp}-{infix}{cert}"


def _options(direction: str, cert: str) -> list[str]:
    chosen = [] if direction == "ingress" else ["--direction", direction]
    return [*chosen, "--targets", TARGETS[direction], "--cert", cert]


def _relative_paths(out: Path) -> None:
    """The results name this checkout's location; keep them relative to it."""
    for name in ("results.md", "results.jsonl"):
        path = out / name
        path.write_text(path.read_text().replace(f"{ROOT}/", ""))


def _section(direction: str, cert: str, out: Path) -> str:
    shown = " ".join(["../shared/bench/run", *_options(direction, cert)])
    table = (out / "results.md").read_text()
    return f"## {TITLES[direction]}, {cert.upper()} certificate\n\nCommand: `{shown}`\n\n{table}"


def _document(sections: list[str]) -> str:
    versions = "\n".join(f"- {line}" for line in _versions())
    notes = NOTES.read_text() if NOTES.exists() else ""
    return (
        "# Benchmarks\n\n"
        "Written by `make bench` (benchmarks/report.py) from runs of the shared\n"
        "harness, both directions (ingress: TLS in; egress: TLS out); raw JSON\n"
        "lines in `benchmarks/results/`. Ratios are to the best peer of the same\n"
        "run; compare within a run only.\n\n"
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
