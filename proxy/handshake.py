"""The TLS handshake loop, driven by OpenSSL's want-read / want-write signals.

Theory of operation
-------------------

OpenSSL's `SSL_do_handshake(3)` on a non-blocking socket does as much of the
handshake as the socket allows and then returns early: `SSL_ERROR_WANT_READ`
when it needs bytes the peer has not sent yet, `SSL_ERROR_WANT_WRITE` when the
kernel's send buffer is full. The caller is expected to wait until the socket
is readable (or writable) and call it again with nothing changed; OpenSSL keeps
all the handshake state in between. Python surfaces the same contract:
`SSLSocket.do_handshake()` raises `ssl.SSLWantReadError` /
`ssl.SSLWantWriteError`.

This module is that loop, in the open:

    peek the first bytes          (before OpenSSL reads anything)
    wrap the socket               (server side, no handshake on connect)
    loop:
        do_handshake()            -> done
        SSLWantReadError          -> count, wait_readable(sock), again
        SSLWantWriteError         -> count, wait_writable(sock), again
    all of it under handshake_timeout

Each wait is a Trio checkpoint, so the deadline (a cancel scope owned here,
the only code that knows the policy) interrupts any of them. A full TLS 1.3
handshake typically costs one want-read: the ClientHello is already in the
socket when we start, OpenSSL writes the whole server flight at once, then
must wait for the client's Finished.

Peeking first matters for diagnosis: a plain `GET / HTTP/1.1` on the TLS
port would otherwise surface as OpenSSL's "wrong version number"; looking at
the record type byte before OpenSSL does lets us say `not_tls`.

The peek also reads the whole ClientHello (for the JA4 fingerprint in the
access log and the ALPN policy in `proxy.tls`) without consuming it: OpenSSL
then reads the very same bytes. The hello may arrive in several TCP segments,
and a peek does not drain the socket, so "wait until readable, peek again"
would spin: the socket stays readable while the first segment sits unread.
Instead, once `proxy.clienthello.reassemble` says how many bytes it needs,
the loop sets `SO_RCVLOWAT` to that count, so the kernel reports the socket
readable only when that many bytes are queued (or on EOF/error), waits once,
peeks again, and puts `SO_RCVLOWAT` back to 1. Each wait needs strictly more
bytes than the last, the total is bounded by `MAX_PEEK_BYTES`, and the whole
thing runs under the handshake deadline. Waiting here costs nothing: OpenSSL
cannot answer before it has the whole ClientHello either. If the bytes stop
growing (EOF), the hello is malformed or too big, or the socket option is
refused, the loop gives up on the fingerprint and lets OpenSSL judge the
bytes: a fingerprint is best effort and never fails a handshake.

Every way the loop can end, including the deadline, is classified into
exactly one `Outcome` by the pure functions in `proxy.outcome`.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import trio

from proxy import clienthello
from proxy.clienthello import ClientHello
from proxy.outcome import Outcome, classify
from proxy.tls import HandshakeNotes, attach_notes

# One TLS record header: content type, two version bytes, two length bytes.
# The content type alone decides not_tls; the rest is there for the log.
PEEK_BYTES = 5


@dataclass(slots=True)
class HandshakeResult:
    """What the loop learned; the caller owns `conn` and must close it."""

    outcome: Outcome
    conn: socket.socket  # the SSLSocket once wrapped, else the raw socket
    wants_read: int
    wants_write: int
    seconds: float
    error: BaseException | None
    notes: HandshakeNotes

    @property
    def tls(self) -> ssl.SSLSocket:
        """The established TLS socket; only valid when the outcome is success."""
        assert isinstance(self.conn, ssl.SSLSocket)
        return self.conn


async def run_handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    timeout: float,  # noqa: ASYNC109 - the deadline firing is itself an outcome
) -> HandshakeResult:
    """Peek, wrap, and drive the handshake of one accepted socket to an outcome.

    The loop owns its deadline because a timeout is not an error to propagate
    but one of the outcomes to classify and count.
    """
    start = trio.current_time()
    loop = _Loop(sock)
    error: BaseException | None = None
    with trio.move_on_after(timeout) as deadline:
        try:
            await loop.run(context)
        except Exception as exc:
            error = exc
        except BaseException:
            loop.conn.close()  # cancelled from outside: the wrapped socket is ours alone
            raise
    outcome = classify(
        first=loop.first,
        error=error,
        timed_out=deadline.cancelled_caught,
        refused=loop.notes.refused,
    )
    return HandshakeResult(
        outcome=outcome,
        conn=loop.conn,
        wants_read=loop.wants_read,
        wants_write=loop.wants_write,
        seconds=trio.current_time() - start,
        error=error,
        notes=loop.notes,
    )


class _Loop:
    """The state of one handshake, kept so a deadline can still report it."""

    __slots__ = ("conn", "first", "notes", "wants_read", "wants_write")

    def __init__(self, sock: socket.socket) -> None:
        self.conn: socket.socket = sock
        self.first: bytes | None = None
        self.notes = HandshakeNotes()
        self.wants_read = 0
        self.wants_write = 0

    async def run(self, context: ssl.SSLContext) -> None:
        self.notes.hello = await self._peek_hello()
        if not self.first or self.first[0] != 0x16:
            return  # the classifier decides from the bytes alone
        tls = context.wrap_socket(self.conn, server_side=True, do_handshake_on_connect=False)
        attach_notes(tls, self.notes)
        self.conn = tls
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self.wants_read += 1
                await trio.lowlevel.wait_readable(tls)
            except ssl.SSLWantWriteError:
                self.wants_write += 1
                await trio.lowlevel.wait_writable(tls)
            else:
                return

    async def _peek_hello(self) -> ClientHello | None:
        """Peek until the ClientHello is whole (see the module docstring)."""
        data = await self._peek()
        self.first = data[:PEEK_BYTES]
        while True:
            verdict = clienthello.reassemble(data)
            if isinstance(verdict, bytes):
                return clienthello.parse(verdict)
            if verdict == clienthello.GIVE_UP:
                return None
            more = await self._peek_at_least(verdict)
            if len(more) <= len(data):
                return None  # EOF, or the kernel would not wait for us: let OpenSSL judge
            data = more

    async def _peek(self) -> bytes:
        while True:
            try:
                return self.conn.recv(clienthello.MAX_PEEK_BYTES, socket.MSG_PEEK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.conn)

    async def _peek_at_least(self, count: int) -> bytes:
        """Wait until `count` bytes are queued (or EOF), then peek them all."""
        sock = self.conn
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
        except OSError:
            return b""
        try:
            await trio.lowlevel.wait_readable(sock)
        finally:
            # WARNING: must be restored before OpenSSL reads or the handshake
            # loop waits: with a low-water mark left at `count`, a later
            # wait_readable would sleep until `count` bytes of *new* data came.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return await self._peek()
