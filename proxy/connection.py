"""One client connection from accept to close: handshake, backend, splice, log.

The steps, each optional by the listener's kind:

    PROXY header from a load balancer   (accept_proxy_protocol)
    TLS handshake with the client       ([listeners.tls]: terminate)
    connect the backend                 (PROXY header to it, if configured)
    TLS handshake with the upstream     ([listeners.upstream_tls]: originate)
    splice the two ends                 (plain or TLS, either side)

Each step's outcome is recorded exactly once: the handshake outcome on
`handshakes_total`, a backend failure on `backend_connect_failures_total`,
the upstream handshake's on `upstream_handshakes_total` (proxy.upstream),
and one access-log line when the connection ends, whatever ended it.

When the way to the backend fails (connect or upstream handshake), the
client learns nothing more than that: a TLS client gets close_notify; a
plaintext client gets a reset, as stunnel does by default (its `reset =
yes`), so that an application cannot take the close for a complete, empty
answer, as it could a FIN.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import trio

from proxy import accept_proxy, backend, membio, openssl
from proxy.buffers import BufferPool
from proxy.config import Address, format_sockaddr
from proxy.ends import BACKEND, CLIENT, CloseReason, End, Gone, PlainEnd, TLSEnd
from proxy.handshake import HandshakeResult, Negotiated, negotiated, run_handshake
from proxy.identity import Identity
from proxy.ja4 import ja4
from proxy.outcome import NOT_ALLOWED, Outcome, client_cert_reason
from proxy.parking import IdleWatch, ParkingLot
from proxy.runtime import ListenerRuntime
from proxy.splice import Splice
from proxy.tlsio import TLSConn
from proxy.upstream import Upstream

# SO_LINGER on, zero seconds: close() sends a reset instead of a FIN.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)


@dataclass
class ListenerState:
    """A bound listener: its current runtime and how many connections it holds."""

    runtime: ListenerRuntime
    active: int = 0


class ConnectionSet:
    """Every live connection, running (its cancel scope) or parked (in the
    lot), so that a drain can wait for or cut them; and what they share:
    receive buffers, the idle watch and the parking lot."""

    def __init__(self) -> None:
        self.buffers = BufferPool()
        self.lot: ParkingLot[_Connection] = ParkingLot(_resume, _close_parked)
        self.memory = membio.Releaser()  # what parked connections' TLS buffers gave back
        self.idle = IdleWatch(self.lot, self.memory)
        self.live: set[trio.CancelScope] = set()
        self.cutting = False
        self._idle = trio.Event()

    def __len__(self) -> int:
        return len(self.live) + len(self.lot)

    def add(self, scope: trio.CancelScope) -> None:
        self.live.add(scope)

    def discard(self, scope: trio.CancelScope) -> None:
        self.live.discard(scope)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.live and not self.lot:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no connection is live."""
        while self.live or self.lot:
            self._idle = trio.Event()
            await self._idle.wait()

    def cut(self) -> None:
        """End every live connection; each logs close_reason=drain."""
        self.cutting = True
        for scope in self.live:
            scope.cancel()
        self.lot.close_all(CloseReason.DRAIN)
        self._check_idle()


def handle_connection(
    sock: socket.socket, peer: Any, listener: ListenerState, connections: ConnectionSet
) -> Coroutine[Any, Any, None]:
    """The task that serves one accepted socket: never raises, always
    closes, always logs. (The connection's own coroutine, not one awaiting
    it: every frame of a task's chain runs again at each of its wake-ups.)"""
    conn = _Connection(sock, peer, listener, connections)
    return conn.own(conn.serve)


def _resume(conn: _Connection) -> Coroutine[Any, Any, None]:
    """A parked connection's task again, started by the lot when one of its
    sockets became readable."""
    return conn.own(conn.resume, parked=True)


def _close_parked(conn: _Connection, reason: CloseReason) -> None:
    """The lot ends a connection it owns: an idle timeout or a drain."""
    assert conn.splice is not None
    conn.splice.ended(reason)
    conn.end(drained=reason is CloseReason.DRAIN)


class _Connection:
    """The sockets of one connection and what its access-log line will say.

    The log fields are kept as attributes and turned into a dict only when
    the line is written: a dict of twenty entries per idle connection would
    cost more than the attributes.
    """

    __slots__ = (
        "allow_rules",
        "backend",
        "backend_address",
        "client",
        "client_cert",
        "close_reason",
        "identity",
        "ja4",
        "listener",
        "negotiated",
        "peer",
        "result",
        "runtime",
        "shared",
        "shown_peer",
        "splice",
        "start",
        "tls",
        "upstream",
    )

    def __init__(
        self, sock: socket.socket, peer: Any, listener: ListenerState, shared: ConnectionSet
    ) -> None:
        self.listener = listener
        self.runtime = runtime = listener.runtime
        self.shared = shared
        self.start = trio.current_time()
        self.client = sock
        self.peer = peer  # kept for the PROXY header: getpeername() fails after a reset
        self.shown_peer: str | None = None  # its text, once only the access line needs it
        self.result: HandshakeResult[Outcome] | None = None
        self.ja4: str | None = None
        self.negotiated: Negotiated | None = None
        self.client_cert: dict[str, Any] | None = None
        self.identity: Identity | None = None  # the verified client certificate's, read once
        self.allow_rules: str | None = None  # the allow table that judged it
        self.tls: TLSConn | None = None  # set once the handshake succeeded
        self.backend_address: Address | None = None
        self.backend: socket.socket | None = None
        self.splice: Splice | None = None
        self.upstream: Upstream | None = None
        self.close_reason: str | None = None
        runtime.metrics.accepted.inc()
        runtime.metrics.active.inc()

    async def own(
        self, body: Callable[[trio.Nursery], Awaitable[None]], *, parked: bool = False
    ) -> None:
        """Run `body` as the connection's task, then close the connection or,
        if it parked, hand it to the lot (see proxy.parking); never raises.
        `parked`: the lot woke it, and still owns it until it is taken.

        The connection's one nursery is also its cancel scope: a drain cuts
        it, and the splice's second direction runs in it (one scope and one
        nursery per connection, not one each for the connection and the
        splice: a running connection's memory is mostly such objects).
        """
        shared = self.shared
        if parked and not shared.lot.take(self):
            return  # the lot closed it between the wake-up and now
        scope: trio.CancelScope | None = None
        try:
            # Taken from the lot and added to the live set with no checkpoint
            # between (entering a nursery is none): never neither.
            async with trio.open_nursery() as nursery:
                scope = nursery.cancel_scope
                shared.add(scope)
                await body(nursery)
        except Exception:
            self.runtime.metrics.internal_errors.inc()
            self.runtime.log.exception(
                "connection failed unexpectedly; please report this", **self.fields()
            )
            self.close_reason = "internal_error"
        finally:
            splice = self.splice
            parking = splice is not None and splice.parking and self.close_reason is None
            if scope is None:
                self.end(drained=False)
            elif parking and not scope.cancel_called and self._park(splice):
                shared.discard(scope)  # after the lot took it: never neither
            else:
                shared.discard(scope)
                # cut by a drain: in a wait, or on its way to the lot
                self.end(drained=shared.cutting and (scope.cancelled_caught or parking))

    def _park(self, splice: Splice | None) -> bool:
        """Hand the connection to the lot; False if the kernel refused (it
        is closed as any other then, and the process serves on)."""
        assert splice is not None
        try:
            self.shared.lot.park(self, splice)
        except (OSError, ValueError) as exc:
            self.runtime.metrics.internal_errors.inc()
            self.close_reason = "internal_error"
            self.runtime.log.error(
                "could not park an idle connection; closed it; please report this",
                **self.fields(),
                error=str(exc),
            )
            return False
        splice.scope = None  # the ended nursery's: not kept while parked
        splice.release_buffers(self.shared.memory)
        return True

    def end(self, *, drained: bool) -> None:
        self.listener.active -= 1  # taken by the accept loop, before the task started
        self.close(drained=drained)

    async def resume(self, nursery: trio.Nursery) -> None:
        """The woken connection's copying, from where it parked."""
        splice = self.splice
        assert splice is not None
        splice.resume()
        self.shared.idle.watch(splice)
        await splice.run(nursery)

    async def serve(self, nursery: trio.Nursery) -> None:
        runtime = self.runtime
        lm = runtime.metrics
        timeout, early = runtime.config.handshake_timeout, b""
        if runtime.config.accept_proxy_protocol != "off":
            start = trio.current_time()
            try:
                header, early = await accept_proxy.read_header(
                    self.client, runtime.config.accept_proxy_protocol, timeout
                )
            except accept_proxy.HeaderRefused as exc:
                lm.rejected("proxy_header")
                self.close_reason = "proxy_header"
                runtime.log.warning(
                    "PROXY header refused; connection closed", **self.fields(), error=str(exc)
                )
                return
            if header.source is not None:  # else LOCAL: the balancer's own connection
                self.peer = header.source
            timeout -= trio.current_time() - start
        client = (
            PlainEnd(self.client, CLIENT, self.shared.buffers, speaks_first=True)
            if runtime.context is None
            else await self._terminate(runtime.context, timeout, early)
        )
        if client is None:
            return
        self.backend = await self._connect_backend()
        if self.backend is None:
            return
        backend_end = await self._originate(self.backend)
        if backend_end is None:
            return
        self.splice = Splice(client, backend_end, runtime.config.idle_timeout, lm)
        if early and runtime.context is None:  # else the TLS handshake had them
            try:
                await self.splice.prime(early)
            except Gone:
                return
        # From here on the client's address is only shown: kept as its text,
        # about 80 bytes less than the address tuple while the connection idles
        self.shown_peer, self.peer = format_sockaddr(self.peer), None
        if self.splice.quiet():
            self.splice.parking = True  # parked from the start: no pump task yet
            return
        self.shared.idle.watch(self.splice)
        await self.splice.run(nursery)

    async def _terminate(
        self,
        context: ssl.SSLContext,
        timeout: float,  # noqa: ASYNC109 - the handshake's own deadline
        early: bytes,
    ) -> TLSEnd | None:
        """The client's handshake: its end once it succeeded and was admitted."""
        lm = self.runtime.metrics
        lm.in_progress.inc()
        try:
            result = await run_handshake(
                self.client,
                context,
                timeout,
                self.shared.buffers,
                self._record_handshake,
                early=early,
            )
        finally:
            lm.in_progress.dec()
        if result.outcome is Outcome.SUCCESS and result.tls is not None:
            self._authorize(result, result.tls)
        self._record_handshake(result)
        if result.outcome is Outcome.CLIENT_CERT_DENIED:
            self.tls = result.tls  # closed with close_notify, the backend never connected
            return None
        if result.outcome is not Outcome.SUCCESS or result.tls is None:
            return None
        self.tls = result.tls
        return TLSEnd(self.tls, CLIENT, self.shared.buffers)

    async def _originate(self, sock: socket.socket) -> End | None:
        """The backend's end: TLS once the upstream handshake succeeded, or plain."""
        runtime = self.runtime
        if runtime.upstream is None:
            return PlainEnd(sock, BACKEND, self.shared.buffers, speaks_first=False)
        assert self.backend_address is not None
        upstream = self.upstream = Upstream(runtime.upstream, self.backend_address, self.sni)
        return await upstream.handshake(sock, runtime.config.handshake_timeout, self.shared.buffers)

    def close(self, *, drained: bool) -> None:
        splice = self.splice
        upstream = self.upstream
        if upstream is not None:
            upstream.finish()
            if upstream.failed and self.close_reason is None:
                assert upstream.result is not None
                self.close_reason = f"upstream_{upstream.result.outcome.value}"
        if splice is not None:
            self.shared.idle.forget(splice)
            splice.report_bytes(trio.current_time())
            if self.close_reason is None and splice.close_reason is not None:
                self.close_reason = splice.close_reason.value
        if drained:
            self.close_reason = CloseReason.DRAIN.value
        if self.tls is not None and self.close_reason != CloseReason.CLIENT_RESET.value:
            self.tls.queue_close_notify()
            self.tls.flush_nowait()
        elif self.runtime.context is None and self._backend_failed():
            with contextlib.suppress(OSError):
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        self.client.close()
        if upstream is not None and self.close_reason != CloseReason.BACKEND_RESET.value:
            upstream.close_notify()
        if self.backend is not None:
            self.backend.close()
        self.runtime.metrics.active.dec()
        if self.runtime.access is not None:
            self.runtime.access(self.fields())

    @property
    def sni(self) -> str | None:
        """The name the client's hello asked for (None without TLS or SNI),
        from the handshake's notes: the connection keeps no `SSLObject`."""
        return None if self.result is None else self.result.notes.sni

    def _backend_failed(self) -> bool:
        """The way to the backend failed before the client got a byte: the
        connect, or the upstream's handshake (at once, or on its first read)."""
        if self.backend is None:
            return self.backend_address is not None
        return self.upstream is not None and self.upstream.failed

    def fields(self) -> dict[str, Any]:
        """The access-log line's fields, as far as the connection got."""
        fields: dict[str, Any] = {
            "listener": self.runtime.metrics.name,
            "client": self.shown_peer or format_sockaddr(self.peer),
        }
        result = self.result
        if result is not None:
            fields.update(_handshake_fields(result))
            if self.ja4 is not None:
                fields["ja4"] = self.ja4
            if self.negotiated is not None:
                version, cipher, alpn, resumed = self.negotiated
                fields.update(tls_version=version, cipher=cipher, alpn=alpn, resumed=resumed)
            if self.client_cert is not None:
                fields.update(self.client_cert)
            if self.allow_rules is not None:
                fields["allow_rules"] = self.allow_rules
                if result.outcome is Outcome.CLIENT_CERT_DENIED:
                    fields["client_cert_error"] = NOT_ALLOWED
        if self.backend_address is not None:
            fields["backend"] = str(self.backend_address)
        if self.upstream is not None:
            fields.update(self.upstream.fields())
        if self.close_reason is not None:
            fields["close_reason"] = self.close_reason
        if self.splice is not None:
            fields["bytes_to_backend"] = self.splice.bytes_to_backend
            fields["bytes_to_client"] = self.splice.bytes_to_client
        fields["duration_ms"] = round((trio.current_time() - self.start) * 1000, 3)
        return fields

    def _authorize(self, result: HandshakeResult[Outcome], tls: TLSConn) -> None:
        """The allow table's decision: after the chain verified, before the
        backend is connected. A denial turns the handshake's outcome into
        client_cert_denied before it is counted, so it is counted once."""
        runtime = self.runtime
        if not runtime.needs_identity:
            return
        cert = tls.engine.getpeercert()
        self.identity = Identity.from_peercert(cert) if cert else None
        rules = runtime.allow_for(result.notes.sni)
        if rules is None:
            return
        self.allow_rules, allow = rules
        if self.identity is None or not allow.admits(self.identity):
            result.outcome = Outcome.CLIENT_CERT_DENIED

    def _record_handshake(self, result: HandshakeResult[Outcome]) -> None:
        """Count the handshake's outcome and keep what the access line says;
        also called for a handshake cut by a drain, before the cancellation
        ends the connection."""
        self.result = result
        runtime = self.runtime
        lm = runtime.metrics
        lm.outcomes[result.outcome].inc()
        if result.wants_read:
            lm.wants_read.inc(result.wants_read)
        if result.wants_write:
            lm.wants_write.inc(result.wants_write)
        ok = result.outcome is Outcome.SUCCESS
        (lm.handshake_ok if ok else lm.handshake_failed).observe(result.seconds)
        completed = ok or result.outcome is Outcome.CLIENT_CERT_DENIED
        notes = result.notes
        if notes.hello is not None and runtime.access_log:
            self.ja4 = ja4(notes.hello)
        tls_config = runtime.config.tls
        if (
            result.outcome is Outcome.NO_SHARED_CIPHER
            and tls_config is not None
            and openssl.shares_no_group(notes.hello, tls_config.groups, result.error)
        ):
            notes.no_shared = "group"
        notes.hello = None  # the notes live as long as the connection; the hello need not
        if completed and result.tls is not None:
            self.negotiated = negotiated(result.tls.engine)
            if ok:
                lm.negotiated(*self.negotiated)
            tls = runtime.config.tls
            if tls is not None and tls.client_auth != "none" and runtime.access_log:
                self.client_cert = _client_cert_fields(self.identity)
        elif result.outcome is Outcome.INTERNAL_ERROR:
            runtime.log.error(
                "handshake failed unexpectedly; please report this",
                exc_info=result.error,
                **self.fields(),
            )

    async def _connect_backend(self) -> socket.socket | None:
        runtime = self.runtime
        sni = self.sni
        address = self.backend_address = runtime.backend_for(sni)
        lm = runtime.metrics
        version = runtime.config.proxy_protocol
        preamble = (
            b""
            if version == "off"
            else backend.proxy_header(
                version, self.client, self.tls, self.peer, identity=self.identity, sni=sni
            )
        )
        start = trio.current_time()
        try:
            sock = await backend.connect(address, runtime.config.connect_timeout, preamble)
        except backend.BackendConnectError as exc:
            lm.connect_failed(exc.reason)
            self.close_reason = f"backend_{exc.reason}"
            runtime.log.warning(
                exc.event,
                backend=str(address),
                reason=exc.reason,
                detail=exc.detail,
            )
            return None
        lm.connect_duration.observe(trio.current_time() - start)
        return sock


def _handshake_fields(result: HandshakeResult[Outcome]) -> dict[str, Any]:
    notes = result.notes
    fields: dict[str, Any] = {
        "outcome": result.outcome.value,
        "handshake_ms": round(result.seconds * 1000, 3),
        "wants_read": result.wants_read,
        "wants_write": result.wants_write,
        "sni": notes.sni,
        "sni_match": notes.sni_match,
    }
    if notes.no_shared is not None:
        fields["no_shared"] = notes.no_shared
    if result.outcome is not Outcome.SUCCESS and result.error is not None:
        fields["error"] = str(result.error)
        if result.outcome is Outcome.CLIENT_CERT_INVALID:
            fields["client_cert_error"] = client_cert_reason(result.error)
    return fields


def _client_cert_fields(identity: Identity | None) -> dict[str, Any]:
    """The verified client certificate's subject and SAN DNS names and URIs."""
    if identity is None:
        return {"client_subject": None}
    return {
        "client_subject": identity.subject,
        "client_san_dns": list(identity.dns),
        "client_san_uri": list(identity.uris),
    }
