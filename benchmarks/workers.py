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
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DURATION = 10  # seconds per measured run
WARM_UP = 2  # seconds of wrk before each measured run
CONNECTIONS = 32  # wrk connections in flight
START_TIMEOUT = 30.0  # seconds for a daemon or nginx to listen
STOP_TIMEOUT = 30.0  # seconds for a daemon to drain and exit on SIGTERM

KEYS = {
    "rsa4096": ["-newkey", "rsa:4096"],
    "rsa2048": ["-newkey", "rsa:2048"],
    "ecdsa": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.1)
        else:
            return
    raise RuntimeError(f"nothing listens on port {port} after {START_TIMEOUT:g} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (workers)."""
    total = 0.0
    pids = [pid]
    # Any thread's children: Trio starts processes from a worker thread.
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(child) for child in children.read_text().split()]
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@contextmanager
def started(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process stopped by its own PID at the end: SIGTERM, then SIGKILL."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def nginx_command(directory: Path, port: int) -> list[str]:
    www = directory / "www"
    www.mkdir()
    (www / "small.txt").write_bytes(b"x" * 100)
    config = directory / "nginx.conf"
    config.write_text(
        f"""worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {directory}/tb; proxy_temp_path {directory}/tp;
  fastcgi_temp_path {directory}/tf; uwsgi_temp_path {directory}/tu;
  scgi_temp_path {directory}/ts;
  server {{ listen 127.0.0.1:{port}; root {www}; }}
}}
"""
    )
    return [
        "nginx",
        "-p",
        str(directory),
        "-e",
        str(directory / "nginx-error.log"),
        "-c",
        str(config),
    ]


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


def measure(directory: Path, workers: int, backend: int, nginx: int) -> dict[str, float]:
    port = free_port()
    config = daemon_config(directory, workers, port, backend)
    command = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    with started(command, directory / f"tlsproxy-{workers}.log") as daemon:
        wait_port(port, daemon)
        time.sleep(1.0)  # every worker accepting: the supervisor binds first
        run_wrk(port, WARM_UP)
        cpu_daemon, cpu_nginx = cpu_seconds(daemon.pid), cpu_seconds(nginx)
        start = time.monotonic()
        rate, errors = run_wrk(port, DURATION)
        elapsed = time.monotonic() - start
        used_daemon = cpu_seconds(daemon.pid) - cpu_daemon
        used_nginx = cpu_seconds(nginx) - cpu_nginx
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
        backend = free_port()
        with started(nginx_command(directory, backend), directory / "nginx.log") as nginx:
            wait_port(backend, nginx)
            rates: dict[int, list[float]] = {1: [], 2: []}
            for round_ in range(1, args.rounds + 1):
                for workers in (1, 2):
                    result = measure(directory, workers, backend, nginx.pid)
                    rates[workers].append(result["rate"])
                    print(
                        f"round {round_} workers={workers}: {result['rate']:.0f} handshakes/s, "
                        f"proxy {result['proxy_cores']:.2f} cores, nginx "
                        f"{result['nginx_cores']:.2f}, wrk <= "
                        f"{2 - result['proxy_cores'] - result['nginx_cores']:.2f}; "
                        f"{result['errors']:.0f} errors",
                        flush=True,
                    )
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(
        f"{args.cert}: workers=1 {one:.0f}/s, workers=2 {two:.0f}/s (medians of "
        f"{args.rounds}): {two / one:.2f}x, {two / one / ceiling:.0%} of the machine's "
        f"{ceiling:.2f}x"
    )


if __name__ == "__main__":
    main()
