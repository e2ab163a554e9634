"""Python calls per connection, by function: which of tlsproxy's Python code a load runs.

    .venv/bin/python -m benchmarks.pycalls [--tree DIR] [--base DIR]
        [--direction ingress|egress] [--keep-alive R] [--cert ecdsa|rsa] [-n N] [--top K]
        [--by-module]

Why: callgrind (`benchmarks/instructions.py`) counts instructions per shared
object and per C function, and nearly all of the interpreter's share is one
C function, `_PyEval_EvalFrameDefault`: it tells that a tree's Python code
costs more, not which code. cProfile's call counts are deterministic for a
given load (the same connections and requests make the same calls), so the
difference of two trees' counts per connection names the functions that
are new or called more often; cProfile's own-time column, measured with the
profiler's overhead on a shared machine, only ranks them roughly.

What it does: the setup of instructions.py (the certificate, nginx on CPU
1, tlsproxy's configuration for the direction, the same client threads and
requests, `--keep-alive R` included), but tlsproxy runs without valgrind,
pinned to CPU 0, inside a small launcher that switches a cProfile profiler
on at SIGUSR1 (after the warm-up request) and off, writing its statistics,
at SIGUSR2 (after the load): start-up and the warm-up are not counted.
Functions are keyed by file (relative to the tree) and name, not line, so
the same function matches across trees whose lines moved. With `--base
DIR` the same run is made for that tree first, and the output lists the
functions whose calls per connection differ, by the absolute difference.

Only tlsproxy is measured (HAProxy has no Python). Every process it starts
is stopped by PID; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.instructions import (
    LOAD_CPU,
    PROXY_CPU,
    REPO,
    STOP_WAIT_S,
    TARGET_START_S,
    Setup,
    check_load,
    client_context,
    fetch,
    make_certificate,
    on_signal,
    openssl_conf,
    run_load,
    source_tree,
    target_command,
)
from benchmarks.processes import Processes, free_port, start_nginx, wait_port

# The launcher: `python -c LAUNCHER OUT run --config FILE`. It runs `python
# -m proxy` in this process, with a profiler that SIGUSR1 turns on (OUT.on
# says so) and SIGUSR2 turns off and writes to OUT (renamed into place).
LAUNCHER = """
import cProfile, os, runpy, signal, sys
out = sys.argv.pop(1)
profile = cProfile.Profile()
def start(signum, frame):
    profile.enable()
    open(out + ".on", "w").close()
def stop(signum, frame):
    profile.disable()
    profile.dump_stats(out + ".tmp")
    os.replace(out + ".tmp", out)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""
SIGNAL_WAIT_S = 60  # for the profiler to start, or its statistics to be written
POLL_S = 0.05
DEFAULT_TOP = 40
MAX_TOP = 500


@dataclass(frozen=True)
class Calls:
    """One tree's profile: per (file, function), calls and own seconds."""

    tree: Path
    connections: int
    stats: dict[tuple[str, str], tuple[int, float]]

    def per_connection(self, key: tuple[str, str]) -> tuple[float, float]:
        calls, own = self.stats.get(key, (0, 0.0))
        return calls / self.connections, own / self.connections


def function_key(tree: Path, filename: str, name: str) -> tuple[str, str]:
    """A function's file relative to its tree (or to the standard library and
    site-packages, whose paths differ between virtualenvs), and its name."""
    for marker in ("/site-packages/", "/lib/python"):  # a tree's own venv is in it
        if marker in filename:
            return filename.split(marker, 1)[1], name
    return filename.removeprefix(f"{tree}/"), name


def read_stats(path: Path, tree: Path) -> dict[tuple[str, str], tuple[int, float]]:
    stats: dict[tuple[str, str], tuple[int, float]] = {}
    raw = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    for (filename, _line, name), (_primitive, calls, own, _cumulative, _callers) in raw.items():
        key = function_key(tree, filename, name)
        before = stats.get(key, (0, 0.0))
        stats[key] = (before[0] + calls, before[1] + own)
    return stats


def wait_file(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the launcher wrote `path` (it acts on a signal between two
    bytecodes of the event loop), or it exited, or the deadline passed."""
    deadline = time.monotonic() + SIGNAL_WAIT_S
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"tlsproxy exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} not written within {SIGNAL_WAIT_S} s")
        time.sleep(POLL_S)


def profile_tree(args: argparse.Namespace, tree: Path, procs: Processes) -> Calls:
    with tempfile.TemporaryDirectory(prefix="tls-pycalls-") as tmp:
        d = Path(tmp)
        d.chmod(0o755)  # nginx's worker runs as nobody
        cert = make_certificate(d, args.cert)
        peer_env = {**os.environ, "OPENSSL_CONF": str(openssl_conf(d))}
        egress = args.direction == "egress"
        nginx, backend = start_nginx(
            d,
            procs,
            ["taskset", "-c", str(LOAD_CPU)],
            (cert.cert, cert.key) if egress else None,
            peer_env if egress else None,
        )
        setup = Setup(
            d,
            backend,
            cert,
            peer_env,
            procs,
            egress=egress,
            requests=args.keep_alive,
            tree=tree,
        )
        td = d / "tlsproxy"
        td.mkdir()
        port = free_port()
        cmd = target_command("tlsproxy", td, port, setup)
        out = td / "profile.pstats"
        python, _m, _proxy, *rest = cmd.argv
        argv = ["taskset", "-c", str(PROXY_CPU), python, "-c", LAUNCHER, str(out), *rest]
        print(f"pycalls: {tree}: starting", file=sys.stderr)
        proc = procs.start(argv, td / "log", cmd.env, cmd.cwd)
        try:
            wait_port(port, proc, TARGET_START_S)
            fetch(port, None if egress else client_context())
            proc.send_signal(signal.SIGUSR1)
            wait_file(out.with_name(out.name + ".on"), proc)
            print(f"pycalls: {tree}: {args.connections} connections", file=sys.stderr)
            run_load(port, args.connections, setup)
            proc.send_signal(signal.SIGUSR2)
            wait_file(out, proc)
            stats = read_stats(out, tree)
        finally:
            procs.stop(proc)
            procs.stop(nginx)
    return Calls(tree, args.connections, stats)


def report(tree: Calls, base: Calls | None, top: int) -> None:
    n = tree.connections
    print(f"Python calls per connection (cProfile), {n} connections; tree {tree.tree}")
    if base is None:
        ranked = sorted(tree.stats, key=lambda k: -tree.stats[k][1])[:top]
        print(f"{'calls':>10} {'own us':>9}  function (top {top} by own time)")
        for key in ranked:
            calls, own = tree.per_connection(key)
            print(f"{calls:>10.2f} {own * 1e6:>9.1f}  {key[0]}:{key[1]}")
        return
    print(f"against base {base.tree}")
    keys = set(tree.stats) | set(base.stats)
    deltas = {k: tree.per_connection(k)[0] - base.per_connection(k)[0] for k in keys}
    changed = [k for k in keys if abs(deltas[k]) >= 0.005]
    changed.sort(key=lambda k: (-abs(deltas[k]), k))
    total = sum(tree.per_connection(k)[0] for k in tree.stats)
    total_base = sum(base.per_connection(k)[0] for k in base.stats)
    print(f"all Python-visible calls per connection: {total_base:.1f} -> {total:.1f}")
    print(
        f"{'base':>10} {'tree':>10} {'delta':>10} {'own us base':>12} {'own us tree':>12}"
        f"  function ({len(changed)} differ; top {top} by |delta calls|)"
    )
    for key in changed[:top]:
        (b_calls, b_own), (t_calls, t_own) = base.per_connection(key), tree.per_connection(key)
        print(
            f"{b_calls:>10.2f} {t_calls:>10.2f} {deltas[key]:>+10.2f} "
            f"{b_own * 1e6:>12.1f} {t_own * 1e6:>12.1f}  {key[0]}:{key[1]}"
        )


# The profile's own time by where the code lives, first match wins: (what,
# file prefix, or text in a C function's name).
MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tlsproxy (proxy/)", ("proxy/",)),
    ("Trio", ("trio/", "outcome/", "sniffio/")),
    ("ssl and socket (stdlib and C)", ("3.11/ssl.py", "3.11/socket.py", "_ssl.", "_socket.")),
    ("prometheus-client", ("prometheus_client/",)),
    ("logging (structlog, json, orjson)", ("structlog/", "3.11/json/", "orjson", "_json.")),
    ("waiting in epoll (not CPU: the loop idles there)", ("select.epoll",)),
)


def module_of(key: tuple[str, str]) -> str:
    path, name = key
    for what, marks in MODULES:
        if any(path.startswith(m) or m in name for m in marks):
            return what
    return "other stdlib" if path.startswith("3.11/") else "other (builtins, C)"


def report_modules(tree: Calls) -> None:
    """Own time per connection by module, and its share: a ranking (cProfile
    inflates every call alike), not absolute time."""
    own: dict[str, float] = {}
    for key, (_calls, seconds) in tree.stats.items():
        own[module_of(key)] = own.get(module_of(key), 0.0) + seconds
    total = sum(own.values())
    print(f"Own time by module, per connection, {tree.connections} connections; tree {tree.tree}")
    print(f"{'own us':>10} {'share':>7}  module")
    for what, seconds in sorted(own.items(), key=lambda item: -item[1]):
        print(f"{seconds / tree.connections * 1e6:>10.1f} {seconds / total:>7.1%}  {what}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tree", type=Path, default=REPO, help="the tree measured (default: this)")
    ap.add_argument("--base", type=Path, help="a second tree, measured first, to compare with")
    ap.add_argument("--direction", choices=("ingress", "egress"), default="ingress")
    ap.add_argument("--keep-alive", type=int, default=1, metavar="R")
    ap.add_argument("--cert", choices=("ecdsa", "rsa"), default="ecdsa")
    ap.add_argument("-n", "--connections", type=int)
    ap.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K")
    ap.add_argument("--by-module", action="store_true", help="also the own time summed by module")
    args = ap.parse_args()
    check_load(ap, args)
    if not 1 <= args.top <= MAX_TOP:
        ap.error(f"--top must be 1..{MAX_TOP}")
    args.tree = source_tree(ap, "--tree", args.tree)
    if args.base is not None:
        args.base = source_tree(ap, "--base", args.base)
    return args


def main() -> int:
    args = parse_args()
    if not {PROXY_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        print("pycalls: needs CPUs 0 and 1", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {LOAD_CPU})
    signal.signal(signal.SIGTERM, on_signal)
    procs = Processes(STOP_WAIT_S)
    try:
        base = profile_tree(args, args.base, procs) if args.base else None
        tree = profile_tree(args, args.tree, procs)
    except RuntimeError as exc:
        print(f"pycalls: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    report(tree, base, args.top)
    if args.by_module:
        report_modules(tree)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("pycalls: interrupted; every started process stopped", file=sys.stderr)
        sys.exit(130)
