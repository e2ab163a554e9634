"""The upstream classifier as a table: evidence in, exactly one outcome out.

The real servers behind each row are in tests/test_upstream_outcome.py; here
every mapped reason and verify code is checked, including those no server
on this machine can be made to send.
"""

from __future__ import annotations

import ssl

import pytest

from proxy.outcome import (
    ALPN_REASONS,
    CERT_REFUSED_ALERTS,
    CIPHER_REASONS,
    CLIENT_CERT_REJECTED_REASONS,
    EOF_REASONS,
    HANDSHAKE_FAILURE_ALERT,
    UPSTREAM_REASONS,
    VERSION_REASONS,
    UpstreamOutcome,
    classify_first_read_error,
    classify_upstream,
    openssl_reason,
    server_cert_reason,
)

U = UpstreamOutcome
SERVER_HELLO = b"\x16\x03\x03\x00\x7a"
ALERT = b"\x15\x03\x03\x00\x02"


def _ssl_error(reason: str, cls: type[ssl.SSLError] = ssl.SSLError) -> ssl.SSLError:
    exc = cls(1, f"[SSL: {reason}] {reason.lower().replace('_', ' ')} (_ssl.c:1006)")
    exc.reason = reason
    return exc


def _unnamed(words: str) -> ssl.SSLError:
    """As Python 3.11 raises a reason its table does not know (.reason None)."""
    return ssl.SSLError(1, f"[SSL] {words} (_ssl.c:1006)")


def _verify_failed(code: int, message: str = "whatever OpenSSL says") -> ssl.SSLError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    exc.reason = "CERTIFICATE_VERIFY_FAILED"
    exc.verify_code = code
    exc.verify_message = message
    return exc


CASES = [
    ("deadline before any byte", None, None, True, U.TIMEOUT),
    ("deadline after the hello", SERVER_HELLO, _ssl_error("X"), True, U.TIMEOUT),
    ("EOF before any byte", b"", ssl.SSLEOFError(8, "eof"), False, U.SERVER_CLOSED),
    ("reset before any byte", None, ConnectionResetError(), False, U.SERVER_CLOSED),
    ("broken pipe on our hello", None, BrokenPipeError(), False, U.SERVER_CLOSED),
    ("aborted", SERVER_HELLO, ConnectionAbortedError(), False, U.SERVER_CLOSED),
    (
        "close_notify mid-handshake",
        SERVER_HELLO,
        ssl.SSLZeroReturnError(6, "z"),
        False,
        U.SERVER_CLOSED,
    ),
    ("HTTP answer", b"HTTP/", _ssl_error("WRONG_VERSION_NUMBER"), False, U.NOT_TLS),
    ("SSH banner", b"SSH-2", _ssl_error("WRONG_VERSION_NUMBER"), False, U.NOT_TLS),
    ("one byte of HTTP", b"H", ssl.SSLEOFError(8, "eof"), False, U.NOT_TLS),
    ("done", SERVER_HELLO, None, False, U.SUCCESS),
    (
        "alert first: no cipher",
        ALERT,
        _ssl_error(HANDSHAKE_FAILURE_ALERT),
        False,
        U.NO_SHARED_CIPHER,
    ),
    (
        "hello first: no client cert (TLS 1.2)",
        SERVER_HELLO,
        _ssl_error(HANDSHAKE_FAILURE_ALERT),
        False,
        U.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    (
        "unknown_ca FROM the server: our client cert",
        SERVER_HELLO,
        _ssl_error("TLSV1_ALERT_UNKNOWN_CA"),
        False,
        U.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    (
        "unknown CA: OUR verify of the server",
        SERVER_HELLO,
        _verify_failed(20),
        False,
        U.SERVER_CERT_INVALID,
    ),
    ("hostname mismatch", SERVER_HELLO, _verify_failed(62), False, U.SERVER_NAME_MISMATCH),
    ("email mismatch", SERVER_HELLO, _verify_failed(63), False, U.SERVER_NAME_MISMATCH),
    ("IP mismatch", SERVER_HELLO, _verify_failed(64), False, U.SERVER_NAME_MISMATCH),
    ("expired", SERVER_HELLO, _verify_failed(10), False, U.SERVER_CERT_INVALID),
    ("a verify code yet to come", SERVER_HELLO, _verify_failed(999), False, U.SERVER_CERT_INVALID),
    (
        "ALPN alert, reason unnamed",
        ALERT,
        _unnamed("tlsv1 alert no application protocol"),
        False,
        U.ALPN_MISMATCH,
    ),
    ("unmapped reason", SERVER_HELLO, _ssl_error("UNEXPECTED_MESSAGE"), False, U.PROTOCOL_ERROR),
    ("no reason at all", SERVER_HELLO, ssl.SSLError(1, "odd"), False, U.PROTOCOL_ERROR),
    ("a bug", SERVER_HELLO, RuntimeError("bug"), False, U.INTERNAL_ERROR),
]


@pytest.mark.parametrize(
    ("first", "error", "timed_out", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_classify_upstream(
    first: bytes | None, error: BaseException | None, timed_out: bool, expected: UpstreamOutcome
) -> None:
    assert classify_upstream(first=first, error=error, timed_out=timed_out) is expected


EXPECTED_SETS = [
    (EOF_REASONS, U.SERVER_CLOSED),
    (VERSION_REASONS, U.UNSUPPORTED_VERSION),
    (CIPHER_REASONS, U.NO_SHARED_CIPHER),
    (ALPN_REASONS, U.ALPN_MISMATCH),
    (CLIENT_CERT_REJECTED_REASONS, U.CLIENT_CERT_REJECTED_BY_SERVER),
    (frozenset({"CERTIFICATE_VERIFY_FAILED", "BAD_SIGNATURE"}), U.SERVER_CERT_INVALID),
]


def test_the_reason_sets_are_disjoint_and_all_mapped() -> None:
    assert sum(len(reasons) for reasons, _ in EXPECTED_SETS) == len(UPSTREAM_REASONS)
    for reasons, outcome in EXPECTED_SETS:
        assert all(UPSTREAM_REASONS[r] is outcome for r in reasons)
    assert HANDSHAKE_FAILURE_ALERT not in UPSTREAM_REASONS  # needs the first byte


def test_the_server_refusing_our_cert_reads_like_a_client_refusing_ours() -> None:
    """The ingress certificate_rejected_by_client alerts, plus TLS 1.3's
    certificate_required and access_denied."""
    added = CLIENT_CERT_REJECTED_REASONS - CERT_REFUSED_ALERTS
    assert added == {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_ACCESS_DENIED"}


@pytest.mark.parametrize(
    ("reason", "expected"), sorted(UPSTREAM_REASONS.items()), ids=sorted(UPSTREAM_REASONS)
)
def test_every_mapped_reason(reason: str, expected: UpstreamOutcome) -> None:
    assert classify_upstream(first=SERVER_HELLO, error=_ssl_error(reason), timed_out=False) is (
        expected
    )
    # as Python 3.11 raises it when its table lacks the code
    unnamed = _unnamed(reason.lower().replace("_", " "))
    assert classify_upstream(first=SERVER_HELLO, error=unnamed, timed_out=False) is expected


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "[SSL] tlsv1 alert no application protocol (_ssl.c:1006)",
            "TLSV1_ALERT_NO_APPLICATION_PROTOCOL",
        ),
        (
            "[SSL: UNEXPECTED_MESSAGE] unexpected message (_ssl.c:1006)",
            "",
        ),  # named: .reason is used
        ("EOF occurred in violation of protocol (_ssl.c:2427)", ""),
        ("odd", ""),
    ],
)
def test_openssl_reason_from_the_message_only_when_unnamed(message: str, reason: str) -> None:
    exc = ssl.SSLError(1, message)
    assert openssl_reason(exc) == reason
    exc.reason = "NAMED"
    assert openssl_reason(exc) == "NAMED"


@pytest.mark.parametrize("reason", sorted(CLIENT_CERT_REJECTED_REASONS | {HANDSHAKE_FAILURE_ALERT}))
def test_first_read_alerts_about_our_certificate(reason: str) -> None:
    assert classify_first_read_error(_ssl_error(reason)) is U.CLIENT_CERT_REJECTED_BY_SERVER


@pytest.mark.parametrize(
    "exc",
    [
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF)"),
        ConnectionResetError(),
        _ssl_error("DECRYPTION_FAILED_OR_BAD_RECORD_MAC"),
        _ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"),
        _verify_failed(20),
        RuntimeError("bug"),
    ],
    ids=repr,
)
def test_any_other_first_read_error_is_the_splices(exc: BaseException) -> None:
    assert classify_first_read_error(exc) is None


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (2, "unknown_ca"),
        (7, "bad_signature"),
        (9, "not_yet_valid"),
        (10, "expired"),
        (18, "self_signed"),  # the leaf is its own issuer
        (19, "unknown_ca"),  # a self-signed root we do not trust
        (20, "unknown_ca"),
        (21, "unknown_ca"),
        (23, "revoked"),
        (24, "invalid_ca"),
        (26, "wrong_purpose"),
        (62, "hostname_mismatch"),
        (63, "email_mismatch"),
        (64, "ip_mismatch"),
    ],
)
def test_server_cert_reasons(code: int, reason: str) -> None:
    assert server_cert_reason(_verify_failed(code)) == reason


def test_server_cert_reason_otherwise() -> None:
    assert server_cert_reason(_verify_failed(999, "something new")) == "something new"
    assert server_cert_reason(_ssl_error("BAD_SIGNATURE")) == "bad_signature"
    assert server_cert_reason(_ssl_error("TLSV1_ALERT_UNKNOWN_CA")) is None  # not about its cert
    assert server_cert_reason(ConnectionResetError()) is None
