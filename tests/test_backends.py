"""Every kind of backend address (IPv4, IPv6, a name, a Unix socket), and every
backend failure reason counted once, with the client closed cleanly (a
close_notify) within connect_timeout."""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.config import ConfigError, parse_config
from tests.helpers import (
    STEP,
    BioClient,
    Certs,
    build_config,
    echo_handler,
    listener_table,
    scrape,
    start_server,
    tls_connect,
)

# Short enough to keep the suite fast, long enough never to fire by accident
# on a loaded machine for the failures that are immediate.
CONNECT_TIMEOUT = 3.0


async def _echo_once(port: int, certs: Certs) -> None:
    with trio.fail_after(STEP):
        tls = await tls_connect(port, certs.client_context())
        await tls.send_all(b"ping")
        assert await tls.receive_some(10) == b"ping"
        await tls.aclose()


async def _serve_unix(nursery: trio.Nursery, path: Path, handler: Any) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    await nursery.start(partial(trio.serve_listeners, handler, [trio.SocketListener(sock)]))


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_backend(nursery: trio.Nursery, certs: Certs) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, echo_handler, 0, host="::1"))
    port = listeners[0].socket.getsockname()[1]
    proxy = await start_server(nursery, build_config(certs, 0, backend=f"[::1]:{port}"))
    await _echo_once(proxy.port, certs)
    (event,) = await proxy.access_log()
    assert event["backend"] == f"[::1]:{port}"


async def test_backend_by_name_is_resolved_and_each_address_tried(
    nursery: trio.Nursery, certs: Certs
) -> None:
    # `localhost` may resolve to ::1 first; the echo server listens on
    # 127.0.0.1 only, so this also proves the next address is tried.
    listeners = await nursery.start(partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    proxy = await start_server(nursery, build_config(certs, 0, backend=f"localhost:{port}"))
    await _echo_once(proxy.port, certs)


async def test_unix_backend(
    nursery: trio.Nursery, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("unix") / "app.sock"
    await _serve_unix(nursery, path, echo_handler)
    proxy = await start_server(nursery, build_config(certs, 0, backend=f"unix:{path}"))
    await _echo_once(proxy.port, certs)
    (event,) = await proxy.access_log()
    assert event["backend"] == f"unix:{path}"
    assert event["close_reason"] == "client_closed"


async def test_unix_backend_receives_the_proxy_header(
    nursery: trio.Nursery, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("unix") / "app.sock"
    lines: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n" not in data:
            data += await stream.receive_some(4096)
        line, _, rest = data.partition(b"\r\n")
        lines.append(line)
        await stream.send_all(rest)
        await echo_handler(stream)

    await _serve_unix(nursery, path, handler)
    config = build_config(certs, 0, backend=f"unix:{path}", proxy_protocol="v1")
    proxy = await start_server(nursery, config)
    await _echo_once(proxy.port, certs)
    (line,) = lines
    assert line.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    assert line.endswith(f" {proxy.port}".encode())


def _refused_tcp() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        pytest.param(_refused_tcp, "refused", id="tcp-refused"),
        pytest.param(lambda: "unix:/nonexistent/app.sock", "refused", id="unix-missing"),
        # the limited broadcast address has no route for a TCP connect: ENETUNREACH
        pytest.param(lambda: "255.255.255.255:80", "unreachable", id="unreachable"),
        pytest.param(lambda: "no-such-host.invalid:80", "resolve", id="resolve"),  # RFC 6761
    ],
)
async def test_backend_failure_is_counted_and_client_gets_close_notify_in_time(
    nursery: trio.Nursery, certs: Certs, backend: Any, reason: str
) -> None:
    address = backend()
    config = build_config(certs, 0, backend=address, connect_timeout=CONNECT_TIMEOUT)
    proxy = await start_server(nursery, config)
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        start = trio.current_time()
        assert await client.recv() == b""  # a clean close_notify, not a reset
        elapsed = trio.current_time() - start
        await client.stream.aclose()
    assert elapsed < CONNECT_TIMEOUT
    _, text = await scrape(proxy.admin_port)
    failures = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tlsproxy_backend_connect_failures_total{")
    }
    assert failures == {reason: 1.0}
    (event,) = await proxy.access_log()
    assert event["close_reason"] == f"backend_{reason}"
    assert event["backend"] == address


def test_config_accepts_unix_backends_and_proxy_protocol_versions(certs: Certs) -> None:
    for version in ("off", "v1", "v2"):
        config = build_config(certs, 0, backend="unix:/run/app.sock", proxy_protocol=version)
        assert config.listeners[0].backend.unix_path == "/run/app.sock"
        assert config.listeners[0].proxy_protocol == version


def test_config_rejects_a_unix_path_longer_than_the_kernel_allows(certs: Certs) -> None:
    path = "/run/" + "a" * 103  # 108 bytes: no room for sun_path's NUL
    table = listener_table(certs, 0, backend=f"unix:{path}")
    with pytest.raises(ConfigError) as caught:
        parse_config({"listeners": [table]}, certs.cert.parent)
    (error,) = caught.value.errors
    assert error.startswith("listeners[0].backend: unix socket path is longer than 107 bytes")
