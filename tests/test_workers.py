"""`workers = 2`: the real daemon as a supervisor and two worker processes
sharing the listener with SO_REUSEPORT, observed through the access log (whose
`pid` names the worker that served each connection), the supervisor's merged
/metrics, signals and exit codes. Every wait is under a deadline.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from tests.daemon import (
    PYTHON_M_PROXY,
    Daemon,
    GatedStream,
    assert_refused,
    config_text,
    env_for,
    spawn,
    transfer_across_sigterm,
)
from tests.helpers import (
    STEP,
    Certs,
    echo_on,
    issue_leaf,
    sample,
    scrape,
    start_backend,
    tls_connect,
)

MESSAGE = b"hello through a worker"


def _config(cert: Path, key: Path, backend_port: int, *, drain_timeout: float = 20.0) -> str:
    return config_text(
        cert,
        key,
        backend_port=backend_port,
        drain_timeout=drain_timeout,
        process_lines="workers = 2\nwatch = false",
    )


@asynccontextmanager
async def _workers(
    nursery: trio.Nursery,
    tmp_path: Path,
    config: Path,
    *,
    env: dict[str, str] | None = None,
    errors_expected: bool = False,
) -> AsyncIterator[tuple[Daemon, int, int, list[int]]]:
    """The daemon, once both workers accept: (daemon, TLS port, admin port, worker pids)."""
    argv = [*PYTHON_M_PROXY, "run", "--config", str(config)]
    env = env or env_for(tmp_path / "state")
    async with spawn(
        nursery, argv, env=env, cwd=tmp_path, errors_expected=errors_expected
    ) as daemon:
        ready = await daemon.wait_for("workers ready")
        port, admin_port = await daemon.started()
        yield daemon, port, admin_port, list(ready["worker_pids"])


async def _echo(port: int, context: ssl.SSLContext) -> int:
    """One new connection through the proxy; returns the serial of the certificate served."""
    with trio.fail_after(STEP):
        tls = await tls_connect(port, context)
        try:
            der = tls.getpeercert(binary_form=True)
            await echo_on(tls, MESSAGE)
        finally:
            await tls.aclose()
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def _served(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.events if e.get("event") == "connection"]


async def _all_logged(daemon: Daemon, count: int) -> list[dict[str, Any]]:
    """The access-log lines once `count` connections have ended (and been counted)."""
    await daemon.wait_until(lambda: len(_served(daemon)) >= count, f"{count} access-log lines")
    lines = _served(daemon)
    assert len(lines) == count, lines
    return lines


async def _totals(admin_port: int) -> tuple[float, float, float]:
    """(connections_total, successful handshakes, worker restarts) of the whole daemon."""
    status, text = await scrape(admin_port)
    assert status == 200
    return (
        sample(text, "tlsproxy_connections_total", listener="web"),
        sample(text, "tlsproxy_handshakes_total", listener="web", outcome="success"),
        sample(text, "tlsproxy_worker_restarts_total"),
    )


def _stale_metrics(directory: Path) -> None:
    """What a previous run's worker could have left: 1000 connections of pid 424242."""
    directory.mkdir()
    stale: Any = MmapedDict(str(directory / "counter_424242.db"))  # type: ignore[no-untyped-call]
    key = mmap_key(
        "tlsproxy_connections",
        "tlsproxy_connections_total",
        ["listener"],
        ["web"],
        "Client connections accepted.",
    )
    stale.write_value(key, 1000.0, 0.0)
    stale.close()
    (directory / "keep.txt").write_text("not a metrics file: left alone")


async def test_two_workers_share_the_port_and_one_scrape_counts_every_connection(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int
) -> None:
    config = tmp_path / "tlsproxy.toml"
    config.write_text(_config(certs.cert, certs.key, echo_port))
    metrics_dir = tmp_path / "metrics"
    _stale_metrics(metrics_dir)
    env = {**env_for(tmp_path / "state"), "TLSPROXY_METRICS_DIR": str(metrics_dir)}
    context = certs.client_context()
    total = 200

    async with _workers(nursery, tmp_path, config, env=env) as (daemon, port, admin_port, pids):
        assert len(set(pids)) == 2
        assert await scrape(admin_port, "/readyz") == (200, "ready\n")

        async def clients(count: int) -> None:
            for _ in range(count):
                await _echo(port, context)

        async with trio.open_nursery() as load:  # 10 at a time, each a new connection
            for _ in range(10):
                load.start_soon(clients, total // 10)

        lines = await _all_logged(daemon, total)
        assert {line["pid"] for line in lines} == set(pids)
        assert all(line["outcome"] == "success" for line in lines)
        _, text = await scrape(admin_port)
        assert (
            sample(text, "tlsproxy_connections_total", listener="web"),
            sample(text, "tlsproxy_handshakes_total", listener="web", outcome="success"),
            sample(text, "tlsproxy_bytes_total", listener="web", direction="to_backend"),
            sample(text, "tlsproxy_connections_active", listener="web"),
            sample(text, "tlsproxy_handshakes_in_progress", listener="web"),
            sample(text, "tlsproxy_build_info"),
        ) == (total, total, total * len(MESSAGE), 0.0, 0.0, 1.0)
        # one series per label set, as with one process: no `pid` label from a gauge
        assert 'pid="' not in text
        assert (metrics_dir / "keep.txt").exists()

        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0


async def test_a_killed_worker_is_restarted_while_the_other_serves_and_counts_survive(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int
) -> None:
    config = tmp_path / "tlsproxy.toml"
    config.write_text(_config(certs.cert, certs.key, echo_port))
    context = certs.client_context()
    made = 0

    async def connect() -> None:
        nonlocal made
        await _echo(port, context)  # fails the test if a connection fails
        made += 1

    async with _workers(nursery, tmp_path, config, errors_expected=True) as started:
        daemon, port, admin_port, pids = started
        while len({line["pid"] for line in _served(daemon)}) < 2:
            with daemon.deadline(STEP, "both workers serving"):
                await connect()
                await _all_logged(daemon, made)  # none in flight when we kill
        before = await _totals(admin_port)
        assert before == (made, made, 0.0)

        victim, survivor = pids
        os.kill(victim, signal.SIGKILL)
        exited = await daemon.wait_for("worker exited unexpectedly; restarting it")
        assert (exited["worker_pid"], exited["exit"]) == (victim, "killed by SIGKILL")
        assert await _totals(admin_port) == before  # the dead worker's counts stay

        # the survivor serves everything until the restarted worker is ready
        while daemon.find("worker ready", restarts=1) is None:
            await connect()
        restarted = await daemon.wait_for("worker ready", restarts=1)
        replacement = restarted["worker_pid"]
        assert replacement not in pids
        await _all_logged(daemon, made)
        served_meanwhile = {line["pid"] for line in _served(daemon)[int(before[0]) :]}
        assert served_meanwhile <= {survivor, replacement}

        with daemon.deadline(STEP, "the replacement serving"):
            while replacement not in {line["pid"] for line in _served(daemon)}:
                await connect()
                await _all_logged(daemon, made)
        assert await _totals(admin_port) == (made, made, 1.0)
        assert await scrape(admin_port, "/readyz") == (200, "ready\n")

        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0


async def test_sighup_makes_every_worker_serve_the_new_certificate(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int
) -> None:
    old_cert, old_key, old_serial = issue_leaf(certs.ca, tmp_path, "old")
    config = tmp_path / "tlsproxy.toml"
    config.write_text(_config(old_cert, old_key, echo_port))
    context = certs.client_context()

    async with _workers(nursery, tmp_path, config) as (daemon, port, _, pids):
        assert await _echo(port, context) == old_serial
        cert, key, serial = issue_leaf(certs.ca, tmp_path, "new")
        staged = config.with_name("staged.toml")
        staged.write_text(_config(cert, key, echo_port))
        staged.replace(config)

        daemon.signal(signal.SIGHUP)
        for pid in pids:
            await daemon.wait_for("config reloaded", trigger="SIGHUP", pid=pid)
        made = len(_served(daemon))
        with daemon.deadline(STEP, "both workers serving after the reload"):
            while {line["pid"] for line in _served(daemon)[1:]} != set(pids):
                assert await _echo(port, context) == serial
                made += 1
                await _all_logged(daemon, made)
        assert daemon.find("reload rejected; the previous config keeps serving") is None

        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0


async def _reloads(admin_port: int) -> tuple[float, float]:
    _, text = await scrape(admin_port)
    return (
        sample(text, "tlsproxy_config_reloads_total", result="success"),
        sample(text, "tlsproxy_config_reloads_total", result="failure"),
    )


async def test_one_sighup_is_one_reload_and_a_bad_config_one_failure(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int
) -> None:
    config = tmp_path / "tlsproxy.toml"
    config.write_text(_config(certs.cert, certs.key, echo_port))

    async with _workers(nursery, tmp_path, config, errors_expected=True) as (
        daemon,
        _,
        admin_port,
        pids,
    ):
        assert await _reloads(admin_port) == (0.0, 0.0)
        _, text = await scrape(admin_port)  # each worker holds up to its own limit
        assert sample(text, "tlsproxy_connections_max", listener="web") == 2 * 10000
        daemon.signal(signal.SIGHUP)
        for pid in pids:
            await daemon.wait_for("config reloaded", trigger="SIGHUP", pid=pid)
        await daemon.wait_until(
            lambda: daemon.find("reload counted", result="success") is not None, "the count"
        )
        assert await _reloads(admin_port) == (1.0, 0.0)

        config.write_text(config.read_text() + "\nunknown_key = 1\n")
        daemon.signal(signal.SIGHUP)
        await daemon.wait_until(
            lambda: daemon.find("reload counted", result="failure") is not None, "the failure"
        )

        def rejected_by() -> set[int]:
            prefix = "reload rejected; the prev"
            return {e["pid"] for e in daemon.events if e.get("event", "").startswith(prefix)}

        # each process writes its own lines: the workers' may come after the count's
        await daemon.wait_until(lambda: rejected_by() == set(pids), "both workers' rejections")
        assert await _reloads(admin_port) == (1.0, 1.0)

        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0


async def test_a_file_change_is_one_reload_watched_by_the_supervisor(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int
) -> None:
    config = tmp_path / "tlsproxy.toml"
    text = config_text(
        certs.cert, certs.key, backend_port=echo_port, process_lines="workers = 2\nwatch = true"
    )
    config.write_text(text)
    async with _workers(nursery, tmp_path, config) as (daemon, _, admin_port, pids):
        staged = config.with_name("staged.toml")
        staged.write_text(text.replace("drain_timeout = 30.0", "drain_timeout = 29.0"))
        staged.replace(config)
        for pid in pids:  # the supervisor saw the change and signalled them
            await daemon.wait_for("config reloaded", trigger="SIGHUP", pid=pid)
        await daemon.wait_for("reload counted", trigger="file change", result="success")
        assert await _reloads(admin_port) == (1.0, 0.0)
        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0
    reloaded = [e for e in daemon.events if e.get("event") == "config reloaded"]
    assert sorted(e["pid"] for e in reloaded) == sorted(pids)


PAYLOAD_SIZE = 4 * 1024 * 1024


async def test_sigterm_drains_every_worker_and_the_in_flight_transfer_completes(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    backend = GatedStream(os.urandom(PAYLOAD_SIZE))
    config = tmp_path / "tlsproxy.toml"
    config.write_text(_config(certs.cert, certs.key, await start_backend(nursery, backend.handler)))

    async with _workers(nursery, tmp_path, config) as (daemon, port, admin_port, pids):

        async def every_worker_draining() -> None:
            draining = [await daemon.wait_for("draining", pid=pid) for pid in pids]
            assert sorted(d["connections"] for d in draining) == [0, 1]

        received = await transfer_across_sigterm(
            daemon, (port, admin_port), certs.client_context(), backend, every_worker_draining
        )

        assert hashlib.sha256(received).digest() == hashlib.sha256(backend.payload).digest()
        assert await daemon.exit_code() == 0
        (line,) = _served(daemon)
        assert (line["close_reason"], line["bytes_to_client"]) == ("backend_closed", PAYLOAD_SIZE)
        assert line["pid"] in pids
        assert daemon.find("stopped", pid=daemon.process.pid) is not None


async def test_second_sigterm_exits_every_worker_at_once(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    backend = GatedStream(os.urandom(PAYLOAD_SIZE))  # never let go on: stays in flight
    config = tmp_path / "tlsproxy.toml"
    backend_port = await start_backend(nursery, backend.handler)
    config.write_text(_config(certs.cert, certs.key, backend_port, drain_timeout=120))

    async with _workers(nursery, tmp_path, config) as (daemon, port, _, pids):
        tls = await tls_connect(port, certs.client_context())
        try:
            with trio.fail_after(STEP):
                assert await tls.receive_some(65536)
            daemon.signal(signal.SIGTERM)
            for pid in pids:
                await daemon.wait_for("draining", pid=pid)
            daemon.signal(signal.SIGTERM)
            assert await daemon.exit_code() == 0
        finally:
            await trio.aclose_forcefully(tls)
    assert daemon.find("second stop signal: exiting now without waiting for connections")


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
async def test_a_port_in_use_stops_the_supervisor_with_exit_2(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, reuse_port: bool
) -> None:
    """Even a listener that shares its port with SO_REUSEPORT (another tlsproxy
    with workers, say) is found, rather than silently sharing its clients."""
    with socket.socket() as busy:
        if reuse_port:
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        config = tmp_path / "tlsproxy.toml"
        text = _config(certs.cert, certs.key, 1)
        config.write_text(
            text.replace('listen = "127.0.0.1:0"\nbackend', f'listen = "{address}"\nbackend')
        )
        argv = [*PYTHON_M_PROXY, "run", "--config", str(config)]
        env = env_for(tmp_path / "state")
        async with spawn(nursery, argv, env=env, cwd=tmp_path, errors_expected=True) as daemon:
            assert await daemon.exit_code() == 2
    (error,) = [e for e in daemon.events if e.get("level") == "error"]
    assert address in error["event"] and "already in use" in error["event"], error
    assert daemon.find("worker started") is None


async def test_workers_drain_and_exit_when_the_supervisor_dies(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int
) -> None:
    config = tmp_path / "tlsproxy.toml"
    config.write_text(_config(certs.cert, certs.key, echo_port))
    # a killed supervisor cannot remove a temporary directory: use the test's
    env = {**env_for(tmp_path / "state"), "TLSPROXY_METRICS_DIR": str(tmp_path / "metrics")}

    async with _workers(nursery, tmp_path, config, env=env) as (daemon, port, _, pids):
        await _echo(port, certs.client_context())
        daemon.process.kill()  # SIGKILL: no chance to stop the workers itself
        for pid in pids:
            await daemon.wait_for("the supervisor is gone; draining", pid=pid)
            await daemon.wait_for("stopped", pid=pid)
        with daemon.deadline(STEP, "every worker to exit (closing its end of the log pipe)"):
            await daemon.eof.wait()
    await assert_refused(port)
