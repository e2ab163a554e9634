"""Build a listener's client SSLContext for the TLS it originates; keep its sessions.

Theory of operation
-------------------

`build_upstream_context(upstream)` is the client-side twin of
`proxy.tls.build_context`: a pure function of the `[listeners.upstream_tls]`
table and the bytes its validation read (our client certificate and key,
the CA bundle), run once per listener at start-up or reload. It shares the
protocol policy (`proxy.tls.apply_policy`) and the from-memory loading of a
pair with the server side.

What the upstream must prove:

- without an `allow` table, that its chain verifies to `ca` (or the system
  store) and that it is the name we dialled: `server_name`, else the
  backend's host. OpenSSL checks the name during the handshake
  (`check_hostname`), against the DNS SANs, or the IP SANs for an IP
  literal; a mismatch is verify code 62 or 64, the outcome
  `server_name_mismatch`;
- with an `allow` table, that its chain verifies and that its identity (a
  SPIFFE ID need not come with any DNS name) matches the table, judged by
  `proxy.identity` after the handshake (`server_identity_denied`). The name
  is still sent as SNI, so a shared upstream can pick the certificate.

Sessions: TLS 1.3 tickets arrive after the handshake, so a session worth
keeping is read from the connection once bytes have flowed (at the first
read from the upstream, and at close), and offered to the next connection
to the same name. One `Sessions` per listener runtime: a session belongs to
the SSLContext that made it, and a reload makes new contexts.
"""

from __future__ import annotations

import ssl
from collections import OrderedDict

from proxy.config import Address, UpstreamTLSConfig
from proxy.tls import apply_policy, load_pair
from proxy.tlsio import Engine

# Upstream names one listener keeps a session for. A listener dials one
# name, or one per route; the bound only guards against a config with many.
MAX_SESSIONS = 256


def build_upstream_context(upstream: UpstreamTLSConfig) -> ssl.SSLContext:
    """Raises ssl.SSLError/OSError/ValueError on unusable material, and
    openssl.PolicyUnavailable when the groups or suites cannot be set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    apply_policy(context, upstream.min_version, "", upstream.groups, upstream.ciphersuites)
    ca = upstream.ca_pem
    if ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.load_verify_locations(cadata=ca.decode("ascii"))
    for pair in upstream.certificates:
        load_pair(context, pair.material)
    if upstream.alpn:
        context.set_alpn_protocols(list(upstream.alpn))
    if upstream.allow is not None:
        context.check_hostname = False  # the identity is judged instead
    if not upstream.session_resumption:
        context.options |= ssl.OP_NO_TICKET
    return context


def upstream_name(
    upstream: UpstreamTLSConfig, backend: Address, client_sni: str | None = None
) -> str | None:
    """The name we dial: sent as SNI (unless an IP) and checked, unless an
    allow table judges instead. `server_name` if set; else, bridging, the
    name the client asked us for (passed on, as a TLS client would have sent
    it to the upstream itself); else the backend's host. None only for a
    unix backend with an allow table and neither of the other two."""
    if upstream.server_name:
        return upstream.server_name
    if client_sni:
        return client_sni
    if backend.unix_path is not None:
        return None
    return backend.host


class Sessions:
    """The last resumable session per upstream name, most recent first out."""

    __slots__ = ("_by_name", "enabled")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._by_name: OrderedDict[str, ssl.SSLSession] = OrderedDict()

    def get(self, name: str | None) -> ssl.SSLSession | None:
        if not self.enabled or name is None:
            return None
        return self._by_name.get(name)

    def keep(self, name: str | None, engine: Engine) -> None:
        """Remember the connection's session if OpenSSL says it can resume."""
        if not self.enabled or name is None:
            return
        session = engine.session
        # TLS 1.3 resumes by ticket only; TLS 1.2 by ticket or session ID
        if session is None or not (session.has_ticket or engine.version() == "TLSv1.2"):
            return
        self._by_name[name] = session
        self._by_name.move_to_end(name)
        while len(self._by_name) > MAX_SESSIONS:
            self._by_name.popitem(last=False)
