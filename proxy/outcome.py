"""How a handshake ended: the outcome vocabulary and its pure classifier.

Every accepted connection ends its handshake in exactly one `Outcome`. The
classifier sees only evidence (what the first bytes on the wire were, whether
the deadline fired, which exception ended the loop) and returns the outcome,
so the whole taxonomy is a table-driven unit test, independent of sockets.

OpenSSL reports failures as a library reason string (`SSLError.reason`), e.g.
`TLSV1_ALERT_UNKNOWN_CA` when the client sent an `unknown_ca` alert, or
`NO_SHARED_CIPHER` when our own checks failed. The tables below map those
reasons onto the outcomes users see on dashboards.
"""

from __future__ import annotations

import ssl
from enum import StrEnum


class Outcome(StrEnum):
    SUCCESS = "success"
    TIMEOUT = "timeout"
    CLIENT_CLOSED = "client_closed"
    NOT_TLS = "not_tls"
    UNSUPPORTED_VERSION = "unsupported_version"
    NO_SHARED_CIPHER = "no_shared_cipher"
    CLIENT_CERT_MISSING = "client_cert_missing"
    CLIENT_CERT_INVALID = "client_cert_invalid"
    CERTIFICATE_REJECTED_BY_CLIENT = "certificate_rejected_by_client"
    ALPN_MISMATCH = "alpn_mismatch"
    PROTOCOL_ERROR = "protocol_error"
    INTERNAL_ERROR = "internal_error"


# The first byte of every TLS connection is a handshake record (content type
# 22). An SSLv2-compatible hello starts with a two-byte length whose top bit is
# set; anything else (an HTTP verb, an SSH banner) is not TLS at all.
TLS_HANDSHAKE_RECORD = 0x16
SSLV2_HELLO_MASK = 0x80

# Alerts a client sends when it does not accept our certificate chain: the
# "certificate rollout" failure operators most need to see.
_CERT_REJECTED_REASONS = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)

_VERSION_REASONS = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "VERSION_TOO_LOW",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNKNOWN_PROTOCOL",
    }
)

_CIPHER_REASONS = frozenset({"NO_SHARED_CIPHER", "TLSV1_ALERT_INSUFFICIENT_SECURITY"})

_ALPN_REASONS = frozenset({"NO_APPLICATION_PROTOCOL", "TLSV1_ALERT_NO_APPLICATION_PROTOCOL"})

_CLIENT_CERT_MISSING_REASONS = frozenset(
    {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}
)

# An EOF in the middle of the handshake is the client going away, not a
# protocol violation: OpenSSL 3 names it UNEXPECTED_EOF_WHILE_READING.
_EOF_REASONS = frozenset({"UNEXPECTED_EOF_WHILE_READING"})


def classify_first_bytes(first: bytes) -> Outcome | None:
    """Judge the bytes peeked before OpenSSL reads anything.

    Returns an outcome when the bytes alone decide it, else None (let OpenSSL
    try). Peeking first is what lets us say `not_tls` for a plain HTTP request
    instead of OpenSSL's generic "wrong version number".
    """
    if not first:
        return Outcome.CLIENT_CLOSED
    if first[0] == TLS_HANDSHAKE_RECORD:
        return None
    if first[0] & SSLV2_HELLO_MASK:
        return Outcome.UNSUPPORTED_VERSION
    return Outcome.NOT_TLS


def classify_error(exc: BaseException) -> Outcome:
    """Map the exception that ended the handshake loop to its outcome."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Outcome.CLIENT_CERT_INVALID
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return Outcome.CLIENT_CLOSED
    if isinstance(exc, ssl.SSLError):
        return _classify_reason(exc.reason)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return Outcome.CLIENT_CLOSED
    return Outcome.INTERNAL_ERROR


def _classify_reason(reason: str | None) -> Outcome:
    table: tuple[tuple[frozenset[str], Outcome], ...] = (
        (_EOF_REASONS, Outcome.CLIENT_CLOSED),
        (_CERT_REJECTED_REASONS, Outcome.CERTIFICATE_REJECTED_BY_CLIENT),
        (_VERSION_REASONS, Outcome.UNSUPPORTED_VERSION),
        (_CIPHER_REASONS, Outcome.NO_SHARED_CIPHER),
        (_ALPN_REASONS, Outcome.ALPN_MISMATCH),
        (_CLIENT_CERT_MISSING_REASONS, Outcome.CLIENT_CERT_MISSING),
    )
    for reasons, outcome in table:
        if reason in reasons:
            return outcome
    return Outcome.PROTOCOL_ERROR


def classify(*, first: bytes | None, error: BaseException | None, timed_out: bool) -> Outcome:
    """The whole decision: deadline first, then the wire, then the exception.

    `first` is None when nothing could be peeked (the deadline fired or the
    socket failed before the first byte).
    """
    if timed_out:
        return Outcome.TIMEOUT
    if first is not None:
        verdict = classify_first_bytes(first)
        if verdict is not None:
            return verdict
    if error is None:
        return Outcome.SUCCESS
    return classify_error(error)
