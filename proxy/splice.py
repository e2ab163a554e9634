"""Copy plaintext both ways between the TLS client and the backend.

Theory of operation
-------------------

Two tasks in one nursery, one per direction. Each reads one chunk and
writes all of it before reading again, so a slow receiver stops the reader
(back-pressure through the kernel's socket buffers) and memory per
connection is bounded by one chunk per direction. The chunk buffers are
lent by a `BufferPool` only while bytes are in flight: an idle connection,
parked waiting for readability, holds none.

After the handshake OpenSSL keeps the same contract as during it
(`SSL_read(3)`, `SSL_write(3)`): a read may raise `SSLWantReadError` (no
complete record yet) and also `SSLWantWriteError` (it must send a
post-handshake message first); a write may raise either too. The caller
waits for that readiness and retries with the same buffer. A TLS write is
all-or-nothing here (Python does not enable partial writes), so a retried
`send` reports the whole chunk.

Half-close is carried across in both directions:

    client close_notify (or EOF) -> shutdown(SHUT_WR) on the backend
    backend FIN                  -> close_notify to the client

and the connection ends when both directions have ended, when either side
resets, or when no byte moved for `idle_timeout`.

Sending close_notify while the client may still be sending is the subtle
part: Python's `SSLSocket.unwrap()` calls `SSL_shutdown(3)` twice, and the
second call reads from the socket, discarding (with an error) any
application record already waiting there. So close_notify is only sent when
nothing from the client is pending; otherwise the client-reading task sends
it the moment it has drained what was there (see `_Connection`).
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Awaitable, Callable
from enum import StrEnum

import trio

from proxy.metrics import ListenerMetrics

# Bytes read per system call. 64 KiB is four full TLS records: fewer wakeups
# per megabyte than one record at a time, and still small per connection
# (two buffers per established connection).
RECV_CHUNK = 64 * 1024

# Free buffers kept for reuse (64 x 64 KiB = 4 MiB at most); beyond that a
# returned buffer is left to the garbage collector.
POOL_KEEP = 64

# Seconds to wait between retries when the other direction already holds the
# socket's readiness slot (see `_wait_shared`). Only reachable through
# post-handshake messages that make a read want a write, which are rare.
SHARED_WAIT_POLL = 0.001


class CloseReason(StrEnum):
    """Why an established connection ended; a field of the access log."""

    CLIENT_CLOSED = "client_closed"  # client sent close_notify/EOF first, then both ended
    BACKEND_CLOSED = "backend_closed"  # backend sent FIN first, then both ended
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    CLIENT_PROTOCOL_ERROR = "client_protocol_error"
    IDLE_TIMEOUT = "idle_timeout"
    DRAIN = "drain"


class BufferPool:
    """Receive buffers lent for one read-then-write cycle, then reused."""

    __slots__ = ("_free",)

    def __init__(self) -> None:
        self._free: list[memoryview] = []

    def take(self) -> memoryview:
        return self._free.pop() if self._free else memoryview(bytearray(RECV_CHUNK))

    def give(self, view: memoryview) -> None:
        if len(self._free) < POOL_KEEP:
            self._free.append(view)


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
        client: ssl.SSLSocket,
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
            self.close_notify_wanted = True
            self._try_close_notify()
            self._half_closed(CloseReason.BACKEND_CLOSED, scope)
        except _ClientGone as exc:
            self._end(exc.reason, scope)
        except _BackendGone:
            self._end(CloseReason.BACKEND_RESET, scope)

    async def _client_recv(self) -> tuple[memoryview, int] | None:
        """The next plaintext chunk as (pooled buffer, length), or None at EOF."""
        client = self.client
        pool = self.pool
        while True:
            view = pool.take()
            try:
                n = client.recv_into(view)
            except ssl.SSLWantReadError:
                pool.give(view)
                if self.close_notify_wanted:
                    self._try_close_notify()
                await trio.lowlevel.wait_readable(client)
            except ssl.SSLWantWriteError:
                pool.give(view)
                await _wait_shared(trio.lowlevel.wait_writable, client)
            except ssl.SSLZeroReturnError:
                return None  # close_notify after ours: a clean end
            except ssl.SSLError as exc:
                raise _ClientGone(CloseReason.CLIENT_PROTOCOL_ERROR) from exc
            except OSError as exc:
                raise _ClientGone(CloseReason.CLIENT_RESET) from exc
            else:
                if n:
                    return view, n
                pool.give(view)
                return None

    async def _client_send_all(self, view: memoryview) -> None:
        client = self.client
        while True:
            try:
                client.send(view)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(client)
            except ssl.SSLWantReadError:
                await _wait_shared(trio.lowlevel.wait_readable, client)
            except ssl.SSLError as exc:
                raise _ClientGone(CloseReason.CLIENT_PROTOCOL_ERROR) from exc
            except OSError as exc:
                raise _ClientGone(CloseReason.CLIENT_RESET) from exc
            else:
                return

    def _try_close_notify(self) -> None:
        """Send close_notify if no client record can be caught by `unwrap()`.

        WARNING: the check and the send are two system calls apart with no
        checkpoint between them; only bytes arriving in those microseconds
        could still be lost, and then the client gets an error, not silence.
        """
        client = self.client
        if client.pending() or _has_unread_bytes(client):
            return  # the reading task will call again once it has drained them
        self.close_notify_wanted = False
        send_close_notify(client)


def send_close_notify(client: ssl.SSLSocket) -> None:
    """Queue our close_notify without waiting for the client's reply.

    The first `SSL_shutdown` sends it; the second, inside `unwrap`, looks for
    the peer's and raises want-read when it is not there yet, which is fine:
    we never need the peer's close_notify to finish our half.
    """
    try:
        client.unwrap()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass  # sent (or queued in the kernel); the peer's reply is not needed
    except (ssl.SSLError, OSError, ValueError):
        pass  # the client is gone or the TLS layer already shut; nothing left to tell it


def _has_unread_bytes(sock: socket.socket) -> bool:
    try:
        return bool(socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except OSError:
        return False  # a reset: nothing readable to lose


async def _wait_shared(
    wait: Callable[[socket.socket], Awaitable[None]], sock: socket.socket
) -> None:
    try:
        await wait(sock)
    except trio.BusyResourceError:
        await trio.sleep(SHARED_WAIT_POLL)


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
