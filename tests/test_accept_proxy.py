"""`accept_proxy_protocol`: a load balancer's PROXY header before the TLS bytes.

The parser against hand-built headers (a table), then the real daemon: hand
-built v1 and v2 headers (TCP4, TCP6, LOCAL) in front of a real TLS client,
the client they name in the access log and in the header sent on to the
backend; refused headers (missing, truncated, oversized, garbage, too slow)
closed and counted; and a real HAProxy sending `send-proxy-v2`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import ssl
import struct
import subprocess
from pathlib import Path

import pytest
import trio
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v2 import ProxyProtocolV2

from proxy import proxy_protocol as pp
from proxy.proxy_protocol import NEED_MORE, HeaderError, Received
from tests.helpers import (
    STEP,
    Certs,
    Running,
    build_config,
    free_port,
    outcomes,
    sample,
    scrape,
    start_backend,
    start_server,
)
from tests.test_proxy_protocol import (
    HAPROXY,
    SIG,
    _HeaderBackend,
    _wait_listening,
)

LOCAL_V2 = SIG + bytes([0x20, 0x00, 0x00, 0x00])
TLV = pp.tlv(0xEA, b"\x01vpce-0123456789abcdef0")  # an AWS NLB's VPC endpoint id


def _v2(source: tuple[str, int], dest: tuple[str, int], extra: bytes = b"") -> bytes:
    header = pp.encode_v2(source, dest)
    length = struct.unpack("!H", header[14:16])[0] + len(extra)
    return header[:14] + struct.pack("!H", length) + header[16:] + extra


# ---------------------------------------------------------------- the parser

VALID = [
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n", "any", ("192.0.2.7", 51000)),
    (b"PROXY TCP6 2001:db8::7 ::1 1 443\r\n", "v1", ("2001:db8::7", 1)),
    (b"PROXY UNKNOWN ffff::1 whatever\r\n", "v1", None),
    (b"PROXY UNKNOWN\r\n", "any", None),
    (_v2(("192.0.2.7", 51000), ("10.0.0.1", 443), TLV), "v2", ("192.0.2.7", 51000)),
    (_v2(("2001:db8::7", 65535), ("::1", 443)), "any", ("2001:db8::7", 65535)),
    (LOCAL_V2, "v2", None),
    (SIG + bytes([0x21, 0x00, 0x00, 0x03]) + b"abc", "v2", None),  # PROXY, AF_UNSPEC
]


@pytest.mark.parametrize(("header", "mode", "source"), VALID)
def test_valid_headers_and_the_client_they_name(
    header: bytes, mode: pp.Accept, source: tuple[str, int] | None
) -> None:
    verdict = pp.parse_header(header + b"\x16\x03\x01", mode)
    assert isinstance(verdict, Received)
    assert (verdict.length, verdict.source) == (len(header), source)
    assert pp.parse_header(header[:-1], mode) is NEED_MORE


INVALID = [
    (b"\x16\x03\x01\x02\x00", "any", "expected a v1 line or v2 signature, got b'\\x16\\x03"),
    (b"GET / HTTP/1.1\r\n", "v1", "expected a v1 line, got b'GET / HTTP/1.1\\r\\n'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v2", "expected a v2 signature"),
    (LOCAL_V2, "v1", "expected a v1 line"),
    (b"PROXY " + b"x" * 101, "v1", "v1 line without CRLF in its first 107 bytes"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1", "malformed v1 line"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1", "address b'::1' is not IPv4"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "v1", "bad port b'01'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "v1", "port 65536 out of range"),
    (b"PROXY TCP4 1.2.3.\x1b[2J 5.6.7.8 1 2\r\n", "v1", "bad address b'1.2.3.\\x1b[2J'"),
    (SIG + bytes([0x31, 0x11, 0x00, 0x0C]) + bytes(12), "v2", "version/command byte 0x31"),
    (SIG + bytes([0x21, 0x11, 0x04, 0x01]), "v2", "declares 1025 bytes; at most 1024"),
    (SIG + bytes([0x21, 0x12, 0x00, 0x0C]) + bytes(12), "v2", "address family 0x12"),
    (SIG + bytes([0x21, 0x21, 0x00, 0x0C]) + bytes(12), "v2", "too short for its addresses"),
]


@pytest.mark.parametrize(("data", "mode", "error"), INVALID)
def test_invalid_headers_say_what_was_wrong_with_bytes_escaped(
    data: bytes, mode: pp.Accept, error: str
) -> None:
    with pytest.raises(HeaderError) as caught:
        pp.parse_header(data, mode)
    assert error in str(caught.value)
    assert str(caught.value).isprintable()


# ---------------------------------------------------------------- the daemon


@pytest.fixture
async def backend(nursery: trio.Nursery) -> tuple[_HeaderBackend, int]:
    handler = _HeaderBackend()
    return handler, await start_backend(nursery, handler.handler)


async def _proxy(nursery: trio.Nursery, certs: Certs, port: int, accept: str = "any") -> Running:
    config = build_config(
        certs,
        port,
        accept_proxy_protocol=accept,
        proxy_protocol="v2",
        handshake_timeout=3.0,
    )
    return await start_server(nursery, config)


async def _through(port: int, certs: Certs, header: bytes) -> tuple[str, int]:
    """The header, then a TLS echo in the same connection (the header and the
    ClientHello in one segment: the client's first write goes out with it);
    returns the client socket's own address."""
    sock = trio.socket.socket()
    with trio.fail_after(STEP):
        await sock.connect(("127.0.0.1", port))
        own = sock.getsockname()
        stream = trio.SocketStream(sock)
        await stream.send_all(header)
        tls = trio.SSLStream(stream, certs.client_context(), server_hostname="localhost")
        await tls.send_all(b"ping")
        assert await tls.receive_some(10) == b"ping"
        await tls.aclose()
    return str(own[0]), int(own[1])


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 8443\r\n", "192.0.2.7:51000"),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 1 8443\r\n", "[2001:db8::7]:1"),
        (_v2(("192.0.2.7", 51000), ("10.0.0.1", 8443), TLV), "192.0.2.7:51000"),
        (_v2(("2001:db8::7", 65535), ("2001:db8::1", 8443)), "[2001:db8::7]:65535"),
    ],
)
async def test_the_header_names_the_client_in_the_log_and_in_the_header_sent_on(
    nursery: trio.Nursery,
    certs: Certs,
    backend: tuple[_HeaderBackend, int],
    header: bytes,
    client: str,
) -> None:
    handler, port = backend
    proxy = await _proxy(nursery, certs, port)
    await _through(proxy.port, certs, header)
    (line,) = await proxy.access_log()
    assert (line["client"], line["outcome"]) == (client, "success")
    assert line["ja4"].startswith("t13d")
    (sent,) = handler.headers
    result = ProxyProtocolV2().unpack(sent)
    assert isinstance(result, ProxyResultIPv4 | ProxyResultIPv6)
    host, _, sport = client.rpartition(":")
    assert result.source == (ipaddress.ip_address(host.strip("[]")), int(sport))
    assert result.tlv.authority == "localhost"


async def test_a_local_header_keeps_the_sockets_own_peer(
    nursery: trio.Nursery, certs: Certs, backend: tuple[_HeaderBackend, int]
) -> None:
    proxy = await _proxy(nursery, certs, backend[1], accept="v2")
    own = await _through(proxy.port, certs, LOCAL_V2)
    (line,) = await proxy.access_log()
    assert line["client"] == f"{own[0]}:{own[1]}"


async def _rejected(proxy: Running) -> float:
    _, text = await scrape(proxy.admin_port)
    return sample(
        text, "tlsproxy_connections_rejected_total", listener="web", reason="proxy_header"
    )


async def _refused(proxy: Running, send: bytes, *, close: bool = True) -> dict[str, object]:
    """Send `send` (then EOF, if `close`); the connection must be closed by
    the proxy, counted, and logged with the reason; returns the warning."""
    before = await outcomes(proxy.admin_port)
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await stream.send_all(send)
        if close:
            await stream.send_eof()
        assert await stream.receive_some(100) == b""  # closed by the proxy, nothing sent
        await stream.aclose()
    (line,) = await proxy.access_log()
    assert line["close_reason"] == "proxy_header"
    assert await _rejected(proxy) == 1.0
    assert await outcomes(proxy.admin_port) == before  # no handshake was begun
    (warning,) = proxy.log_events("PROXY header refused; connection closed")
    return warning


@pytest.mark.parametrize(
    ("send", "error"),
    [
        (b"", "connection closed after 0 bytes"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 51000", "connection closed after 35 bytes"),
        (_v2(("192.0.2.7", 1), ("10.0.0.1", 2))[:20], "connection closed after 20 bytes"),
        (SIG + b"\x21\x11\xff\xff" + bytes(64), "declares 65535 bytes"),
        (b"PROXY " + b"9" * 200, "without CRLF"),
        (b"\x1b[31mhello\r\n", "got b'\\x1b[31mhello\\r\\n'"),
    ],
    ids=["missing", "truncated-v1", "truncated-v2", "oversized-v2", "oversized-v1", "garbage"],
)
async def test_a_connection_without_a_valid_header_is_refused_and_counted(
    nursery: trio.Nursery,
    certs: Certs,
    backend: tuple[_HeaderBackend, int],
    send: bytes,
    error: str,
) -> None:
    proxy = await _proxy(nursery, certs, backend[1])
    assert await _rejected(proxy) == 0.0  # exported at zero
    warning = await _refused(proxy, send, close=len(send) < 60)
    assert error in str(warning["error"]), warning
    assert backend[0].headers == []


async def test_a_tls_client_without_a_header_is_refused(
    nursery: trio.Nursery, certs: Certs, backend: tuple[_HeaderBackend, int]
) -> None:
    proxy = await _proxy(nursery, certs, backend[1])
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    with trio.fail_after(STEP), pytest.raises((ssl.SSLError, trio.BrokenResourceError)):
        tls = trio.SSLStream(stream, certs.client_context(), server_hostname="localhost")
        await tls.do_handshake()
    await stream.aclose()
    (warning,) = proxy.log_events("PROXY header refused; connection closed")
    # the hello's first bytes, escaped; repr quotes with " when they hold a '
    assert re.search(
        r"expected a v1 line or v2 signature, got b['\"]\\x16\\x03", str(warning["error"])
    )
    assert await _rejected(proxy) == 1.0


async def test_a_header_sent_a_byte_a_second_ends_at_handshake_timeout(
    nursery: trio.Nursery, certs: Certs, backend: tuple[_HeaderBackend, int]
) -> None:
    proxy = await _proxy(nursery, certs, backend[1])  # handshake_timeout = 3 s
    header = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 8443\r\n"
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        start = trio.current_time()
        sent = 0
        with trio.move_on_after(STEP):
            for byte in header:
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                sent += 1
                await trio.sleep(1.0)
        closed_after = trio.current_time() - start
    await stream.aclose()
    assert 2.5 <= closed_after <= 3.0 + STEP / 2, closed_after
    assert 3 <= sent < len(header)
    (warning,) = proxy.log_events("PROXY header refused; connection closed")
    assert "no complete PROXY header within handshake_timeout (3 s)" in str(warning["error"])
    assert await _rejected(proxy) == 1.0


# ---------------------------------------------------------------- HAProxy

_HAPROXY_SENDING = """\
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 20s
    timeout server 20s
frontend fe
    bind 127.0.0.1:{port}
    log-format "forwarded client=%ci:%cp"
    default_backend be
backend be
    server tlsproxy 127.0.0.1:{proxy} send-proxy-v2
"""


@pytest.mark.skipif(not os.path.exists(HAPROXY), reason="Debian package haproxy (make test)")
async def test_haproxy_send_proxy_v2_names_the_real_client(
    nursery: trio.Nursery, certs: Certs, backend: tuple[_HeaderBackend, int], tmp_path: Path
) -> None:
    proxy = await _proxy(nursery, certs, backend[1], accept="v2")
    haproxy_port = free_port()
    config_file = tmp_path / "haproxy.cfg"
    config_file.write_text(_HAPROXY_SENDING.format(port=haproxy_port, proxy=proxy.port))
    process = await trio.lowlevel.open_process(
        [HAPROXY, "-db", "-f", str(config_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_listening(haproxy_port)
        client = await _through(haproxy_port, certs, b"")
        # the probe of _wait_listening went through HAProxy too: two lines
        (line,) = [e for e in await proxy.access_log(2) if e.get("outcome") == "success"]
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True), trio.move_on_after(STEP):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    # without the header the log would show HAProxy's own outgoing port
    assert line["client"] == f"{client[0]}:{client[1]}"
    assert line["outcome"] == "success"
    (sent,) = backend[0].headers
    result = ProxyProtocolV2().unpack(sent)
    assert isinstance(result, ProxyResultIPv4)
    assert result.source == (ipaddress.IPv4Address(client[0]), client[1])
