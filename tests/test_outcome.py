"""The classifier as a table: evidence in, exactly one outcome out."""

from __future__ import annotations

import ssl

import pytest

from proxy.outcome import Outcome, classify


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
    assert {case[-1] for case in CASES} == set(Outcome)
