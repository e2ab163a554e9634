"""Every handshake outcome of this release, produced by a real client over a
real socket, seen as exactly one +1 on /metrics scraped over HTTP, with the
proxy still serving a normal client afterwards."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.config import Address
from proxy.handshake import cut_outcome
from proxy.outcome import Outcome
from proxy.sni import NameTable
from tests.daemon import PYTHON_M_PROXY, env_for, spawn, write_config
from tests.helpers import (
    STEP,
    Certs,
    Running,
    blocking_tls_handshake,
    build_config,
    expect_outcome,
    outcome_delta,
    outcomes,
    raw_connect,
    sample,
    scrape,
    served_normally,
    start_server,
    tls_connect,
    until,
)
from tests.pki import CA, client_context, handshake
from tests.test_mtls import PKI


async def _expect(
    proxy: Running,
    certs: Certs,
    outcome: Outcome,
    client: Callable[[], Awaitable[None]],
    normal: ssl.SSLContext | None = None,
) -> None:
    await expect_outcome(proxy, outcome.value, client, normal or certs.client_context())


def _in_thread(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await trio.to_thread.run_sync(fn)

    return run


async def _wait_closed(stream: trio.SocketStream) -> None:
    """Read until the proxy closes the connection (EOF or reset)."""
    try:
        while await stream.receive_some(4096):
            pass
    except trio.BrokenResourceError:
        pass


async def test_python_client_counts_success(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        tls = await tls_connect(proxy.port, certs.client_context())
        await tls.send_all(b"ping")
        assert await tls.receive_some(10) == b"ping"
        await tls.aclose()

    await _expect(proxy, certs, Outcome.SUCCESS, client)


async def test_partial_client_hello_counts_timeout(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        stream = await raw_connect(proxy.port)
        # A record header announcing a 512-byte hello, then only 4 bytes of it.
        await stream.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")
        await _wait_closed(stream)  # the 2 s handshake_timeout closes it
        await stream.aclose()

    await _expect(proxy, certs, Outcome.TIMEOUT, client)


async def test_connect_then_close_counts_client_closed(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        stream = await raw_connect(proxy.port)
        await stream.aclose()

    await _expect(proxy, certs, Outcome.CLIENT_CLOSED, client)


async def test_connect_then_reset_counts_client_closed(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # linger 0: RST instead of FIN

    await _expect(proxy, certs, Outcome.CLIENT_CLOSED, client)


async def test_reset_in_the_middle_of_the_handshake_counts_client_closed(
    proxy: Running, certs: Certs
) -> None:
    def client() -> None:
        hello = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ssl.create_default_context().wrap_bio(*hello, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=STEP)
        sock.sendall(hello[1].read())
        sock.recv(1)  # the server's flight has started: OpenSSL is mid-handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    await _expect(proxy, certs, Outcome.CLIENT_CLOSED, _in_thread(client))


async def test_plain_http_counts_not_tls(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        stream = await raw_connect(proxy.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await _wait_closed(stream)
        await stream.aclose()

    await _expect(proxy, certs, Outcome.NOT_TLS, client)


async def test_tls11_only_client_counts_unsupported_version(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        result = await trio.run_process(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{proxy.port}",
                "-tls1_1",
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
                "-servername",
                "localhost",
            ],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode != 0

    await _expect(proxy, certs, Outcome.UNSUPPORTED_VERSION, client)


async def test_python_client_without_our_ca_counts_certificate_rejected(
    proxy: Running, certs: Certs
) -> None:
    def client() -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            blocking_tls_handshake(proxy.port, ssl.create_default_context())

    await _expect(proxy, certs, Outcome.CERTIFICATE_REJECTED_BY_CLIENT, _in_thread(client))


async def test_curl_without_cacert_counts_certificate_rejected(
    proxy: Running, certs: Certs
) -> None:
    async def client() -> None:
        result = await trio.run_process(
            ["curl", "--silent", "--max-time", "10", f"https://localhost:{proxy.port}/"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 60  # curl: peer certificate cannot be authenticated

    await _expect(proxy, certs, Outcome.CERTIFICATE_REJECTED_BY_CLIENT, client)


async def test_garbage_after_record_header_counts_protocol_error(
    proxy: Running, certs: Certs
) -> None:
    async def client() -> None:
        stream = await raw_connect(proxy.port)
        await stream.send_all(b"\x16\x03\x01\x00\x10" + bytes(range(16)))
        await _wait_closed(stream)
        await stream.aclose()

    await _expect(proxy, certs, Outcome.PROTOCOL_ERROR, client)


class _BrokenContext(ssl.SSLContext):
    """A server context with a bug: stands in for any unexpected failure."""

    def wrap_bio(self, *args: object, **kwargs: object) -> ssl.SSLObject:
        raise RuntimeError("injected fault")


async def test_unexpected_exception_counts_internal_error_and_logs_traceback(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    proxy = await start_server(nursery, build_config(certs, echo_port))
    good = proxy.server.listeners[0].runtime.context
    broken = _BrokenContext(ssl.PROTOCOL_TLS_SERVER)
    proxy.server.listeners[0].runtime.context = broken
    before = await outcomes(proxy.admin_port)
    with trio.fail_after(STEP), pytest.raises(trio.BrokenResourceError):
        await tls_connect(proxy.port, certs.client_context())
    assert await outcome_delta(proxy.admin_port, before) == {"internal_error": 1.0}
    assert "RuntimeError: injected fault" in proxy.log.getvalue()
    proxy.server.listeners[0].runtime.context = good
    await served_normally(proxy, certs.client_context())


class _BrokenRoutes(NameTable[Address]):
    """A routing table with a bug: fails after the handshake, before the backend."""

    def __init__(self) -> None:
        super().__init__([("broken.test", Address("127.0.0.1", 1))])

    def lookup(self, server_name: str | None) -> tuple[str, Address] | None:
        raise RuntimeError("injected fault after the handshake")


async def test_unexpected_exception_after_the_handshake_counts_an_internal_error(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    proxy = await start_server(nursery, build_config(certs, echo_port))
    _, text = await scrape(proxy.admin_port)
    assert 'tlsproxy_internal_errors_total{listener="web"} 0.0' in text  # exported at zero
    runtime = proxy.server.listeners[0].runtime
    good = runtime.routes
    runtime.routes = _BrokenRoutes()
    with trio.fail_after(STEP):
        tls = await tls_connect(proxy.port, certs.client_context())  # the handshake succeeds
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.send_all(b"x")
            assert await tls.receive_some(100) == b"", "echoed although the backend step failed"
        await trio.aclose_forcefully(tls)
    (line,) = await proxy.access_log()
    assert line["outcome"] == "success"
    assert line["close_reason"] == "internal_error"
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_internal_errors_total", listener="web") == 1
    assert "RuntimeError: injected fault after the handshake" in proxy.log.getvalue()
    runtime.routes = good
    await served_normally(proxy, certs.client_context())
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_internal_errors_total", listener="web") == 1


# A record header announcing a 512-byte hello, then only 4 bytes of it: a
# client stalled in the middle of its handshake.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc"


async def test_a_drain_cutting_a_handshake_logs_and_counts_its_outcome(
    nursery: trio.Nursery, certs: Certs, echo_port: int, tmp_path: Path
) -> None:
    """SIGTERM with a short drain_timeout while a client stalls mid-handshake:
    its access line has the outcome and close_reason=drain, and the outcome
    counter (read from the workers' metric files once the daemon is gone)
    moved by exactly one."""
    metrics_dir = tmp_path / "metrics"
    config = write_config(
        tmp_path / "tlsproxy.toml", certs, backend_port=echo_port, drain_timeout=0.5,
        process_lines="workers = 2", listener_lines="handshake_timeout = 60.0",
    )  # fmt: skip
    env = {**env_for(tmp_path / "state"), "TLSPROXY_METRICS_DIR": str(metrics_dir)}
    argv = [*PYTHON_M_PROXY, "run", "--config", str(config)]
    async with spawn(nursery, argv, env=env, cwd=tmp_path) as daemon:
        await daemon.wait_for("workers ready")
        port, admin_port = await daemon.started()
        before = await outcomes(admin_port)
        stream = await raw_connect(port)
        await stream.send_all(PARTIAL_HELLO)

        async def handshaking() -> bool:
            _, text = await scrape(admin_port)
            return sample(text, "tlsproxy_handshakes_in_progress", listener="web") == 1

        await until(handshaking)
        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0
        await stream.aclose()
    line = daemon.find("connection")
    assert line is not None, daemon.output()
    assert line["outcome"] == "timeout"
    assert line["close_reason"] == "drain"
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    text = generate_latest(registry).decode()
    after = {o.value: sample(text, "tlsproxy_handshakes_total", outcome=o.value) for o in Outcome}
    delta = {k: v - before[k] for k, v in after.items() if v != before[k]}
    assert delta == {"timeout": 1.0}


@pytest.mark.parametrize(("saw_eof", "outcome"), [(False, "timeout"), (True, "client_closed")])
def test_a_cut_handshake_is_client_closed_only_after_the_clients_eof(
    saw_eof: bool, outcome: str
) -> None:
    assert cut_outcome(saw_eof) == outcome


# ---------------------------------------------------------------- TLS policy


def _tls(certs: Certs, **keys: object) -> dict[str, object]:
    return {"certificates": [{"cert": str(certs.cert), "key": str(certs.key)}], **keys}


async def test_cbc_only_client_counts_no_shared_cipher(proxy: Running, certs: Certs) -> None:
    def client() -> None:
        context = certs.client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:AES128-SHA")
        with pytest.raises(ssl.SSLError):
            blocking_tls_handshake(proxy.port, context)

    await _expect(proxy, certs, Outcome.NO_SHARED_CIPHER, _in_thread(client))


async def test_unknown_protocol_only_counts_alpn_mismatch(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    tls = _tls(certs, alpn=["h2", "http/1.1"])
    proxy = await start_server(nursery, build_config(certs, echo_port, tls=tls))

    async def client() -> None:
        result = await trio.run_process(
            [
                *("openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}"),
                *("-servername", "localhost", "-alpn", "imap"),
            ],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert b"no application protocol" in result.stderr

    await _expect(proxy, certs, Outcome.ALPN_MISMATCH, client)


async def _mtls_proxy(nursery: trio.Nursery, pki: PKI, echo_port: int, **keys: object) -> Running:
    tls = {
        "certificates": [pki.server.pair()],
        "client_auth": "require",
        "client_ca": str(pki.clients.ca_file),
        **keys,
    }
    certs = Certs(None, pki.server.cert, pki.server.key, pki.servers.ca_file)  # type: ignore[arg-type]
    return await start_server(nursery, build_config(certs, echo_port, tls=tls))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


async def test_no_client_certificate_counts_client_cert_missing(
    nursery: trio.Nursery, certs: Certs, echo_port: int, pki: PKI
) -> None:
    proxy = await _mtls_proxy(nursery, pki, echo_port)

    def client() -> None:
        with pytest.raises((ssl.SSLError, OSError)):
            handshake(proxy.port, client_context(pki.servers))

    good = client_context(pki.servers, pki.good)
    await _expect(proxy, certs, Outcome.CLIENT_CERT_MISSING, _in_thread(client), good)


async def test_client_certificate_from_another_ca_counts_client_cert_invalid(
    nursery: trio.Nursery, certs: Certs, echo_port: int, pki: PKI, tmp_path: Path
) -> None:
    proxy = await _mtls_proxy(nursery, pki, echo_port)
    stranger = CA(tmp_path, "stranger").issue("stranger", "x.test", client=True)

    def client() -> None:
        with pytest.raises((ssl.SSLError, OSError)):
            handshake(proxy.port, client_context(pki.servers, stranger))

    good = client_context(pki.servers, pki.good)
    await _expect(proxy, certs, Outcome.CLIENT_CERT_INVALID, _in_thread(client), good)
    lines = await proxy.access_log(2)
    assert lines[0]["client_cert_error"] == "unknown_ca"


async def test_a_certificate_no_allow_entry_admits_counts_client_cert_denied(
    nursery: trio.Nursery, certs: Certs, echo_port: int, pki: PKI
) -> None:
    proxy = await _mtls_proxy(nursery, pki, echo_port, allow={"dns": ["billing.test"]})
    other = pki.clients.issue("other", "other.test", client=True)

    def client() -> None:
        # TLS 1.3: the handshake completes; the close_notify ends the first read
        with contextlib.suppress(ssl.SSLError, OSError):
            assert handshake(proxy.port, client_context(pki.servers, other)).reply == b""

    good = client_context(pki.servers, pki.good)
    await _expect(proxy, certs, Outcome.CLIENT_CERT_DENIED, _in_thread(client), good)
    lines = await proxy.access_log(2)
    assert lines[0]["client_cert_error"] == "not_allowed"


def test_every_outcome_has_a_live_test() -> None:
    names = {name for name in globals() if name.startswith("test_")}
    produced = {
        Outcome.SUCCESS: "test_python_client_counts_success",
        Outcome.TIMEOUT: "test_partial_client_hello_counts_timeout",
        Outcome.CLIENT_CLOSED: "test_connect_then_close_counts_client_closed",
        Outcome.NOT_TLS: "test_plain_http_counts_not_tls",
        Outcome.UNSUPPORTED_VERSION: "test_tls11_only_client_counts_unsupported_version",
        Outcome.NO_SHARED_CIPHER: "test_cbc_only_client_counts_no_shared_cipher",
        Outcome.CLIENT_CERT_MISSING: "test_no_client_certificate_counts_client_cert_missing",
        Outcome.CLIENT_CERT_INVALID: (
            "test_client_certificate_from_another_ca_counts_client_cert_invalid"
        ),
        Outcome.CLIENT_CERT_DENIED: (
            "test_a_certificate_no_allow_entry_admits_counts_client_cert_denied"
        ),
        Outcome.CERTIFICATE_REJECTED_BY_CLIENT: (
            "test_python_client_without_our_ca_counts_certificate_rejected"
        ),
        Outcome.ALPN_MISMATCH: "test_unknown_protocol_only_counts_alpn_mismatch",
        Outcome.PROTOCOL_ERROR: "test_garbage_after_record_header_counts_protocol_error",
        Outcome.INTERNAL_ERROR: (
            "test_unexpected_exception_counts_internal_error_and_logs_traceback"
        ),
    }
    assert set(produced) == set(Outcome)
    assert set(produced.values()) <= names
