"""How an upstream handshake ended (we are the TLS client): the outcome
vocabulary and its pure classifier, the counterpart of proxy.outcome.ingress.

The evidence is the same kind: the first bytes the server sent, whether the
deadline fired, and the exception that ended the client-side handshake loop.
Every mapping below was observed on real servers (openssl s_server, nginx,
Python's ssl; tests/test_upstream_outcome.py drives each), not inferred.

Three things only the client side has to untangle:

- `unknown_ca` (and the other certificate alerts) arriving FROM the server
  means it refused OUR client certificate; our own refusal of the server's
  chain is an `SSLCertVerificationError` with a verify code instead.
- OpenSSL servers refuse a missing client certificate in TLS 1.2 with a bare
  `handshake_failure` alert, the same alert they answer a hello with when no
  cipher or group is shared. The first record tells them apart: a refused
  hello is answered by an alert record, a refused certificate comes after the
  server's own hello flight (a handshake record).
- In TLS 1.3 the server judges our certificate after our side of the
  handshake has finished, so its alert arrives on our first read
  (`classify_first_read_error`).
"""

from __future__ import annotations

import ssl
from enum import StrEnum

from proxy.clienthello import ALERT_RECORD, HANDSHAKE_RECORD
from proxy.outcome.reasons import (
    ALPN_REASONS,
    CERT_INVALID_REASONS,
    CERT_REFUSED_ALERTS,
    CERT_VERIFY_REASONS,
    CIPHER_REASONS,
    EOF_REASONS,
    VERSION_REASONS,
    openssl_reason,
    verify_words,
)


class UpstreamOutcome(StrEnum):
    SUCCESS = "success"
    TIMEOUT = "timeout"
    SERVER_CLOSED = "server_closed"
    NOT_TLS = "not_tls"
    UNSUPPORTED_VERSION = "unsupported_version"
    NO_SHARED_CIPHER = "no_shared_cipher"
    SERVER_CERT_INVALID = "server_cert_invalid"
    SERVER_NAME_MISMATCH = "server_name_mismatch"
    # The chain verified but the identity matches no `upstream_tls.allow`
    # entry: decided by the caller after the handshake, never by this
    # classifier.
    SERVER_IDENTITY_DENIED = "server_identity_denied"
    CLIENT_CERT_REJECTED_BY_SERVER = "client_cert_rejected_by_server"
    ALPN_MISMATCH = "alpn_mismatch"
    PROTOCOL_ERROR = "protocol_error"
    INTERNAL_ERROR = "internal_error"


# A server's first byte is a handshake record (its hello) or an alert record
# (it refused ours); anything else (`HTTP/1.1 400`, an SSH banner) is not TLS.
TLS_FIRST_BYTES = frozenset({HANDSHAKE_RECORD, ALERT_RECORD})

# The bare alert an OpenSSL server sends both for "no shared cipher or group"
# (in answer to our hello) and for "TLS 1.2, no client certificate" (after its
# hello flight): see the module docstring.
HANDSHAKE_FAILURE_ALERT = "SSLV3_ALERT_HANDSHAKE_FAILURE"

# The server refused our client certificate: the alerts any peer sends for a
# certificate it does not accept, and TLS 1.3's certificate_required when we
# sent none. access_denied: the certificate verified but the server's own
# access control refused it.
CLIENT_CERT_REJECTED_REASONS = CERT_REFUSED_ALERTS | frozenset(
    {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_ACCESS_DENIED"}
)

# Every OpenSSL reason the classifier maps (besides HANDSHAKE_FAILURE_ALERT,
# which needs the first byte); any other reason is protocol_error.
UPSTREAM_REASONS: dict[str, UpstreamOutcome] = {
    reason: outcome
    for reasons, outcome in (
        (EOF_REASONS, UpstreamOutcome.SERVER_CLOSED),
        (VERSION_REASONS, UpstreamOutcome.UNSUPPORTED_VERSION),
        (CIPHER_REASONS, UpstreamOutcome.NO_SHARED_CIPHER),
        (ALPN_REASONS, UpstreamOutcome.ALPN_MISMATCH),
        (CLIENT_CERT_REJECTED_REASONS, UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER),
        (CERT_INVALID_REASONS, UpstreamOutcome.SERVER_CERT_INVALID),
    )
    for reason in reasons
}

# Verify codes that mean "valid chain, wrong name" (x509_vfy.h): the host
# name, e-mail or IP address we asked for is not in the certificate.
NAME_MISMATCH_CODES = frozenset({62, 63, 64})

# The access log's server_cert_error words: the shared ones, plus a
# self-signed leaf (a backend still on its default certificate, the common
# case upstream) and the name mismatches.
SERVER_CERT_REASONS: dict[int, str] = {
    **CERT_VERIFY_REASONS,
    18: "self_signed",  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    62: "hostname_mismatch",
    63: "email_mismatch",
    64: "ip_mismatch",
}

# A TLS 1.3 server refuses our certificate after our Finished: on the first
# read, its alert can only be about our flight, so handshake_failure counts
# too (an implementation without certificate_required).
_FIRST_READ_REJECTED_REASONS = CLIENT_CERT_REJECTED_REASONS | {HANDSHAKE_FAILURE_ALERT}


def classify_upstream(
    *, first: bytes | None, error: BaseException | None, timed_out: bool
) -> UpstreamOutcome:
    """The whole decision: deadline first, then the wire, then the exception.

    `first` is the first bytes (up to a record header) the server sent, None
    if nothing was read; `error` the exception that ended the client-side
    handshake loop, None on success.
    """
    if timed_out:
        return UpstreamOutcome.TIMEOUT
    if first and first[0] not in TLS_FIRST_BYTES:
        return UpstreamOutcome.NOT_TLS
    if error is None:
        return UpstreamOutcome.SUCCESS
    return _classify_error(error, first)


def _classify_error(exc: BaseException, first: bytes | None) -> UpstreamOutcome:
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in NAME_MISMATCH_CODES:
            return UpstreamOutcome.SERVER_NAME_MISMATCH
        return UpstreamOutcome.SERVER_CERT_INVALID
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return UpstreamOutcome.SERVER_CLOSED
    if isinstance(exc, ssl.SSLError):
        reason = openssl_reason(exc)
        if reason == HANDSHAKE_FAILURE_ALERT:
            if first and first[0] == HANDSHAKE_RECORD:  # after the server's hello
                return UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER
            return UpstreamOutcome.NO_SHARED_CIPHER
        return UPSTREAM_REASONS.get(reason, UpstreamOutcome.PROTOCOL_ERROR)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return UpstreamOutcome.SERVER_CLOSED
    return UpstreamOutcome.INTERNAL_ERROR


def classify_first_read_error(exc: BaseException) -> UpstreamOutcome | None:
    """The first read's error after a successful handshake:
    CLIENT_CERT_REJECTED_BY_SERVER when it is a TLS 1.3 server's alert about
    our certificate (or its absence), None for anything else (an ordinary
    splice error)."""
    if isinstance(exc, ssl.SSLCertVerificationError) or not isinstance(exc, ssl.SSLError):
        return None
    if openssl_reason(exc) in _FIRST_READ_REJECTED_REASONS:
        return UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER
    return None


def server_cert_reason(exc: BaseException) -> str | None:
    """Why the server's certificate was refused ("expired", "unknown_ca",
    "self_signed"...), for the access log's server_cert_error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return verify_words(exc, SERVER_CERT_REASONS)
    if isinstance(exc, ssl.SSLError) and openssl_reason(exc) == "BAD_SIGNATURE":
        return "bad_signature"
    return None
