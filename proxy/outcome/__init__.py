"""How handshakes ended: the outcome vocabularies and their pure classifiers.

`ingress` judges the handshakes we answer as the TLS server. Every public
name is re-exported here, so `from proxy.outcome import ...` is the one
import callers use.
"""

from proxy.outcome.ingress import (
    CLIENT_CERT_REASONS,
    NOT_ALLOWED,
    REASONS,
    SSLV2_CLIENT_HELLO,
    SSLV2_HELLO_MASK,
    Outcome,
    classify,
    classify_error,
    classify_first_bytes,
    client_cert_reason,
)

__all__ = [
    "CLIENT_CERT_REASONS",
    "NOT_ALLOWED",
    "REASONS",
    "SSLV2_CLIENT_HELLO",
    "SSLV2_HELLO_MASK",
    "Outcome",
    "classify",
    "classify_error",
    "classify_first_bytes",
    "client_cert_reason",
]
