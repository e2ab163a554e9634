"""The TLS a connection originates to its backend: handshake, identity, outcome.

Theory of operation
-------------------

Once the backend socket is connected (and the PROXY header, if any, is
written), `Upstream.handshake` drives the client side of the handshake with
the one loop of `proxy.handshake`, under the listener's
`handshake_timeout`, counted from the connect's completion. Then:

- a failed handshake is counted at once under its upstream outcome;
- with an `allow` table, the upstream's verified identity is judged
  (`server_identity_denied` when no entry admits it);
- a TLS 1.2 success is final at once: the server has judged our client
  certificate inside the handshake;
- a TLS 1.3 success is final only at the first read from the upstream. A
  TLS 1.3 server verifies our certificate after our side of the handshake
  has finished, and a refusal (`certificate_required`, `unknown_ca`,
  `bad_certificate`, ...) arrives as an alert on that read: counted then as
  `client_cert_rejected_by_server`, on the upstream handshake and not as a
  splice error. Plaintext (or a session ticket followed by data, or a clean
  close) makes it `success`. A connection that ends before that read
  (the client gave up, a drain, a write to the upstream that met its reset)
  looks at what the upstream already sent, at its close: its refusal if
  there, else `success`.

Every upstream handshake is counted exactly once, whichever of these ends it.
The session a successful handshake leaves is kept for the next connection
to the same name (`proxy.tls_upstream.Sessions`).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from proxy.buffers import BufferPool
from proxy.config import Address
from proxy.ends import BACKEND, TLSEnd
from proxy.handshake import HandshakeResult, Negotiated, negotiated, run_client_handshake
from proxy.identity import Identity
from proxy.outcome import (
    NOT_ALLOWED,
    UpstreamOutcome,
    classify_first_read_error,
    server_cert_reason,
)
from proxy.runtime import UpstreamRuntime
from proxy.tls_upstream import upstream_name
from proxy.tlsio import TLSConn


class Upstream:
    """One connection's upstream TLS and what its access line says of it."""

    __slots__ = ("identity", "name", "negotiated", "pending", "result", "runtime")

    def __init__(self, runtime: UpstreamRuntime, backend: Address, client_sni: str | None) -> None:
        self.runtime = runtime
        self.name = upstream_name(runtime.config, backend, client_sni)
        self.result: HandshakeResult[UpstreamOutcome] | None = None
        self.identity: Identity | None = None
        # read once the handshake completed: after a ragged or refused end
        # OpenSSL no longer reports the version
        self.negotiated: Negotiated | None = None
        self.pending = False  # a TLS 1.3 success waiting for the first read

    @property
    def failed(self) -> bool:
        return self.result is not None and self.result.outcome is not UpstreamOutcome.SUCCESS

    async def handshake(
        self,
        sock: socket.socket,
        timeout: float,  # noqa: ASYNC109 - the deadline firing is itself an outcome
        pool: BufferPool,
    ) -> TLSEnd | None:
        """The upstream end once its handshake succeeded, else None (counted)."""
        runtime = self.runtime
        result = self.result = await run_client_handshake(
            sock,
            runtime.context,
            timeout,
            pool,
            self._count,
            server_hostname=self.name,
            session=runtime.sessions.get(self.name),
        )
        tls = result.tls
        if result.outcome is UpstreamOutcome.SUCCESS and tls is not None:
            self.negotiated = negotiated(tls.engine)
            if runtime.needs_identity:
                cert = tls.engine.getpeercert()
                self.identity = Identity.from_peercert(cert) if cert else None
            allow = runtime.allow
            if allow is not None and (self.identity is None or not allow.admits(self.identity)):
                result.outcome = UpstreamOutcome.SERVER_IDENTITY_DENIED
        if result.outcome is not UpstreamOutcome.SUCCESS or tls is None:
            self._count(result)
            return None
        if tls.engine.version() == "TLSv1.3":
            self.pending = True
            return TLSEnd(tls, BACKEND, pool, self._first_read)
        self._count(result)
        runtime.sessions.keep(self.name, tls.engine)
        return TLSEnd(tls, BACKEND, pool)

    def _first_read(self, error: BaseException | None) -> None:
        """The TLS 1.3 verdict: the server's first record after our Finished."""
        result = self.result
        assert result is not None and result.tls is not None
        self.pending = False
        refused = None if error is None else classify_first_read_error(error)
        if refused is not None:
            result.outcome = refused
            result.error = error
        else:
            self.runtime.sessions.keep(self.name, result.tls.engine)
        self._count(result)

    def finish(self) -> None:
        """At the connection's close, a TLS 1.3 success still waiting for its
        first read gets its verdict from what the upstream has already sent.
        The other direction can end the connection before this one reads
        (a write to the upstream meets its reset after the refusal, the
        application resets, a drain) with the refusal already in our socket:
        it is still the outcome. Nothing there: a success nobody refused."""
        result = self.result
        if self.pending and result is not None and result.tls is not None:
            self._first_read(_last_look(result.tls))

    def close_notify(self) -> None:
        """Best effort at the connection's close: a completed session ends
        with our close_notify, not a bare FIN (which the upstream would log
        as a truncated connection)."""
        result = self.result
        if result is not None and result.tls is not None and not self.failed:
            result.tls.queue_close_notify()
            result.tls.flush_nowait()

    def _count(self, result: HandshakeResult[UpstreamOutcome]) -> None:
        """Count the upstream handshake once; also called for one cut by a drain."""
        self.result = result
        metrics = self.runtime.metrics
        metrics.outcomes[result.outcome].inc()
        if result.wants_read:
            metrics.wants_read.inc(result.wants_read)
        if result.wants_write:
            metrics.wants_write.inc(result.wants_write)
        ok = result.outcome is UpstreamOutcome.SUCCESS
        (metrics.handshake_ok if ok else metrics.handshake_failed).observe(result.seconds)
        if ok and self.negotiated is not None:
            metrics.negotiated(*self.negotiated)

    def fields(self) -> dict[str, Any]:
        """The access line's upstream_* fields, as far as the upstream got."""
        result = self.result
        if result is None:
            return {}
        fields: dict[str, Any] = {
            "upstream_outcome": result.outcome.value,
            "upstream_handshake_ms": round(result.seconds * 1000, 3),
            "upstream_wants_read": result.wants_read,
            "upstream_wants_write": result.wants_write,
            "upstream_name": self.name,
        }
        if self.negotiated is not None:  # completed
            version, cipher, alpn, resumed = self.negotiated
            fields.update(
                upstream_tls_version=version,
                upstream_cipher=cipher,
                upstream_alpn=alpn,
                upstream_resumed=resumed,
            )
        identity = self.identity
        if identity is not None:
            fields.update(
                upstream_subject=identity.subject,
                upstream_san_dns=list(identity.dns),
                upstream_san_uri=list(identity.uris),
            )
        if result.error is not None and result.outcome is not UpstreamOutcome.SUCCESS:
            fields["upstream_error"] = str(result.error)
            reason = server_cert_reason(result.error)
            if reason is not None:
                fields["server_cert_error"] = reason
        if result.outcome is UpstreamOutcome.SERVER_IDENTITY_DENIED:
            fields["server_cert_error"] = NOT_ALLOWED
        return fields


def _last_look(tls: TLSConn) -> ssl.SSLError | None:
    """The error of a read of what the peer already sent, None if none (no
    bytes, or plaintext: the connection is closing, so it is dropped)."""
    tls.fill_nowait()
    try:
        tls.engine.read(1)
    except ssl.SSLWantReadError:
        return None
    except ssl.SSLError as exc:
        return exc
    return None
