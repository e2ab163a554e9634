"""PROXY protocol headers: the pure encoder against the spec's byte layout and
an independent parser (PyPI `proxy-protocol`), then end to end through the
proxy to a backend that parses the header (with mTLS: `verify` is 0 and the
CN is sent only for a verified client certificate), and to a real HAProxy
with `accept-proxy` that logs the client address it parsed (HAProxy 2.6 has
no fetch for the SSL TLV, so the CN is checked with the parser only)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import ssl
import struct
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from proxy import proxy_protocol as pp
from proxy.config import Config, parse_config
from proxy.proxy_protocol import TLSFacts
from tests.helpers import (
    STEP,
    Certs,
    build_config,
    echo_handler,
    free_port,
    start_backend,
    start_server,
)
from tests.pki import CA, Leaf, client_context, handshake

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
FACTS = TLSFacts(
    version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", alpn="h2", sni="api.example.com"
)


# ---------------------------------------------------------------- byte layout


def test_v1_ipv4_is_the_spec_text_line() -> None:
    header = pp.encode_v1(("192.0.2.7", 51000), ("10.0.0.1", 8443))
    assert header == b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 8443\r\n"


def test_v1_ipv6_uses_tcp6_and_unbracketed_addresses() -> None:
    header = pp.encode_v1(("2001:db8::7", 1), ("::1", 443))
    assert header == b"PROXY TCP6 2001:db8::7 ::1 1 443\r\n"


def test_v1_worst_case_fits_the_spec_limit_of_107_bytes() -> None:
    v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    assert len(pp.encode_v1((v6, 65535), (v6, 65535))) == 104


def test_v2_ipv4_without_tlvs_is_signature_ver_cmd_family_length_addresses() -> None:
    header = pp.encode_v2(("192.0.2.7", 51000), ("10.0.0.1", 8443))
    assert header == (
        SIG
        + b"\x21"  # version 2, PROXY
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 bytes of addresses follow
        + bytes([192, 0, 2, 7])
        + bytes([10, 0, 0, 1])
        + struct.pack("!HH", 51000, 8443)
    )


def test_v2_ipv6_family_byte_and_36_address_bytes() -> None:
    header = pp.encode_v2(("2001:db8::7", 1), ("::1", 443))
    assert header[12:16] == b"\x21\x21\x00\x24"
    assert header[16:32] == ipaddress.IPv6Address("2001:db8::7").packed
    assert header[32:48] == ipaddress.IPv6Address("::1").packed
    assert header[48:] == b"\x00\x01\x01\xbb"


def test_v2_tlvs_alpn_authority_and_ssl_with_version_and_cipher() -> None:
    header = pp.encode_v2(("192.0.2.7", 51000), ("10.0.0.1", 8443), FACTS)
    tlvs = header[16 + 12 :]
    ssl_value = (
        b"\x01"  # client: PP2_CLIENT_SSL only, no client certificate
        + b"\x00\x00\x00\x01"  # verify: non-zero, nothing was verified
        + b"\x21\x00\x07TLSv1.3"
        + b"\x23\x00\x16TLS_AES_256_GCM_SHA384"
    )
    assert tlvs == (
        b"\x01\x00\x02h2"
        + b"\x02\x00\x0fapi.example.com"
        + b"\x20"
        + struct.pack("!H", len(ssl_value))
        + ssl_value
    )
    assert struct.unpack("!H", header[14:16])[0] == 12 + len(tlvs)


def test_v2_ssl_tlv_with_a_verified_client_certificate_carries_cn_and_flags() -> None:
    facts = TLSFacts(version="TLSv1.2", cipher="ECDHE-RSA-AES128-GCM-SHA256", client_cn="alice")
    value = pp.ssl_value(facts)
    assert value[0] == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS
    assert value[1:5] == b"\x00\x00\x00\x00"  # verified
    assert value[5:] == (
        b"\x21\x00\x07TLSv1.2" + b"\x22\x00\x05alice" + b"\x23\x00\x1bECDHE-RSA-AES128-GCM-SHA256"
    )


def test_v2_ssl_tlv_on_a_resumed_session_flags_the_session_not_the_connection() -> None:
    value = pp.ssl_value(TLSFacts(client_cn="alice", resumed=True))
    assert value[0] == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_SESS
    assert value[1:5] == b"\x00\x00\x00\x00"
    assert value[5:] == b"\x22\x00\x05alice"


def test_v2_without_alpn_or_sni_sends_only_the_ssl_tlv() -> None:
    header = pp.encode_v2(("192.0.2.7", 1), ("10.0.0.1", 2), TLSFacts(version="TLSv1.3"))
    assert header[28:] == b"\x20\x00\x0f\x01\x00\x00\x00\x01\x21\x00\x07TLSv1.3"


def test_ipv4_mapped_addresses_from_a_dual_stack_listener_are_sent_as_ipv4() -> None:
    header = pp.encode_v1(("::ffff:192.0.2.7", 1), ("::ffff:10.0.0.1", 2))
    assert header == b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\r\n"


def test_mixed_families_are_both_sent_as_ipv6() -> None:
    header = pp.encode_v1(("192.0.2.7", 1), ("2001:db8::1", 2))
    _, family, source, dest, _, _ = header.decode().split(" ")
    assert family == "TCP6"
    assert ipaddress.IPv6Address(source).ipv4_mapped == ipaddress.IPv4Address("192.0.2.7")
    assert dest == "2001:db8::1"


def test_a_tlv_value_longer_than_its_uint16_length_is_refused() -> None:
    with pytest.raises(ValueError, match="at most 65535"):
        pp.tlv(pp.PP2_TYPE_AUTHORITY, b"x" * 65536)


# ---------------------------------------------------------------- independent parser


def test_independent_parser_reads_v1() -> None:
    result = ProxyProtocolV1().unpack(pp.encode_v1(("192.0.2.7", 51000), ("10.0.0.1", 8443)))
    assert isinstance(result, ProxyResultIPv4)
    assert result.source == (ipaddress.IPv4Address("192.0.2.7"), 51000)
    assert result.dest == (ipaddress.IPv4Address("10.0.0.1"), 8443)


@pytest.mark.parametrize(
    ("source", "dest"),
    [(("192.0.2.7", 51000), ("10.0.0.1", 8443)), (("2001:db8::7", 1), ("::1", 443))],
)
def test_independent_parser_reads_v2_with_every_tlv(
    source: tuple[str, int], dest: tuple[str, int]
) -> None:
    facts = TLSFacts(
        version="TLSv1.2", cipher="ECDHE-RSA-AES128-GCM-SHA256", alpn="h2", sni="a.example",
        client_cn="alice",
    )  # fmt: skip
    result = ProxyProtocolV2().unpack(pp.encode_v2(source, dest, facts))
    assert isinstance(result, ProxyResultIPv4 | ProxyResultIPv6)
    assert result.source == (ipaddress.ip_address(source[0]), source[1])
    assert result.dest == (ipaddress.ip_address(dest[0]), dest[1])
    assert result.tlv.alpn == b"h2"
    assert result.tlv.authority == "a.example"
    tls = result.tlv.ssl
    assert tls.has_ssl and tls.has_cert_conn and tls.verified
    assert (tls.version, tls.cn, tls.cipher) == ("TLSv1.2", "alice", "ECDHE-RSA-AES128-GCM-SHA256")


def test_independent_parser_sees_no_verified_certificate_without_mtls() -> None:
    result = ProxyProtocolV2().unpack(pp.encode_v2(("192.0.2.7", 1), ("10.0.0.1", 2), FACTS))
    tls = result.tlv.ssl
    assert tls.has_ssl
    assert not tls.has_cert_conn
    assert not tls.verified
    assert tls.cn is None


# ---------------------------------------------------------------- through the proxy


class _HeaderBackend:
    """A backend that reads and parses the PROXY header, then echoes."""

    def __init__(self) -> None:
        self.headers: list[bytes] = []

    async def handler(self, stream: trio.SocketStream) -> None:
        data = b""
        while not _complete(data):
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        size = _header_size(data)
        self.headers.append(data[:size])
        if data[size:]:
            await stream.send_all(data[size:])
        await echo_handler(stream)


def _header_size(data: bytes) -> int:
    if data.startswith(SIG):
        return 16 + int(struct.unpack("!H", data[14:16])[0])
    return data.index(b"\r\n") + 2


def _complete(data: bytes) -> bool:
    if data.startswith(SIG):
        return len(data) >= 16 and len(data) >= _header_size(data)
    return b"\r\n" in data


async def _one_client(port: int, certs: Certs) -> tuple[str, int]:
    """An echo round trip offering ALPN h2; returns the client's own address."""
    context = certs.client_context()
    context.set_alpn_protocols(["h2"])
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        address = stream.socket.getsockname()
        tls = trio.SSLStream(stream, context, server_hostname="localhost")
        await tls.send_all(b"ping")
        assert await tls.receive_some(10) == b"ping"
        await tls.aclose()
    return str(address[0]), int(address[1])


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_backend_parses_the_real_client_address_sni_and_alpn(
    nursery: trio.Nursery, certs: Certs, version: str
) -> None:
    backend = _HeaderBackend()
    port = await start_backend(nursery, backend.handler)
    config = build_config(certs, port, proxy_protocol=version, tls=_tls(certs, alpn=["h2"]))
    proxy = await start_server(nursery, config)
    client = await _one_client(proxy.port, certs)
    (header,) = backend.headers
    parser = ProxyProtocolV1() if version == "v1" else ProxyProtocolV2()
    result = parser.unpack(header)
    assert isinstance(result, ProxyResultIPv4)
    assert result.source == (ipaddress.IPv4Address(client[0]), client[1])
    assert result.dest == (ipaddress.IPv4Address("127.0.0.1"), proxy.port)
    if version == "v2":
        assert result.tlv.authority == "localhost"
        assert result.tlv.alpn == b"h2"
        assert result.tlv.ssl.has_ssl
        assert result.tlv.ssl.version == "TLSv1.3"
        assert result.tlv.ssl.cipher is not None
        assert result.tlv.ssl.cipher.startswith("TLS_")


def _tls(certs: Certs, **extra: object) -> dict[str, object]:
    return {"certificates": [{"cert": str(certs.cert), "key": str(certs.key)}], **extra}


# ---------------------------------------------------------------- HAProxy

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

# `%ci:%cp` is the client as HAProxy understood it: with accept-proxy, the
# address from our header. `fc_pp_authority` is the authority TLV (SNI).
_HAPROXY_CONFIG = """\
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 20s
    timeout server 20s
frontend fe
    bind 127.0.0.1:{port} accept-proxy
    log-format "parsed client=%ci:%cp authority=%[fc_pp_authority]"
    default_backend be
backend be
    server echo 127.0.0.1:{echo}
"""


async def _haproxy_line(process: trio.Process, needle: bytes) -> bytes:
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(STEP):
        while True:
            for line in seen.splitlines():
                if needle in line:
                    return line
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"haproxy exited: {seen!r}"
            seen += chunk


@pytest.mark.skipif(not os.path.exists(HAPROXY), reason="Debian package haproxy (make test)")
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_haproxy_accept_proxy_logs_the_real_client(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path, version: str
) -> None:
    echo = await start_backend(nursery, echo_handler)
    haproxy_port = free_port()
    config_file = tmp_path / "haproxy.cfg"
    config_file.write_text(_HAPROXY_CONFIG.format(port=haproxy_port, echo=echo))
    process = await trio.lowlevel.open_process(
        [HAPROXY, "-db", "-f", str(config_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await _wait_listening(haproxy_port)
        config = build_config(certs, haproxy_port, proxy_protocol=version)
        proxy = await start_server(nursery, config)
        client = await _one_client(proxy.port, certs)
        line = await _haproxy_line(process, b"parsed client=")
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True), trio.move_on_after(STEP):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        assert process.stdout is not None
        with trio.CancelScope(shield=True):
            await process.stdout.aclose()
    authority = b"localhost" if version == "v2" else b"-"
    assert line.endswith(f"client={client[0]}:{client[1]} authority=".encode() + authority), line


async def _wait_listening(port: int) -> None:
    with trio.fail_after(STEP):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)
            else:
                await stream.aclose()
                return


# ---------------------------------------------------------------- with mTLS


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, CA, Leaf, Leaf]:
    """Server CA, client CA, the server's leaf and a client's leaf (CN billing.test)."""
    directory = tmp_path_factory.mktemp("pp-mtls")
    servers, clients = CA(directory, "server CA"), CA(directory, "client CA")
    server = servers.issue("server", "localhost")
    client = clients.issue("billing", "billing.test", client=True)
    return servers, clients, server, client


def _mtls_config(mtls: tuple[CA, CA, Leaf, Leaf], backend: int, client_auth: str) -> Config:
    _, clients, server, _ = mtls
    listener = {
        "name": "web",
        "listen": "127.0.0.1:0",
        "backend": f"127.0.0.1:{backend}",
        "proxy_protocol": "v2",
        "tls": {
            "certificates": [server.pair()],
            "client_auth": client_auth,
            "client_ca": str(clients.ca_file),
        },
    }
    return parse_config({"admin": {"listen": "127.0.0.1:0"}, "listeners": [listener]}, Path())


@pytest.mark.parametrize(
    ("client_auth", "present", "cn"),
    [
        pytest.param("require", True, "billing.test", id="require"),
        pytest.param("optional", True, "billing.test", id="optional-with-certificate"),
        pytest.param("optional", False, None, id="optional-without-certificate"),
    ],
)
async def test_v2_says_whether_the_client_certificate_was_verified_and_its_cn(
    nursery: trio.Nursery,
    mtls: tuple[CA, CA, Leaf, Leaf],
    client_auth: str,
    present: bool,
    cn: str | None,
) -> None:
    servers, _, _, client = mtls
    backend = _HeaderBackend()
    port = await start_backend(nursery, backend.handler)
    proxy = await start_server(nursery, _mtls_config(mtls, port, client_auth))
    context = client_context(servers, client if present else None)
    with trio.fail_after(STEP):
        seen = await trio.to_thread.run_sync(partial(handshake, proxy.port, context))
    assert seen.reply == b"ping"
    (header,) = backend.headers
    tls = ProxyProtocolV2().unpack(header).tlv.ssl
    assert tls.has_ssl
    assert tls.cn == cn
    assert tls.verified is present  # verify == 0 only for a verified certificate
    assert tls.has_cert_conn is present
    assert tls.has_cert_sess is present


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"]
)
async def test_v2_on_a_resumed_session_says_the_certificate_came_with_the_session(
    nursery: trio.Nursery, mtls: tuple[CA, CA, Leaf, Leaf], version: ssl.TLSVersion
) -> None:
    servers, _, _, client = mtls
    backend = _HeaderBackend()
    port = await start_backend(nursery, backend.handler)
    proxy = await start_server(nursery, _mtls_config(mtls, port, "require"))
    context = client_context(servers, client)
    context.minimum_version = context.maximum_version = version
    with trio.fail_after(STEP):
        first = await trio.to_thread.run_sync(partial(handshake, proxy.port, context))
        second = await trio.to_thread.run_sync(
            partial(handshake, proxy.port, context, session=first.session)
        )
    assert (first.reused, second.reused) == (False, True)
    full, resumed = (ProxyProtocolV2().unpack(h).tlv.ssl for h in backend.headers)
    assert (full.has_cert_conn, full.has_cert_sess) == (True, True)
    assert (resumed.has_cert_conn, resumed.has_cert_sess) == (False, True)
    assert resumed.verified
    assert resumed.cn == full.cn == "billing.test"


# ---------------------------------------------------------------- the SPIFFE ID TLV


def test_v2_spiffe_id_tlv_is_type_0xe0_after_the_ssl_tlv() -> None:
    spiffe = "spiffe://prod.example/ns/web/sa/frontend"
    facts = TLSFacts(version="TLSv1.3", client_cn="web", client_spiffe_id=spiffe)
    tlvs = pp.tlvs(facts)
    assert tlvs.endswith(b"\xe0" + struct.pack("!H", len(spiffe)) + spiffe.encode())
    assert b"\xe0" not in pp.tlvs(TLSFacts(version="TLSv1.3", client_cn="web"))


@pytest.mark.parametrize(
    ("uris", "expected"),
    [
        pytest.param(("spiffe://prod.example/ns/web",), b"spiffe://prod.example/ns/web", id="one"),
        pytest.param(("spiffe://a.example/x", "spiffe://b.example/y"), None, id="two"),
        pytest.param(("https://id.example/alice",), None, id="not-spiffe"),
    ],
)
async def test_v2_carries_the_verified_spiffe_id_when_there_is_exactly_one(
    nursery: trio.Nursery,
    mtls: tuple[CA, CA, Leaf, Leaf],
    uris: tuple[str, ...],
    expected: bytes | None,
) -> None:
    servers, clients, _, _ = mtls
    leaf = clients.issue(f"svid-{len(uris)}-{uris[0][:5]}", "svid.test", uris=uris, client=True)
    backend = _HeaderBackend()
    port = await start_backend(nursery, backend.handler)
    proxy = await start_server(nursery, _mtls_config(mtls, port, "require"))
    with trio.fail_after(STEP):
        seen = await trio.to_thread.run_sync(
            partial(handshake, proxy.port, client_context(servers, leaf))
        )
    assert seen.reply == b"ping"
    (header,) = backend.headers
    tlv = ProxyProtocolV2().unpack(header).tlv  # the independent parser
    assert tlv.get(pp.PP2_TYPE_TLSPROXY_SPIFFE_ID) == expected
    assert tlv.ssl.cn == "svid.test"
    assert pp.PP2_TYPE_TLSPROXY_SPIFFE_ID == 0xE0
