"""Every upstream outcome, produced by a real server through the real daemon:
exactly one +1 of `tlsproxy_upstream_handshakes_total` (the whole outcome
vector compared before and after), the access line's `upstream_outcome` and
`server_cert_error`, and what the application is told when the way to the
upstream fails; then the lifecycle (drain, reload, workers) of egress.

The servers are the real ones of tests/upstream_peers.py (openssl s_server,
nginx, Python ssl servers in threads, raw sockets that misbehave on purpose),
through the module-scoped `world` of tests/test_upstream_outcome.py, whose
table proves the classifier on the same servers without the daemon.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config, ConfigError, with_overrides
from proxy.outcome import UpstreamOutcome
from tests.daemon import toml_str
from tests.helpers import (
    STEP,
    UPSTREAM_HANDSHAKES,
    Running,
    free_port,
    outcome_delta,
    outcomes,
    sample,
    scrape,
    start_server,
)
from tests.pki import CA, Leaf, client_context
from tests.test_deploy_egress import Upstream as MTLSUpstream
from tests.test_deploy_renewal import not_after
from tests.test_upstream_outcome import (
    GARBAGE_HANDSHAKE,
    REQUEST,
    T12,
    World,
    world,  # noqa: F401 - the module-scoped fixture, shared
)
from tests.test_workers import _all_logged, _workers
from tests.upstream_peers import (
    READ_SIZE,
    egress_config,
    eof_at_once,
    read_then,
    thread_server,
)

SUCCESS = UpstreamOutcome.SUCCESS
# Failures no exception explains: the deadline, the server's first bytes
# alone, and our own allow table.
NO_EXCEPTION = frozenset(
    {UpstreamOutcome.TIMEOUT, UpstreamOutcome.NOT_TLS, UpstreamOutcome.SERVER_IDENTITY_DENIED}
)
# The upstream's SPIFFE ID an allow table admits, and another one.
API_ID = "spiffe://test.example/ns/pay/sa/api"
OTHER_ID = "spiffe://test.example/ns/pay/sa/other"
# A handshake_timeout short enough for a stalled upstream to hit it soon,
# long enough for any loopback handshake on a loaded machine.
SHORT_HANDSHAKE = 1.0


@dataclass(frozen=True)
class AppSaw:
    """What the plaintext application read from the egress listener."""

    data: bytes
    reset: bool  # the read ended in ECONNRESET, not EOF


FAILED = AppSaw(b"", reset=True)  # what the README promises on any upstream failure


async def app_exchange(port: int, request: bytes = REQUEST, *, half_close: bool = False) -> AppSaw:
    """The application's side: connect, send `request` (if any) and, with
    `half_close`, its FIN; read to the end."""
    sock = trio.socket.socket()
    data = b""
    with sock, trio.fail_after(STEP):
        try:
            # a proxy that resets at once may do it before connect() returns
            await sock.connect(("127.0.0.1", port))
            if request:
                await sock.send(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while chunk := await sock.recv(READ_SIZE):
                data += chunk
        except ConnectionResetError:
            return AppSaw(data, reset=True)
        return AppSaw(data, reset=False)


def stalled(conn: socket.socket) -> None:
    """Accept, read our ClientHello, answer nothing until we close."""
    conn.recv(READ_SIZE)
    conn.recv(READ_SIZE)


@contextlib.contextmanager
def _raw(behaviour: Callable[[socket.socket], None]) -> Iterator[int]:
    with thread_server(behaviour) as server:
        yield server.port


@dataclass(frozen=True)
class Identities:
    """Upstream certificates with SPIFFE IDs, from the world's CA."""

    other: Leaf  # localhost and OTHER_ID
    api_only: Leaf  # API_ID and no DNS name at all


@pytest.fixture(scope="module")
def identities(world: World) -> Identities:  # noqa: F811 - the fixture, as a parameter
    ca: CA = world.ca
    return Identities(
        other=ca.issue("spiffe-other", "localhost", uris=(OTHER_ID,)),
        api_only=ca.issue("spiffe-api", uris=(API_ID,)),
    )


@dataclass(frozen=True)
class Case:
    id: str
    server: Callable[[World, Identities], AbstractContextManager[int]]
    outcome: UpstreamOutcome
    upstream: dict[str, Any] = field(default_factory=dict)  # upstream_tls keys
    client: Callable[[World], Leaf | None] = lambda w: w.client
    host: str = "localhost"
    cert_error: str | None = None
    reply: bytes = b""  # a success: what the application reads first


def _s(*options: str, leaf: Callable[[World], Leaf] | None = None) -> Any:
    """An s_server case's server."""
    return lambda w, i: w.s_server(*options, leaf=None if leaf is None else leaf(w))


# (case, the certificate served, server_cert_error)
BAD_CHAINS: list[tuple[str, Callable[[World], Leaf], str]] = [
    ("unknown CA", lambda w: w.untrusted_server, "unknown_ca"),
    ("expired", lambda w: w.expired_server, "expired"),
    ("not yet valid", lambda w: w.future_server, "not_yet_valid"),
    ("self-signed", lambda w: w.self_signed_server, "self_signed"),
]

CASES = [
    # ---- success, on three kinds of server
    Case("s_server", _s("-www"), SUCCESS, reply=b"HTTP/1.0 200 ok"),
    Case("python", lambda w, i: w.python_server(), SUCCESS, reply=b"ok"),
    Case(
        "nginx",
        lambda w, i: contextlib.nullcontext(w.nginx["ok"]),
        SUCCESS,
        reply=b"HTTP/1.1 200 OK",
    ),
    Case(
        "s_server TLS 1.2 requiring our certificate",
        lambda w, i: w.requiring_client_cert("-tls1_2", "-www"),
        SUCCESS,
        reply=b"HTTP/1.0 200 ok",
    ),
    # ---- timeout: accepts, never answers
    Case(
        "stalled",
        lambda w, i: _raw(stalled),
        UpstreamOutcome.TIMEOUT,
        client=lambda w: None,
    ),
    # ---- server_closed
    Case("EOF", lambda w, i: _raw(eof_at_once), UpstreamOutcome.SERVER_CLOSED),
    Case("reset", lambda w, i: _raw(read_then(b"", reset=True)), UpstreamOutcome.SERVER_CLOSED),
    # ---- not_tls
    Case(
        "nginx plain HTTP",
        lambda w, i: contextlib.nullcontext(w.nginx["plain"]),
        UpstreamOutcome.NOT_TLS,
    ),
    # ---- unsupported_version
    Case(
        "s_server TLS 1.2 only, min_version TLSv1.3",
        _s("-tls1_2"),
        UpstreamOutcome.UNSUPPORTED_VERSION,
        upstream={"min_version": "TLSv1.3"},
    ),
    Case(
        "python TLS 1.2 only, min_version TLSv1.3",
        lambda w, i: w.python_server(maximum=T12),
        UpstreamOutcome.UNSUPPORTED_VERSION,
        upstream={"min_version": "TLSv1.3"},
    ),
    # ---- no_shared_cipher
    Case(
        "s_server groups disjoint",
        _s("-groups", "X448"),
        UpstreamOutcome.NO_SHARED_CIPHER,
        upstream={"groups": ["P-256"]},
    ),
    Case(
        "s_server TLS 1.3 ciphersuites disjoint",
        _s("-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"),
        UpstreamOutcome.NO_SHARED_CIPHER,
        upstream={"ciphersuites": ["TLS_AES_128_GCM_SHA256"]},
    ),
    # ---- server_cert_invalid: s_server serving each bad certificate
    *(
        Case(name, _s(leaf=leaf), UpstreamOutcome.SERVER_CERT_INVALID, cert_error=reason)
        for name, leaf, reason in BAD_CHAINS
    ),
    # ---- server_name_mismatch
    Case(
        "DNS name",
        _s(leaf=lambda w: w.elsewhere),
        UpstreamOutcome.SERVER_NAME_MISMATCH,
        cert_error="hostname_mismatch",
    ),
    Case(
        "IP literal",
        lambda w, i: w.python_server(),
        UpstreamOutcome.SERVER_NAME_MISMATCH,
        host="127.0.0.1",
        cert_error="ip_mismatch",
    ),
    Case(
        "a SPIFFE-only certificate without an allow table",
        lambda w, i: w.s_server("-www", leaf=i.api_only),
        UpstreamOutcome.SERVER_NAME_MISMATCH,
        cert_error="hostname_mismatch",
    ),
    # ---- server_identity_denied, and admitted: the allow table replaces the name check
    Case(
        "another SPIFFE ID",
        lambda w, i: w.s_server("-www", leaf=i.other),
        UpstreamOutcome.SERVER_IDENTITY_DENIED,
        upstream={"allow": {"uri": [API_ID]}},
        cert_error="not_allowed",
    ),
    Case(
        "the allowed SPIFFE ID, no DNS name",
        lambda w, i: w.s_server("-www", leaf=i.api_only),
        SUCCESS,
        upstream={"allow": {"uri": [API_ID]}},
        reply=b"HTTP/1.0 200 ok",
    ),
    # ---- client_cert_rejected_by_server: TLS 1.2 in the handshake, TLS 1.3 on the first read
    Case(
        "s_server TLS 1.2, no client certificate",
        lambda w, i: w.requiring_client_cert("-tls1_2"),
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
        client=lambda w: None,
    ),
    Case(
        "python TLS 1.2, untrusted client certificate",
        lambda w, i: w.python_server(require_client_cert=True, maximum=T12),
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
        client=lambda w: w.untrusted_client,
    ),
    Case(
        "s_server TLS 1.3, no client certificate",
        lambda w, i: w.requiring_client_cert(),
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
        client=lambda w: None,
    ),
    Case(
        "python TLS 1.3, untrusted client certificate",
        lambda w, i: w.python_server(require_client_cert=True),
        UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER,
        client=lambda w: w.untrusted_client,
    ),
    # ---- alpn_mismatch
    Case(
        "s_server -alpn h2",
        _s("-alpn", "h2"),
        UpstreamOutcome.ALPN_MISMATCH,
        upstream={"alpn": ["http/1.1"]},
    ),
    Case(
        "nginx http2",
        lambda w, i: contextlib.nullcontext(w.nginx["h2"]),
        UpstreamOutcome.ALPN_MISMATCH,
        upstream={"alpn": ["imap"]},
    ),
    # ---- protocol_error
    Case(
        "garbage in a handshake record",
        lambda w, i: _raw(read_then(GARBAGE_HANDSHAKE)),
        UpstreamOutcome.PROTOCOL_ERROR,
    ),
]


async def egress(
    nursery: trio.Nursery,
    directory: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
    port: int,
    client: Leaf | None,
    *,
    host: str = "localhost",
    **keys: Any,
) -> Running:
    """The in-process daemon: one egress listener to `host`:`port`."""
    config = egress_config(
        directory,
        port,
        world.ca,
        client,
        host=host,
        listener={"handshake_timeout": SHORT_HANDSHAKE},
        **keys,
    )
    return await start_server(nursery, config)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_an_upstream_outcome_is_one_increment_and_its_access_line(
    nursery: trio.Nursery,
    tmp_path: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
    identities: Identities,
    case: Case,
) -> None:
    with case.server(world, identities) as port:
        proxy = await egress(
            nursery, tmp_path, world, port, case.client(world), host=case.host, **case.upstream
        )
        before = await outcomes(proxy.admin_port, UPSTREAM_HANDSHAKES)
        assert before == dict.fromkeys(UpstreamOutcome, 0.0)  # every outcome exported at zero
        saw = await app_exchange(proxy.port)
        (line,) = await proxy.access_log()
        delta = await outcome_delta(proxy.admin_port, before, UPSTREAM_HANDSHAKES)
    assert delta == {case.outcome.value: 1.0}, line
    assert line["upstream_outcome"] == case.outcome.value
    assert line.get("server_cert_error") == case.cert_error, line
    _, text = await scrape(proxy.admin_port)
    ok = case.outcome is SUCCESS
    duration = "tlsproxy_upstream_handshake_duration_seconds_count"
    assert sample(text, duration, listener="web", result="success") == (1 if ok else 0)
    assert sample(text, duration, listener="web", result="failure") == (0 if ok else 1)
    wants = "tlsproxy_upstream_handshake_wants_total"
    # every upstream handshake waits at least once, for the server's first bytes
    assert line["upstream_wants_read"] >= 1
    assert sample(text, wants, listener="web", want="read") == line["upstream_wants_read"]
    assert sample(text, wants, listener="web", want="write") == line["upstream_wants_write"]
    negotiated = "tlsproxy_upstream_tls_negotiated_total"
    if ok:
        assert saw.data.startswith(case.reply) and not saw.reset, saw
        assert "close_reason" not in line or not line["close_reason"].startswith("upstream_")
        assert (
            sample(
                text,
                negotiated,
                listener="web",
                version=line["upstream_tls_version"],
                cipher=line["upstream_cipher"],
                alpn=line["upstream_alpn"],
                resumed="false",
            )
            == 1
        )
    else:
        assert saw == FAILED
        assert line["close_reason"] == f"upstream_{case.outcome.value}"
        assert ("upstream_error" in line) == (case.outcome not in NO_EXCEPTION), line
        assert f"{negotiated}{{" not in text
    if case.outcome is UpstreamOutcome.TIMEOUT:
        assert SHORT_HANDSHAKE * 1000 <= line["upstream_handshake_ms"] < STEP * 1000


def test_every_upstream_outcome_but_a_bug_has_a_live_case() -> None:
    assert set(UpstreamOutcome) - {case.outcome for case in CASES} == {
        UpstreamOutcome.INTERNAL_ERROR
    }


# A request body bigger than the upstream's first records: the write of its
# later records meets the upstream's reset (it closed after its refusal with
# our bytes unread) while its alert is still unread in our socket.
BIG_REQUEST = b"x" * (200 * 1024)
# Which direction of the splice learns first is a race between the two: before
# the last look at close, 6 connections in 30 (measured) lost the refusal, so
# 20 connections miss it with a chance of about 1 %.
RACES = 20


async def test_a_tls13_refusal_is_counted_when_the_write_to_the_upstream_fails_first(
    nursery: trio.Nursery,
    tmp_path: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
) -> None:
    """The application sends a large body at once; the TLS 1.3 upstream
    refuses our (missing) certificate after our Finished and closes. When
    the direction writing to it fails first, on its reset, the refusal
    already in our socket is still the outcome (not success), and the
    application is reset without a byte."""
    for _ in range(RACES):
        with world.python_server(require_client_cert=True) as port:
            proxy = await egress(nursery, tmp_path, world, port, None)
            saw = await app_exchange(proxy.port, BIG_REQUEST)
            (line,) = await proxy.access_log()
            delta = await outcome_delta(
                proxy.admin_port,
                dict.fromkeys(UpstreamOutcome, 0.0),
                UPSTREAM_HANDSHAKES,
            )
        assert delta == {"client_cert_rejected_by_server": 1.0}, line
        assert line["close_reason"] == "upstream_client_cert_rejected_by_server"
        assert line["upstream_error"].startswith("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]")
        assert saw == FAILED


# ---------------------------------------------------------------- what the client is told


async def test_a_backend_connect_failure_resets_the_app_and_is_no_upstream_handshake(
    nursery: trio.Nursery,
    tmp_path: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
) -> None:
    """Nobody listens on the backend port: counted as a backend connect
    failure, not as an upstream handshake (none began), and the application
    is reset before a byte, exactly as for a failed handshake."""
    proxy = await egress(nursery, tmp_path, world, free_port(), world.client)
    before = await outcomes(proxy.admin_port, UPSTREAM_HANDSHAKES)
    assert await app_exchange(proxy.port, b"") == FAILED  # ECONNRESET on the first read
    (line,) = await proxy.access_log()
    _, text = await scrape(proxy.admin_port)
    failures = "tlsproxy_backend_connect_failures_total"
    assert sample(text, failures, listener="web", reason="refused") == 1
    assert await outcomes(proxy.admin_port, UPSTREAM_HANDSHAKES) == before
    assert sum(before.values()) == 0
    assert line["close_reason"] == "backend_refused"
    assert "upstream_outcome" not in line


STUNNEL_READY = "Configuration successful"
# How often to look whether stunnel has said it is ready.
STUNNEL_POLL = 0.02


@contextlib.contextmanager
def stunnel_client(directory: Path, upstream: int, ca: CA) -> Iterator[tuple[int, Path]]:
    """stunnel as an egress proxy (`client = yes`), verifying the upstream
    against `ca`, every other option at its default (`reset` included):
    its port and its log file."""
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    assert binary is not None, "stunnel4 is in the Makefile's TEST_DEBS"
    port = free_port()
    conf, log = directory / "stunnel.conf", directory / "stunnel.log"
    conf.write_text(
        f"foreground = yes\npid =\n[egress]\nclient = yes\naccept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{upstream}\nverifyChain = yes\nCAfile = {ca.ca_file}\n"
        "checkHost = localhost\n"
    )
    with (
        log.open("w") as out,
        subprocess.Popen([binary, str(conf)], stdout=out, stderr=out) as process,
    ):
        try:
            deadline = time.monotonic() + STEP
            while STUNNEL_READY not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "stunnel did not start"
                time.sleep(STUNNEL_POLL)
            yield port, log
        finally:
            process.kill()


async def test_stunnel_resets_a_plaintext_client_when_its_upstream_fails(
    tmp_path: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
) -> None:
    """The README's comparison: stunnel (`client = yes`, default `reset`)
    refusing its upstream's certificate resets the application's connection
    without a byte, as tlsproxy does."""
    with (
        world.s_server(leaf=world.untrusted_server) as upstream,
        stunnel_client(tmp_path, upstream, world.ca) as (port, log),
    ):
        assert await app_exchange(port, REQUEST) == FAILED
        assert "certificate verify failed" in log.read_text()


def read_through_bridge(port: int, context: ssl.SSLContext) -> bytes:
    """A blocking Python ssl client (run it in a thread): its request, then
    one read; a bare FIN raises SSLEOFError here, a reset ConnectionResetError."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=STEP) as sock,
        context.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False) as tls,
    ):
        tls.sendall(REQUEST)
        return tls.recv(READ_SIZE)


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        ("server certificate from another CA", UpstreamOutcome.SERVER_CERT_INVALID),
        ("TLS 1.3 refusal of our certificate", UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER),
    ],
)
async def test_a_bridged_tls_client_gets_close_notify_when_the_upstream_fails(
    nursery: trio.Nursery,
    tmp_path: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
    failure: str,
    outcome: UpstreamOutcome,
) -> None:
    """Re-encrypting: the client's own handshake succeeded, the upstream's
    failed; the client reads a clean end (close_notify: recv returns b"",
    no SSLError, no reset) and no application byte."""
    refusal = outcome is UpstreamOutcome.CLIENT_CERT_REJECTED_BY_SERVER
    server = (
        world.python_server(require_client_cert=True)
        if refusal
        else world.s_server(leaf=world.untrusted_server)
    )
    front = {"tls": {"certificates": [world.server.pair()]}}
    with server as port:
        config = egress_config(tmp_path, port, world.ca, None, listener=front)
        proxy = await start_server(nursery, config)
        before = await outcomes(proxy.admin_port, UPSTREAM_HANDSHAKES)
        got = await trio.to_thread.run_sync(
            read_through_bridge, proxy.port, client_context(world.ca)
        )
        (line,) = await proxy.access_log()
        delta = await outcome_delta(proxy.admin_port, before, UPSTREAM_HANDSHAKES)
    assert got == b""
    assert delta == {outcome.value: 1.0}
    assert line["outcome"] == "success"
    assert line["upstream_outcome"] == outcome.value
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_handshakes_total", listener="web", outcome="success") == 1


# ---------------------------------------------------------------- lifecycle


DRAIN_TIMEOUT = 0.5  # seconds a drain waits before it cuts


async def test_a_drain_cuts_a_stalled_upstream_handshake_and_counts_it_once(
    nursery: trio.Nursery,
    tmp_path: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
) -> None:
    """A drain while the upstream has our hello and answers nothing (its
    handshake_timeout far away): the connection is cut at drain_timeout,
    logged close_reason=drain, counted once as `timeout` (cut unfinished,
    no EOF from the upstream), and the application reset without a byte."""
    hello_in = threading.Event()

    def stall(conn: socket.socket) -> None:
        conn.recv(READ_SIZE)
        hello_in.set()
        conn.recv(READ_SIZE)  # until we are cut

    with _raw(stall) as port:
        config = egress_config(
            tmp_path,
            port,
            world.ca,
            world.client,
            listener={"handshake_timeout": STEP * 3},
            process={"drain_timeout": DRAIN_TIMEOUT},
        )
        proxy = await start_server(nursery, config)
        before = await outcomes(proxy.admin_port, UPSTREAM_HANDSHAKES)
        async with trio.open_nursery() as app:
            saw: list[AppSaw] = []

            async def exchange() -> None:
                saw.append(await app_exchange(proxy.port))

            app.start_soon(exchange)
            assert await trio.to_thread.run_sync(hello_in.wait, STEP)
            drained_at = trio.current_time()
            proxy.server.request_drain()
            (line,) = await proxy.access_log()
            cut_after = trio.current_time() - drained_at
    assert DRAIN_TIMEOUT <= cut_after < STEP
    assert line["close_reason"] == "drain"
    assert line["upstream_outcome"] == "timeout"
    assert saw == [FAILED]
    text = generate_latest(proxy.server.metrics.registry).decode()  # the admin port has closed
    after = {
        outcome.value: sample(text, UPSTREAM_HANDSHAKES, outcome=outcome.value)
        for outcome in UpstreamOutcome
    }
    assert {k: v - before[k] for k, v in after.items() if v != before[k]} == {"timeout": 1.0}


def _expiry_series(text: str) -> dict[str, float]:
    """The expiry gauge of listener "web", by subject."""
    return {
        s.labels["subject"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tlsproxy_certificate_expiry_timestamp_seconds"
        and s.labels["listener"] == "web"
    }


def _subject(leaf: Leaf) -> str:
    return x509.load_pem_x509_certificate(leaf.cert.read_bytes()).subject.rfc4514_string()


async def test_a_reload_changes_the_client_certificate_and_a_bad_key_keeps_the_old(
    nursery: trio.Nursery,
    tmp_path: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
) -> None:
    """A reload with a new client certificate: the next connection presents
    it (the upstream sees its serial) and the expiry gauge follows (the old
    subject's series gone). A reload whose key does not match its
    certificate fails and the running one keeps being presented."""
    ca = world.ca
    first = ca.issue("me-first", client=True)
    second = ca.issue("me-second", client=True, not_after=datetime.now(UTC) + timedelta(days=30))
    third = ca.issue("me-third", client=True)
    mismatched = Leaf(third.cert, second.key, third.serial)
    upstream = MTLSUpstream(ca, world.server)
    port = await upstream.start(nursery)

    def config(client: Leaf) -> Config:
        return egress_config(tmp_path, port, ca, client, session_resumption=False)

    proxy = await start_server(nursery, config(first))

    async def presented() -> int:
        echoed = await app_exchange(proxy.port, b"ping", half_close=True)
        assert echoed == AppSaw(b"ping", reset=False)
        return upstream.client_serials[-1]

    async def expiries() -> dict[str, float]:
        return _expiry_series((await scrape(proxy.admin_port))[1])

    assert await presented() == first.serial
    assert await expiries() == {_subject(first): not_after(first)}
    assert await proxy.server.reload(lambda: config(second), trigger="test")
    assert await presented() == second.serial
    assert await expiries() == {_subject(second): not_after(second)}
    assert not await proxy.server.reload(lambda: config(mismatched), trigger="test")
    (rejected,) = proxy.log_events("reload rejected; the previous config keeps serving")
    assert rejected["error"].startswith(
        "listeners[0].upstream_tls.certificates[0].key: key does not match certificate"
    )
    assert await presented() == second.serial
    assert await expiries() == {_subject(second): not_after(second)}
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_config_reloads_total", result="failure") == 1
    assert sample(text, "tlsproxy_config_reloads_total", result="success") == 1
    assert sample(text, UPSTREAM_HANDSHAKES, listener="web", outcome="success") == 3


# Connections made at most until the kernel has given each of two workers
# some (SO_REUSEPORT hashes the client's port: one worker missing all of 40
# has a chance of 2**-39).
MAX_SPREAD = 40


async def test_two_workers_upstream_outcomes_merge_into_one_scrape(
    nursery: trio.Nursery,
    tmp_path: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
) -> None:
    """workers = 2 (the subprocess daemon): connections served by both
    workers, and one scrape of the supervisor counts every upstream
    handshake of both, in each upstream series."""
    upstream = MTLSUpstream(world.ca, world.server)
    port = await upstream.start(nursery)
    config = tmp_path / "tlsproxy.toml"
    config.write_text(
        f"""\
[admin]
listen = "127.0.0.1:0"

[process]
workers = 2

[[listeners]]
name = "web"
listen = "127.0.0.1:0"
backend = "localhost:{port}"

[listeners.upstream_tls]
ca = {toml_str(world.ca.ca_file)}
certificates = [{{ cert = {toml_str(world.client.cert)}, key = {toml_str(world.client.key)} }}]
""",
        encoding="utf-8",
    )
    async with _workers(nursery, tmp_path, config) as (daemon, listen_port, admin_port, pids):
        for count in range(1, MAX_SPREAD + 1):
            echoed = await app_exchange(listen_port, b"ping", half_close=True)
            assert echoed == AppSaw(b"ping", reset=False)
            lines = await _all_logged(daemon, count)
            if {line["pid"] for line in lines} == set(pids):
                break
        else:
            raise AssertionError(f"one worker served all {MAX_SPREAD} connections")
        _, text = await scrape(admin_port)
    assert all(line["upstream_outcome"] == "success" for line in lines)
    assert upstream.client_serials == [world.client.serial] * count
    merged = {o.value: sample(text, UPSTREAM_HANDSHAKES, outcome=o.value) for o in UpstreamOutcome}
    assert merged == {**dict.fromkeys(merged, 0.0), "success": float(count)}
    duration = "tlsproxy_upstream_handshake_duration_seconds_count"
    assert sample(text, duration, listener="web", result="success") == count
    assert sample(text, "tlsproxy_upstream_handshake_wants_total", want="read") >= count
    negotiated = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tlsproxy_upstream_tls_negotiated_total"
    ]
    assert sum(negotiated) == count


def test_cert_flags_on_a_plaintext_in_first_listener_are_a_config_error(
    tmp_path: Path,
    world: World,  # noqa: F811 - the fixture, as a parameter
) -> None:
    """`tlsproxy run --config` on a config whose first listener takes
    plaintext in (egress) crashed on a TypeError, flags or not (the workers
    test above ran into it); --cert/--key have no certificate to replace."""
    config = egress_config(tmp_path, 1, world.ca, world.client)
    assert with_overrides(config) is config
    assert with_overrides(config, backend="127.0.0.1:2").listeners[0].backend.port == 2
    with pytest.raises(ConfigError, match=r"--cert and --key: listener 'web' has no"):
        with_overrides(config, cert="x.pem", key="x.key")
