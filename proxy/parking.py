"""The clock of established connections, and the lot where idle ones park.

Theory of operation
-------------------

An established connection is in one of these states:

    handshaking  its task runs the steps of `proxy.connection` up to the
                 splice (PROXY header, handshakes, backend connect)
    running      its task and, while both directions are open, a second
                 one in its nursery copy bytes (`proxy.splice`)
    parked       no task: its sockets wait in the lot's epoll
    closing      `_Connection.close`: close_notify, sockets, access line

    handshaking -> running <-> parked
                      |           |
                      +-> closing <-+

Most connections a sidecar holds are idle most of the time (keep-alive
pools, long polls, streams), and an idle running connection's biggest
objects are its tasks and their parked waits. So `IdleWatch`, one task per
process scanning every running connection a few times a second, parks one
that has moved no byte for `PARK_AFTER` while each of its open directions
waits to read (`Splice.parkable`): `Splice.park` wakes those waits with
`trio.lowlevel.notify_closing`, the pumps return without touching the
connection's state, and the connection's task hands the connection to the
`ParkingLot` as it ends. The lot is one task waiting on one `select.epoll`
in which every parked connection's open sources are registered one-shot:
when one is readable (bytes, a FIN, a reset), the lot takes the connection
out and starts its task again, in the handlers' nursery, with its state (TLS
object, byte counts, half-close state, idle deadline) as it was.

A parked connection is live in every other respect. The lot owns it: its
idle timeout is checked at every scan and closes it there, a drain closes
it with `close_reason=drain`, `connections_active` and `max_connections`
count it, and a reload leaves it on the runtime it was accepted with. A
connection woken but whose task has not run yet stays in the lot until the
task takes it (`ParkingLot.take`), so that no connection is ever without an
owner: a drain or an idle close in between closes it, and the task, finding
it gone, ends at once.
"""

from __future__ import annotations

import contextlib
import math
import select
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import trio

from proxy import membio
from proxy.ends import CloseReason
from proxy.splice import Splice

# How long a connection moves no byte before it parks, in seconds. A park
# and a wake cost the CPU of about four running requests (two tasks started,
# the sockets moved between Trio's epoll and the lot's; BENCHMARKS.md), so a
# connection that parks between every two requests pays that at most twice
# a second; half a second is far above the gaps inside a burst of requests
# (milliseconds) and below the seconds to minutes a pooled or streaming
# connection idles.
PARK_AFTER = 0.5

# Bounds on the scan's period, in seconds: a connection parks at most one
# scan after PARK_AFTER (the scan stamps activity it sees, at most one scan
# late) and idles out at most two scans late; never a busy loop for tiny
# timeouts. A scan costs about a microsecond per running connection.
SCAN_MAX = PARK_AFTER / 2
SCAN_MIN = 0.05

# Wakes handled per turn of the lot's task, so that a burst of wakes (every
# pooled connection called at once) yields to the rest of the process.
WAKE_BATCH = 256

# epoll(7): readable, one report per registration.
_WATCH = select.EPOLLIN | select.EPOLLONESHOT

Car = TypeVar("Car", bound=Hashable)


class ParkingLot(Generic[Car]):
    """Every parked connection of the process, waiting on one epoll.

    `Car` is the connection; the lot knows it only through its splice and
    the two callbacks: `resume` is the connection's task, started again,
    and `close` ends a connection the lot owns, for a reason.
    """

    def __init__(
        self,
        resume: Callable[[Car], Awaitable[None]],
        close: Callable[[Car, CloseReason], None],
    ) -> None:
        self._resume = resume
        self._close = close
        self._epoll = select.epoll()
        self._cars: dict[Car, Splice] = {}  # parked, or woken and not yet taken
        self._next_expiry = math.inf  # no parked connection's idle timeout comes sooner
        # The parked ones' watched descriptors, indexed by descriptor: a list
        # of small dense ints costs a slot each, where a dict costs an entry
        # and an int object (about 190 bytes a connection, BENCHMARKS.md).
        self._by_fd: list[Car | None] = []

    def __len__(self) -> int:
        return len(self._cars)

    def __contains__(self, car: Car) -> bool:
        return car in self._cars

    def park(self, car: Car, splice: Splice) -> None:
        """Take a connection whose tasks have ended: its open sources join
        the epoll (bytes already there are reported at once). Raises
        OSError or ValueError, having taken nothing, if the kernel refuses."""
        by_fd = self._by_fd
        try:
            for sock in splice.sources():
                fd = sock.fileno()
                self._epoll.register(fd, _WATCH)  # a closed socket's -1: ValueError
                if fd >= len(by_fd):
                    by_fd.extend([None] * (fd + 1 - len(by_fd)))
                by_fd[fd] = car
        except (OSError, ValueError):
            self._unwatch(splice)  # all or nothing: the caller closes it instead
            raise
        self._cars[car] = splice
        self._next_expiry = min(self._next_expiry, splice.last_activity + splice.idle_timeout)

    def take(self, car: Car) -> bool:
        """The woken connection's task takes it back; False when the lot
        closed it meanwhile."""
        return self._cars.pop(car, None) is not None

    def expire(self, now: float) -> None:
        """Close every parked connection whose idle timeout has passed.

        Only when the earliest deadline has come: a look at every parked
        connection at each scan cost 3.6 % of a core with 9 488 parked
        (BENCHMARKS.md), and the deadlines are minutes away.
        """
        if now < self._next_expiry:
            return
        self._next_expiry = math.inf
        for car, splice in list(self._cars.items()):
            deadline = splice.last_activity + splice.idle_timeout
            if now >= deadline:
                self._remove(car, splice)
                self._close(car, CloseReason.IDLE_TIMEOUT)
            else:
                self._next_expiry = min(self._next_expiry, deadline)

    def close_all(self, reason: CloseReason) -> None:
        for car, splice in list(self._cars.items()):
            self._remove(car, splice)
            self._close(car, reason)

    def _remove(self, car: Car, splice: Splice) -> None:
        del self._cars[car]
        self._unwatch(splice)

    def _unwatch(self, splice: Splice) -> None:
        by_fd = self._by_fd
        for sock in splice.sources():
            fd = sock.fileno()
            if fd < len(by_fd) and by_fd[fd] is not None:
                by_fd[fd] = None
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    async def run(self, nursery: trio.Nursery) -> None:
        """Wake parked connections as their sockets become readable; their
        tasks start in `nursery`, the handlers'."""
        epoll = self._epoll
        try:
            while True:
                # Always a checkpoint: the rest of the process runs between
                # two batches even when more wakes are already waiting.
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, WAKE_BATCH):
                    car = self._by_fd[fd]
                    if car is None:  # its other socket woke it in this batch
                        continue
                    self._unwatch(self._cars[car])
                    nursery.start_soon(self._resume, car)
        finally:
            epoll.close()


class IdleWatch:
    """Every running connection's idle timeout and parking, checked by one
    task, which also publishes the bytes each has moved since its last scan.

    The check is a scan of the connections' byte counts, run every
    `SCAN_MAX` or a quarter of the shortest timeout: a scan that finds bytes
    moved since the last one stamps the connection active, so no chunk reads
    the clock. A connection that moved none for `PARK_AFTER` parks when it
    can; the parked ones' timeouts are checked by the same scan.
    """

    __slots__ = ("_interval", "_splices", "lot", "memory")

    def __init__(self, lot: ParkingLot[Any], memory: membio.Releaser) -> None:
        self._splices: set[Splice] = set()
        self._interval = SCAN_MAX
        self.lot = lot
        self.memory = memory

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
            self.scan(trio.current_time())

    def scan(self, now: float) -> None:
        for splice in list(self._splices):
            splice.report_bytes(now)
            idle_for = now - splice.last_activity
            if idle_for >= splice.idle_timeout:
                splice.end(CloseReason.IDLE_TIMEOUT)
            elif idle_for >= PARK_AFTER and splice.parkable():
                splice.park()  # its task hands it to the lot as it ends
                self._splices.discard(splice)
        self.lot.expire(now)
        self.memory.trim()  # what the connections parked since the last scan gave back
