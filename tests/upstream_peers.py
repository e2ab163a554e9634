"""Real TLS servers on loopback and a client-side handshake driven over memory BIOs.

The upstream classifier (proxy.outcome.upstream) is only as good as the
exceptions it was tested on, so these are genuine ones: `openssl s_server`
and nginx subprocesses, Java's TLS stack (JSSE, not OpenSSL: tests/jsse/),
Python `ssl` servers in threads, and raw sockets that misbehave on purpose.
The client is an `SSLObject` over a `MemoryBIO` pair, as the daemon's is,
driven by a small blocking loop (tests only: the daemon drives its own on
Trio).

The egress tests (tests/test_egress*.py) put the daemon in front of the same
servers: the configs of an egress listener and of tlsproxy's own mTLS way
in, a Python ssl server on Trio that can half-close (`start_bio_server`),
and `openssl s_server -quiet` as a pipe between its stdin, the TLS peer and
its stdout (`s_server_pipe`).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from proxy.clienthello import RECORD_HEADER
from proxy.config import Config, parse_config
from tests.helpers import STEP, BioClient, free_port
from tests.pki import CA, Leaf

# How long a peer may take to start listening, and any one read: generous,
# since nothing here waits on purpose.
PEER_DEADLINE = STEP
# A socket read's size: a whole TLS record and more.
READ_SIZE = 65536
# How often to look whether a server (nginx, s_server) listens yet: it
# takes some 10 ms.
LISTEN_POLL = 0.02
# A TCP socket in the LISTEN state, in /proc/net/tcp's `st` column.
TCP_LISTEN = "0A"

Behaviour = Callable[[socket.socket], None]


@dataclass
class Attempt:
    """What one client-side handshake saw: the evidence classify_upstream takes."""

    first: bytes | None
    error: BaseException | None
    obj: ssl.SSLObject
    sock: socket.socket
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO

    def send_pending(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def _feed(self) -> None:
        data = self.sock.recv(READ_SIZE)
        if self.first is None:
            self.first = b""
        if len(self.first) < RECORD_HEADER:
            self.first += data[: RECORD_HEADER - len(self.first)]
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def handshake(self) -> None:
        """The want-read/want-write loop; the exception that ends it is kept."""
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                try:
                    self.send_pending()
                    self._feed()
                except OSError as exc:
                    self.error = exc
                    return
            except (ssl.SSLError, OSError) as exc:
                # Our own alert (e.g. unknown_ca after a failed verify) goes
                # out, as a real client's does; the server may be gone.
                with contextlib.suppress(OSError):
                    self.send_pending()
                self.error = exc
                return
            else:
                with contextlib.suppress(OSError):
                    self.send_pending()
                return

    def first_read(self) -> bytes:
        """The first application read after a successful handshake: where a
        TLS 1.3 server's verdict on our client certificate arrives."""
        while True:
            try:
                return self.obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                self.send_pending()
                self._feed()


def originate(
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None = "localhost",
    *,
    request: bytes = b"",
) -> Attempt:
    """Connect to 127.0.0.1:`port` and run the client-side handshake.

    `request` is written (and flushed) once the handshake succeeded, as the
    daemon's first spliced bytes would be.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=PEER_DEADLINE)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_hostname)
    attempt = Attempt(None, None, obj, sock, incoming, outgoing)
    attempt.handshake()
    if attempt.error is None and request:
        obj.write(request)
        with contextlib.suppress(OSError):
            attempt.send_pending()
    return attempt


@contextlib.contextmanager
def attempt_on(
    port: int, context: ssl.SSLContext, server_hostname: str | None = "localhost"
) -> Iterator[Attempt]:
    attempt = originate(port, context, server_hostname)
    try:
        yield attempt
    finally:
        attempt.sock.close()


# ---------------------------------------------------------------- servers


@dataclass
class ThreadServer:
    """A loopback listener whose one accepted socket gets `behaviour` in a thread."""

    behaviour: Behaviour
    sock: socket.socket = field(init=False)
    errors: list[BaseException] = field(default_factory=list)
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(PEER_DEADLINE)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(PEER_DEADLINE)
                try:
                    self.behaviour(conn)
                except (ssl.SSLError, OSError) as exc:
                    self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()
        self._thread.join(PEER_DEADLINE)


@contextlib.contextmanager
def thread_server(behaviour: Behaviour) -> Iterator[ThreadServer]:
    server = ThreadServer(behaviour)
    try:
        yield server
    finally:
        server.close()


def tls_behaviour(context: ssl.SSLContext, *, reply: bytes = b"ok") -> Behaviour:
    """A Python ssl server: handshake, read one request, answer, close."""

    def serve(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            if tls.recv(READ_SIZE):
                tls.sendall(reply)

    return serve


def eof_at_once(conn: socket.socket) -> None:
    """Accept and send EOF at once: the client reads nothing but the EOF.

    (Closing outright would race the ClientHello: arriving before the
    close, unread, it turns the close into a reset.)"""
    conn.shutdown(socket.SHUT_WR)
    conn.recv(READ_SIZE)


def reset_on_close(conn: socket.socket) -> None:
    """Make the close an RST (SO_LINGER 0)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def close_unread(conn: socket.socket) -> None:
    """Close with the ClientHello arrived but unread: the kernel answers
    with an RST, as for any server that closes without reading.

    (Waiting for the hello keeps the RST after our connect; a reset at
    accept could beat it and fail the connect, not the handshake.)"""
    conn.recv(1, socket.MSG_PEEK)


def read_then(answer: bytes, *, reset: bool = False) -> Behaviour:
    """Read the ClientHello, then send `answer` (and close, or reset)."""

    def serve(conn: socket.socket) -> None:
        conn.recv(READ_SIZE)
        if answer:
            conn.sendall(answer)
        if reset:
            reset_on_close(conn)

    return serve


# ---------------------------------------------------------------- the daemon's egress

# The SPIFFE ID our client certificate carries, and tlsproxy's own way in admits.
APP_ID = "spiffe://test.example/ns/a/sa/app"


def server_context(
    ca: CA, leaf: Leaf, *, client_ca: CA | None, tls13: bool = True
) -> ssl.SSLContext:
    """A Python ssl server's: `leaf`, a client certificate from `client_ca`
    required if given, TLS 1.2 at most unless `tls13`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf.cert, leaf.key)
    if not tls13:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca.ca_file)
    return context


def egress_config(
    directory: Path,
    port: int,
    ca: CA,
    client: Leaf | None,
    *,
    host: str = "localhost",
    listener: dict[str, Any] | None = None,
    process: dict[str, Any] | None = None,
    **upstream: Any,
) -> Config:
    """One listener "web" originating TLS to `host`:`port`, trusting `ca`,
    presenting `client`; `listener` and `process` add keys to those tables
    (a `tls` table makes it bridge), `upstream` to its upstream_tls."""
    table: dict[str, Any] = {"ca": str(ca.ca_file)}
    if client is not None:
        table["certificates"] = [client.pair()]
    table.update(upstream)
    return parse_config(
        {
            "admin": {"listen": "127.0.0.1:0"},
            "process": process or {},
            "listeners": [
                {
                    "name": "web",
                    "listen": "127.0.0.1:0",
                    "backend": f"{host}:{port}",
                    "upstream_tls": table,
                    **(listener or {}),
                }
            ],
        },
        directory,
    )


def ingress_config(directory: Path, backend_port: int, ca: CA, server: Leaf, uri: str) -> Config:
    """tlsproxy's own way in: mTLS required, one SPIFFE ID allowed."""
    tls = {
        "certificates": [server.pair()],
        "client_auth": "require",
        "client_ca": str(ca.ca_file),
        "allow": {"uri": [uri]},
    }
    return parse_config(
        {
            "admin": {"listen": "127.0.0.1:0"},
            "listeners": [
                {
                    "name": "web",
                    "listen": "127.0.0.1:0",
                    "backend": f"127.0.0.1:{backend_port}",
                    "tls": tls,
                }
            ],
        },
        directory,
    )


BioHandler = Callable[[BioClient], Awaitable[None]]


async def start_bio_server(
    nursery: trio.Nursery, context: ssl.SSLContext, handler: BioHandler
) -> int:
    """A Python ssl server on Trio over memory BIOs: `handler` gets each
    connection with its handshake done, and may half-close it. A failure
    is not swallowed: it fails the test that ran the server."""

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await handler(await BioClient.accept(stream, context))

    (listener,) = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return int(listener.socket.getsockname()[1])


# ---------------------------------------------------------------- openssl s_server


@contextlib.contextmanager
def s_server(*options: str) -> Iterator[int]:
    """`openssl s_server` with `options` on a kernel-chosen loopback port.

    It prints `ACCEPT 127.0.0.1:<port>` once it listens; `-naccept 1` makes
    it exit after the one connection a test makes.
    """
    with subprocess.Popen(
        [_openssl(), "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", *options],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            port = None
            for line in process.stdout:
                if line.startswith("ACCEPT "):
                    port = int(line.rsplit(":", 1)[1])
                    break
            assert port is not None, "s_server exited before listening"
            yield port
        finally:
            process.kill()


def _openssl() -> str:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is in the Makefile's TEST_DEBS"
    return openssl


@dataclass
class SServerPipe:
    """A running `s_server -quiet`: what it writes to the peer comes from
    `stdin`, what the peer sent is in the file `received`, its verify
    callback's lines (the peer certificate's subject) in `log`."""

    port: int
    process: trio.Process
    stdin: trio.abc.SendStream
    received: Path
    log: Path


@contextlib.asynccontextmanager
async def s_server_pipe(
    directory: Path, *options: str, naccept: int = 1
) -> AsyncIterator[SServerPipe]:
    """`openssl s_server -quiet` for `naccept` connections, one at a time:
    a byte-exact pipe.

    -quiet turns off its commands (a line starting with Q would stop it)
    and all it would print among the data, the `ACCEPT` line too: so it gets
    a fixed port, and is seen listening in /proc/net/tcp. It ends the
    connection (exiting after the last) at the peer's close_notify or its
    stdin's EOF; the stdin pipe stays open until the test closes it.
    """
    port = free_port()
    listen = ("-accept", f"127.0.0.1:{port}", "-naccept", str(naccept))
    received, log = directory / "s_server.out", directory / "s_server.log"
    with received.open("wb") as out, log.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [_openssl(), "s_server", "-quiet", *listen, *options],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
        )
    try:
        assert process.stdin is not None
        with trio.fail_after(PEER_DEADLINE):
            while not listening([port]):
                assert process.poll() is None, log.read_text()
                await trio.sleep(LISTEN_POLL)
        yield SServerPipe(port, process, process.stdin, received, log)
    finally:
        process.kill()
        await process.wait()


# ---------------------------------------------------------------- nginx


# Debian's nginx-light builds the stream module (TLS in front of any TCP
# service, not only HTTP) as a separate package, libnginx-mod-stream.
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

NGINX_CONF = """\
load_module {stream_module};
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {connections}; }}
{blocks}
"""
# Connections one nginx may hold, its listeners', clients' and backends'
# together: enough for the few a classifier case makes.
NGINX_CONNECTIONS = 16


@contextlib.contextmanager
def nginx(
    directory: Path,
    blocks: Callable[[dict[str, int]], str],
    names: list[str],
    *,
    connections: int = NGINX_CONNECTIONS,
) -> Iterator[dict[str, int]]:
    """nginx in the foreground with the `http`/`stream` blocks `blocks(ports)`
    writes, one fixed loopback port per name (nginx cannot report a
    kernel-chosen one)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    ports = {name: free_port() for name in names}
    conf = directory / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            stream_module=NGINX_STREAM_MODULE,
            dir=directory,
            connections=connections,
            blocks=blocks(ports),
        )
    )
    with subprocess.Popen(
        [binary, "-p", str(directory), "-c", str(conf), "-e", "stderr"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as process:
        try:
            _wait_listening(process, ports.values())
            yield ports
        finally:
            process.terminate()


def nginx_http_temp(directory: Path) -> str:
    """An http block's temporary directories, inside `directory` (Debian's
    compiled-in ones are under /var/lib/nginx)."""
    return " ".join(
        f"{kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def listening(ports: Iterable[int]) -> set[int]:
    """Which of `ports` a socket listens on, from /proc/net/tcp: looking,
    not connecting, so a server counts no probe among its connections."""
    wanted = set(ports)
    found: set[int] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        port = int(local.rsplit(":", 1)[1], 16)
        if state == TCP_LISTEN and port in wanted:
            found.add(port)
    return found


def _wait_listening(process: subprocess.Popen[bytes], ports: Iterable[int]) -> None:
    wanted = set(ports)
    deadline = time.monotonic() + PEER_DEADLINE
    while listening(wanted) != wanted:
        if process.poll() is not None:
            assert process.stderr is not None
            raise AssertionError(process.stderr.read().decode())
        assert time.monotonic() < deadline, "nginx did not listen"
        time.sleep(LISTEN_POLL)


# ---------------------------------------------------------------- Java (JSSE)


JSSE_SERVER = Path(__file__).parent / "jsse" / "TlsServer.java"


@contextlib.contextmanager
def jsse(cert: Path, key: Path, ca: Path) -> Iterator[dict[str, int]]:
    """tests/jsse/TlsServer.java, run from source (a JDK's `java` compiles
    it on start, about a second): its listeners' ports by name."""
    java = shutil.which("java")
    assert java is not None, "a JDK is in the Makefile's TEST_DEBS"
    with subprocess.Popen(
        [java, str(JSSE_SERVER), str(cert), str(key), str(ca)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            words = process.stdout.readline().split()
            assert words[:1] == ["PORTS"], "the Java server exited before listening"
            yield {name: int(port) for name, port in (word.split("=") for word in words[1:])}
        finally:
            process.kill()
