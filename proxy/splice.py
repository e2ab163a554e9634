"""Copy plaintext both ways between the connection's two ends.

Theory of operation
-------------------

Two tasks, one per direction: the connection's own task copies from the
backend to the client, and a second task in the connection's nursery copies
from the client to the backend. Both run the same pump over the ends of
`proxy.ends`, whichever kind each end is (plain socket or TLS), so the four
listener kinds (terminate, originate, bridge; plain in and out is not one)
share one copy loop, one back-pressure rule and one half-close rule.

The idle timeouts of all connections are enforced by one `IdleWatch` task
per process (`proxy.parking`), not a task each, and a connection idle for
long enough parks: its tasks end, and the parking lot starts them again when
a byte comes (`park`, `resume`). Each direction reads one chunk and
writes all of it before reading again, so a slow receiver stops the reader
(back-pressure through the kernel's socket buffers) and memory per
connection is bounded by one chunk per direction. The chunk buffers are
lent by a `BufferPool` only while bytes are in flight: an idle connection,
parked waiting for readability, holds none.

Half-close is carried across in both directions, whatever the ends speak:

    client close_notify or FIN -> close_notify or FIN to the backend
    backend close_notify or FIN -> close_notify or FIN to the client

and the connection ends when both directions have ended, when either side
resets or breaks the protocol, or when no byte moved for `idle_timeout`.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable
from typing import cast

import trio

from proxy.ends import CloseReason, End, Gone, PlainEnd, TLSEnd
from proxy.membio import Releaser
from proxy.metrics import ListenerMetrics

_wait_readable = trio.lowlevel.wait_readable


def _readable(sock: socket.socket) -> bool:
    """Bytes, a FIN or an error are waiting: a read would not block."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True  # a reset: the read reports it
    return True


class Splice:
    """One established connection's copy state; `run` drives it to the end."""

    __slots__ = (
        "backend",
        "client",
        "close_reason",
        "idle_timeout",
        "last_activity",
        "metrics",
        "parking",
        "reported_to_backend",
        "reported_to_client",
        "scope",
    )

    def __init__(
        self, client: End, backend: End, idle_timeout: float, metrics: ListenerMetrics
    ) -> None:
        self.client = client
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self.close_reason: CloseReason | None = None
        self.scope: trio.CancelScope | None = None
        self.parking = False  # `park` woke the pumps' waits to end them
        self.last_activity = trio.current_time()
        # what tlsproxy_bytes_total has been told of each direction so far
        self.reported_to_backend = 0
        self.reported_to_client = 0

    def run(self, nursery: trio.Nursery) -> Awaitable[None]:
        """Copy until both directions end, one fails, the connection idles
        out, or it parks.

        Each open direction runs: client to backend as a task of the
        connection's nursery, and the other returned for the caller to
        await in its own task (not awaited here: a coroutine frame less in
        every running connection); after a park only the open ones run
        again. `end` cancels the nursery. The caller reads `close_reason`
        once the nursery has closed, and parks the connection if `parking`.
        """
        self.scope = nursery.cancel_scope
        self.parking = False
        client, backend = self.client, self.backend
        if backend.done:
            return self._pump(client, backend)
        if not client.done:
            nursery.start_soon(self._pump, client, backend)
        return self._pump(backend, client)

    def sources(self) -> list[socket.socket]:
        """The sockets of the directions still open: what a parked
        connection waits on."""
        return [end.sock for end in (self.client, self.backend) if not end.done]

    def parkable(self) -> bool:
        """Every open direction waits to read and nothing is there to read.

        The second half makes `park` exact: a pump whose wait the kernel has
        already answered (its task woken, not yet run) still shows as
        waiting, but its socket is readable, and parking it would lose the
        wake-up.
        """
        scope = self.scope
        if scope is None or scope.cancel_called or (self.client.done and self.backend.done):
            return False  # ending: parked with nothing to wait on, it would never wake
        return all(
            end.done or (end.waiting and not _readable(end.sock))
            for end in (self.client, self.backend)
        )

    def quiet(self) -> bool:
        """Before the first `run`: neither peer has sent a byte to copy, so
        the connection parks before its pumps exist.

        A pool's or a channel's connection, opened ahead of its use, then
        never holds a task, and a burst of them leaves no high-water mark
        of tasks behind (the interpreter keeps the memory it once had). A
        client whose first bytes came with its handshake, the usual case,
        has them waiting by now, or in OpenSSL already, and runs at once.
        """
        return not any(
            (isinstance(end, TLSEnd) and not end.conn.drained())  # fed to OpenSSL already
            or _readable(end.sock)
            for end in (self.client, self.backend)
        )

    def park(self) -> None:
        """End the pumps of a `parkable` connection: each open direction's
        read wait raises ClosedResourceError and its pump returns, leaving
        the state as it is for `resume`."""
        self.parking = True
        for sock in self.sources():
            trio.lowlevel.notify_closing(sock)

    def release_buffers(self, memory: Releaser) -> None:
        """Parked: what the TLS ends hold only while bytes pass goes back."""
        for end in (self.client, self.backend):
            if isinstance(end, TLSEnd):
                end.conn.release_buffers(memory)

    def resume(self) -> None:
        """Before `run` again: the lot woke the connection because one of its
        sockets is readable; read both at once instead of waiting first."""
        for end in (self.client, self.backend):
            end.ready()

    @property
    def bytes_to_backend(self) -> int:
        return self.client.moved

    @property
    def bytes_to_client(self) -> int:
        return self.backend.moved

    async def prime(self, early: bytes) -> None:
        """Before `run`: the client's bytes read with its PROXY header go
        to the backend first, counted as any others."""
        try:
            await self.backend.send_all(memoryview(early))
        except Gone as exc:
            self.close_reason = exc.reason
            raise
        self.client.moved += len(early)

    def report_bytes(self, now: float) -> None:
        """Add what moved since the last report to tlsproxy_bytes_total, and
        call the connection active at `now` if anything did: at every idle
        scan (so at most one scan late) and at the close. One locked counter
        update per direction and scan, and no clock read per chunk, instead
        of one of each per chunk: measured per keep-alive request
        (BENCHMARKS.md)."""
        moved = self.client.moved
        if moved != self.reported_to_backend:
            self.metrics.bytes_to_backend.inc(moved - self.reported_to_backend)
            self.reported_to_backend = moved
            self.last_activity = now
        moved = self.backend.moved
        if moved != self.reported_to_client:
            self.metrics.bytes_to_client.inc(moved - self.reported_to_client)
            self.reported_to_client = moved
            self.last_activity = now

    def end(self, reason: CloseReason) -> None:
        """Stop both directions; a failure overrides a clean half-close as the reason."""
        self.ended(reason)
        assert self.scope is not None
        self.scope.cancel()

    def ended(self, reason: CloseReason) -> None:
        """Record why the connection ends (a parked one has no task to stop)."""
        if self.close_reason is None or self.close_reason in (
            CloseReason.CLIENT_CLOSED,
            CloseReason.BACKEND_CLOSED,
        ):
            self.close_reason = reason

    async def _pump(self, source: End, sink: End) -> None:
        """Read a chunk, write all of it, and again; at the source's end,
        close the sink's write half.

        A plain source is read here (see `proxy.ends`), a TLS source
        through its `recv`.
        """
        # Bound once: a method looked up per chunk is measurable per request.
        send_all, take, give = sink.send_all, source.pool.take, source.pool.give
        tls = None if isinstance(source, PlainEnd) else source
        plain = cast(PlainEnd, source)  # read from only when not TLS
        sock = tls.conn.sock if tls is not None else plain.sock
        try:
            while True:
                if tls is not None:
                    chunk = await tls.recv()
                    if chunk is None:
                        break
                    view, n = chunk
                else:
                    if plain.drained:
                        plain.waiting = True
                        await _wait_readable(sock)
                        plain.waiting = False
                    view = take()
                    try:
                        n = sock.recv_into(view)
                    except BlockingIOError:
                        give(view)
                        plain.drained = True
                        continue
                    except OSError as exc:
                        give(view)
                        raise Gone(plain.side.reset) from exc
                    if not n:
                        give(view)
                        break
                    plain.drained = n < len(view)
                await send_all(view[:n])
                give(view)
                source.moved += n  # published by report_bytes
            await sink.close_write()
            source.done = True
            if self.close_reason is None:
                self.close_reason = source.side.closed
        except Gone as exc:
            self.end(exc.reason)
        except trio.ClosedResourceError:
            if not self.parking:
                raise
            # parked: the read wait was woken by `park`, nothing was read
