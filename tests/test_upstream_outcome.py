"""The upstream classifier on genuine exceptions from real servers.

Each case runs a real server on loopback (openssl s_server, nginx, Java's
JSSE, a Python ssl server, or a raw socket that misbehaves on purpose), drives a
client-side SSLObject over memory BIOs against it (tests/upstream_peers.py),
and asserts both what OpenSSL raised (class, reason, verify code: the table
the classifier is built from) and the outcome `classify_upstream` gives it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.outcome import (
    UpstreamOutcome,
    classify_first_read_error,
    classify_upstream,
    openssl_reason,
    server_cert_reason,
)
from tests.pki import CA, Leaf, self_signed
from tests.upstream_peers import (
    Attempt,
    ThreadServer,
    attempt_on,
    close_unread,
    eof_at_once,
    jsse,
    nginx,
    nginx_http_temp,
    originate,
    read_then,
    s_server,
    thread_server,
    tls_behaviour,
)

T12 = ssl.TLSVersion.TLSv1_2
T13 = ssl.TLSVersion.TLSv1_3
HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
# A handshake record header announcing 16 bytes, then 16 bytes that are no
# handshake message; and an alert record whose two bytes are no alert.
GARBAGE_HANDSHAKE = b"\x16\x03\x03\x00\x10" + b"\xff" * 16
GARBAGE_ALERT = b"\x15\x03\x03\x00\x02\xff\xff"
BAD_RECORD_VERSION = b"\x16\x09\x09\x00\x10" + b"\x02" * 16
# A record header, then the server goes away mid-record.
HEADER_THEN_EOF = b"\x16\x03\x03\x00\x40\x02"


@dataclass(frozen=True)
class World:
    """The certificates and the one nginx every case may use."""

    ca: CA
    server: Leaf  # localhost, ECDSA, from `ca`
    rsa_server: Leaf  # localhost, RSA: TLS 1.2 ECDHE-RSA suites
    elsewhere: Leaf  # example.net only
    untrusted_server: Leaf  # localhost, from another CA
    expired_server: Leaf
    future_server: Leaf
    self_signed_server: Leaf
    client: Leaf
    untrusted_client: Leaf
    expired_client: Leaf
    server_as_client: Leaf  # serverAuth extended key usage only
    nginx: dict[str, int]
    jsse: dict[str, int]

    def s_server(self, *options: str, leaf: Leaf | None = None) -> AbstractContextManager[int]:
        leaf = leaf or self.server
        return s_server("-cert", str(leaf.cert), "-key", str(leaf.key), *options)

    def requiring_client_cert(self, *options: str) -> AbstractContextManager[int]:
        """s_server refusing a missing or unverified client certificate
        (without -verify_return_error it logs the failure and carries on)."""
        return self.s_server(
            "-Verify", "1", "-verify_return_error", "-CAfile", str(self.ca.ca_file), *options
        )

    def python_server(
        self,
        *,
        require_client_cert: bool = False,
        minimum: ssl.TLSVersion | None = None,
        maximum: ssl.TLSVersion | None = None,
        alpn: list[str] | None = None,
    ) -> AbstractContextManager[int]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server.cert, self.server.key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.trust(context)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        return _port_of(thread_server(tls_behaviour(context)))

    def client_context(
        self,
        leaf: Leaf | None = None,
        *,
        minimum: ssl.TLSVersion | None = None,
        maximum: ssl.TLSVersion | None = None,
        ciphers: str | None = None,
        group: str | None = None,
        alpn: list[str] | None = None,
    ) -> ssl.SSLContext:
        """The daemon's kind of client: verifies the server against `ca`."""
        context = self.ca.trust(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        if leaf is not None:
            context.load_cert_chain(leaf.cert, leaf.key)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
        if ciphers is not None:
            context.set_ciphers(ciphers)
        if group is not None:
            context.set_ecdh_curve(group)  # OpenSSL 3: the only group we offer
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        return context


@contextlib.contextmanager
def _port_of(server: AbstractContextManager[ThreadServer]) -> Iterator[int]:
    with server as running:
        yield running.port


@contextlib.contextmanager
def _raw(behaviour: Callable[..., None]) -> Iterator[int]:
    with _port_of(thread_server(behaviour)) as port:
        yield port


def _nginx_blocks(world_dir: Path, server: Leaf, ca: CA) -> Callable[[dict[str, int]], str]:
    def blocks(p: dict[str, int]) -> str:
        temp = nginx_http_temp(world_dir)
        cert = f"ssl_certificate {server.cert}; ssl_certificate_key {server.key};"
        verify = f"ssl_verify_client on; ssl_client_certificate {ca.ca_file};"
        return f"""
http {{
  access_log off; {temp} {cert}
  server {{ listen 127.0.0.1:{p["plain"]}; return 200 "plain"; }}
  server {{ listen 127.0.0.1:{p["ok"]} ssl; return 200 "ok"; }}
  server {{ listen 127.0.0.1:{p["h2"]} ssl http2; return 200 "ok"; }}
  server {{ listen 127.0.0.1:{p["tls13"]} ssl; ssl_protocols TLSv1.3; return 200 "ok"; }}
  server {{ listen 127.0.0.1:{p["verify"]} ssl; {verify} return 200 "verified"; }}
}}
stream {{
  {cert}
  server {{ listen 127.0.0.1:{p["stream_alpn"]} ssl; ssl_alpn h2; return "ok"; }}
  server {{ listen 127.0.0.1:{p["stream_verify"]} ssl; {verify} return "verified"; }}
}}
"""

    return blocks


NGINX_SERVERS = ["plain", "ok", "h2", "tls13", "verify", "stream_alpn", "stream_verify"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("upstream")
    ca, other = CA(directory), CA(directory, "another CA")
    now = datetime.now(UTC)
    long_ago, yesterday = now - timedelta(days=10), now - timedelta(days=1)
    server = ca.issue("server", "localhost")
    nginx_dir = directory / "nginx"
    nginx_dir.mkdir()
    with (
        nginx(nginx_dir, _nginx_blocks(nginx_dir, server, ca), NGINX_SERVERS) as nginx_ports,
        jsse(server.cert, server.key, ca.ca_file) as jsse_ports,
    ):
        yield World(
            ca=ca,
            server=server,
            rsa_server=ca.issue("rsa-server", "localhost", key_type="rsa"),
            elsewhere=ca.issue("elsewhere", "example.net"),
            untrusted_server=other.issue("untrusted-server", "localhost"),
            expired_server=ca.issue(
                "expired-server", "localhost", not_before=long_ago, not_after=yesterday
            ),
            future_server=ca.issue(
                "future-server", "localhost", not_before=now + timedelta(days=1)
            ),
            self_signed_server=self_signed(directory, "self-signed", "localhost"),
            client=ca.issue("client", "client", client=True),
            untrusted_client=other.issue("untrusted-client", "client", client=True),
            expired_client=ca.issue(
                "expired-client", "client", client=True, not_before=long_ago, not_after=yesterday
            ),
            server_as_client=ca.issue("server-as-client", "client"),
            nginx=nginx_ports,
            jsse=jsse_ports,
        )


@dataclass(frozen=True)
class Seen:
    """What OpenSSL raised: the columns of the observed table."""

    error: type[BaseException] | None
    reason: str | None = None  # openssl_reason(); None for an OSError
    verify_code: int | None = None


@dataclass(frozen=True)
class Case:
    id: str
    server: Callable[[World], AbstractContextManager[int]]
    client: Callable[[World], ssl.SSLContext]
    seen: Seen
    outcome: UpstreamOutcome
    hostname: str = "localhost"
    cert_reason: str | None = None
    first: bytes | None = None  # checked when set


def _default(w: World) -> ssl.SSLContext:
    return w.client_context()


OK = Seen(None)
EOF = Seen(ssl.SSLEOFError, "UNEXPECTED_EOF_WHILE_READING")
RESET = Seen(ConnectionResetError)
WRONG_VERSION = Seen(ssl.SSLError, "WRONG_VERSION_NUMBER")
PROTOCOL_VERSION = Seen(ssl.SSLError, "TLSV1_ALERT_PROTOCOL_VERSION")
HANDSHAKE_FAILURE = Seen(ssl.SSLError, "SSLV3_ALERT_HANDSHAKE_FAILURE")
UNKNOWN_CA_ALERT = Seen(ssl.SSLError, "TLSV1_ALERT_UNKNOWN_CA")
NO_ALPN = Seen(ssl.SSLError, "TLSV1_ALERT_NO_APPLICATION_PROTOCOL")


def _verify(code: int) -> Seen:
    return Seen(ssl.SSLCertVerificationError, "CERTIFICATE_VERIFY_FAILED", code)


CASES = [
    # ---- success
    Case("s_server", lambda w: w.s_server(), _default, OK, UpstreamOutcome.SUCCESS),
    Case(
        "nginx",
        lambda w: contextlib.nullcontext(w.nginx["ok"]),
        _default,
        OK,
        UpstreamOutcome.SUCCESS,
    ),
    Case("python", lambda w: w.python_server(), _default, OK, UpstreamOutcome.SUCCESS),
    Case(
        "s_server TLS 1.2 with our client cert",
        lambda w: w.requiring_client_cert("-tls1_2"),
        lambda w: w.client_context(w.client, maximum=T12),
        OK,
        UpstreamOutcome.SUCCESS,
    ),
    Case(
        "JSSE",
        lambda w: contextlib.nullcontext(w.jsse["ok"]),
        _default,
        OK,
        UpstreamOutcome.SUCCESS,
    ),
    # ---- server_closed
    Case(
        "EOF at accept",
        lambda w: _raw(eof_at_once),
        _default,
        EOF,
        UpstreamOutcome.SERVER_CLOSED,
        first=b"",
    ),
    Case(
        "close with our hello unread",
        lambda w: _raw(close_unread),
        _default,
        RESET,
        UpstreamOutcome.SERVER_CLOSED,
    ),
    Case(
        "close after our hello",
        lambda w: _raw(read_then(b"")),
        _default,
        EOF,
        UpstreamOutcome.SERVER_CLOSED,
    ),
    Case(
        "reset after our hello",
        lambda w: _raw(read_then(b"", reset=True)),
        _default,
        RESET,
        UpstreamOutcome.SERVER_CLOSED,
    ),
    Case(
        "close mid-record",
        lambda w: _raw(read_then(HEADER_THEN_EOF)),
        _default,
        EOF,
        UpstreamOutcome.SERVER_CLOSED,
        first=HEADER_THEN_EOF[:5],
    ),
    # ---- not_tls
    Case(
        "HTTP 400 to our hello",
        lambda w: _raw(read_then(HTTP_400)),
        _default,
        WRONG_VERSION,
        UpstreamOutcome.NOT_TLS,
        first=b"HTTP/",
    ),
    Case(
        "nginx plain HTTP port",
        lambda w: contextlib.nullcontext(w.nginx["plain"]),
        _default,
        WRONG_VERSION,
        UpstreamOutcome.NOT_TLS,
        first=b"HTTP/",
    ),
    Case(
        "SSH banner",
        lambda w: _raw(read_then(b"SSH-2.0-OpenSSH_9.2\r\n")),
        _default,
        WRONG_VERSION,
        UpstreamOutcome.NOT_TLS,
    ),
    # ---- unsupported_version
    Case(
        "s_server TLS 1.3 only, we max 1.2",
        lambda w: w.s_server("-tls1_3"),
        lambda w: w.client_context(maximum=T12),
        PROTOCOL_VERSION,
        UpstreamOutcome.UNSUPPORTED_VERSION,
        first=b"\x15\x03\x03\x00\x02",
    ),
    Case(
        "s_server TLS 1.2 only, we min 1.3",
        lambda w: w.s_server("-tls1_2"),
        lambda w: w.client_context(minimum=T13),
        PROTOCOL_VERSION,
        UpstreamOutcome.UNSUPPORTED_VERSION,
    ),
    Case(
        "s_server TLS 1.0 only",
        lambda w: w.s_server("-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"),
        _default,
        PROTOCOL_VERSION,
        UpstreamOutcome.UNSUPPORTED_VERSION,
    ),
    Case(
        "python TLS 1.3 only, we max 1.2",
        lambda w: w.python_server(minimum=T13),
        lambda w: w.client_context(maximum=T12),
        PROTOCOL_VERSION,
        UpstreamOutcome.UNSUPPORTED_VERSION,
    ),
    Case(
        "nginx TLS 1.3 only, we max 1.2",
        lambda w: contextlib.nullcontext(w.nginx["tls13"]),
        lambda w: w.client_context(maximum=T12),
        PROTOCOL_VERSION,
        UpstreamOutcome.UNSUPPORTED_VERSION,
    ),
    Case(
        "JSSE TLS 1.3 only, we max 1.2",
        lambda w: contextlib.nullcontext(w.jsse["tls13"]),
        lambda w: w.client_context(maximum=T12),
        PROTOCOL_VERSION,
        UpstreamOutcome.UNSUPPORTED_VERSION,
    ),
    # ---- no_shared_cipher: the alert answers our hello (first record an alert)
    Case(
        "s_server disjoint TLS 1.2 ciphers",
        lambda w: w.s_server("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA", leaf=w.rsa_server),
        lambda w: w.client_context(maximum=T12, ciphers="ECDHE-RSA-AES256-GCM-SHA384"),
        HANDSHAKE_FAILURE,
        UpstreamOutcome.NO_SHARED_CIPHER,
        first=b"\x15\x03\x03\x00\x02",
    ),
    Case(
        "s_server disjoint groups, TLS 1.3",
        lambda w: w.s_server("-groups", "X448"),
        lambda w: w.client_context(group="prime256v1"),
        HANDSHAKE_FAILURE,
        UpstreamOutcome.NO_SHARED_CIPHER,
        first=b"\x15\x03\x03\x00\x02",
    ),
    Case(
        "s_server disjoint groups, TLS 1.2",
        lambda w: w.s_server("-tls1_2", "-groups", "X448"),
        lambda w: w.client_context(maximum=T12, group="prime256v1"),
        HANDSHAKE_FAILURE,
        UpstreamOutcome.NO_SHARED_CIPHER,
    ),
    Case(
        "JSSE disjoint TLS 1.2 ciphers",
        lambda w: contextlib.nullcontext(w.jsse["ciphers12"]),
        lambda w: w.client_context(maximum=T12, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384"),
        HANDSHAKE_FAILURE,
        UpstreamOutcome.NO_SHARED_CIPHER,
        first=b"\x15\x03\x03\x00\x02",
    ),
    Case(
        "JSSE disjoint groups, TLS 1.2",
        lambda w: contextlib.nullcontext(w.jsse["ok"]),
        lambda w: w.client_context(maximum=T12, group="X448"),
        HANDSHAKE_FAILURE,
        UpstreamOutcome.NO_SHARED_CIPHER,
        first=b"\x15\x03\x03\x00\x02",
    ),
    # ---- server_cert_invalid
    Case(
        "server cert from an unknown CA",
        lambda w: w.s_server(leaf=w.untrusted_server),
        _default,
        _verify(20),
        UpstreamOutcome.SERVER_CERT_INVALID,
        cert_reason="unknown_ca",
    ),
    Case(
        "expired server cert",
        lambda w: w.s_server(leaf=w.expired_server),
        _default,
        _verify(10),
        UpstreamOutcome.SERVER_CERT_INVALID,
        cert_reason="expired",
    ),
    Case(
        "not yet valid server cert",
        lambda w: w.s_server(leaf=w.future_server),
        _default,
        _verify(9),
        UpstreamOutcome.SERVER_CERT_INVALID,
        cert_reason="not_yet_valid",
    ),
    Case(
        "self-signed server cert",
        lambda w: w.s_server(leaf=w.self_signed_server),
        _default,
        _verify(18),
        UpstreamOutcome.SERVER_CERT_INVALID,
        cert_reason="self_signed",
    ),
    # ---- server_name_mismatch
    Case(
        "DNS name not in the cert",
        lambda w: w.s_server(leaf=w.elsewhere),
        _default,
        _verify(62),
        UpstreamOutcome.SERVER_NAME_MISMATCH,
        cert_reason="hostname_mismatch",
    ),
    Case(
        "IP literal not in the cert",
        lambda w: w.s_server(),
        _default,
        _verify(64),
        UpstreamOutcome.SERVER_NAME_MISMATCH,
        hostname="127.0.0.1",
        cert_reason="ip_mismatch",
    ),
    # ---- client_cert_rejected_by_server, TLS 1.2: inside the handshake
    Case(
        "s_server TLS 1.2, no client cert",
        lambda w: w.requiring_client_cert("-tls1_2"),
        lambda w: w.client_context(maximum=T12),
        HANDSHAKE_FAILURE,
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
        first=b"\x16\x03\x03\x00\x41",  # its ServerHello came first
    ),
    Case(
        "s_server TLS 1.2, untrusted client cert",
        lambda w: w.requiring_client_cert("-tls1_2"),
        lambda w: w.client_context(w.untrusted_client, maximum=T12),
        UNKNOWN_CA_ALERT,
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    Case(
        "s_server TLS 1.2, expired client cert",
        lambda w: w.requiring_client_cert("-tls1_2"),
        lambda w: w.client_context(w.expired_client, maximum=T12),
        Seen(ssl.SSLError, "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    Case(
        "python TLS 1.2, no client cert",
        lambda w: w.python_server(require_client_cert=True, maximum=T12),
        _default,
        HANDSHAKE_FAILURE,
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    Case(
        "python TLS 1.2, untrusted client cert",
        lambda w: w.python_server(require_client_cert=True, maximum=T12),
        lambda w: w.client_context(w.untrusted_client),
        UNKNOWN_CA_ALERT,
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    Case(
        "python TLS 1.2, client cert without clientAuth usage",
        lambda w: w.python_server(require_client_cert=True, maximum=T12),
        lambda w: w.client_context(w.server_as_client),
        Seen(ssl.SSLError, "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE"),
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    Case(
        "JSSE TLS 1.2, no client cert",
        lambda w: contextlib.nullcontext(w.jsse["need12"]),
        _default,
        Seen(ssl.SSLError, "SSLV3_ALERT_BAD_CERTIFICATE"),
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    Case(
        "JSSE TLS 1.2, untrusted client cert",
        lambda w: contextlib.nullcontext(w.jsse["need12"]),
        lambda w: w.client_context(w.untrusted_client),
        Seen(ssl.SSLError, "SSLV3_ALERT_CERTIFICATE_UNKNOWN"),
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    Case(
        "JSSE TLS 1.2, expired client cert",
        lambda w: contextlib.nullcontext(w.jsse["need12"]),
        lambda w: w.client_context(w.expired_client),
        Seen(ssl.SSLError, "SSLV3_ALERT_CERTIFICATE_UNKNOWN"),
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
    ),
    # ---- alpn_mismatch: servers that send no_application_protocol
    Case(
        "s_server -alpn h2, TLS 1.3",
        lambda w: w.s_server("-alpn", "h2"),
        lambda w: w.client_context(alpn=["http/1.1"]),
        NO_ALPN,
        UpstreamOutcome.ALPN_MISMATCH,
    ),
    Case(
        "s_server -alpn h2, TLS 1.2",
        lambda w: w.s_server("-alpn", "h2", "-tls1_2"),
        lambda w: w.client_context(alpn=["http/1.1"]),
        NO_ALPN,
        UpstreamOutcome.ALPN_MISMATCH,
    ),
    Case(
        "nginx http2",
        lambda w: contextlib.nullcontext(w.nginx["h2"]),
        lambda w: w.client_context(alpn=["imap"]),
        NO_ALPN,
        UpstreamOutcome.ALPN_MISMATCH,
    ),
    Case(
        "nginx stream ssl_alpn h2",
        lambda w: contextlib.nullcontext(w.nginx["stream_alpn"]),
        lambda w: w.client_context(alpn=["imap"]),
        NO_ALPN,
        UpstreamOutcome.ALPN_MISMATCH,
    ),
    Case(
        "JSSE ALPN h2",
        lambda w: contextlib.nullcontext(w.jsse["alpn"]),
        lambda w: w.client_context(alpn=["http/1.1"]),
        NO_ALPN,
        UpstreamOutcome.ALPN_MISMATCH,
    ),
    # ---- protocol_error
    Case(
        "garbage in a handshake record",
        lambda w: _raw(read_then(GARBAGE_HANDSHAKE)),
        _default,
        Seen(ssl.SSLError, "UNEXPECTED_MESSAGE"),
        UpstreamOutcome.PROTOCOL_ERROR,
        first=GARBAGE_HANDSHAKE[:5],
    ),
    Case(
        "garbage in an alert record",
        lambda w: _raw(read_then(GARBAGE_ALERT)),
        _default,
        Seen(ssl.SSLError, "UNKNOWN_ALERT_TYPE"),
        UpstreamOutcome.PROTOCOL_ERROR,
    ),
    Case(
        "handshake record of no TLS version",
        lambda w: _raw(read_then(BAD_RECORD_VERSION)),
        _default,
        WRONG_VERSION,
        UpstreamOutcome.PROTOCOL_ERROR,
    ),
]


def _observed(error: BaseException | None) -> Seen:
    if error is None:
        return OK
    if isinstance(error, ssl.SSLCertVerificationError):
        return Seen(type(error), openssl_reason(error), error.verify_code)
    if isinstance(error, ssl.SSLError):
        return Seen(type(error), openssl_reason(error))
    return Seen(type(error))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_real_server(world: World, case: Case) -> None:
    with case.server(world) as port, attempt_on(port, case.client(world), case.hostname) as seen:
        assert _observed(seen.error) == case.seen, seen.error
        if case.first is not None:
            assert seen.first == case.first
        outcome = classify_upstream(first=seen.first, error=seen.error, timed_out=False)
        assert outcome is case.outcome
        if seen.error is not None:
            assert server_cert_reason(seen.error) == case.cert_reason


def test_every_outcome_but_the_callers_own_is_observed_on_a_real_server() -> None:
    """The table covers the vocabulary: timeout (the caller's deadline),
    server_identity_denied (the caller's allow table) and internal_error (a
    bug) are the only outcomes no server can cause."""
    observed = {case.outcome for case in CASES}
    observed |= {UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER}  # also TLS 1.3, below
    assert set(UpstreamOutcome) - observed == {
        UpstreamOutcome.TIMEOUT,
        UpstreamOutcome.SERVER_IDENTITY_DENIED,
        UpstreamOutcome.INTERNAL_ERROR,
    }


# ---------------------------------------------------------------- TLS 1.3: on the first read


@dataclass(frozen=True)
class ReadCase:
    id: str
    server: Callable[[World], AbstractContextManager[int]]
    client: Callable[[World], ssl.SSLContext]
    reason: str
    request: bytes = REQUEST


READ_CASES = [
    ReadCase(
        "s_server, no client cert",
        lambda w: w.requiring_client_cert(),
        _default,
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    ),
    ReadCase(
        "s_server, no client cert, nothing written",
        lambda w: w.requiring_client_cert(),
        _default,
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        request=b"",
    ),
    ReadCase(
        "s_server, untrusted client cert",
        lambda w: w.requiring_client_cert(),
        lambda w: w.client_context(w.untrusted_client),
        "TLSV1_ALERT_UNKNOWN_CA",
    ),
    ReadCase(
        "s_server, expired client cert",
        lambda w: w.requiring_client_cert(),
        lambda w: w.client_context(w.expired_client),
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    ),
    ReadCase(
        "python, no client cert",
        lambda w: w.python_server(require_client_cert=True),
        _default,
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    ),
    ReadCase(
        "python, untrusted client cert",
        lambda w: w.python_server(require_client_cert=True),
        lambda w: w.client_context(w.untrusted_client),
        "TLSV1_ALERT_UNKNOWN_CA",
    ),
    ReadCase(
        "python, client cert without clientAuth usage",
        lambda w: w.python_server(require_client_cert=True),
        lambda w: w.client_context(w.server_as_client),
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    ),
    ReadCase(
        "JSSE, no client cert",
        lambda w: contextlib.nullcontext(w.jsse["need13"]),
        _default,
        "SSLV3_ALERT_BAD_CERTIFICATE",
    ),
    ReadCase(
        "JSSE, untrusted client cert",
        lambda w: contextlib.nullcontext(w.jsse["need13"]),
        lambda w: w.client_context(w.untrusted_client),
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    ),
    ReadCase(
        "JSSE, expired client cert",
        lambda w: contextlib.nullcontext(w.jsse["need13"]),
        lambda w: w.client_context(w.expired_client),
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    ),
]


@pytest.mark.parametrize("case", READ_CASES, ids=[c.id for c in READ_CASES])
def test_tls13_client_cert_rejection_arrives_on_the_first_read(
    world: World, case: ReadCase
) -> None:
    with case.server(world) as port:
        seen = originate(port, case.client(world), request=case.request)
        with seen.sock:
            assert seen.error is None  # our side of the handshake finished
            assert seen.obj.version() == "TLSv1.3"
            assert (
                classify_upstream(first=seen.first, error=None, timed_out=False)
                is UpstreamOutcome.SUCCESS
            )
            with pytest.raises(ssl.SSLError) as raised:
                seen.first_read()
    assert type(raised.value) is ssl.SSLError
    assert openssl_reason(raised.value) == case.reason
    assert classify_first_read_error(raised.value) is UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER


def _read_outcome(seen: Attempt) -> tuple[bytes | None, UpstreamOutcome | None]:
    """The first read's bytes, or the classification of its error."""
    try:
        return seen.first_read(), None
    except (ssl.SSLError, OSError) as exc:
        return None, classify_first_read_error(exc)


def test_an_ordinary_first_read_error_is_not_a_client_cert_rejection(world: World) -> None:
    """A server that closes without close_notify after a good handshake: the
    read's SSLEOFError is a splice error, not a verdict on our certificate."""

    def handshake_then_vanish(conn: socket.socket) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(world.server.cert, world.server.key)
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)  # then close: SSLSocket.close sends no close_notify

    with _raw(handshake_then_vanish) as port:
        seen = originate(port, world.client_context(), request=b"x")
        with seen.sock:
            assert seen.error is None
            with pytest.raises(ssl.SSLEOFError) as raised:
                seen.first_read()
    assert classify_first_read_error(raised.value) is None


@pytest.mark.parametrize("maximum", [T12, T13], ids=["TLS 1.2", "TLS 1.3"])
@pytest.mark.parametrize("leaf", ["none", "untrusted"])
def test_nginx_refuses_a_client_cert_after_the_handshake_without_an_alert(
    world: World, maximum: ssl.TLSVersion, leaf: str
) -> None:
    """nginx's ssl_verify_client never fails the handshake: http answers
    400, stream closes with close_notify. No TLS evidence of the refusal
    exists, so no classifier can see it (the caller sees a 400 or an EOF)."""
    client = world.untrusted_client if leaf == "untrusted" else None
    context = world.client_context(client, maximum=maximum)
    for server, expected in (("verify", b"HTTP/1.1 400 "), ("stream_verify", b"")):
        seen = originate(world.nginx[server], context, request=REQUEST)
        with seen.sock:
            assert seen.error is None
            data, rejected = _read_outcome(seen)
        assert rejected is None
        assert data is not None and data.startswith(expected)


def test_a_server_that_selects_no_alpn_protocol_completes_the_handshake(world: World) -> None:
    """Python's ssl server sends no no_application_protocol alert: it just
    selects none, so the handshake succeeds without ALPN (and only a caller
    that requires a protocol could call that a mismatch)."""
    client = world.client_context(alpn=["http/1.1"])
    with world.python_server(alpn=["h2"]) as port, attempt_on(port, client) as seen:
        assert seen.error is None
        assert seen.obj.selected_alpn_protocol() is None
    assert classify_upstream(first=seen.first, error=None, timed_out=False) is (
        UpstreamOutcome.SUCCESS
    )
