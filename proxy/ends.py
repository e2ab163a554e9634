"""The two kinds of end a splice copies between: a plain socket and a TLS peer.

Theory of operation
-------------------

A connection has two ends, the client we accepted and the backend we
dialled, and either may speak TLS: a terminating listener has a TLS client
and a plain backend, an originating one a plain client and a TLS backend, a
bridging one TLS on both. `proxy.splice` copies between any two ends
through the same calls:

    recv()         a TLS end's next plaintext chunk (a pooled buffer and
                   its length), or None once the peer has finished sending
    send_all(b)    all of `b`, waiting while the peer's socket is full
    close_write()  our half is done: FIN on a socket, close_notify on TLS

and learns of a failure from `Gone`, which carries the close reason of the
side that failed (`CLIENT_RESET`, `BACKEND_PROTOCOL_ERROR`, ...).

A plain end is read by the splice's pump itself, with `recv_into` into a
pooled buffer (after a short read the socket was empty, so the next read
waits for readability first instead of spending a system call on EAGAIN):
written out there rather than called, the pump awaits Trio's wait and no
coroutine of ours, one less per chunk, measurable per keep-alive request
(BENCHMARKS.md).

A TLS end keeps OpenSSL's contract (`SSL_read(3)`, `SSL_write(3)`) over
`proxy.tlsio.TLSConn`: a read that needs more ciphertext is answered by
feeding the memory BIO from the socket; a write goes into the BIO and is
flushed. Its close_notify is queued only while nothing the peer sent is
waiting to be decrypted (`TLSConn.drained`): `unwrap()` would otherwise
consume and reject that data. If the task reading this end is mid-way
through the peer's bytes, it queues the close_notify the moment it has
drained them, before reading the socket again.

A TLS end may carry a `verdict` callback, called once with the outcome of
the first read: None when plaintext (or a clean end) came, else the
exception. A TLS 1.3 server judges our client certificate after our side of
the handshake has finished, so its refusal arrives as an alert on this
read; `proxy.upstream` makes the upstream outcome final there.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Callable
from enum import StrEnum

import trio

from proxy.buffers import RECV_CHUNK, BufferPool
from proxy.tlsio import TLSConn


class CloseReason(StrEnum):
    """Why an established connection ended; a field of the access log."""

    CLIENT_CLOSED = "client_closed"  # client sent close_notify/EOF first, then both ended
    BACKEND_CLOSED = "backend_closed"  # backend sent FIN (or close_notify) first, then both ended
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    CLIENT_PROTOCOL_ERROR = "client_protocol_error"
    BACKEND_PROTOCOL_ERROR = "backend_protocol_error"  # a TLS upstream broke the protocol
    IDLE_TIMEOUT = "idle_timeout"
    DRAIN = "drain"


class Side:
    """The close reasons of one side of the connection."""

    __slots__ = ("closed", "protocol_error", "reset")

    def __init__(self, closed: CloseReason, reset: CloseReason, protocol_error: CloseReason):
        self.closed = closed
        self.reset = reset
        self.protocol_error = protocol_error


CLIENT = Side(
    CloseReason.CLIENT_CLOSED, CloseReason.CLIENT_RESET, CloseReason.CLIENT_PROTOCOL_ERROR
)
BACKEND = Side(
    CloseReason.BACKEND_CLOSED, CloseReason.BACKEND_RESET, CloseReason.BACKEND_PROTOCOL_ERROR
)

# A chunk of plaintext: a buffer lent by the pool and how much of it is data.
Chunk = tuple[memoryview, int]


class Gone(Exception):
    """An end failed; carries the close reason."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class PlainEnd:
    """A socket that carries plaintext."""

    __slots__ = ("done", "drained", "moved", "pool", "side", "sock", "waiting")

    def __init__(
        self, sock: socket.socket, side: Side, pool: BufferPool, *, speaks_first: bool
    ) -> None:
        self.sock = sock
        self.side = side
        self.pool = pool
        self.moved = 0  # plaintext bytes read from this end and written on
        # A peer that speaks when spoken to (a backend) has nothing to read
        # yet: wait for its first bytes instead of spending a read on EAGAIN.
        # A client that spoke first has most likely sent already.
        self.drained = not speaks_first
        self.waiting = False  # the pump waits for readability (proxy.parking)
        self.done = False  # read to its end, and the end passed on

    def ready(self) -> None:
        """Readable, or worth one read: the parking lot woke the connection."""
        self.drained = False
        self.waiting = False

    async def send_all(self, view: memoryview) -> None:
        sock = self.sock
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
            except OSError as exc:
                raise Gone(self.side.reset) from exc
            else:
                view = view[sent:]

    async def close_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise Gone(self.side.reset) from exc


class TLSEnd:
    """A peer that speaks TLS, its handshake done."""

    __slots__ = ("close_notify_wanted", "conn", "done", "moved", "pool", "side", "verdict")

    def __init__(
        self,
        conn: TLSConn,
        side: Side,
        pool: BufferPool,
        verdict: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.conn = conn
        self.side = side
        self.pool = pool
        self.close_notify_wanted = False
        self.verdict = verdict
        self.moved = 0  # plaintext bytes read from this end and written on
        self.done = False  # read to its end, and the end passed on

    @property
    def sock(self) -> socket.socket:
        return self.conn.sock

    @property
    def waiting(self) -> bool:
        """The pump waits for ciphertext (proxy.parking)."""
        return self.conn.waiting

    def ready(self) -> None:
        """Readable, or worth one read: the parking lot woke the connection."""
        self.conn.drained_socket = False
        self.conn.waiting = False

    async def recv(self) -> Chunk | None:
        conn = self.conn
        engine = conn.engine
        incoming = conn.incoming
        pool = self.pool
        while True:
            # With nothing fed left to decrypt (the usual case once a request
            # has been read) OpenSSL can only want more: skip asking it, and
            # the SSLWantReadError it would raise and we would catch.
            if incoming.pending or incoming.eof or engine.pending():
                view = pool.take()
                try:
                    n = engine.read(RECV_CHUNK, view)
                except ssl.SSLWantReadError:
                    n = -1
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    n = 0  # close_notify, or a bare FIN (a ragged but common end)
                except ssl.SSLError as exc:
                    pool.give(view)
                    conn.flush_nowait()  # the alert that says why
                    if self.verdict is not None:
                        self._judged(exc)
                    raise Gone(self.side.protocol_error) from exc
                if n >= 0 and self.verdict is not None:
                    self._judged(None)
                if n > 0:
                    return view, n
                pool.give(view)
                if n == 0:
                    return None
            # Everything fed so far is decrypted: send what OpenSSL produced
            # meanwhile (and our close_notify, if due), then read the socket.
            # Outside the except clause: a handled exception and its
            # traceback live as long as the clause, here as long as the
            # connection idles.
            try:
                if self.close_notify_wanted:
                    self.close_notify_wanted = False
                    conn.queue_close_notify()
                if conn.outgoing.pending:
                    await conn.flush()
                await conn.fill()
            except OSError as exc:
                raise Gone(self.side.reset) from exc

    def _judged(self, error: BaseException | None) -> None:
        verdict, self.verdict = self.verdict, None
        assert verdict is not None
        verdict(error)

    async def send_all(self, view: memoryview) -> None:
        conn = self.conn
        try:
            # One coroutine less per chunk than `write` alone (BENCHMARKS.md).
            if not conn.write_at_once(view):
                await conn.write(view)
            elif conn.outgoing.pending:
                await conn.flush()
        except ssl.SSLError as exc:
            raise Gone(self.side.protocol_error) from exc
        except OSError as exc:
            raise Gone(self.side.reset) from exc

    async def close_write(self) -> None:
        """Our half is done: close_notify now if the peer's bytes are all
        read, else the reading task sends it once they are (see `recv`)."""
        conn = self.conn
        if not conn.drained():
            self.close_notify_wanted = True
            return
        conn.queue_close_notify()
        try:
            await conn.flush()
        except OSError as exc:
            raise Gone(self.side.reset) from exc


End = PlainEnd | TLSEnd
