"""Scaling from `workers = 1` to `workers = 2`, measured as-is (requests per
second), with a load that costs the machine much less than the proxy does.

    .venv/bin/python -m benchmarks.workers [--cert rsa4096|rsa2048|ecdsa] [--rounds 3]
    (make workers)

Why a big RSA key: on a two-core machine, two workers can only show 2x if
the load generator and the backend need almost no CPU. A full handshake
with an RSA-4096 certificate costs the server one private-key signature
(several ms) and the client one public-key check (tens of microseconds), so
wrk and nginx stay a small share of the machine while both workers are busy.
With ECDSA the client's work per handshake is as large as the server's, and
the load generator, not the proxy, sets the pace: the script prints, for
every run, how much CPU the proxy and the load side (wrk + nginx) used, so a
reader can tell which side was the limit. Nothing is pinned: the workers
must be free to use both cores.

The machine's own ceiling is measured first: `openssl speed rsa4096`
signatures per second with one process, then with two at once. A virtual
machine's two CPUs may be two hyperthreads of one physical core, and then
two busy processes get much less than twice the work of one, whatever they
run; the proxy's scaling is reported against that ceiling too.

Each round runs wrk (`-t1 -c32`, `Connection: close`: every request a new
TCP + full TLS 1.3 handshake, session tickets off) against a daemon with
one worker, then against a daemon with two, for DURATION seconds after a
warm-up; the ratio is of the medians. Needs nginx-light, wrk and openssl
(`make bench` installs them).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.processes import Processes, cpu_seconds, free_port, start_nginx, wait_port

DURATION = 10  # seconds per measured run
WARM_UP = 2  # seconds of wrk before each measured run
CONNECTIONS = 32  # wrk connections in flight
START_TIMEOUT = 30.0  # seconds for a daemon to listen
STOP_TIMEOUT = 30.0  # seconds for a daemon to drain and exit on SIGTERM

KEYS = {
    "rsa4096": ["-newkey", "rsa:4096"],
    "rsa2048": ["-newkey", "rsa:2048"],
    "ecdsa": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
}


def daemon_config(directory: Path, workers: int, port: int, backend: int) -> Path:
    config = directory / f"tlsproxy-{workers}.toml"
    config.write_text(
        f"""[process]
workers = {workers}
[admin]
listen = "127.0.0.1:{free_port()}"
[[listeners]]
name = "bench"
listen = "127.0.0.1:{port}"
backend = "127.0.0.1:{backend}"
[listeners.tls]
certificates = [{{ cert = "cert.pem", key = "key.pem" }}]
session_tickets = false
"""
    )
    return config


def run_wrk(port: int, seconds: int) -> tuple[float, int]:
    """(requests per second, socket errors + non-2xx) of one wrk run."""
    result = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            "-H",
            "Connection: close",
            f"https://127.0.0.1:{port}/small.txt",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)[1])  # type: ignore[index]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", result.stdout))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    return rate, errors + (int(non2xx[1]) if non2xx else 0)


def measure(
    directory: Path, workers: int, backend: int, nginx: int, procs: Processes
) -> dict[str, float]:
    port = free_port()
    config = daemon_config(directory, workers, port, backend)
    command = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    daemon = procs.start(command, directory / f"tlsproxy-{workers}.log")
    try:
        wait_port(port, daemon, START_TIMEOUT)
        time.sleep(1.0)  # every worker accepting: the supervisor binds first
        run_wrk(port, WARM_UP)
        cpu_daemon, cpu_nginx = cpu_seconds(daemon.pid), cpu_seconds(nginx)
        start = time.monotonic()
        rate, errors = run_wrk(port, DURATION)
        elapsed = time.monotonic() - start
        used_daemon = cpu_seconds(daemon.pid) - cpu_daemon
        used_nginx = cpu_seconds(nginx) - cpu_nginx
    finally:
        procs.stop(daemon)
    # wrk's own CPU is not in /proc once it exited: what the machine had
    # (two cores) minus the proxy and nginx is an upper bound for it.
    return {
        "rate": rate,
        "errors": errors,
        "proxy_cores": used_daemon / elapsed,
        "nginx_cores": used_nginx / elapsed,
    }


SPEED_SECONDS = 5  # per openssl speed run


def _speed() -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["openssl", "speed", "-seconds", str(SPEED_SECONDS), "rsa4096"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _signs_per_second(process: subprocess.Popen[str]) -> float:
    out, _ = process.communicate(timeout=SPEED_SECONDS * 10)
    match = re.search(r"^rsa 4096 bits\s+\S+\s+\S+\s+([\d.]+)", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"unexpected openssl speed output: {out!r}")
    return float(match[1])


def machine_ceiling() -> float:
    """How much more two CPU-bound processes do at once than one alone."""
    # Alone before and after the pair: the machine's speed drifts.
    before = _signs_per_second(_speed())
    pair = [_speed(), _speed()]
    together = sum(_signs_per_second(process) for process in pair)
    alone = (before + _signs_per_second(_speed())) / 2
    print(
        f"machine: openssl speed rsa4096, one process {alone:.0f} signs/s (mean of the "
        f"runs before and after), two at once "
        f"{together:.0f} signs/s in all: {together / alone:.2f}x",
        flush=True,
    )
    return together / alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cert", choices=sorted(KEYS), default="rsa4096")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ceiling = machine_ceiling()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)  # nginx's workers run as nobody when started as root
        subprocess.run(
            [
                *("openssl", "req", "-x509", *KEYS[args.cert], "-nodes", "-days", "7"),
                *("-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "cert.pem"),
            ],
            cwd=directory,
            check=True,
            capture_output=True,
        )
        procs = Processes(STOP_TIMEOUT)
        try:
            nginx, backend = start_nginx(directory, procs)
            rates: dict[int, list[float]] = {1: [], 2: []}
            for round_ in range(1, args.rounds + 1):
                for workers in (1, 2):
                    result = measure(directory, workers, backend, nginx.pid, procs)
                    rates[workers].append(result["rate"])
                    print(
                        f"round {round_} workers={workers}: {result['rate']:.0f} handshakes/s, "
                        f"proxy {result['proxy_cores']:.2f} cores, nginx "
                        f"{result['nginx_cores']:.2f}, wrk <= "
                        f"{2 - result['proxy_cores'] - result['nginx_cores']:.2f}; "
                        f"{result['errors']:.0f} errors",
                        flush=True,
                    )
        finally:
            procs.stop_all()
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(
        f"{args.cert}: workers=1 {one:.0f}/s, workers=2 {two:.0f}/s (medians of "
        f"{args.rounds}): {two / one:.2f}x, {two / one / ceiling:.0%} of the machine's "
        f"{ceiling:.2f}x"
    )


if __name__ == "__main__":
    main()
