"""Limits: max_connections enforced at accept, the accept loop surviving fd
exhaustion without spinning and refusing (and counting) each connection it
cannot hold, 500 slowloris clients not starving a normal one, and no
per-connection state left behind however a connection ended."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import struct
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path

import pytest
import trio

from proxy.accept import EXHAUSTED_EVENT as EXHAUSTED
from tests.daemon import PYTHON_M_PROXY, Daemon, echo_through, env_for, spawn, write_config
from tests.helpers import (
    STEP,
    Certs,
    build_config,
    echo_handler,
    outcomes,
    raw_connect,
    sample,
    scrape,
    start_backend,
    start_server,
    tls_connect,
    until,
)


@pytest.fixture(autouse=True, scope="module")
def _enough_descriptors() -> Iterator[None]:
    """Slowloris holds 500 client sockets and the proxy's 500 in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _echo(tls: trio.SSLStream[trio.SocketStream], data: bytes) -> None:
    await tls.send_all(data)
    received = b""
    while len(received) < len(data):
        chunk = await tls.receive_some(1000)
        assert chunk
        received += chunk
    assert received == data


# ---------------------------------------------------------------- max_connections


async def test_60_clients_against_max_connections_50_reject_10_and_serve_50(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    proxy = await start_server(nursery, build_config(certs, echo_port, max_connections=50))
    held: list[trio.SSLStream[trio.SocketStream]] = []
    refused = 0

    async def one() -> None:
        nonlocal refused
        try:
            held.append(await tls_connect(proxy.port, certs.client_context()))
        except (trio.BrokenResourceError, ssl.SSLError, OSError):
            refused += 1

    try:
        with trio.fail_after(STEP):
            async with trio.open_nursery() as clients:
                for _ in range(60):  # all at once: the limit must hold within one accept burst
                    clients.start_soon(one)
        assert (len(held), refused) == (50, 10)
        _, text = await scrape(proxy.admin_port)
        assert sample(text, "tlsproxy_connections_rejected_total", reason="max_connections") == 10
        assert sample(text, "tlsproxy_connections_active") == 50
        with trio.fail_after(STEP):
            async with trio.open_nursery() as clients:
                for i, tls in enumerate(held):
                    clients.start_soon(_echo, tls, f"client {i}".encode())
    finally:
        for tls in held:
            await trio.aclose_forcefully(tls)


# ---------------------------------------------------------------- slowloris

SLOWLORIS = 500
NORMAL_HANDSHAKES = 50
NORMAL_LANES = 5  # the normal handshakes run five at a time, like a small client pool
# Long enough that the 50 normal handshakes finish while all 500 slow
# clients are still connected, even on a loaded two-core machine.
SLOW_HANDSHAKE_TIMEOUT = 5.0


async def _normal_client(port: int, certs: Certs, lane: int) -> None:
    for i in range(NORMAL_HANDSHAKES // NORMAL_LANES):
        tls = await tls_connect(port, certs.client_context())
        await _echo(tls, f"normal {lane}.{i}".encode())
        await tls.aclose()


async def test_500_slowloris_connections_time_out_while_50_handshakes_succeed(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    config = build_config(certs, echo_port, handshake_timeout=SLOW_HANDSHAKE_TIMEOUT)
    proxy = await start_server(nursery, config)
    slow: list[trio.SocketStream] = []
    try:
        with trio.fail_after(STEP):
            for _ in range(SLOWLORIS):
                stream = await raw_connect(proxy.port)
                slow.append(stream)
                await stream.send_all(b"\x16\x03\x01\x02\x00")  # a header, then nothing
            opened = trio.current_time()
            async with trio.open_nursery() as clients:
                for lane in range(NORMAL_LANES):
                    clients.start_soon(_normal_client, proxy.port, certs, lane)
            normal_done = trio.current_time()
        assert normal_done - opened < SLOW_HANDSHAKE_TIMEOUT, "normal clients were starved"
        with trio.fail_after(STEP):
            while True:
                counts = await outcomes(proxy.admin_port)
                if counts.get("timeout", 0) >= SLOWLORIS:
                    break
                await trio.sleep(0.1)
        assert trio.current_time() - opened >= SLOW_HANDSHAKE_TIMEOUT * 0.9
        assert counts["success"] == NORMAL_HANDSHAKES
        assert counts["timeout"] == SLOWLORIS
        assert sum(counts.values()) == SLOWLORIS + NORMAL_HANDSHAKES
    finally:
        for stream in slow:
            await trio.aclose_forcefully(stream)


# ---------------------------------------------------------------- no leftovers

# Connections per way of ending, and the short timeouts that end some of them.
EACH_WAY = 5
LEFTOVER_TIMEOUT = 1.0


async def _ended_by_the_proxy(stream: trio.SocketStream) -> None:
    """Wait until the proxy closes a raw connection (EOF or reset)."""
    with suppress(trio.BrokenResourceError):
        while await stream.receive_some(1024):
            pass
    await stream.aclose()


async def _clean_close(port: int, certs: Certs) -> None:
    await echo_through(port, certs.client_context())


async def _client_reset(port: int, certs: Certs) -> None:
    tls = await tls_connect(port, certs.client_context())
    await _echo(tls, b"then a reset")
    tls.transport_stream.socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    await trio.aclose_forcefully(tls)


async def _idle_timeout(port: int, certs: Certs) -> None:
    tls = await tls_connect(port, certs.client_context())
    await _echo(tls, b"then nothing")
    assert await tls.receive_some(100) == b""  # the proxy's close_notify, at idle_timeout
    await trio.aclose_forcefully(tls)


async def _not_tls(port: int, certs: Certs) -> None:
    stream = await raw_connect(port)
    await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
    await _ended_by_the_proxy(stream)


async def _handshake_timeout(port: int, certs: Certs) -> None:
    await _ended_by_the_proxy(await raw_connect(port))


async def _gone_mid_handshake(port: int, certs: Certs) -> None:
    stream = await raw_connect(port)
    await stream.send_all(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello begins
    await stream.aclose()


ENDINGS = [
    (_clean_close, "client_closed"),
    (_client_reset, "client_reset"),
    (_idle_timeout, "idle_timeout"),
    (_not_tls, None),
    (_handshake_timeout, None),
    (_gone_mid_handshake, None),
]


def _task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


async def test_no_per_connection_state_is_left_after_close(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    config = build_config(
        certs, echo_port, handshake_timeout=LEFTOVER_TIMEOUT, idle_timeout=LEFTOVER_TIMEOUT
    )
    proxy = await start_server(nursery, config)
    await echo_through(proxy.port, certs.client_context())
    await proxy.access_log(1)
    _, text = await scrape(proxy.admin_port)
    series, tasks = len(text.splitlines()), _task_count()
    connections = proxy.server.connections
    with trio.fail_after(STEP):
        async with trio.open_nursery() as clients:
            for end, _ in ENDINGS:
                for _ in range(EACH_WAY):
                    clients.start_soon(end, proxy.port, certs)
    lines = (await proxy.access_log(1 + len(ENDINGS) * EACH_WAY))[1:]
    reasons = Counter(line.get("close_reason") for line in lines)
    for _, reason in ENDINGS:
        if reason is not None:
            assert reasons[reason] == EACH_WAY, reasons
    _, text = await scrape(proxy.admin_port)
    assert len(text.splitlines()) == series  # no new label sets
    assert _task_count() == tasks  # every connection task ended
    assert connections.live == set()
    assert len(connections.idle) == 0  # which the idle_timeout ones were watched in
    assert [state.active for state in proxy.server.listeners] == [0]


# ---------------------------------------------------------------- fd exhaustion

# The daemon's descriptor limit: its own baseline (interpreter, epoll, wakeup
# pipes, listening sockets, stdio) is ~15, so 64 runs out after some 45
# connections.
DAEMON_NOFILE = 64
EXHAUSTING_CLIENTS = 80
# CPU seconds the daemon may burn per wall second while out of descriptors:
# a spinning accept loop would use a whole core (1.0).
MAX_BACKOFF_CPU = 0.2


@asynccontextmanager
async def _limited_daemon(nursery: trio.Nursery, cwd: Path, config: Path) -> AsyncIterator[Daemon]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (DAEMON_NOFILE, DAEMON_NOFILE))

    argv = [*PYTHON_M_PROXY, "run", "--config", str(config)]
    async with spawn(
        nursery, argv, env=env_for(cwd / "state"), cwd=cwd, preexec_fn=limit, errors_expected=True
    ) as daemon:
        yield daemon


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _closed_by_the_proxy(stream: trio.SocketStream, closed: list[trio.SocketStream]) -> None:
    """Record `stream` once the proxy closes it; a held one waits until cancelled."""
    with suppress(trio.BrokenResourceError):
        while await stream.receive_some(1024):
            pass
    closed.append(stream)


async def _at_least(items: list[trio.SocketStream], count: int) -> bool:
    return len(items) >= count


async def test_fd_exhaustion_refuses_and_counts_each_connection_and_recovers(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    echo_port = await start_backend(nursery, echo_handler)
    config = write_config(
        tmp_path / "tlsproxy.toml", certs, backend_port=echo_port,
        listener_lines="handshake_timeout = 60.0",
    )  # fmt: skip
    async with _limited_daemon(nursery, tmp_path, config) as daemon:
        port, admin_port = await daemon.started()
        pid = daemon.process.pid
        with trio.fail_after(STEP):
            live = await tls_connect(port, certs.client_context())
            await _echo(live, b"the backend is connected")
        # each connection the daemon can still hold takes one descriptor
        room = DAEMON_NOFILE - _open_descriptors(pid)
        refusals = EXHAUSTING_CLIENTS - room
        assert refusals > 0
        idle: list[trio.SocketStream] = []
        closed: list[trio.SocketStream] = []
        try:
            async with trio.open_nursery() as watching:
                with trio.fail_after(STEP):
                    for _ in range(EXHAUSTING_CLIENTS):
                        idle.append(await raw_connect(port))
                        watching.start_soon(_closed_by_the_proxy, idle[-1], closed)
                await until(partial(_at_least, closed, refusals))
                await daemon.wait_for(EXHAUSTED)
                start_cpu, start = _cpu_seconds(pid), trio.current_time()
                with trio.fail_after(STEP):
                    await _echo(live, b"still served while out of descriptors")
                await trio.sleep(1.0)  # measuring idle CPU over a second: this sleep is the point
                busy = (_cpu_seconds(pid) - start_cpu) / (trio.current_time() - start)
                assert busy < MAX_BACKOFF_CPU, f"accept loop spins: {busy:.2f} CPU s per s"
                assert len(closed) == refusals  # the held ones are still held
                watching.cancel_scope.cancel()
            backoffs = [e for e in daemon.events if e.get("event") == EXHAUSTED]
            assert len(backoffs) == 1, "one log line per episode, not one per refusal"
        finally:
            for stream in idle:
                await trio.aclose_forcefully(stream)
            await trio.aclose_forcefully(live)
        await echo_through(port, certs.client_context())
        await daemon.wait_for("accepting again")
        _, text = await scrape(admin_port)
        rejected = sample(text, "tlsproxy_connections_rejected_total", reason="fd_exhausted")
        assert rejected == refusals
        assert sample(text, "tlsproxy_handshakes_total", outcome="success") == 2
        assert sample(text, "tlsproxy_handshakes_total", outcome="client_closed") == room
