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

Every way the loop can end, including the deadline, is classified into
exactly one `Outcome` by the pure functions in `proxy.outcome`.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import trio

from proxy.outcome import Outcome, classify

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
    outcome = classify(first=loop.first, error=error, timed_out=deadline.cancelled_caught)
    return HandshakeResult(
        outcome=outcome,
        conn=loop.conn,
        wants_read=loop.wants_read,
        wants_write=loop.wants_write,
        seconds=trio.current_time() - start,
        error=error,
    )


class _Loop:
    """The state of one handshake, kept so a deadline can still report it."""

    __slots__ = ("conn", "first", "wants_read", "wants_write")

    def __init__(self, sock: socket.socket) -> None:
        self.conn: socket.socket = sock
        self.first: bytes | None = None
        self.wants_read = 0
        self.wants_write = 0

    async def run(self, context: ssl.SSLContext) -> None:
        self.first = await self._peek()
        if not self.first or self.first[0] != 0x16:
            return  # the classifier decides from the bytes alone
        tls = context.wrap_socket(self.conn, server_side=True, do_handshake_on_connect=False)
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

    async def _peek(self) -> bytes:
        while True:
            try:
                return self.conn.recv(PEEK_BYTES, socket.MSG_PEEK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.conn)
