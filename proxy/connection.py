"""One client connection from accept to close: handshake, backend, splice, log.

Each step's outcome is recorded exactly once: the handshake outcome on
`handshakes_total`, a backend failure on `backend_connect_failures_total`,
and one access-log line when the connection ends, whatever ended it.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy import backend
from proxy.buffers import BufferPool
from proxy.config import Address, ListenerConfig
from proxy.handshake import HandshakeResult, run_handshake
from proxy.ja4 import ja4
from proxy.log import Logger
from proxy.metrics import ListenerMetrics
from proxy.outcome import Outcome, client_cert_reason
from proxy.sni import NameTable
from proxy.splice import CloseReason, IdleWatch, Splice
from proxy.tls import server_name
from proxy.tlsio import TLSConn


@dataclass
class ListenerRuntime:
    """What a connection needs from its listener, swapped as a whole on reload."""

    config: ListenerConfig
    context: ssl.SSLContext
    metrics: ListenerMetrics
    log: Logger
    access_log: bool
    # [[listeners.routes]]: backend by SNI, built once from the config
    routes: NameTable[Address] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.routes = NameTable((route.sni, route.backend) for route in self.config.routes)

    def backend_for(self, sni: str | None) -> Address:
        """The route matching the SNI (exact before wildcard), else the listener's."""
        found = self.routes.lookup(sni) if self.routes else None
        return self.config.backend if found is None else found[1]


@dataclass
class ListenerState:
    """A bound listener: its current runtime and how many connections it holds."""

    runtime: ListenerRuntime
    active: int = 0


class ConnectionSet:
    """Every live connection's cancel scope, so a drain can wait for or cut them,
    and the receive buffers they share."""

    def __init__(self) -> None:
        self.buffers = BufferPool()
        self.idle = IdleWatch()
        self.live: set[trio.CancelScope] = set()
        self.cutting = False
        self._idle = trio.Event()

    def add(self, scope: trio.CancelScope) -> None:
        self.live.add(scope)

    def discard(self, scope: trio.CancelScope) -> None:
        self.live.discard(scope)
        if not self.live:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no connection is live."""
        if self.live:
            self._idle = trio.Event()
            await self._idle.wait()

    def cut(self) -> None:
        """Cancel every live connection; each logs close_reason=drain."""
        self.cutting = True
        for scope in self.live:
            scope.cancel()


async def handle_connection(
    sock: socket.socket, peer: Any, listener: ListenerState, connections: ConnectionSet
) -> None:
    """Serve one accepted socket; never raises, always closes, always logs."""
    conn = _Connection(sock, peer, listener.runtime, connections)
    scope = trio.CancelScope()
    connections.add(scope)
    try:
        with scope:
            await conn.serve()
    except Exception:
        conn.runtime.log.exception(
            "connection failed unexpectedly; please report this", **conn.fields
        )
        conn.fields["close_reason"] = "internal_error"
    finally:
        connections.discard(scope)
        listener.active -= 1  # taken by the accept loop, before this task started
        conn.close(drained=scope.cancelled_caught and connections.cutting)


class _Connection:
    """The sockets and access-log fields of one connection."""

    def __init__(
        self, sock: socket.socket, peer: Any, runtime: ListenerRuntime, shared: ConnectionSet
    ) -> None:
        self.runtime = runtime
        self.buffers = shared.buffers
        self.idle = shared.idle
        self.start = trio.current_time()
        self.fields: dict[str, Any] = {
            "listener": runtime.metrics.name,
            "client": _format_peer(peer),
        }
        self.client = sock
        self.peer = peer  # kept for the PROXY header: getpeername() fails after a reset
        self.tls: TLSConn | None = None  # set once the handshake succeeded
        self.backend: socket.socket | None = None
        runtime.metrics.accepted.inc()
        runtime.metrics.active.inc()

    async def serve(self) -> None:
        runtime = self.runtime
        lm = runtime.metrics
        lm.in_progress.inc()
        try:
            result = await run_handshake(
                self.client, runtime.context, runtime.config.handshake_timeout, self.buffers
            )
        finally:
            lm.in_progress.dec()
        _record_handshake(result, runtime, self.fields)
        if result.outcome is not Outcome.SUCCESS or result.tls is None:
            return
        self.tls = result.tls
        self.backend = await _connect_backend(runtime, self.fields, self.tls, self.peer)
        if self.backend is None:
            return
        splice = Splice(self.tls, self.backend, runtime.config.idle_timeout, lm, self.buffers)
        try:
            self.fields["close_reason"] = (await splice.run(self.idle)).value
        finally:
            self.fields["bytes_to_backend"] = splice.bytes_to_backend
            self.fields["bytes_to_client"] = splice.bytes_to_client

    def close(self, *, drained: bool) -> None:
        fields = self.fields
        if drained:
            fields["close_reason"] = CloseReason.DRAIN.value
        if self.tls is not None and fields.get("close_reason") != CloseReason.CLIENT_RESET.value:
            self.tls.queue_close_notify()
            self.tls.flush_nowait()
        self.client.close()
        if self.backend is not None:
            self.backend.close()
        self.runtime.metrics.active.dec()
        if self.runtime.access_log:
            fields["duration_ms"] = round((trio.current_time() - self.start) * 1000, 3)
            self.runtime.log.info("connection", **fields)


def _record_handshake(
    result: HandshakeResult, runtime: ListenerRuntime, fields: dict[str, Any]
) -> None:
    lm = runtime.metrics
    lm.outcomes[result.outcome].inc()
    if result.wants_read:
        lm.wants_read.inc(result.wants_read)
    if result.wants_write:
        lm.wants_write.inc(result.wants_write)
    ok = result.outcome is Outcome.SUCCESS
    (lm.handshake_ok if ok else lm.handshake_failed).observe(result.seconds)
    fields["outcome"] = result.outcome.value
    fields["handshake_ms"] = round(result.seconds * 1000, 3)
    fields["wants_read"] = result.wants_read
    fields["wants_write"] = result.wants_write
    notes = result.notes
    fields["sni"] = notes.sni
    fields["sni_match"] = notes.sni_match
    if notes.hello is not None and runtime.access_log:
        fields["ja4"] = ja4(notes.hello)
    notes.hello = None  # the notes live as long as the connection; the hello need not
    if ok and result.tls is not None:
        tls = result.tls.obj
        version = tls.version() or "unknown"
        cipher = (tls.cipher() or ("unknown",))[0]
        alpn = tls.selected_alpn_protocol() or "none"
        resumed = bool(tls.session_reused)
        lm.negotiated(version, cipher, alpn, resumed)
        fields.update(tls_version=version, cipher=cipher, alpn=alpn, resumed=resumed)
        if runtime.config.tls.client_auth != "none":
            _record_client_cert(tls, fields)
    elif result.outcome is Outcome.INTERNAL_ERROR:
        runtime.log.error(
            "handshake failed unexpectedly; please report this",
            exc_info=result.error,
            **fields,
        )
    elif result.error is not None:
        fields["error"] = str(result.error)
        if result.outcome is Outcome.CLIENT_CERT_INVALID:
            fields["client_cert_error"] = client_cert_reason(result.error)


# getpeercert() spells attribute names out; RFC 4514 (and the certificate
# expiry metric's subject label) use the short forms.
_RDN_KEYS = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _record_client_cert(tls: ssl.SSLObject, fields: dict[str, Any]) -> None:
    """The verified client certificate's subject and SAN DNS names and URIs."""
    cert = tls.getpeercert()
    if not cert:
        fields["client_subject"] = None
        return
    rdns: Any = cert.get("subject", ())
    sans: Any = cert.get("subjectAltName", ())
    fields["client_subject"] = ",".join(
        f"{_RDN_KEYS.get(key, key)}={value}" for rdn in reversed(rdns) for key, value in rdn
    )
    fields["client_san_dns"] = [value for kind, value in sans if kind == "DNS"]
    fields["client_san_uri"] = [value for kind, value in sans if kind == "URI"]


async def _connect_backend(
    runtime: ListenerRuntime, fields: dict[str, Any], tls: TLSConn, peer: Any
) -> socket.socket | None:
    address = runtime.backend_for(server_name(tls.obj))
    fields["backend"] = str(address)
    lm = runtime.metrics
    version = runtime.config.proxy_protocol
    preamble = b"" if version == "off" else backend.proxy_header(version, tls, peer)
    start = trio.current_time()
    try:
        sock = await backend.connect(address, runtime.config.connect_timeout, preamble)
    except backend.BackendConnectError as exc:
        lm.connect_failed(exc.reason)
        fields["close_reason"] = f"backend_{exc.reason}"
        runtime.log.warning(
            "backend connect failed; is the application listening?",
            backend=str(address),
            reason=exc.reason,
            detail=exc.detail,
        )
        return None
    lm.connect_duration.observe(trio.current_time() - start)
    return sock


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)
