"""How an ingress handshake ended (we are the TLS server): the outcome
vocabulary and its pure classifier. proxy.outcome.upstream is its
counterpart for the handshakes we originate.

Every accepted connection ends its handshake in exactly one `Outcome`. The
classifier sees only evidence (what the first bytes on the wire were, whether
the deadline fired, which exception ended the loop) and returns the outcome,
so the whole taxonomy is a table-driven unit test, independent of sockets.

OpenSSL reports failures as a library reason string (`SSLError.reason`), e.g.
`TLSV1_ALERT_UNKNOWN_CA` when the client sent an `unknown_ca` alert, or
`NO_SHARED_CIPHER` when our own checks failed. The table below maps those
reasons (the sets in proxy.outcome.reasons, shared with the upstream
classifier) onto the outcomes users see on dashboards.
"""

from __future__ import annotations

import ssl
from enum import StrEnum

from proxy.clienthello import HANDSHAKE_RECORD
from proxy.outcome.reasons import (
    ALPN_REASONS,
    CERT_INVALID_REASONS,
    CERT_REFUSED_ALERTS,
    CERT_VERIFY_REASONS,
    CIPHER_REASONS,
    EOF_REASONS,
    VERSION_REASONS,
    verify_words,
)


class Outcome(StrEnum):
    SUCCESS = "success"
    TIMEOUT = "timeout"
    CLIENT_CLOSED = "client_closed"
    NOT_TLS = "not_tls"
    UNSUPPORTED_VERSION = "unsupported_version"
    NO_SHARED_CIPHER = "no_shared_cipher"
    CLIENT_CERT_MISSING = "client_cert_missing"
    CLIENT_CERT_INVALID = "client_cert_invalid"
    # The chain verified but the identity matches no `allow` entry: decided
    # by proxy.connection after the handshake, never by this classifier.
    CLIENT_CERT_DENIED = "client_cert_denied"
    CERTIFICATE_REJECTED_BY_CLIENT = "certificate_rejected_by_client"
    ALPN_MISMATCH = "alpn_mismatch"
    PROTOCOL_ERROR = "protocol_error"
    INTERNAL_ERROR = "internal_error"


# The first byte of every TLS connection is a handshake record
# (`HANDSHAKE_RECORD`). An SSLv2-compatible hello starts with a two-byte
# length whose top bit is set; anything else (an HTTP verb, an SSH banner) is
# not TLS at all.
SSLV2_HELLO_MASK = 0x80
SSLV2_CLIENT_HELLO = 0x01

_CLIENT_CERT_MISSING_REASONS = frozenset(
    {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}
)

# Every OpenSSL reason the classifier maps; any other reason is protocol_error.
REASONS: dict[str, Outcome] = {
    reason: outcome
    for reasons, outcome in (
        (EOF_REASONS, Outcome.CLIENT_CLOSED),
        # the client refused the certificate we presented
        (CERT_REFUSED_ALERTS, Outcome.CERTIFICATE_REJECTED_BY_CLIENT),
        (VERSION_REASONS, Outcome.UNSUPPORTED_VERSION),
        (CIPHER_REASONS, Outcome.NO_SHARED_CIPHER),
        (ALPN_REASONS, Outcome.ALPN_MISMATCH),
        (_CLIENT_CERT_MISSING_REASONS, Outcome.CLIENT_CERT_MISSING),
        (CERT_INVALID_REASONS, Outcome.CLIENT_CERT_INVALID),
    )
    for reason in reasons
}


def classify_first_bytes(first: bytes) -> Outcome | None:
    """Judge the first bytes, read before OpenSSL sees anything.

    Returns an outcome when the bytes alone decide it, else None (let OpenSSL
    try). Looking first is what lets us say `not_tls` for a plain HTTP request
    instead of OpenSSL's generic "wrong version number".
    """
    if not first:
        return Outcome.CLIENT_CLOSED
    if first[0] == HANDSHAKE_RECORD:
        return None
    if _is_sslv2_client_hello(first):
        return Outcome.UNSUPPORTED_VERSION
    return Outcome.NOT_TLS


def _is_sslv2_client_hello(first: bytes) -> bool:
    """An SSLv2(-compatible) CLIENT-HELLO: a 2-byte length with the top bit
    set, message type 1, then a version major of 0 (SSLv2) or 3 (SSLv3/TLS)."""
    return (
        len(first) >= 4
        and bool(first[0] & SSLV2_HELLO_MASK)
        and first[2] == SSLV2_CLIENT_HELLO
        and first[3] in (0x00, 0x03)
    )


def classify_error(exc: BaseException) -> Outcome:
    """Map the exception that ended the handshake loop to its outcome."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Outcome.CLIENT_CERT_INVALID
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return Outcome.CLIENT_CLOSED
    if isinstance(exc, ssl.SSLError):
        return REASONS.get(exc.reason or "", Outcome.PROTOCOL_ERROR)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return Outcome.CLIENT_CLOSED
    return Outcome.INTERNAL_ERROR


def client_cert_reason(exc: BaseException) -> str | None:
    """Why the client's certificate was refused ("expired", "unknown_ca"...)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return verify_words(exc, CERT_VERIFY_REASONS)
    if isinstance(exc, ssl.SSLError) and exc.reason == "BAD_SIGNATURE":
        return "bad_signature"
    return None


def classify(
    *,
    first: bytes | None,
    error: BaseException | None,
    timed_out: bool,
    refused: Outcome | None = None,
) -> Outcome:
    """The whole decision: deadline first, then the wire, then the exception.

    `first` is None when nothing could be read (the deadline fired or the
    socket failed before the first byte). `refused` is set when our own policy
    failed the handshake from a callback (the ALPN check in `proxy.tls`):
    OpenSSL then reports a generic CALLBACK_FAILED, and only we know why.
    """
    if timed_out:
        return Outcome.TIMEOUT
    if first is not None:
        verdict = classify_first_bytes(first)
        if verdict is not None:
            return verdict
    if error is None:
        return Outcome.SUCCESS
    if refused is not None:
        return refused
    return classify_error(error)
