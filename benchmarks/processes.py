"""Ports, processes and the nginx backend shared by the benchmarks that drive
real programs (`instructions`, `workers`): every process is stopped by the
PID this code started, never by name, and its descendants only if their
start time shows they are still the same processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SMALL_BYTES = 100  # the file every load fetches, as in ../shared/bench/run
NGINX_START_S = 15.0  # nginx must listen within this
# A TLS nginx logs one line per request here (in its directory): the
# connection's serial, then "r" for a resumed session or "." for a full
# handshake, the protocol and the cipher.
SESSION_LOG = "sessions.log"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.1)
        else:
            return
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g} s")


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks: tells a PID from its reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """pid and all its descendants, pid first. Every thread's children count:
    Trio, for one, starts processes from a worker thread."""
    pids, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                found = children.read_text().split()
            except OSError:
                continue
            for child in map(int, found):
                if child not in pids:
                    pids.append(child)
                    todo.append(child)
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (workers)."""
    total = 0.0
    for each in descendants(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Processes:
    """The processes a benchmark started, each stopped by its PID: SIGTERM,
    then SIGKILL after `stop_wait` seconds, then its leftover descendants."""

    def __init__(self, stop_wait: float) -> None:
        self._started: list[subprocess.Popen[bytes]] = []
        self._stop_wait = stop_wait

    def start(
        self,
        cmd: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # a terminal's Ctrl-C reaches only the benchmark
            )
        self._started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        family = [(pid, start_time(pid)) for pid in descendants(proc.pid)[1:]]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self._stop_wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid, born in family:
            if born is not None and start_time(pid) == born:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if proc in self._started:
            self._started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._started)):
            self.stop(proc)


def start_nginx(
    d: Path,
    procs: Processes,
    prefix: list[str] | None = None,
    tls: tuple[Path, Path] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """nginx-light serving `small.txt` from `d` (which nginx's workers, as
    nobody, must be able to read), one worker, no access log; `prefix` such
    as `taskset -c 1` must exec nginx, keeping the PID. With `tls` (a
    certificate and key) it serves TLS and refuses resumption (no tickets,
    no session cache; `env` may add an OpenSSL config), logging every
    request's session to SESSION_LOG instead. Keep-alive connections are
    not cut short (by default nginx closes one after 1000 requests).
    Returns it and its port."""
    www = d / "www"
    www.mkdir()
    (www / "small.txt").write_bytes(b"x" * SMALL_BYTES)
    port = free_port()
    server = f"listen 127.0.0.1:{port}; root {www};"
    if tls is not None:
        server = (
            f"listen 127.0.0.1:{port} ssl; root {www};\n"
            f"    ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};\n"
            "    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_tickets off; ssl_session_cache off;\n"
            f"    access_log {d / SESSION_LOG} sessions;"
        )
    conf = d / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  log_format sessions "$connection $ssl_session_reused $ssl_protocol $ssl_cipher";
  keepalive_requests 1000000;
  client_body_temp_path {d}/tmp-body; proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fcgi; uwsgi_temp_path {d}/tmp-uwsgi;
  scgi_temp_path {d}/tmp-scgi;
  server {{
    {server}
  }}
}}
""")  # fmt: skip
    cmd = [*(prefix or []), "nginx", "-p", str(d), "-e", str(d / "nginx-error.log")]
    proc = procs.start([*cmd, "-c", str(conf)], d / "nginx.log", env)
    wait_port(port, proc, NGINX_START_S)
    return proc, port
