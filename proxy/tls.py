"""Build the server-side SSLContext for a listener from its TLS config.

Everything that costs time (parsing certificates and keys, cipher strings)
happens here, once per listener at start-up, never per handshake.
"""

from __future__ import annotations

import ssl

from proxy.config import TLSConfig

# Mozilla's "intermediate" profile for TLS 1.2, narrowed to ECDHE key exchange
# with AEAD ciphers: forward secrecy always, no CBC, no static RSA, no DHE
# (finite-field DH parameters are slow and rarely needed by modern clients).
# TLS 1.3 suites are OpenSSL's defaults, which Python's ssl cannot change.
DEFAULT_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

_MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def build_context(tls: TLSConfig) -> ssl.SSLContext:
    """A hardened server context; raises ssl.SSLError/OSError on bad material."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSIONS[tls.min_version]
    context.set_ciphers(tls.ciphers or DEFAULT_TLS12_CIPHERS)
    context.options |= (
        ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    )
    pair = tls.certificates[0]
    context.load_cert_chain(str(pair.cert), str(pair.key))
    if tls.alpn:
        context.set_alpn_protocols(list(tls.alpn))
    if not tls.session_tickets:
        # OP_NO_TICKET alone still lets OpenSSL send stateful TLS 1.3 tickets
        # backed by its session cache; zero tickets means no resumption at all.
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    context.sni_callback = _remember_server_name
    return context


def _remember_server_name(
    conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _context: ssl.SSLContext
) -> None:
    """Keep the client's SNI on its socket for the access log."""
    conn.server_name_indication = server_name  # type: ignore[union-attr]


def server_name(conn: ssl.SSLSocket) -> str | None:
    """The SNI the client sent, if any."""
    return getattr(conn, "server_name_indication", None)
