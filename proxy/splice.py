"""Copy plaintext both ways between the TLS client and the backend.

Theory of operation
-------------------

Two tasks, one per direction: the connection's own task copies from the
backend to the client, and a second task in the connection's nursery copies
from the client to the backend. The idle timeouts of all connections are
enforced by one `IdleWatch` task per process, not a task each: a task and
its parked wait are the biggest part of an idle connection's memory. Each
direction reads one chunk and writes all of it before reading again, so a
slow receiver stops the reader (back-pressure through the kernel's socket
buffers) and memory per connection is bounded by one chunk per direction.
The chunk buffers are lent by a `BufferPool` only while bytes are in
flight: an idle connection, parked waiting for readability, holds none.

After the handshake the client side keeps OpenSSL's contract
(`SSL_read(3)`, `SSL_write(3)`) through `proxy.tlsio.TLSConn`: a read that
needs more ciphertext raises `SSLWantReadError`, answered by feeding the
memory BIO from the socket; a write goes into the BIO and is flushed.

Half-close is carried across in both directions:

    client close_notify (or EOF) -> shutdown(SHUT_WR) on the backend
    backend FIN                  -> close_notify to the client

and the connection ends when both directions have ended, when either side
resets, or when no byte moved for `idle_timeout`.

Our close_notify is queued only while nothing the client sent is waiting to
be decrypted (`TLSConn.drained`): `unwrap()` would otherwise consume and
reject that data. If the client-reading task is mid-way through the client's
bytes, it queues the close_notify the moment it has drained them, before
reading the socket again.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Awaitable
from enum import StrEnum

import trio

from proxy.buffers import RECV_CHUNK, BufferPool
from proxy.metrics import ListenerMetrics
from proxy.tlsio import TLSConn

# Bounds on the idle scan's period, in seconds: at most a second late for the
# usual minutes-long timeouts, and never a busy loop for tiny ones.
SCAN_MAX = 1.0
SCAN_MIN = 0.05


# The largest TLS plaintext record (RFC 8446, 5.1).
TLS_RECORD = 16 * 1024


class CloseReason(StrEnum):
    """Why an established connection ended; a field of the access log."""

    CLIENT_CLOSED = "client_closed"  # client sent close_notify/EOF first, then both ended
    BACKEND_CLOSED = "backend_closed"  # backend sent FIN first, then both ended
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    CLIENT_PROTOCOL_ERROR = "client_protocol_error"
    IDLE_TIMEOUT = "idle_timeout"
    DRAIN = "drain"


class IdleWatch:
    """Every established connection's idle timeout, checked by one task.

    The check is a scan of `last_activity` stamps, a few microseconds per
    thousand connections, run a few times per shortest timeout: a connection
    idles out at most a quarter of its timeout (and at most `SCAN_MAX`) late.
    """

    __slots__ = ("_interval", "_splices")

    def __init__(self) -> None:
        self._splices: set[Splice] = set()
        self._interval = SCAN_MAX

    def watch(self, splice: Splice) -> None:
        self._splices.add(splice)
        self._interval = min(self._interval, max(SCAN_MIN, splice.idle_timeout / 4))

    def forget(self, splice: Splice) -> None:
        self._splices.discard(splice)

    def __len__(self) -> int:
        return len(self._splices)

    async def run(self) -> None:
        while True:
            await trio.sleep(self._interval)
            now = trio.current_time()
            for splice in list(self._splices):
                splice.expire_if_idle(now)


class _ClientGone(Exception):
    """The client connection failed; carries the close reason."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class _BackendGone(Exception):
    """The backend connection failed."""


class Splice:
    """One established connection's copy state; `run` drives it to the end."""

    __slots__ = (
        "backend",
        "backend_drained",
        "bytes_to_backend",
        "bytes_to_client",
        "client",
        "close_notify_wanted",
        "close_reason",
        "idle_timeout",
        "last_activity",
        "metrics",
        "pool",
        "scope",
    )

    def __init__(
        self,
        client: TLSConn,
        backend: socket.socket,
        idle_timeout: float,
        metrics: ListenerMetrics,
        pool: BufferPool,
    ) -> None:
        self.pool = pool
        self.client = client
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self.bytes_to_backend = 0
        self.bytes_to_client = 0
        self.close_reason: CloseReason | None = None
        self.close_notify_wanted = False
        self.scope: trio.CancelScope | None = None
        # The backend speaks when spoken to: wait for its first bytes instead of
        # spending a read on EAGAIN (a server-speaks-first backend still works).
        self.backend_drained = True
        self.last_activity = trio.current_time()

    def run(self, nursery: trio.Nursery, idle: IdleWatch) -> Awaitable[None]:
        """Copy until both directions end, one fails, or the connection idles out.

        The client-to-backend direction runs as a task of the connection's
        nursery; the caller awaits the returned backend-to-client direction in
        its own task (returned, not awaited here: a coroutine frame less in
        every idle connection). `_end` cancels the nursery. The caller reads
        `close_reason` once the nursery has closed, and removes the splice
        from `idle` then.
        """
        self.scope = nursery.cancel_scope
        idle.watch(self)
        nursery.start_soon(self._to_backend)
        return self._to_client()

    def expire_if_idle(self, now: float) -> None:
        if now - self.last_activity >= self.idle_timeout:
            self._end(CloseReason.IDLE_TIMEOUT)

    def _end(self, reason: CloseReason) -> None:
        """Stop both directions; a failure overrides a clean half-close as the reason."""
        if self.close_reason is None or self.close_reason in (
            CloseReason.CLIENT_CLOSED,
            CloseReason.BACKEND_CLOSED,
        ):
            self.close_reason = reason
        assert self.scope is not None
        self.scope.cancel()

    def _half_closed(self, reason: CloseReason) -> None:
        if self.close_reason is None:
            self.close_reason = reason

    async def _to_backend(self) -> None:
        counter = self.metrics.bytes_to_backend
        pool = self.pool
        try:
            while chunk := await self._client_recv():
                self.last_activity = trio.current_time()
                view, n = chunk
                await _sock_send_all(self.backend, view[:n])
                pool.give(view)
                self.bytes_to_backend += n
                counter.inc(n)
            _shutdown_write(self.backend)
            self._half_closed(CloseReason.CLIENT_CLOSED)
        except _ClientGone as exc:
            self._end(exc.reason)
        except _BackendGone:
            self._end(CloseReason.BACKEND_RESET)

    async def _to_client(self) -> None:
        """Read a backend chunk, encrypt and send all of it, and again.

        After a chunk shorter than the buffer the socket was empty, so the
        next read waits for readability first (a read now would be a system
        call spent on EAGAIN); after a full one it reads at once.
        """
        counter = self.metrics.bytes_to_client
        pool = self.pool
        sock = self.backend
        try:
            while True:
                if self.backend_drained:
                    await trio.lowlevel.wait_readable(sock)
                view = pool.take()
                try:
                    n = sock.recv_into(view)
                except BlockingIOError:
                    pool.give(view)
                    self.backend_drained = True
                    continue
                except OSError as exc:
                    pool.give(view)
                    raise _BackendGone from exc
                if not n:
                    pool.give(view)
                    break
                self.backend_drained = n < len(view)
                self.last_activity = trio.current_time()
                await self._client_send_all(view[:n])
                pool.give(view)
                self.bytes_to_client += n
                counter.inc(n)
            await self._close_notify()
            self._half_closed(CloseReason.BACKEND_CLOSED)
        except _ClientGone as exc:
            self._end(exc.reason)
        except _BackendGone:
            self._end(CloseReason.BACKEND_RESET)

    async def _client_recv(self) -> tuple[memoryview, int] | None:
        """The next plaintext chunk as (pooled buffer, length), or None at EOF."""
        client = self.client
        obj = client.obj
        incoming = client.incoming
        pool = self.pool
        while True:
            # With nothing fed left to decrypt (the usual case once a request
            # has been read) OpenSSL can only want more: skip asking it, and
            # the SSLWantReadError it would raise and we would catch.
            if incoming.pending or incoming.eof or obj.pending():
                view = pool.take()
                try:
                    n: int = obj.read(RECV_CHUNK, view)  # type: ignore[assignment]  # with a buffer: a count
                except ssl.SSLWantReadError:
                    n = -1
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    n = 0  # close_notify, or a bare FIN (a ragged but common end)
                except ssl.SSLError as exc:
                    pool.give(view)
                    client.flush_nowait()  # the alert that says why
                    raise _ClientGone(CloseReason.CLIENT_PROTOCOL_ERROR) from exc
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
                    client.queue_close_notify()
                if client.outgoing.pending:
                    await client.flush()
                await client.fill()
            except OSError as exc:
                raise _ClientGone(CloseReason.CLIENT_RESET) from exc

    async def _client_send_all(self, view: memoryview) -> None:
        client = self.client
        write = client.obj.write
        try:
            # One record's worth at a time: the outgoing memory BIO keeps the
            # largest size it ever held, so this bounds it near 16 KiB (at a
            # measured ~10 % of bulk throughput against whole 64 KiB writes).
            for start in range(0, len(view), TLS_RECORD):
                write(view[start : start + TLS_RECORD])
                await client.flush()
        except ssl.SSLError as exc:
            raise _ClientGone(CloseReason.CLIENT_PROTOCOL_ERROR) from exc
        except OSError as exc:
            raise _ClientGone(CloseReason.CLIENT_RESET) from exc

    async def _close_notify(self) -> None:
        """Our half is done: close_notify now if the client's bytes are all
        read, else the reading task sends it once they are (see `_client_recv`)."""
        client = self.client
        if not client.drained():
            self.close_notify_wanted = True
            return
        client.queue_close_notify()
        try:
            await client.flush()
        except OSError as exc:
            raise _ClientGone(CloseReason.CLIENT_RESET) from exc


async def _sock_send_all(sock: socket.socket, view: memoryview) -> None:
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        except OSError as exc:
            raise _BackendGone from exc
        else:
            view = view[sent:]


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise _BackendGone from exc
