"""The two kinds of end a splice copies between: a plain socket and a TLS peer.

Theory of operation
-------------------

A connection has two ends, the client we accepted and the backend we
dialled, and either may speak TLS: a terminating listener has a TLS client
and a plain backend, an originating one a plain client and a TLS backend, a
bridging one TLS on both. `proxy.splice` copies between any two ends
through the same three calls:

    ready()        the next plaintext chunk (a pooled buffer and its
                   length) if one can be had without waiting, None once
                   the peer has finished sending, else WAIT
    refill()       an awaitable that returns once ready() may have more
    send_all(b)    all of `b`, waiting while the peer's socket is full
    close_write()  our half is done: FIN on a socket, close_notify on TLS

Reading is split in a call that never waits and an awaitable that only
waits, so the pump awaits nothing but the wait itself: for a plain socket
`refill` is Trio's `wait_readable` coroutine, with no frame of ours around
it (one coroutine less per chunk, measurable per keep-alive request).

and learns of a failure from `Gone`, which carries the close reason of the
side that failed (`CLIENT_RESET`, `BACKEND_PROTOCOL_ERROR`, ...).

A plain end reads with `recv_into` into a pooled buffer. After a short read
the socket was empty, so the next read waits for readability first instead
of spending a system call on EAGAIN.

A TLS end keeps OpenSSL's contract (`SSL_read(3)`, `SSL_write(3)`) over
`proxy.tlsio.TLSConn`: a read that needs more ciphertext is answered by
feeding the memory BIO from the socket; a write goes into the BIO and is
flushed. Its close_notify is queued only while nothing the peer sent is
waiting to be decrypted (`TLSConn.drained`): `unwrap()` would otherwise
consume and reject that data. If the task reading this end is mid-way
through the peer's bytes, it queues the close_notify the moment it has
drained them, before reading the socket again (`refill`).

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
from collections.abc import Awaitable, Callable
from enum import Enum, StrEnum

import trio

from proxy.buffers import RECV_CHUNK, BufferPool
from proxy.tlsio import TLSConn

# The largest TLS plaintext record (RFC 8446, 5.1).
TLS_RECORD = 16 * 1024


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


class _Wait(Enum):
    """`ready()`'s answer when the next chunk needs a wait: `await refill()`
    (an enum member, so that `is WAIT` narrows the type)."""

    WAIT = 0


WAIT = _Wait.WAIT


class Gone(Exception):
    """An end failed; carries the close reason."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class PlainEnd:
    """A socket that carries plaintext."""

    __slots__ = ("drained", "early", "pool", "side", "sock")

    def __init__(
        self,
        sock: socket.socket,
        side: Side,
        pool: BufferPool,
        *,
        speaks_first: bool,
        early: bytes = b"",
    ) -> None:
        self.sock = sock
        self.side = side
        self.pool = pool
        # A peer that speaks when spoken to (a backend) has nothing to read
        # yet: wait for its first bytes instead of spending a read on EAGAIN.
        # A client that spoke first has most likely sent already.
        self.drained = not speaks_first
        # Bytes already read from the socket (those after a load balancer's
        # PROXY header): the first to be returned.
        self.early = early

    def ready(self) -> Chunk | _Wait | None:
        if self.early:
            view = self.pool.take()
            n = min(len(self.early), len(view))
            view[:n] = self.early[:n]
            self.early = self.early[n:]
            return view, n
        if self.drained:
            return WAIT
        pool = self.pool
        view = pool.take()
        try:
            n = self.sock.recv_into(view)
        except BlockingIOError:
            pool.give(view)
            self.drained = True
            return WAIT
        except OSError as exc:
            pool.give(view)
            raise Gone(self.side.reset) from exc
        if not n:
            pool.give(view)
            return None
        self.drained = n < len(view)
        return view, n

    def refill(self) -> Awaitable[None]:
        """Trio's wait itself: the next ready() reads."""
        self.drained = False
        return trio.lowlevel.wait_readable(self.sock)  # noqa: ASYNC105 - awaited by the pump

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

    __slots__ = ("close_notify_wanted", "conn", "pool", "side", "verdict")

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

    def ready(self) -> Chunk | _Wait | None:
        conn = self.conn
        obj = conn.obj
        incoming = conn.incoming
        # With nothing fed left to decrypt (the usual case once a request
        # has been read) OpenSSL can only want more: skip asking it, and
        # the SSLWantReadError it would raise and we would catch.
        if not (incoming.pending or incoming.eof or obj.pending()):
            return WAIT
        pool = self.pool
        view = pool.take()
        try:
            n: int = obj.read(RECV_CHUNK, view)  # type: ignore[assignment]  # with a buffer: a count
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
        if n < 0:
            pool.give(view)
            return WAIT
        if self.verdict is not None:
            self._judged(None)
        if n:
            return view, n
        pool.give(view)
        return None

    async def refill(self) -> None:
        """Everything fed so far is decrypted: send what OpenSSL produced
        meanwhile (and our close_notify, if due), then read the socket."""
        conn = self.conn
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
        write = conn.obj.write
        try:
            # One record's worth at a time: the outgoing memory BIO keeps the
            # largest size it ever held, so this bounds it near 16 KiB (at a
            # measured ~10 % of bulk throughput against whole 64 KiB writes).
            for start in range(0, len(view), TLS_RECORD):
                write(view[start : start + TLS_RECORD])
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
