"""Copy plaintext both ways between the TLS client and the backend.

Theory of operation
-------------------

Two tasks in one nursery, one per direction. Each reads one chunk and
writes all of it before reading again, so a slow receiver stops the reader
(back-pressure through the kernel's socket buffers) and memory per
connection is bounded by one chunk per direction. The chunk buffers are
lent by a `BufferPool` only while bytes are in flight: an idle connection,
parked waiting for readability, holds none.

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
from enum import StrEnum

import trio

from proxy.buffers import RECV_CHUNK, BufferPool
from proxy.metrics import ListenerMetrics
from proxy.tlsio import TLSConn


class CloseReason(StrEnum):
    """Why an established connection ended; a field of the access log."""

    CLIENT_CLOSED = "client_closed"  # client sent close_notify/EOF first, then both ended
    BACKEND_CLOSED = "backend_closed"  # backend sent FIN first, then both ended
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    CLIENT_PROTOCOL_ERROR = "client_protocol_error"
    IDLE_TIMEOUT = "idle_timeout"
    DRAIN = "drain"


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
        "bytes_to_backend",
        "bytes_to_client",
        "client",
        "close_notify_wanted",
        "close_reason",
        "idle_timeout",
        "last_activity",
        "metrics",
        "open_directions",
        "pool",
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
        self.open_directions = 2
        self.last_activity = trio.current_time()

    async def run(self) -> CloseReason:
        """Copy until both directions end, one fails, or the connection idles out."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_idle, nursery.cancel_scope)
            nursery.start_soon(self._to_backend, nursery.cancel_scope)
            nursery.start_soon(self._to_client, nursery.cancel_scope)
        assert self.close_reason is not None
        return self.close_reason

    def _end(self, reason: CloseReason, scope: trio.CancelScope) -> None:
        if self.close_reason is None or self.close_reason in (
            CloseReason.CLIENT_CLOSED,
            CloseReason.BACKEND_CLOSED,
        ):
            self.close_reason = reason
        scope.cancel()

    def _half_closed(self, reason: CloseReason, scope: trio.CancelScope) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.open_directions -= 1
        if not self.open_directions:
            scope.cancel()  # both halves ended cleanly: stop the idle watch

    async def _watch_idle(self, scope: trio.CancelScope) -> None:
        while True:
            deadline = self.last_activity + self.idle_timeout
            if trio.current_time() >= deadline:
                self._end(CloseReason.IDLE_TIMEOUT, scope)
                return
            await trio.sleep_until(deadline)

    async def _to_backend(self, scope: trio.CancelScope) -> None:
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
            self._half_closed(CloseReason.CLIENT_CLOSED, scope)
        except _ClientGone as exc:
            self._end(exc.reason, scope)
        except _BackendGone:
            self._end(CloseReason.BACKEND_RESET, scope)

    async def _to_client(self, scope: trio.CancelScope) -> None:
        counter = self.metrics.bytes_to_client
        pool = self.pool
        try:
            while chunk := await _sock_recv(self.backend, pool):
                self.last_activity = trio.current_time()
                view, n = chunk
                await self._client_send_all(view[:n])
                pool.give(view)
                self.bytes_to_client += n
                counter.inc(n)
            await self._close_notify()
            self._half_closed(CloseReason.BACKEND_CLOSED, scope)
        except _ClientGone as exc:
            self._end(exc.reason, scope)
        except _BackendGone:
            self._end(CloseReason.BACKEND_RESET, scope)

    async def _client_recv(self) -> tuple[memoryview, int] | None:
        """The next plaintext chunk as (pooled buffer, length), or None at EOF."""
        client = self.client
        obj = client.obj
        pool = self.pool
        while True:
            view = pool.take()
            try:
                n: int = obj.read(RECV_CHUNK, view)  # type: ignore[assignment]  # with a buffer: a count
            except ssl.SSLWantReadError:
                pool.give(view)
                await self._refill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                n = 0  # close_notify, or a bare FIN (a ragged but common end)
            except ssl.SSLError as exc:
                pool.give(view)
                client.flush_nowait()  # the alert that says why
                raise _ClientGone(CloseReason.CLIENT_PROTOCOL_ERROR) from exc
            if n:
                return view, n
            pool.give(view)
            return None

    async def _refill(self) -> None:
        """Everything fed so far is decrypted: send what OpenSSL produced
        meanwhile (and our close_notify, if due), then read the socket."""
        client = self.client
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
        try:
            client.obj.write(view)
            await client.flush()
        except ssl.SSLError as exc:
            raise _ClientGone(CloseReason.CLIENT_PROTOCOL_ERROR) from exc
        except OSError as exc:
            raise _ClientGone(CloseReason.CLIENT_RESET) from exc

    async def _close_notify(self) -> None:
        """Our half is done: close_notify now if the client's bytes are all
        read, else the reading task sends it once they are (see `_refill`)."""
        client = self.client
        if not client.drained():
            self.close_notify_wanted = True
            return
        client.queue_close_notify()
        try:
            await client.flush()
        except OSError as exc:
            raise _ClientGone(CloseReason.CLIENT_RESET) from exc


async def _sock_recv(sock: socket.socket, pool: BufferPool) -> tuple[memoryview, int] | None:
    """The next chunk from a plain socket as (pooled buffer, length), or None at EOF."""
    while True:
        view = pool.take()
        try:
            n = sock.recv_into(view)
        except BlockingIOError:
            pool.give(view)
            await trio.lowlevel.wait_readable(sock)
        except OSError as exc:
            raise _BackendGone from exc
        else:
            if n:
                return view, n
            pool.give(view)
            return None


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
