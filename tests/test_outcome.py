"""The classifier as a table: evidence in, exactly one outcome out."""

from __future__ import annotations

import ssl

import pytest

from proxy.outcome import CERT_VERIFY_REASONS, REASONS, Outcome, classify, client_cert_reason


def _ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    exc.reason = reason
    return exc


HELLO = b"\x16\x03\x01\x02\x00"

CASES = [
    ("deadline before any byte", None, None, True, Outcome.TIMEOUT),
    ("deadline mid-hello", HELLO, None, True, Outcome.TIMEOUT),
    ("EOF before any byte", b"", None, False, Outcome.CLIENT_CLOSED),
    ("reset before any byte", None, ConnectionResetError(), False, Outcome.CLIENT_CLOSED),
    ("plain HTTP", b"GET /", None, False, Outcome.NOT_TLS),
    ("SSH banner", b"SSH-2", None, False, Outcome.NOT_TLS),
    ("SSLv2 hello", b"\x80\x2e\x01\x00\x02", None, False, Outcome.UNSUPPORTED_VERSION),
    ("SSLv2-compat TLS hello", b"\x80\x2e\x01\x03\x01", None, False, Outcome.UNSUPPORTED_VERSION),
    ("high bit, not a hello", b"\x9c\x11\x7f\x00\x02", None, False, Outcome.NOT_TLS),
    ("handshake done", HELLO, None, False, Outcome.SUCCESS),
    ("EOF mid-handshake", HELLO, ssl.SSLEOFError(8, "eof"), False, Outcome.CLIENT_CLOSED),
    ("EOF reason", HELLO, _ssl_error("UNEXPECTED_EOF_WHILE_READING"), False, Outcome.CLIENT_CLOSED),
    ("reset mid-handshake", HELLO, ConnectionResetError(), False, Outcome.CLIENT_CLOSED),
    ("broken pipe", HELLO, BrokenPipeError(), False, Outcome.CLIENT_CLOSED),
    (
        "TLS 1.1 client",
        HELLO,
        _ssl_error("UNSUPPORTED_PROTOCOL"),
        False,
        Outcome.UNSUPPORTED_VERSION,
    ),
    (
        "version alert",
        HELLO,
        _ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"),
        False,
        Outcome.UNSUPPORTED_VERSION,
    ),
    (
        "unknown CA",
        HELLO,
        _ssl_error("TLSV1_ALERT_UNKNOWN_CA"),
        False,
        Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    ),
    (
        "bad cert",
        HELLO,
        _ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"),
        False,
        Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    ),
    (
        "expired",
        HELLO,
        _ssl_error("SSLV3_ALERT_CERTIFICATE_EXPIRED"),
        False,
        Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    ),
    ("no cipher", HELLO, _ssl_error("NO_SHARED_CIPHER"), False, Outcome.NO_SHARED_CIPHER),
    ("ALPN", HELLO, _ssl_error("NO_APPLICATION_PROTOCOL"), False, Outcome.ALPN_MISMATCH),
    (
        "ALPN alert",
        HELLO,
        _ssl_error("TLSV1_ALERT_NO_APPLICATION_PROTOCOL"),
        False,
        Outcome.ALPN_MISMATCH,
    ),
    (
        "no client cert",
        HELLO,
        _ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        False,
        Outcome.CLIENT_CERT_MISSING,
    ),
    (
        "bad client cert",
        HELLO,
        ssl.SSLCertVerificationError(1, "verify failed"),
        False,
        Outcome.CLIENT_CERT_INVALID,
    ),
    ("garbage record", HELLO, _ssl_error("LENGTH_MISMATCH"), False, Outcome.PROTOCOL_ERROR),
    ("unknown reason", HELLO, _ssl_error("SOMETHING_NEW"), False, Outcome.PROTOCOL_ERROR),
    ("a bug", HELLO, RuntimeError("bug"), False, Outcome.INTERNAL_ERROR),
]


@pytest.mark.parametrize(
    ("first", "error", "timed_out", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_classify_maps_evidence_to_one_outcome(
    first: bytes | None, error: BaseException | None, timed_out: bool, expected: Outcome
) -> None:
    assert classify(first=first, error=error, timed_out=timed_out) is expected


def test_every_outcome_is_reachable_from_the_table() -> None:
    # client_cert_denied is the allow table's verdict on a handshake that
    # succeeded (proxy.connection), not evidence this classifier sees.
    assert {case[-1] for case in CASES} == set(Outcome) - {Outcome.CLIENT_CERT_DENIED}


# Every OpenSSL reason the classifier maps, listed here so that a change to the
# tables shows up as a change to this test.
MAPPED = {
    "UNEXPECTED_EOF_WHILE_READING": Outcome.CLIENT_CLOSED,
    "TLSV1_ALERT_UNKNOWN_CA": Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    "SSLV3_ALERT_BAD_CERTIFICATE": Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    "TLSV1_ALERT_DECRYPT_ERROR": Outcome.CERTIFICATE_REJECTED_BY_CLIENT,
    "UNSUPPORTED_PROTOCOL": Outcome.UNSUPPORTED_VERSION,
    "VERSION_TOO_LOW": Outcome.UNSUPPORTED_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": Outcome.UNSUPPORTED_VERSION,
    "UNKNOWN_PROTOCOL": Outcome.UNSUPPORTED_VERSION,
    "NO_SHARED_CIPHER": Outcome.NO_SHARED_CIPHER,
    "NO_CIPHERS_AVAILABLE": Outcome.NO_SHARED_CIPHER,
    "NO_SHARED_SIGNATURE_ALGORITHMS": Outcome.NO_SHARED_CIPHER,
    "NO_SUITABLE_SIGNATURE_ALGORITHM": Outcome.NO_SHARED_CIPHER,
    "NO_SHARED_GROUPS": Outcome.NO_SHARED_CIPHER,
    "NO_SUITABLE_KEY_SHARE": Outcome.NO_SHARED_CIPHER,
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": Outcome.NO_SHARED_CIPHER,
    "NO_APPLICATION_PROTOCOL": Outcome.ALPN_MISMATCH,
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": Outcome.ALPN_MISMATCH,
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": Outcome.CLIENT_CERT_MISSING,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": Outcome.CLIENT_CERT_MISSING,
    "CERTIFICATE_VERIFY_FAILED": Outcome.CLIENT_CERT_INVALID,
    "BAD_SIGNATURE": Outcome.CLIENT_CERT_INVALID,
}


def test_the_reason_table_is_exactly_this() -> None:
    assert REASONS == MAPPED


@pytest.mark.parametrize(("reason", "expected"), sorted(MAPPED.items()))
def test_every_mapped_reason(reason: str, expected: Outcome) -> None:
    assert classify(first=HELLO, error=_ssl_error(reason), timed_out=False) is expected


def test_our_own_refusal_names_the_outcome() -> None:
    error = _ssl_error("CALLBACK_FAILED")
    assert classify(first=HELLO, error=error, timed_out=False) is Outcome.PROTOCOL_ERROR
    refused = classify(first=HELLO, error=error, timed_out=False, refused=Outcome.ALPN_MISMATCH)
    assert refused is Outcome.ALPN_MISMATCH
    # the deadline and the wire still come first
    assert classify(first=HELLO, error=None, timed_out=True, refused=Outcome.ALPN_MISMATCH) is (
        Outcome.TIMEOUT
    )


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (10, "expired"),
        (9, "not_yet_valid"),
        (20, "unknown_ca"),
        (7, "bad_signature"),
        (23, "revoked"),
        (3, "crl_missing"),
        (12, "crl_expired"),
        (11, "crl_not_yet_valid"),
        (8, "crl_bad_signature"),
    ],
)
def test_client_certificate_reasons(code: int, reason: str) -> None:
    exc = ssl.SSLCertVerificationError(1, "verify failed")
    exc.verify_code = code
    exc.verify_message = "whatever OpenSSL says"
    assert CERT_VERIFY_REASONS[code] == reason
    assert client_cert_reason(exc) == reason


def test_unlisted_verify_codes_keep_openssls_words() -> None:
    exc = ssl.SSLCertVerificationError(1, "verify failed")
    exc.verify_code = 999
    exc.verify_message = "something new"
    assert client_cert_reason(exc) == "something new"
