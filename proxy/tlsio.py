"""TLS through a memory BIO pair: OpenSSL computes, this module moves bytes.

Theory of operation
-------------------

`SSLContext.wrap_bio` gives an `SSLObject` that reads ciphertext from one
`MemoryBIO` (`incoming`) and writes ciphertext to another (`outgoing`). It
keeps OpenSSL's want-read / want-write contract (`SSL_do_handshake(3)`,
`SSL_read(3)`): a call that needs more peer bytes raises `SSLWantReadError`,
and we answer it exactly as the socket variant would, by waiting for the
socket to be readable, except that the bytes go through our hands:

    want read   -> flush outgoing to the socket (waiting while it is full:
                   the want-write), then recv into incoming (waiting while
                   it is empty: the want-read), retry
    write       -> SSL_write into outgoing a record at a time, then send
                   the records with one system call

A memory BIO never blocks, so OpenSSL itself never wants to write; the
socket does, and that wait is what counts as a want-write.

Why not let OpenSSL own the socket (`SSLContext.wrap_socket`)? Measured on
the benchmark, moving the bytes ourselves costs fewer system calls: one
`recv` fills incoming with several records, where a socket BIO without
read-ahead (which Python cannot enable) reads every record's header and body
with two `recv` calls, and one `send` carries everything a write produced.
It also makes the half-close exact: `SSLObject.unwrap()` (the only way
Python offers to send close_notify) calls `SSL_shutdown` twice and the
second call reads the peer's bytes; with a memory BIO it can only read what
we have fed, so close_notify is sent when `incoming` is empty, and no
application data can be swallowed.

Both directions of a connection share this object. Only the task reading
from this peer calls `fill`; either task may `flush`, so flushes are serialised: a
task that finds a flush in progress waits for it, keeping the ciphertext in
order and the outgoing buffer bounded by what one write produced.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any, Protocol, overload

import trio

from proxy.buffers import BufferPool
from proxy.membio import Releaser

# Ciphertext read per system call: one full record (16 KiB of plaintext, its
# 5-byte header and up to 256 bytes of AEAD expansion), or several small
# ones. The incoming memory BIO keeps the largest size it ever held, so the
# read size bounds it; 64 KiB reads measured ~10 % more bulk throughput but
# would leave 64 KiB behind in every connection that once received a burst.
FILL_BYTES = 16 * 1024 + 5 + 256

# The largest TLS plaintext record (RFC 8446, 5.1).
TLS_RECORD = 16 * 1024


class Engine(Protocol):
    """OpenSSL's side of a connection, as the data path calls it: the C
    object (`_ssl._SSLSocket`) that an `SSLObject` wraps, method for method.

    An `SSLObject` is a Python object in front of it whose every method is
    one more Python frame and whose attribute dict a connection keeps for
    as long as it lives (about 130 bytes with our handshake notes in it,
    BENCHMARKS.md). Only the handshake needs it: OpenSSL's SNI callback
    passes it to ours, through a weak reference. So the handshake holds it
    and the connection keeps only this.
    """

    @overload
    def read(self, size: int, /) -> bytes: ...
    @overload
    def read(self, size: int, buffer: memoryview, /) -> int: ...
    def write(self, data: memoryview | bytes, /) -> int: ...
    def pending(self) -> int: ...
    def do_handshake(self) -> None: ...
    def shutdown(self) -> Any: ...  # SSLObject.unwrap: our close_notify
    def getpeercert(self, binary_form: bool = False, /) -> Any: ...
    def version(self) -> str | None: ...
    def cipher(self) -> tuple[str, str, int] | None: ...
    def selected_alpn_protocol(self) -> str | None: ...
    @property
    def session(self) -> ssl.SSLSession | None: ...
    @property
    def session_reused(self) -> bool: ...


def engine_of(obj: ssl.SSLObject) -> Engine:
    """The C object behind an `SSLObject` (its `_sslobj`, there since
    Python 3.5; tests/test_tlsio.py checks it has what `Engine` names)."""
    engine: Engine = obj._sslobj  # type: ignore[attr-defined]
    return engine


class TLSConn:
    """One peer's TLS state over its socket: a client we accepted (server
    side) or an upstream we dialled (client side); the same bytes move the
    same way."""

    __slots__ = (
        "_flush_done",
        "_flushing",
        "drained_socket",
        "engine",
        "incoming",
        "outgoing",
        "pool",
        "sock",
        "waiting",
    )

    engine: Engine  # set by the constructor of the side, `server` or `client`

    def __init__(self, sock: socket.socket, pool: BufferPool) -> None:
        self.sock = sock
        self.pool = pool
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self._flushing = False
        self._flush_done: trio.Event | None = None
        self.drained_socket = True
        self.waiting = False  # in `fill`'s wait for readability

    @classmethod
    def server(
        cls, sock: socket.socket, context: ssl.SSLContext, pool: BufferPool, hello: bytes
    ) -> tuple[TLSConn, ssl.SSLObject]:
        """An accepted client whose first bytes (`hello`, read until the
        socket had no more) were read before OpenSSL existed; with the
        `SSLObject` that the handshake must hold while it runs (see `Engine`)."""
        conn = cls(sock, pool)
        conn.incoming.write(hello)
        obj = context.wrap_bio(conn.incoming, conn.outgoing, server_side=True)
        conn.engine = engine_of(obj)
        return conn, obj

    @classmethod
    def client(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        pool: BufferPool,
        server_hostname: str | None,
        session: ssl.SSLSession | None,
    ) -> tuple[TLSConn, ssl.SSLObject]:
        """A dialled upstream: nothing to read until our ClientHello is out."""
        conn = cls(sock, pool)
        obj = context.wrap_bio(
            conn.incoming,
            conn.outgoing,
            server_side=False,
            server_hostname=server_hostname,
            session=session,
        )
        conn.engine = engine_of(obj)
        return conn, obj

    def fileno(self) -> int:
        return self.sock.fileno()

    async def fill(self) -> bool:
        """Feed OpenSSL the next bytes from the peer; EOF is fed as EOF.

        Returns whether it had to wait for them (a want-read). Raises OSError
        when the connection failed.
        """
        waited = False
        pool = self.pool
        while True:
            if self.drained_socket:
                # The last read was short: the socket was empty then, and a
                # read now would most likely be a system call spent on EAGAIN.
                waited = True
                self.waiting = True
                await trio.lowlevel.wait_readable(self.sock)
                self.waiting = False
            view = pool.take()
            try:
                n = self.sock.recv_into(view, FILL_BYTES)
            except BlockingIOError:
                pool.give(view)
                self.drained_socket = True
                continue
            except BaseException:
                pool.give(view)
                raise
            self.drained_socket = n < FILL_BYTES
            if n:
                self.incoming.write(view[:n])
            else:
                self.incoming.write_eof()
            pool.give(view)
            return waited

    def fill_nowait(self) -> None:
        """Feed OpenSSL what the peer has already sent, without waiting: one
        read, for a last look at a connection about to close (a reset or an
        empty socket leaves nothing more to feed)."""
        view = self.pool.take()
        with contextlib.suppress(OSError):
            n = self.sock.recv_into(view, FILL_BYTES)
            if n:
                self.incoming.write(view[:n])
            else:
                self.incoming.write_eof()
        self.pool.give(view)

    async def write(self, view: memoryview) -> int:
        """Encrypt `view` and send it; returns the waits for writability.

        The outgoing memory BIO keeps the largest size it ever held, so more
        than a record is encrypted one record at a time and each record taken
        out at once: the BIO stays near 16 KiB. The records then go out in
        one `sendmsg` instead of one `send` each (BENCHMARKS.md: a quarter
        of the send calls of a bulk download, its CPU within the noise).

        The data path tries `write_at_once` before it, and comes here only
        for a write larger than a record or behind a flush in progress.
        """
        engine = self.engine
        if len(view) <= TLS_RECORD:
            engine.write(view)  # after the flush in progress: its loop sends it, or ours
            return await self.flush()
        if self._flushing:
            await self._flushed()
        read = self.outgoing.read
        records: list[bytes | memoryview] = []
        for start in range(0, len(view), TLS_RECORD):
            engine.write(view[start : start + TLS_RECORD])
            records.append(read())
        # No wait since `_flushed`: nothing can have been queued before these.
        self._flushing = True
        try:
            waits = await self._send(records)
        finally:
            self._flush_finished()
        return waits + await self.flush()  # what the reading side queued meanwhile

    def write_at_once(self, view: memoryview) -> bool:
        """Encrypt `view` and send it with one `send`, without a coroutine
        or a wait, when it is at most a record and no flush is in progress;
        False, having done nothing, otherwise. What the socket did not take
        is put back first in line in `outgoing` (nothing can have been
        queued meanwhile), for `flush`.

        The usual write, a request or a response that fits the socket's
        buffer: with `TLSEnd.send_all` calling this first, 2.8 % fewer
        instructions per keep-alive request (BENCHMARKS.md)."""
        if len(view) > TLS_RECORD or self._flushing:
            return False
        self.engine.write(view)
        data = self.outgoing.read()
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.outgoing.write(memoryview(data)[sent:])
        return True

    async def flush(self) -> int:
        """Send everything OpenSSL produced; returns the waits for writability."""
        if self._flushing:
            await self._flushed()
        outgoing = self.outgoing
        if not outgoing.pending:
            return 0
        waits = 0
        self._flushing = True
        try:
            while outgoing.pending:
                data = memoryview(outgoing.read())
                while data:
                    try:
                        sent = self.sock.send(data)
                    except BlockingIOError:
                        waits += 1
                        await trio.lowlevel.wait_writable(self.sock)
                    else:
                        data = data[sent:]
        finally:
            self._flush_finished()
        return waits

    async def _flushed(self) -> None:
        """Until no flush is in progress: ciphertext leaves in the order
        OpenSSL wrote it, and one task at a time sends it."""
        while self._flushing:
            if self._flush_done is None:
                self._flush_done = trio.Event()
            await self._flush_done.wait()

    def _flush_finished(self) -> None:
        self._flushing = False
        if self._flush_done is not None:
            self._flush_done.set()
            self._flush_done = None

    async def _send(self, records: list[bytes | memoryview]) -> int:
        """All of `records`, in order, gathered into as few system calls as
        the socket takes; returns the waits for writability."""
        waits = 0
        while records:
            try:
                sent = self.sock.sendmsg(records)
            except BlockingIOError:
                waits += 1
                await trio.lowlevel.wait_writable(self.sock)
                continue
            records = unsent(records, sent)
        return waits

    def flush_nowait(self) -> None:
        """Best effort, for a last alert or close_notify: one send, no waiting."""
        if self.outgoing.pending and not self._flushing:
            with contextlib.suppress(OSError):
                self.sock.send(self.outgoing.read())

    def drained(self) -> bool:
        """Nothing from the peer is waiting to be decrypted."""
        return not self.incoming.pending and not self.engine.pending()

    def queue_close_notify(self) -> None:
        """Put our close_notify in `outgoing`; call only when `drained()`.

        OpenSSL's shutdown (`SSLObject.unwrap`) then looks for the peer's close_notify in an empty
        `incoming` and raises want-read, which is fine: our half is done.
        """
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.engine.shutdown()

    def release_buffers(self, memory: Releaser) -> None:
        """The connection parks: both memory BIOs, empty until it wakes,
        and OpenSSL's record buffers give their memory back (`proxy.membio`)."""
        memory.release(self.incoming)
        memory.release(self.outgoing)
        memory.release_records(self.engine)

    def close(self) -> None:
        self.sock.close()


def unsent(records: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What a gathered send of `records` left, after its first `sent` bytes."""
    for index, record in enumerate(records):
        if sent < len(record):
            return [memoryview(record)[sent:], *records[index + 1 :]]
        sent -= len(record)
    return []
