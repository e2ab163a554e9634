"""Receive buffers shared by every connection of a process.

A buffer is lent for one read-then-write cycle and given back, so a
connection parked waiting for bytes holds none: idle connections cost no
buffer memory, and busy ones reuse the same few buffers.
"""

from __future__ import annotations

# Bytes read per system call. 64 KiB is four full TLS records: fewer wakeups
# per megabyte than one record at a time.
RECV_CHUNK = 64 * 1024

# Free buffers kept for reuse (64 x 64 KiB = 4 MiB at most); beyond that a
# returned buffer is left to the garbage collector.
POOL_KEEP = 64


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
