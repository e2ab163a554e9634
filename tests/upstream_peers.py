"""Real TLS servers on loopback and a client-side handshake driven over memory BIOs.

The upstream classifier (proxy.outcome.upstream) is only as good as the
exceptions it was tested on, so these are genuine ones: `openssl s_server`
and nginx subprocesses, Java's TLS stack (JSSE, not OpenSSL: tests/jsse/),
Python `ssl` servers in threads, and raw sockets that misbehave on purpose.
The client is an `SSLObject` over a `MemoryBIO` pair, as the daemon's is,
driven by a small blocking loop (tests only: the daemon drives its own on
Trio).
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proxy.clienthello import RECORD_HEADER
from tests.helpers import STEP, free_port

# How long a peer may take to start listening, and any one read: generous,
# since nothing here waits on purpose.
PEER_DEADLINE = STEP
# A socket read's size: a whole TLS record and more.
READ_SIZE = 65536
# How often to look whether nginx listens yet: it takes some 10 ms.
NGINX_POLL = 0.02

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


# ---------------------------------------------------------------- openssl s_server


@contextlib.contextmanager
def s_server(*options: str) -> Iterator[int]:
    """`openssl s_server` with `options` on a kernel-chosen loopback port.

    It prints `ACCEPT 127.0.0.1:<port>` once it listens; `-naccept 1` makes
    it exit after the one connection a test makes.
    """
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is in the Makefile's TEST_DEBS"
    with subprocess.Popen(
        [openssl, "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", *options],
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
events {{ worker_connections 16; }}
{blocks}
"""


@contextlib.contextmanager
def nginx(
    directory: Path, blocks: Callable[[dict[str, int]], str], names: list[str]
) -> Iterator[dict[str, int]]:
    """nginx in the foreground with the `http`/`stream` blocks `blocks(ports)`
    writes, one fixed loopback port per name (nginx cannot report a
    kernel-chosen one)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    ports = {name: free_port() for name in names}
    conf = directory / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(stream_module=NGINX_STREAM_MODULE, dir=directory, blocks=blocks(ports))
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


def _wait_listening(process: subprocess.Popen[bytes], ports: Iterable[int]) -> None:
    deadline = time.monotonic() + PEER_DEADLINE
    for port in ports:
        while True:
            if process.poll() is not None:
                assert process.stderr is not None
                raise AssertionError(process.stderr.read().decode())
            try:
                socket.create_connection(("127.0.0.1", port), timeout=PEER_DEADLINE).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(NGINX_POLL)


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
