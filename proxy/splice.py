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
per process, not a task each: a task and its parked wait are the biggest
part of an idle connection's memory. Each direction reads one chunk and
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

from collections.abc import Awaitable
from typing import cast

import trio

from proxy.ends import CloseReason, End, Gone, PlainEnd
from proxy.metrics import ListenerMetrics

_wait_readable = trio.lowlevel.wait_readable

# Bounds on the idle scan's period, in seconds: at most a second late for the
# usual minutes-long timeouts, and never a busy loop for tiny ones.
SCAN_MAX = 1.0
SCAN_MIN = 0.05


class IdleWatch:
    """Every established connection's idle timeout, checked by one task,
    which also publishes the bytes each has moved since its last scan.

    The check is a scan of the connections' byte counts, a few microseconds
    per thousand connections, run a few times per shortest timeout: a scan
    that finds bytes moved since the last one stamps the connection active,
    so a connection idles out at most two scans (half its timeout, and at
    most 2 x `SCAN_MAX`) late, and no chunk reads the clock.
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
                splice.report_bytes(now)
                splice.expire_if_idle(now)


class Splice:
    """One established connection's copy state; `run` drives it to the end."""

    __slots__ = (
        "backend",
        "client",
        "close_reason",
        "idle_timeout",
        "last_activity",
        "metrics",
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
        self.last_activity = trio.current_time()
        # what tlsproxy_bytes_total has been told of each direction so far
        self.reported_to_backend = 0
        self.reported_to_client = 0

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
        nursery.start_soon(self._pump, self.client, self.backend)
        return self._pump(self.backend, self.client)

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
                        await _wait_readable(sock)
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
            if self.close_reason is None:
                self.close_reason = source.side.closed
        except Gone as exc:
            self._end(exc.reason)
