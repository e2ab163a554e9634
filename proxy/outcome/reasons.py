"""OpenSSL's words that both classifiers read: the ingress one (we are the
TLS server) and the upstream one (we are the TLS client).

A disagreement on versions, ciphers or ALPN reads the same whichever end
noticed it, and so does an alert refusing a certificate: the client refusing
ours on ingress, the server refusing ours upstream. Those reason sets, and
the X509 verify-code words of the access log, are defined here once.
"""

from __future__ import annotations

import re
import ssl

# An EOF in the middle of the handshake is the peer going away, not a
# protocol violation: OpenSSL 3 names it UNEXPECTED_EOF_WHILE_READING.
EOF_REASONS = frozenset({"UNEXPECTED_EOF_WHILE_READING"})

# One end does not speak a version the other requires. The alert is what the
# peer sends when it refuses; the others are our own refusal.
VERSION_REASONS = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "VERSION_TOO_LOW",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNKNOWN_PROTOCOL",
    }
)

# No cipher suite, no signature algorithm the key can make, or no
# key-exchange group both ends accept: nothing to negotiate with.
CIPHER_REASONS = frozenset(
    {
        "NO_SHARED_CIPHER",
        "NO_CIPHERS_AVAILABLE",
        "NO_SHARED_SIGNATURE_ALGORITHMS",
        "NO_SUITABLE_SIGNATURE_ALGORITHM",
        "NO_SHARED_GROUPS",
        "NO_SUITABLE_KEY_SHARE",  # TLS 1.3: no key share in a group we accept
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    }
)

ALPN_REASONS = frozenset({"NO_APPLICATION_PROTOCOL", "TLSV1_ALERT_NO_APPLICATION_PROTOCOL"})

# The peer's certificate failed verification (SSLCertVerificationError, whose
# reason is CERTIFICATE_VERIFY_FAILED), or its CertificateVerify signature
# did not match the certificate's key: the client's on the way in, the
# server's on the way out.
CERT_INVALID_REASONS = frozenset({"CERTIFICATE_VERIFY_FAILED", "BAD_SIGNATURE"})

# Alerts a peer sends when it does not accept the certificate we presented.
# DECRYPT_ERROR: our CertificateVerify signature did not verify with the
# certificate's key.
CERT_REFUSED_ALERTS = frozenset(
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

# Why a peer's certificate failed, from OpenSSL's X509_V_ERR_* verify code
# (x509_vfy.h), in the words the access log uses. Anything else is logged
# with OpenSSL's own message.
CERT_VERIFY_REASONS: dict[int, str] = {
    2: "unknown_ca",  # unable to get issuer certificate
    3: "crl_missing",  # unable to get certificate CRL: client_crl has none of its issuer
    7: "bad_signature",  # certificate signature failure
    8: "crl_bad_signature",  # CRL signature failure
    9: "not_yet_valid",
    10: "expired",
    11: "crl_not_yet_valid",  # the issuer's CRL: its lastUpdate is ahead
    12: "crl_expired",  # the issuer's CRL: past its nextUpdate
    18: "unknown_ca",  # self-signed certificate
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    23: "revoked",
    24: "invalid_ca",  # invalid CA certificate
    26: "wrong_purpose",  # unsupported certificate purpose (wrong extended key usage)
}

# Python formats an OpenSSL error as "[LIB: REASON] reason string (_ssl.c:N)",
# but only names REASON when its own table (built against some OpenSSL
# release) knows the code: Python 3.11 with OpenSSL 3.0 says just
# "[SSL] tlsv1 alert no application protocol (_ssl.c:1006)". OpenSSL's
# reason strings are its reason names in lower case with spaces.
_REASON_STRING = re.compile(r"^\[\w+\] (?P<words>[a-z0-9 ]+) \(")


def openssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason name for `exc` ("" when there is none), also when
    Python's table does not know it."""
    named = getattr(exc, "reason", None)  # None, or absent on a hand-made SSLError
    if named:
        return str(named)
    match = _REASON_STRING.match(str(exc.strerror or ""))
    if match is None:
        return ""
    return match["words"].upper().replace(" ", "_")


def verify_words(exc: ssl.SSLCertVerificationError, words: dict[int, str]) -> str:
    """The log's word for a failed verification, or OpenSSL's own message."""
    code = exc.verify_code
    return words.get(code) or str(exc.verify_message or code)


# The access log's client_cert_error (client_cert_denied) or
# server_cert_error (server_identity_denied) for a verified certificate whose
# identity no `allow` entry admits.
NOT_ALLOWED = "not_allowed"
