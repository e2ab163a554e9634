"""How handshakes ended: the outcome vocabularies and their pure classifiers.

`ingress` judges the handshakes we answer as the TLS server, `upstream` the
ones we originate as the TLS client; `reasons` holds what they share. Every
public name is re-exported here, so `from proxy.outcome import ...` is the
one import callers use.
"""

from proxy.outcome.ingress import (
    REASONS,
    SSLV2_CLIENT_HELLO,
    SSLV2_HELLO_MASK,
    Outcome,
    classify,
    classify_error,
    classify_first_bytes,
    client_cert_reason,
)
from proxy.outcome.reasons import (
    ALPN_REASONS,
    CERT_REFUSED_ALERTS,
    CERT_VERIFY_REASONS,
    CIPHER_REASONS,
    EOF_REASONS,
    NOT_ALLOWED,
    VERSION_REASONS,
    openssl_reason,
    verify_words,
)
from proxy.outcome.upstream import (
    CLIENT_CERT_REJECTED_REASONS,
    HANDSHAKE_FAILURE_ALERT,
    NAME_MISMATCH_CODES,
    SERVER_CERT_REASONS,
    TLS_FIRST_BYTES,
    UPSTREAM_REASONS,
    UpstreamOutcome,
    classify_first_read_error,
    classify_upstream,
    server_cert_reason,
)

__all__ = [
    "ALPN_REASONS",
    "CERT_REFUSED_ALERTS",
    "CERT_VERIFY_REASONS",
    "CIPHER_REASONS",
    "CLIENT_CERT_REJECTED_REASONS",
    "EOF_REASONS",
    "HANDSHAKE_FAILURE_ALERT",
    "NAME_MISMATCH_CODES",
    "NOT_ALLOWED",
    "REASONS",
    "SERVER_CERT_REASONS",
    "SSLV2_CLIENT_HELLO",
    "SSLV2_HELLO_MASK",
    "TLS_FIRST_BYTES",
    "UPSTREAM_REASONS",
    "VERSION_REASONS",
    "Outcome",
    "UpstreamOutcome",
    "classify",
    "classify_error",
    "classify_first_bytes",
    "classify_first_read_error",
    "classify_upstream",
    "client_cert_reason",
    "openssl_reason",
    "server_cert_reason",
    "verify_words",
]
