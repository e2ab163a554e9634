"""A log sink that is slow or gone costs log lines, never connections.

The real daemon, its stderr a pipe: the test reads the start-up lines to
learn the ports, then nobody reads the pipe again (it fills after a few
hundred access lines), then its read end is closed (every write fails with
EPIPE). Connections keep being served throughout, and /metrics counts the
lines that could not be written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.log import LOG_FLUSH_TIMEOUT
from tests.daemon import PYTHON_M_PROXY, env_for, port_of, write_config
from tests.helpers import (
    STEP,
    Certs,
    echo_handler,
    echo_on,
    sample,
    scrape,
    start_backend,
    tls_connect,
    until,
)

# Sequential connections while nobody reads: each writes an access line of
# ~500 bytes, so the 64 KiB pipe is full after ~130 of them (the base commit
# stopped serving there).
UNREAD_CONNECTIONS = 1000
AFTER_CLOSE_CONNECTIONS = 100
# Enough unread access lines to fill the pipe (the rest wait in the buffer).
FILLING_CONNECTIONS = 300
DROPPED = "tlsproxy_log_lines_dropped_total"
# The whole run of connections, generous for a shared 2-core machine (~10 ms
# each), and within pytest's timeout.
SERVE_DEADLINE = 60.0


class _StderrPipe:
    """The daemon's stdout and stderr: a pipe the test stops reading."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.read_open = True

    async def events_until(self, *wanted: str) -> dict[str, dict[str, Any]]:
        """Read lines until every `wanted` event was seen; then stop reading."""
        seen: dict[str, dict[str, Any]] = {}
        pending = b""
        with trio.fail_after(STEP):
            while not all(event in seen for event in wanted):
                chunk = await trio.to_thread.run_sync(os.read, self.read_fd, 65536)
                assert chunk, "the daemon closed stderr during start-up"
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    record = json.loads(line)
                    seen.setdefault(record["event"], record)
        return seen

    def close_read_end(self) -> None:
        os.close(self.read_fd)
        self.read_open = False


@asynccontextmanager
async def _daemon_on_a_pipe(
    config: Path, cwd: Path, **env: str
) -> AsyncIterator[tuple[trio.Process, _StderrPipe]]:
    pipe = _StderrPipe()
    process = await trio.lowlevel.open_process(
        [*PYTHON_M_PROXY, "run", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=pipe.write_fd,
        stderr=pipe.write_fd,
        env={**env_for(cwd / "state"), **env},
        cwd=cwd,
    )
    os.close(pipe.write_fd)
    try:
        yield process, pipe
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            if pipe.read_open:
                pipe.close_read_end()


def _fd_flags(pid: int, fd: int) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


async def _serve(port: int, certs: Certs, count: int) -> None:
    context = certs.client_context()
    for n in range(count):
        with trio.move_on_after(STEP) as step:
            tls = await tls_connect(port, context)
            try:
                await echo_on(tls, b"connection %d" % n)
            finally:
                await tls.aclose()
        assert not step.cancelled_caught, f"connection {n} of {count} not served within {STEP}s"


async def test_a_stalled_then_closed_stderr_drops_log_lines_not_connections(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    echo_port = await start_backend(nursery, echo_handler)
    config = write_config(tmp_path / "tlsproxy.toml", certs, backend_port=echo_port)
    async with _daemon_on_a_pipe(config, tmp_path) as (process, pipe):
        seen = await pipe.events_until("listening", "admin listening")
        port, admin_port = (
            port_of(seen["listening"]["address"]),
            port_of(seen["admin listening"]["address"]),
        )
        with trio.fail_after(SERVE_DEADLINE):
            await _serve(port, certs, UNREAD_CONNECTIONS)
        _, text = await scrape(admin_port)
        assert sample(text, "tlsproxy_handshakes_total", outcome="success") == UNREAD_CONNECTIONS

        assert not _fd_flags(process.pid, 2) & os.O_NONBLOCK  # the shared pipe is left as it was

        pipe.close_read_end()
        with trio.fail_after(SERVE_DEADLINE):
            await _serve(port, certs, AFTER_CLOSE_CONNECTIONS)
        _, text = await scrape(admin_port)
        total = UNREAD_CONNECTIONS + AFTER_CLOSE_CONNECTIONS
        assert sample(text, "tlsproxy_handshakes_total", outcome="success") == total
        assert sample(text, "tlsproxy_log_lines_dropped_total") > 0

        # A clean stop still exits 0 with stderr gone: the flush gives up, bounded.
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            assert await process.wait() == 0


async def test_a_clean_exit_gives_a_stalled_stderr_a_bounded_flush(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    echo_port = await start_backend(nursery, echo_handler)
    config = write_config(tmp_path / "tlsproxy.toml", certs, backend_port=echo_port)
    async with _daemon_on_a_pipe(config, tmp_path) as (process, pipe):
        seen = await pipe.events_until("listening", "admin listening")
        with trio.fail_after(SERVE_DEADLINE):
            await _serve(port_of(seen["listening"]["address"]), certs, FILLING_CONNECTIONS)
        start = trio.current_time()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            assert await process.wait() == 0
        elapsed = trio.current_time() - start
    # The buffered lines never drain: the exit waited for them, then gave up.
    assert LOG_FLUSH_TIMEOUT * 0.9 <= elapsed < STEP


def _files_value(metrics_dir: Path) -> float:
    """The workers' own counts, read from their multiprocess files."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    return sample(generate_latest(registry).decode(), DROPPED)


async def test_with_workers_every_process_drops_count_in_the_merged_scrape(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    echo_port = await start_backend(nursery, echo_handler)
    config = write_config(
        tmp_path / "tlsproxy.toml", certs, backend_port=echo_port, process_lines="workers = 2"
    )
    metrics_dir = tmp_path / "metrics"
    running = _daemon_on_a_pipe(config, tmp_path, TLSPROXY_METRICS_DIR=str(metrics_dir))
    async with running as (process, pipe):
        seen = await pipe.events_until("listening", "admin listening", "workers ready")
        port, admin_port = (
            port_of(seen["listening"]["address"]),
            port_of(seen["admin listening"]["address"]),
        )
        _, text = await scrape(admin_port)
        assert text.count(f"# TYPE {DROPPED} counter") == 1
        assert f"{DROPPED} 0.0" in text  # from zero, one series for the whole daemon

        with trio.fail_after(SERVE_DEADLINE):
            await _serve(port, certs, FILLING_CONNECTIONS)
        pipe.close_read_end()
        with trio.fail_after(SERVE_DEADLINE):
            await _serve(port, certs, AFTER_CLOSE_CONNECTIONS)
        _, text = await scrape(admin_port)
        assert sample(text, DROPPED) > 0
        assert text.count(f"# TYPE {DROPPED} counter") == 1

        # The supervisor's own lines ("SIGHUP received") are lost too, and
        # counted in the same series on top of the workers' files.
        process.send_signal(signal.SIGHUP)

        async def supervisor_counted() -> bool:
            _, text = await scrape(admin_port)
            return sample(text, DROPPED) - _files_value(metrics_dir) >= 1

        await until(supervisor_counted)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            assert await process.wait() == 0
