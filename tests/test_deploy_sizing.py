"""The sidecar's memory limit holds `max_connections`, by the figures that
deploy/README.md documents, and the real daemon stays within those figures.

The figures are read from the README's sizing table, so the document, the
manifests and the measurement cannot drift apart: the limit must hold the
baseline plus every connection active, the request the baseline plus every
connection idle. Then the daemon, on the shipped config, is measured the way
the table says: baseline RSS after start and a warm-up round, growth per
idle connection (handshake done, one byte echoed), and growth per active
connection (both directions blocked mid-transfer, a receive buffer lent in
each: the client sends without reading through an echo backend). An egress
connection (the egress overlay: plaintext from the app, mutual TLS to an
echo upstream) is measured the same way against its own two figures.
"""

from __future__ import annotations

import re
import shutil
import socket
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from benchmarks.harness import rss_kib
from tests.daemon import PYTHON_M_PROXY, Daemon, env_for, spawn
from tests.deploy.kustomize import (
    BASE,
    EGRESS,
    OVERLAYS,
    container,
    render,
    rendered_sidecar_config,
)
from tests.helpers import (
    STEP,
    Certs,
    echo_handler,
    echo_on,
    sample,
    scrape,
    until,
    write_certs,
)
from tests.pki import CA
from tests.test_deploy_egress import (
    Sidecar,
    Upstream,
    argv_for,
    egress_listener,
    rendered_config,
    secrets_as_issued,
)

README = BASE.parent.parent / "README.md"
FIGURE = re.compile(
    r"^\| (baseline|per (?:idle|active) (?:egress )?connection) \| (\d+) (KiB|MiB) \|", re.M
)
UNITS = {"KiB": 1024, "MiB": 1024**2, "Gi": 1024**3, "Mi": 1024**2, "Ki": 1024}

# Connections measured: enough that per-connection growth stands well above
# the allocator's noise (a few hundred KiB), few enough for a shared machine.
IDLE_CONNECTIONS = 400
ACTIVE_CONNECTIONS = 100
WARM_UP = 100
# Socket buffers of the test's clients and echo backend: small, so that the
# kernel holds little of each blocked transfer and every connection blocks
# after a few hundred KiB (the daemon's own sockets keep their defaults).
CLIENT_SOCKET_BUFFER = 64 * 1024
PUSH = 16 * 1024
# Seconds without a byte moving, on /metrics, before the transfers count as
# blocked: each connection moves its next 16 KiB in well under a millisecond
# whenever it can.
QUIET = 1.0


def documented() -> dict[str, int]:
    """The sizing table of deploy/README.md, in bytes."""
    figures = {
        name: int(value) * UNITS[unit] for name, value, unit in FIGURE.findall(README.read_text())
    }
    assert figures.keys() == {
        "baseline",
        *(
            f"per {state} {kind}connection"
            for state in ("idle", "active")
            for kind in ("", "egress ")
        ),
    }
    return figures


def quantity(value: str) -> int:
    """A Kubernetes memory quantity in binary units (what the manifests use)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", value)
    assert match, f"{value!r}: write memory in Ki, Mi or Gi"
    return int(match[1]) * UNITS[match[2]]


@pytest.mark.parametrize("kustomization", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_the_memory_limit_holds_max_connections_active_and_the_request_holds_them_idle(
    kustomization: Path,
) -> None:
    resources = render(kustomization)
    memory = container(resources, "tlsproxy")["resources"]
    limit, request = quantity(memory["limits"]["memory"]), quantity(memory["requests"]["memory"])
    config = tomllib.loads(rendered_sidecar_config(resources))
    assert config.get("process", {}).get("workers", 1) == 1, "the figures are for one process"
    figures = documented()

    def held(state: str) -> int:
        """Every listener's max_connections at its kind's figure; a bridge (TLS
        in and out) as an ingress plus an egress connection, as
        deploy/README.md (Egress) says."""
        return sum(
            listener["max_connections"]
            * (
                figures[f"per {state} connection"] * ("tls" in listener)
                + figures[f"per {state} egress connection"] * ("upstream_tls" in listener)
            )
            for listener in config["listeners"]
        )

    assert figures["baseline"] + held("active") <= limit
    assert figures["baseline"] + held("idle") <= request <= limit


async def _small_buffered_echo(nursery: trio.Nursery) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    for listener in listeners:  # accepted sockets inherit the buffer sizes
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            listener.socket.setsockopt(socket.SOL_SOCKET, option, CLIENT_SOCKET_BUFFER)
    nursery.start_soon(trio.serve_listeners, echo_handler, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def _open(port: int, certs: Certs) -> trio.SSLStream[trio.SocketStream]:
    """Handshake done and one byte echoed: the backend connection exists too."""
    sock = _small_buffered_socket()
    await sock.connect(("127.0.0.1", port))
    tls = trio.SSLStream(
        trio.SocketStream(sock), certs.client_context(), server_hostname="localhost"
    )
    await echo_on(tls, b".")
    return tls


async def _moved(admin_port: int, listener: str) -> float:
    _, text = await scrape(admin_port)
    return sum(
        sample(text, "tlsproxy_bytes_total", listener=listener, direction=direction)
        for direction in ("to_backend", "to_client")
    )


def _small_buffered_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket()
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, CLIENT_SOCKET_BUFFER)
    return sock


async def _open_plaintext(port: int) -> trio.SocketStream:
    """An app's connection to an egress listener, one byte echoed through
    the upstream: the upstream's TLS connection exists too."""
    sock = _small_buffered_socket()
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(b".")
    assert await stream.receive_some(1) == b".", "the proxy closed before echoing"
    return stream


Opener = Callable[[], Awaitable[trio.abc.Stream]]


async def _measure(
    daemon: Daemon, admin_port: int, listener: str, kind: str, open_one: Opener
) -> None:
    """The daemon's RSS against the documented figures of `kind` ("" or
    "egress "), through `listener`: after a warm-up, with IDLE_CONNECTIONS
    idle, and with ACTIVE_CONNECTIONS of them blocked both ways (the client
    sends and never reads)."""
    figures = documented()
    pid = daemon.process.pid
    with trio.fail_after(STEP):
        for _ in range(WARM_UP):  # one-time costs: imports, OpenSSL tables, buffer pool
            await (await open_one()).aclose()

    async def none_active() -> bool:
        _, text = await scrape(admin_port)
        return sample(text, "tlsproxy_connections_active", listener=listener) == 0

    await until(none_active)
    baseline = rss_kib(pid) * 1024
    assert baseline <= figures["baseline"]

    streams: list[trio.abc.Stream] = []
    try:
        with trio.fail_after(STEP * 3):
            for _ in range(IDLE_CONNECTIONS):
                streams.append(await open_one())
        idle = (rss_kib(pid) * 1024 - baseline) / IDLE_CONNECTIONS
        assert idle <= figures[f"per idle {kind}connection"]

        async def push(stream: trio.abc.Stream) -> None:
            while True:  # never reads: both directions fill up and block
                await stream.send_all(b"x" * PUSH)

        async with trio.open_nursery() as pushing:
            for stream in streams[:ACTIVE_CONNECTIONS]:
                pushing.start_soon(push, stream)
            with trio.fail_after(STEP * 3):
                before = await _moved(admin_port, listener)
                while True:  # blocked once nothing moves for QUIET seconds
                    await trio.sleep(QUIET)
                    now = await _moved(admin_port, listener)
                    if now == before > 0:
                        break
                    before = now
            grown = rss_kib(pid) * 1024 - baseline
            pushing.cancel_scope.cancel()
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
    # the connections left idle still hold what they held
    active = (grown - (IDLE_CONNECTIONS - ACTIVE_CONNECTIONS) * idle) / ACTIVE_CONNECTIONS
    assert active <= figures[f"per active {kind}connection"]
    print(
        f"{listener}: baseline {baseline / 2**20:.1f} MiB, {idle / 1024:.1f} KiB per idle "
        f"connection, {active / 1024:.1f} KiB per active connection"
    )


async def test_the_shipped_daemon_stays_within_the_documented_figures(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    (tmp_path / "tls").mkdir()
    certs = write_certs(tmp_path / "tls")
    certs.cert.rename(tmp_path / "tls" / "tls.crt")
    certs.key.rename(tmp_path / "tls" / "tls.key")
    shutil.copy(BASE / "tlsproxy.toml", tmp_path / "tlsproxy.toml")
    backend = await _small_buffered_echo(nursery)
    argv = [
        *PYTHON_M_PROXY,
        *("run", "--config", str(tmp_path / "tlsproxy.toml")),
        *("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
        *("--backend", f"127.0.0.1:{backend}"),
    ]

    async def open_one() -> trio.SSLStream[trio.SocketStream]:
        return await _open(port, certs)

    async with spawn(nursery, argv, env=env_for(tmp_path / "state"), cwd=tmp_path) as daemon:
        port, admin_port = await daemon.started()
        await _measure(daemon, admin_port, "web", "", open_one)


async def test_an_egress_connection_stays_within_its_documented_figures(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # the egress overlay's config as rendered, plaintext in, mutual TLS out
    # to a small-buffered echo upstream, against its own rows of the table
    ca = CA(tmp_path)
    resources = render(EGRESS)
    (upstream_id,) = egress_listener(rendered_config(resources))["upstream_tls"]["allow"]["uri"]
    upstream = Upstream(ca, ca.issue("upstream", "payments.example", uris=(upstream_id,)))
    sidecar = Sidecar(tmp_path, await upstream.start(nursery, socket_buffer=CLIENT_SOCKET_BUFFER))
    config = sidecar.write(secrets_as_issued(resources, ca))

    async def open_one() -> trio.SocketStream:
        return await _open_plaintext(sidecar.egress_port)

    async with spawn(nursery, argv_for(config), env=env_for(tmp_path / "state")) as daemon:
        _, admin_port = await daemon.started()
        await daemon.wait_for("listening", listener="payments")
        await _measure(daemon, admin_port, "payments", "egress ", open_one)
