"""The admin endpoints and the published metric names, over real HTTP; the
admin port's bounds (connections, request deadline) against hostile clients."""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin import MAX_CONNECTIONS, REQUEST_TIMEOUT
from tests.daemon import PYTHON_M_PROXY, echo_through, env_for, spawn, write_config
from tests.helpers import (
    STEP,
    Certs,
    Running,
    build_config,
    raw_connect,
    sample,
    scrape,
    start_server,
    tls_connect,
    until,
)

# The README's metrics table: dashboards and alerts depend on these names.
PUBLISHED = {
    "tlsproxy_handshakes": "counter",
    "tlsproxy_handshake_duration_seconds": "histogram",
    "tlsproxy_handshake_wants": "counter",
    "tlsproxy_handshakes_in_progress": "gauge",
    "tlsproxy_tls_negotiated": "counter",
    "tlsproxy_upstream_handshakes": "counter",
    "tlsproxy_upstream_handshake_duration_seconds": "histogram",
    "tlsproxy_upstream_handshake_wants": "counter",
    "tlsproxy_upstream_tls_negotiated": "counter",
    "tlsproxy_connections_active": "gauge",
    "tlsproxy_connections": "counter",
    "tlsproxy_connections_rejected": "counter",
    "tlsproxy_bytes": "counter",
    "tlsproxy_backend_connect_failures": "counter",
    "tlsproxy_backend_connect_duration_seconds": "histogram",
    "tlsproxy_certificate_expiry_timestamp_seconds": "gauge",
    "tlsproxy_config_reloads": "counter",
    "tlsproxy_build_info": "gauge",
    "tlsproxy_internal_errors": "counter",
    "tlsproxy_log_lines_dropped": "counter",
}


async def test_metrics_exports_every_published_name_with_its_type(proxy: Running) -> None:
    status, text = await scrape(proxy.admin_port)
    assert status == 200
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in PUBLISHED.items():
        assert families.get(name) == kind, name


async def test_every_refusal_and_backend_failure_reason_is_exported_at_zero(
    proxy: Running,
) -> None:
    """Alerts take increase() of these: a series born at 1 would hide the
    first refusal of its kind."""
    _, text = await scrape(proxy.admin_port)
    values = {
        (s.name, s.labels["reason"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "reason" in s.labels and s.name.endswith("_total")
    }
    for reason in ("max_connections", "fd_exhausted"):
        assert values[("tlsproxy_connections_rejected_total", reason)] == 0
    for reason in ("refused", "timeout", "unreachable", "resolve", "fd_exhausted"):
        assert values[("tlsproxy_backend_connect_failures_total", reason)] == 0


async def test_certificate_expiry_is_exported_for_the_loaded_certificate(
    proxy: Running, certs: Certs
) -> None:
    _, text = await scrape(proxy.admin_port)
    (family,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "tlsproxy_certificate_expiry_timestamp_seconds"
    ]
    (series,) = family.samples
    assert series.labels["listener"] == "web"
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    assert series.value == cert.not_valid_after_utc.timestamp()


async def test_healthz_and_readyz_are_200_while_serving(proxy: Running) -> None:
    assert (await scrape(proxy.admin_port, "/healthz"))[0] == 200
    assert (await scrape(proxy.admin_port, "/readyz"))[0] == 200


async def test_unknown_admin_path_is_404_with_a_hint(proxy: Running) -> None:
    status, body = await scrape(proxy.admin_port, "/nope")
    assert status == 404
    assert "/metrics" in body


async def test_readyz_turns_503_on_drain(proxy: Running, certs: Certs) -> None:
    with trio.fail_after(STEP):
        tls = await tls_connect(proxy.port, certs.client_context())  # keeps the drain open
        proxy.server.request_drain()
        assert (await scrape(proxy.admin_port, "/readyz"))[0] == 503
        assert (await scrape(proxy.admin_port, "/healthz"))[0] == 200
        await tls.aclose()


async def test_connections_over_max_connections_are_closed_and_counted(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    proxy = await start_server(nursery, build_config(certs, echo_port, max_connections=2))
    with trio.fail_after(STEP):
        held = [await tls_connect(proxy.port, certs.client_context()) for _ in range(2)]
        extra = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        assert await extra.receive_some(1) == b""  # closed at once, before any handshake
        await extra.aclose()
        for tls in held:
            await tls.send_all(b"ok")
            assert await tls.receive_some(2) == b"ok"
            await tls.aclose()
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_connections_rejected_total", reason="max_connections") == 1


# ---------------------------------------------------------------- admin bounds

# A request head cut short: a slowloris sends the rest one byte at a time.
PARTIAL_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
FULL_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
# Seconds between a slowloris's bytes: each arrives long before any
# per-read timeout, so only a deadline on the whole request cuts it.
TRICKLE = 1.0


async def _read_to_eof(stream: trio.SocketStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    return received


async def test_admin_connections_beyond_the_limit_are_closed_at_once_and_a_slowloris_is_cut(
    proxy: Running,
) -> None:
    # every slot held by a slowloris that keeps sending, a byte at a time
    held = [await raw_connect(proxy.admin_port) for _ in range(MAX_CONNECTIONS)]
    cut_after: list[float] = []
    try:
        for stream in held:
            await stream.send_all(PARTIAL_HEAD)
        started = trio.current_time()
        with trio.fail_after(STEP):
            extra = await raw_connect(proxy.admin_port)
            await extra.send_all(FULL_REQUEST)
            # no slot: closed without an answer, while the slowlorises still hold theirs
            assert await _read_to_eof(extra) == b""
            await extra.aclose()

        async def trickle_until_cut(stream: trio.SocketStream) -> None:
            with trio.move_on_after(TRICKLE) as idle:
                await stream.receive_some(1)  # an answer or EOF, whichever comes
            while idle.cancelled_caught:
                try:
                    await stream.send_all(b"X")
                except trio.BrokenResourceError:
                    break  # the server closed while the byte was on its way
                with trio.move_on_after(TRICKLE) as idle:
                    await stream.receive_some(1)
            cut_after.append(trio.current_time() - started)

        with trio.fail_after(REQUEST_TIMEOUT + STEP):
            async with trio.open_nursery() as trickling:
                for stream in held:
                    trickling.start_soon(trickle_until_cut, stream)
    finally:
        for stream in held:
            await trio.aclose_forcefully(stream)
    assert len(cut_after) == MAX_CONNECTIONS
    # cut by the deadline on the whole request: not before it, and the slots
    # are free again for a new client
    assert min(cut_after) >= REQUEST_TIMEOUT - TRICKLE
    assert (await scrape(proxy.admin_port, "/healthz"))[0] == 200


# The daemon's descriptor limit: the shipped container's soft limit is often
# 1024. Without a bound on the admin port, held admin connections take all
# of it and the TLS port can no longer accept.
DAEMON_NOFILE = 1024
HELD_ADMIN_CONNECTIONS = 2000


def _still_open(stream: trio.SocketStream) -> bool:
    """Whether the server has not closed this connection yet (no EOF queued)."""
    with socket.fromfd(stream.socket.fileno(), socket.AF_INET, socket.SOCK_STREAM) as peek:
        try:
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True  # open, nothing to read
        except ConnectionResetError:
            return False


@pytest.fixture
def _descriptors_for_the_clients() -> Iterator[None]:
    """This process holds every client socket of the flood."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HELD_ADMIN_CONNECTIONS + 1024
    if hard < need:
        pytest.skip(f"the descriptor hard limit {hard} cannot hold {need} client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("_descriptors_for_the_clients")
async def test_a_flood_of_held_admin_connections_does_not_starve_the_tls_port(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path, echo_port: int
) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (DAEMON_NOFILE, DAEMON_NOFILE))

    config = write_config(tmp_path / "tlsproxy.toml", certs, backend_port=echo_port)
    argv = [*PYTHON_M_PROXY, "run", "--config", str(config)]
    env = env_for(tmp_path / "state")
    async with spawn(nursery, argv, env=env, cwd=tmp_path, preexec_fn=limit) as daemon:
        port, admin_port = await daemon.started()
        held: list[trio.SocketStream] = []
        try:
            with trio.fail_after(STEP):
                for _ in range(HELD_ADMIN_CONNECTIONS):
                    held.append(await raw_connect(admin_port))
            await echo_through(port, certs.client_context())
            # served while the admin port kept no more than its slots open
            assert sum(map(_still_open, held)) <= MAX_CONNECTIONS
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)

        async def metrics_answer() -> bool:
            status, text = await scrape(admin_port)
            return status == 200 and "tlsproxy_handshakes_total" in text

        await until(metrics_answer)
    # spawn: and no error line, i.e. the daemon never ran out of descriptors
