"""The TLS handshake loop, driven by OpenSSL's want-read / want-write signals.

Theory of operation
-------------------

OpenSSL's `SSL_do_handshake(3)` on a non-blocking socket does as much of the
handshake as the socket allows and then returns early: `SSL_ERROR_WANT_READ`
when it needs bytes the peer has not sent yet, `SSL_ERROR_WANT_WRITE` when the
kernel's send buffer is full. The caller is expected to wait until the socket
is readable (or writable) and call it again with nothing changed; OpenSSL keeps
all the handshake state in between. Python surfaces the same contract:
`do_handshake()` raises `ssl.SSLWantReadError` / `ssl.SSLWantWriteError`,
on an `SSLSocket` and on an `SSLObject` over memory BIOs alike.

This module is that loop, in the open, over the memory-BIO connection of
`proxy.tlsio` (which says why the bytes go through our hands). OpenSSL's
contract is the same on both sides of a handshake, so one loop drives both:
the server side for a client we accepted, the client side for an upstream
we dialled (`[listeners.upstream_tls]`). Only how it starts differs:

    server side (run_handshake)          client side (run_client_handshake)
    read the ClientHello (first          wrap a TLSConn in connect state;
      bytes, JA4) before OpenSSL           do_handshake() writes our hello;
      exists;                              flush it (want-write), then read
    wrap it in a TLSConn, the hello        the server's first bytes (a
      already fed                          want-read) and look at them
                                           before OpenSSL does
    then the same loop:
        do_handshake()            -> done: flush the last flight
        SSLWantReadError          -> flush our flight (count each wait for
                                     writability: want-write), then read
                                     the socket (count the wait for
                                     readability: want-read), again
    all of it under handshake_timeout (for the client side, counted from
    the backend connect's completion)

Each wait is a Trio checkpoint, so the deadline (a cancel scope owned here,
the only code that knows the policy) interrupts any of them. A full TLS 1.3
handshake typically costs one want-read: the ClientHello is already in hand
when OpenSSL starts, it writes the whole server flight at once, then must
wait for the client's Finished. When a handshake fails, OpenSSL has put an
alert in the outgoing buffer; it is sent before the socket closes, so the
client learns why.

Looking at the first bytes before OpenSSL does matters on both sides. On
the server side, a plain `GET / HTTP/1.1` on the TLS port would otherwise
surface as OpenSSL's "wrong version number"; looking at the record type
byte first lets us say `not_tls`. The whole hello (reassembled across TCP segments and TLS
records by `proxy.clienthello`, bounded by `MAX_HELLO_STREAM` and the
deadline) gives the JA4 fingerprint for the access log and the ALPN policy
in `proxy.tls`; the bytes are then handed to OpenSSL unchanged. A hello we
cannot parse is OpenSSL's to judge: a fingerprint is best effort and never
fails a handshake.

On the client side the server's first byte must be a handshake or an
alert record: anything else (an HTTP server's `HTTP/1.1 400`) is `not_tls`,
and no bytes at all is `server_closed`.

Every way the loop can end, including the deadline, is classified into
exactly one outcome by the pure functions in `proxy.outcome`: an `Outcome`
for the server side (`outcome.ingress`), an `UpstreamOutcome` for the client
side (`outcome.upstream`). The side's verdict function is the only other
difference between the two.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from proxy import clienthello, unraisable
from proxy.buffers import BufferPool
from proxy.clienthello import ALERT_RECORD, HANDSHAKE_RECORD, RECORD_HEADER
from proxy.outcome import Outcome, UpstreamOutcome, classify, classify_upstream
from proxy.tls import HandshakeNotes, attach_notes
from proxy.tlsio import Engine, TLSConn

OutcomeT = TypeVar("OutcomeT", Outcome, UpstreamOutcome)


@dataclass(slots=True)
class HandshakeResult(Generic[OutcomeT]):
    """What the loop learned; the caller owns `sock` (and `tls`) and must close it."""

    outcome: OutcomeT
    sock: socket.socket
    tls: TLSConn | None  # set once OpenSSL was given the connection
    wants_read: int
    wants_write: int
    seconds: float
    error: BaseException | None
    notes: HandshakeNotes


async def run_handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    timeout: float,  # noqa: ASYNC109 - the deadline firing is itself an outcome
    pool: BufferPool,
    on_cut: Callable[[HandshakeResult[Outcome]], None],
    *,
    early: bytes = b"",
) -> HandshakeResult[Outcome]:
    """Read the hello, then drive the handshake of one accepted socket to an outcome.

    The loop owns its deadline because a timeout is not an error to propagate
    but one of the outcomes to classify and count. A cancellation from
    outside (a drain cutting the connection) does propagate, but the
    handshake still ends in one outcome: `on_cut` gets the result first.
    """
    loop = _Loop(sock, pool, early)
    return await _drive(loop, loop.serve(context), timeout, on_cut, _ingress_verdict)


async def run_client_handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    timeout: float,  # noqa: ASYNC109 - as run_handshake
    pool: BufferPool,
    on_cut: Callable[[HandshakeResult[UpstreamOutcome]], None],
    *,
    server_hostname: str | None,
    session: ssl.SSLSession | None,
) -> HandshakeResult[UpstreamOutcome]:
    """Drive the handshake of a dialled upstream to an upstream outcome: the
    same loop, started by OpenSSL writing our ClientHello."""
    loop = _Loop(sock, pool, b"")
    steps = loop.originate(context, server_hostname, session)
    return await _drive(loop, steps, timeout, on_cut, _upstream_verdict)


# How a side turns the loop's evidence into its outcome: (loop, error,
# timed_out, cut) -> outcome. `cut`: cancelled from outside.
Verdict = Callable[["_Loop", BaseException | None, bool, bool], OutcomeT]


async def _drive(
    loop: _Loop,
    steps: Coroutine[Any, Any, None],
    timeout: float,  # noqa: ASYNC109 - the deadline is the loop's own
    on_cut: Callable[[HandshakeResult[OutcomeT]], None],
    verdict: Verdict[OutcomeT],
) -> HandshakeResult[OutcomeT]:
    start = trio.current_time()
    error: BaseException | None = None

    def result(outcome: OutcomeT) -> HandshakeResult[OutcomeT]:
        return HandshakeResult(
            outcome=outcome,
            sock=loop.sock,
            tls=loop.tls,
            wants_read=loop.wants_read,
            wants_write=loop.wants_write,
            seconds=trio.current_time() - start,
            error=error,
            notes=loop.notes,
        )

    with trio.move_on_after(timeout) as deadline, unraisable.Stray() as stray:
        try:
            await steps
        except Exception as exc:
            error = exc
            if loop.tls is not None:
                loop.tls.flush_nowait()  # OpenSSL's alert: the peer learns why
        except BaseException:
            loop.sock.close()  # cancelled from outside: nobody else will close it
            if not deadline.cancel_called:  # not our timeout: cut from outside
                on_cut(result(verdict(loop, None, False, True)))
            raise
    if error is not None and stray.error is not None:
        # An OpenSSL callback failed inside CPython (a non-ASCII SNI): the
        # stray exception, not OpenSSL's "callback failed", says why.
        refused, error = unraisable.explain(stray)
        loop.notes.refused = loop.notes.refused or refused
        if isinstance(error, unraisable.ServerNameNotASCII):
            loop.notes.sni = error.name.decode("ascii", "backslashreplace")
    return result(verdict(loop, error, deadline.cancelled_caught, False))


def _ingress_verdict(
    loop: _Loop, error: BaseException | None, timed_out: bool, cut: bool
) -> Outcome:
    if cut:
        # Had the client's EOF reached OpenSSL? (It ends the loop before the
        # next wait, so in practice a cut is a timeout.)
        return cut_outcome(loop.tls is not None and loop.tls.incoming.eof)
    return classify(first=loop.first, error=error, timed_out=timed_out, refused=loop.notes.refused)


def _upstream_verdict(
    loop: _Loop, error: BaseException | None, timed_out: bool, cut: bool
) -> UpstreamOutcome:
    if cut:
        saw_eof = loop.tls is not None and loop.tls.incoming.eof
        return UpstreamOutcome.SERVER_CLOSED if saw_eof else UpstreamOutcome.TIMEOUT
    return classify_upstream(first=loop.first, error=error, timed_out=timed_out)


Negotiated = tuple[str, str, str, bool]

# Every (version, cipher, alpn, resumed) seen, so that connections share
# one tuple instead of each keeping its own four objects (about 200 bytes
# a connection, for its access line). Bounded: the versions, ciphers and
# ALPN names a listener's policy allows.
_NEGOTIATED: dict[Negotiated, Negotiated] = {}


def negotiated(engine: Engine) -> Negotiated:
    """(version, cipher, alpn, resumed) of a completed handshake, as the
    metrics' labels and the access line spell them."""
    cipher = engine.cipher()
    values = (
        engine.version() or "unknown",
        cipher[0] if cipher else "unknown",
        engine.selected_alpn_protocol() or "none",
        bool(engine.session_reused),
    )
    return _NEGOTIATED.setdefault(values, values)


def cut_outcome(saw_eof: bool) -> Outcome:
    """A handshake cut from outside: the client had gone, or had not finished in time."""
    return Outcome.CLIENT_CLOSED if saw_eof else Outcome.TIMEOUT


# What a server may answer a ClientHello with: its hello, or an alert.
TLS_RECORD_TYPES = frozenset({HANDSHAKE_RECORD, ALERT_RECORD})


class _Loop:
    """The state of one handshake, kept so a deadline can still report it."""

    __slots__ = (
        "drained_socket",
        "early",
        "first",
        "notes",
        "owner",
        "pool",
        "sock",
        "tls",
        "wants_read",
        "wants_write",
    )

    def __init__(self, sock: socket.socket, pool: BufferPool, early: bytes) -> None:
        self.sock = sock
        self.early = early  # read with a PROXY header: the client's first bytes
        self.pool = pool
        self.tls: TLSConn | None = None
        # While the handshake runs: OpenSSL's SNI callback finds it through a
        # weak reference; the connection keeps only `tls.engine` (tlsio.Engine).
        self.owner: ssl.SSLObject | None = None
        self.first: bytes | None = None
        self.notes = HandshakeNotes()
        self.wants_read = 0
        self.wants_write = 0
        self.drained_socket = False  # nothing read yet: the hello may be in already

    async def serve(self, context: ssl.SSLContext) -> None:
        """The server side: the hello first, then OpenSSL."""
        hello = await self._read_hello()
        self.first = hello[:RECORD_HEADER]
        if not hello or hello[0] != HANDSHAKE_RECORD:
            return  # the classifier decides from the bytes alone
        tls, self.owner = TLSConn.server(self.sock, context, self.pool, hello)
        self.tls = tls
        attach_notes(self.owner, self.notes)
        await self._handshake(tls)

    async def originate(
        self,
        context: ssl.SSLContext,
        server_hostname: str | None,
        session: ssl.SSLSession | None,
    ) -> None:
        """The client side: OpenSSL writes our hello, the server's first
        bytes are looked at before OpenSSL judges them, then the same loop."""
        tls, self.owner = TLSConn.client(self.sock, context, self.pool, server_hostname, session)
        self.tls = tls
        with contextlib.suppress(ssl.SSLWantReadError):  # our ClientHello is in `outgoing`
            tls.engine.do_handshake()
        self.wants_write += await tls.flush()
        self.drained_socket = True  # nothing sent before our hello: wait first
        self.wants_read += 1  # counted before the wait: a timeout or reset ends it
        first = await self._recv()
        self.first = first[:RECORD_HEADER]
        if first and first[0] not in TLS_RECORD_TYPES:
            return  # not_tls, from the bytes alone
        if first:
            tls.incoming.write(first)
        else:  # EOF at once: OpenSSL's EOF error says server_closed, as for one later
            tls.incoming.write_eof()
        tls.drained_socket = self.drained_socket
        await self._handshake(tls)

    async def _handshake(self, tls: TLSConn) -> None:
        """The loop both sides share, once OpenSSL has the first bytes."""
        while True:
            try:
                tls.engine.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass  # waited for below, not holding the exception meanwhile
            self.wants_write += await tls.flush()
            if await tls.fill():
                self.wants_read += 1
        self.wants_write += await tls.flush()

    async def _read_hello(self) -> bytes:
        """The client's first bytes: a whole ClientHello if it sends one,
        else whatever arrived before it stopped making sense (or EOF).

        Every byte read is returned, for OpenSSL to get unchanged; each chunk
        goes to the reassembler once, so however finely the client cuts its
        hello (records, segments) the work stays linear in its size.
        """
        reader = clienthello.Reassembler()
        data = bytearray()
        pending, self.early = self.early, b""
        while chunk := pending or await self._recv():
            pending = b""
            data += chunk
            progress = reader.feed(chunk)
            if progress is clienthello.DONE:
                self.notes.hello = clienthello.parse(reader.message)
            if progress is not clienthello.NEED_MORE:
                break
        return bytes(data)

    async def _recv(self) -> bytes:
        """The next bytes from the client, b"" at EOF.

        After a short read the socket was empty: the next read waits for
        readability first instead of spending a system call on EAGAIN, one
        per segment for a hello that arrives in many small ones.
        """
        while True:
            if self.drained_socket:
                await trio.lowlevel.wait_readable(self.sock)
            try:
                chunk = self.sock.recv(clienthello.MAX_HELLO_STREAM)
            except BlockingIOError:
                self.drained_socket = True
                continue
            self.drained_socket = len(chunk) < clienthello.MAX_HELLO_STREAM
            return chunk
