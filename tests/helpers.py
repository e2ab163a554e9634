"""Real clients, real backends and a real /metrics scrape, shared by the tests."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trustme
from cryptography import x509
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config, ListenerConfig, TLSConfig, parse_config
from proxy.log import make_logger
from proxy.metrics import Metrics
from proxy.server import BoundAddresses, Server

# Generous per-step deadline: these machines are shared and noisy, and a test
# must never fail on timing luck. A step that takes this long is a hang.
STEP = 20.0


@dataclass(frozen=True)
class Certs:
    ca: trustme.CA
    cert: Path
    key: Path
    ca_file: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def write_certs(directory: Path, *names: str) -> Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert(*(names or ("localhost", "127.0.0.1")))
    cert = directory / "server.pem"
    key = directory / "server.key"
    ca_file = directory / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, cert, key, ca_file)


def issue_leaf(ca: trustme.CA, directory: Path, stem: str) -> tuple[Path, Path, int]:
    """A new leaf from the same CA (so clients keep trusting it): paths and serial."""
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key, x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def listener_table(certs: Certs, backend_port: int, **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "name": "web",
        "listen": "127.0.0.1:0",
        "backend": f"127.0.0.1:{backend_port}",
        "tls": {"certificates": [{"cert": str(certs.cert), "key": str(certs.key)}]},
    }
    table.update(overrides)
    return table


def build_config(
    certs: Certs, backend_port: int, *, drain_timeout: float = 30.0, **listener: Any
) -> Config:
    return parse_config(
        {
            "admin": {"listen": "127.0.0.1:0"},
            "process": {"drain_timeout": drain_timeout},
            "listeners": [listener_table(certs, backend_port, **listener)],
        },
        certs.cert.parent,
    )


@dataclass
class Running:
    """A server running in the test's nursery, with its bound ports."""

    server: Server
    bound: BoundAddresses
    log: io.StringIO

    @property
    def port(self) -> int:
        return self.bound.listeners["web"][1]

    @property
    def admin_port(self) -> int:
        return self.bound.admin[1]

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.log.getvalue().splitlines()]
        return [line for line in lines if event is None or line.get("event") == event]

    async def access_log(self, count: int = 1) -> list[dict[str, Any]]:
        """The access-log lines, once `count` connections have been logged."""
        with trio.fail_after(STEP):
            while True:
                lines = self.log_events("connection")
                if len(lines) >= count:
                    return lines
                await trio.sleep(0.01)


async def start_server(nursery: trio.Nursery, config: Config) -> Running:
    log = io.StringIO()
    server = Server(config, Metrics(CollectorRegistry()), make_logger(stream=log))
    bound = await nursery.start(server.run)
    return Running(server, bound, log)


async def until(check: Callable[[], Awaitable[bool]], interval: float = 0.05) -> None:
    """Poll an observable condition (a scrape, a handshake) until it holds, under
    the step deadline: for state that can only be observed by asking again."""
    with trio.fail_after(STEP):
        while True:
            if await check():
                return
            await trio.sleep(interval)


# ---------------------------------------------------------------- backends


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def start_backend(nursery: trio.Nursery, handler: Handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def echo_handler(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close: proves both directions and the FIN."""
    try:
        async for data in stream:
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass


async def http_handler(stream: trio.SocketStream) -> None:
    """A minimal HTTP/1.1 server: answers each request with 'hello' and closes."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        body = b"hello from the backend\n"
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


# ---------------------------------------------------------------- metrics


async def scrape(admin_port: int, path: str = "/metrics") -> tuple[int, str]:
    """GET a path from the admin server over a real TCP connection."""
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", admin_port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            raw = b""
            while chunk := await stream.receive_some(65536):
                raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from exposition text; 0.0 when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


# The outcome counters: of the handshakes we answer, and of those we originate.
HANDSHAKES = "tlsproxy_handshakes_total"
UPSTREAM_HANDSHAKES = "tlsproxy_upstream_handshakes_total"


async def outcomes(admin_port: int, metric: str = HANDSHAKES) -> dict[str, float]:
    """Every outcome's value of the counter `metric`, from one scrape."""
    _, text = await scrape(admin_port)
    return by_label(text, metric, "outcome")


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """The samples of `name` in exposition text, by the value of one label."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                values[s.labels[label]] = float(s.value)
    return values


async def outcome_delta(
    admin_port: int, before: dict[str, float], metric: str = HANDSHAKES
) -> dict[str, float]:
    """Poll /metrics until one more handshake ended; return the per-outcome delta."""
    with trio.fail_after(STEP):
        while True:
            after = await outcomes(admin_port, metric)
            if sum(after.values()) > sum(before.values()):
                return {
                    k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)
                }
            await trio.sleep(0.02)


async def served_normally(proxy: Running, context: ssl.SSLContext) -> None:
    """A well-behaved client still gets its bytes echoed."""
    with trio.fail_after(STEP):
        tls = await tls_connect(proxy.port, context)
        await tls.send_all(b"still there?")
        assert await tls.receive_some(100) == b"still there?"
        await tls.aclose()


async def expect_outcome(
    proxy: Running,
    outcome: str,
    client: Callable[[], Awaitable[None]],
    normal: ssl.SSLContext,
) -> None:
    """`client` ends in exactly one `outcome` on /metrics; then a normal client
    is served and counted as exactly one success."""
    before = await outcomes(proxy.admin_port)
    with trio.fail_after(STEP):
        await client()
    assert await outcome_delta(proxy.admin_port, before) == {outcome: 1.0}
    before = await outcomes(proxy.admin_port)
    await served_normally(proxy, normal)
    assert await outcome_delta(proxy.admin_port, before) == {"success": 1.0}


# ---------------------------------------------------------------- clients


async def tls_connect(port: int, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """A Python ssl client (via trio.SSLStream) with the handshake done."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, context, server_hostname="localhost")
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls


async def echo_on(tls: trio.SSLStream[trio.SocketStream], message: bytes) -> None:
    """Send `message` on an established connection and read it back whole."""
    await tls.send_all(message)
    received = b""
    while len(received) < len(message):
        chunk = await tls.receive_some(65536)
        assert chunk, "the proxy closed before echoing"
        received += chunk
    assert received == message


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, for a peer that needs a fixed one.

    WARNING: another process could take it between this close and the
    caller's bind; on a loopback-only test machine that race is negligible.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def raw_connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


class BioClient:
    """A Python ssl client (or server) over a memory BIO, for exact control of
    close_notify.

    `SSLSocket.unwrap()` would read (and reject) data arriving after our
    close_notify; with a memory BIO the test decides when bytes reach OpenSSL.
    As a server (`accept`) it is an upstream that can half-close: close_notify
    first, then go on reading what the peer still sends.
    """

    def __init__(
        self, stream: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool = False
    ) -> None:
        self.stream = stream
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self.incoming,
            self.outgoing,
            server_side=server_side,
            server_hostname=None if server_side else "localhost",
        )

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext) -> BioClient:
        client = cls(await raw_connect(port), context)
        await client._retry(client.obj.do_handshake)
        return client

    @classmethod
    async def accept(cls, stream: trio.SocketStream, context: ssl.SSLContext) -> BioClient:
        """The server side of an accepted stream, its handshake done."""
        server = cls(stream, context, server_side=True)
        await server._retry(server.obj.do_handshake)
        return server

    async def _flush(self) -> None:
        if data := self.outgoing.read():
            await self.stream.send_all(data)

    async def _feed(self) -> None:
        data = await self.stream.receive_some(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def _retry(self, op: Callable[[], Any]) -> Any:
        while True:
            try:
                result = op()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._feed()
            else:
                await self._flush()
                return result

    async def send_all(self, data: bytes, record: int = 16 * 1024) -> None:
        """Send `data` in TLS records of at most `record` plaintext bytes."""
        view = memoryview(data)
        for start in range(0, len(view), record):
            self.obj.write(view[start : start + record])
            if self.outgoing.pending >= 64 * 1024:
                await self._flush()
        await self._flush()

    async def recv(self) -> bytes:
        """Plaintext, or b'' once the server's close_notify arrived."""
        try:
            return bytes(await self._retry(lambda: self.obj.read(65536)))
        except ssl.SSLZeroReturnError:
            return b""

    async def recv_all(self) -> bytes:
        out = bytearray()
        while chunk := await self.recv():
            out += chunk
        return bytes(out)

    async def close_notify(self) -> None:
        """Send close_notify without reading anything (the incoming BIO stays as is)."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.unwrap()
        await self._flush()


def blocking_tls_handshake(port: int, context: ssl.SSLContext) -> None:
    """A plain stdlib SSLSocket handshake (run it in a thread).

    Unlike trio.SSLStream, a failing SSLSocket writes its alert to the wire
    before raising, as real clients do, so the server learns why.
    """
    with (
        socket.create_connection(("127.0.0.1", port), timeout=STEP) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"x")


def served(listener: ListenerConfig) -> TLSConfig:
    """The listener's [listeners.tls] table, which the test's config has."""
    assert listener.tls is not None
    return listener.tls
