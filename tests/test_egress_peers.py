"""Egress against real TLS servers: the bytes, the half-closes, mTLS, resumption.

The app speaks plaintext to an egress listener (or TLS to a bridging one)
and the listener originates mutual TLS to a real server: `openssl s_server`
(as a byte-exact pipe: its stdin to us, what we send to its stdout), nginx
(the stream module as an mTLS front of a plain backend, the http module
serving a file), a Python ssl server over memory BIOs, and tlsproxy's own
terminating listener requiring a client certificate. What each server saw
is checked on its side: the bytes by their sha256, our certificate by the
subject or SPIFFE ID the server reports; what the listener counted, on its
/metrics.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio

from tests.helpers import (
    STEP,
    BioClient,
    Running,
    by_label,
    raw_connect,
    sample,
    scrape,
    start_backend,
    start_server,
    until,
)
from tests.pki import CA, Leaf, client_context
from tests.upstream_peers import (
    APP_ID,
    SServerPipe,
    egress_config,
    ingress_config,
    nginx,
    nginx_http_temp,
    s_server_pipe,
    server_context,
    start_bio_server,
)

MIB = 1024 * 1024
# What moves each way in a bulk test: many socket buffers and TLS records.
BULK = 20 * MIB
# How much of it one write hands over.
WRITE = MIB
# Concurrent app connections in the fan-out tests.
CLIENTS = 100
# nginx's connections for them: a client and a backend connection each.
NGINX_FAN_OUT = 2 * CLIENTS + 16
# Bulk and fan-out steps move tens of MiB through Python TLS twice over.
BULK_STEP = 3 * STEP
READ = 65536
# What an upstream sends before it half-closes: more than one TLS record.
BANNER = os.urandom(300_000)
# What the app sends in the half-close tests.
REQUEST = os.urandom(200_000)
# Our client certificate's subject as nginx's $ssl_client_s_dn spells it.
ME_DN = "CN=me,O=tlsproxy tests"


class Peer(Protocol):
    """One end of a connection, plain or TLS, as the tests drive it."""

    async def recv(self) -> bytes: ...  # b"" once the other side finished sending

    async def send_all(self, data: bytes) -> None: ...

    async def close_write(self) -> None: ...  # FIN, or close_notify

    async def aclose(self) -> None: ...


@dataclass
class Plain:
    stream: trio.SocketStream

    async def recv(self) -> bytes:
        return await self.stream.receive_some(READ)

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close_write(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Tls:
    bio: BioClient

    async def recv(self) -> bytes:
        return await self.bio.recv()

    async def send_all(self, data: bytes) -> None:
        await self.bio.send_all(data)

    async def close_write(self) -> None:
        await self.bio.close_notify()

    async def aclose(self) -> None:
        await self.bio.stream.aclose()


@dataclass(frozen=True)
class Got:
    """What one side received, to its end."""

    count: int
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> Got:
        return cls(len(data), hashlib.sha256(data).hexdigest())


async def read_all(peer: Peer) -> Got:
    digest = hashlib.sha256()
    count = 0
    while data := await peer.recv():
        digest.update(data)
        count += len(data)
    return Got(count, digest.hexdigest())


async def exchange(app: Peer, payload: bytes) -> Got:
    """Send `payload` and then our half-close, while reading the answer to its end."""

    async def send() -> None:
        for start in range(0, len(payload), WRITE):
            await app.send_all(payload[start : start + WRITE])
        await app.close_write()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        return await read_all(app)


# ---------------------------------------------------------------- what an upstream does

Seen = trio.MemorySendChannel[Got]
Behaviour = Callable[[Peer, Seen], Awaitable[None]]


async def echo(peer: Peer, seen: Seen) -> None:
    """Echo to the end, then half-close."""
    digest = hashlib.sha256()
    count = 0
    while data := await peer.recv():
        digest.update(data)
        count += len(data)
        await peer.send_all(data)
    await peer.close_write()
    await seen.send(Got(count, digest.hexdigest()))


async def answer_at_eof(peer: Peer, seen: Seen) -> None:
    """Read to the app's half-close, then answer: the digest of what came."""
    got = await read_all(peer)
    await peer.send_all(got.sha256.encode())
    await peer.close_write()
    await seen.send(got)


async def close_first(peer: Peer, seen: Seen) -> None:
    """Send the banner and half-close first, then read what the app still sends."""
    await peer.send_all(BANNER)
    await peer.close_write()
    await seen.send(await read_all(peer))


# ---------------------------------------------------------------- the upstreams


@dataclass(frozen=True)
class World:
    directory: Path
    ca: CA
    server: Leaf  # localhost, the name the egress listener dials
    me: Leaf  # our client certificate: CN me, URI SAN APP_ID


@pytest.fixture
def world(tmp_path: Path) -> World:
    ca = CA(tmp_path)
    return World(
        tmp_path,
        ca,
        ca.issue("server", "localhost"),
        ca.issue("me", uris=(APP_ID,), client=True),
    )


@dataclass
class Upstream:
    """A real mTLS server for the egress listener, and what it saw."""

    port: int
    seen: trio.MemoryReceiveChannel[Got]  # one per connection, as the behaviour ended
    identities: Callable[[int], Awaitable[list[str]]]  # the client certificates, its way
    expected: str  # what it says of ours


Starter = Callable[[trio.Nursery, World, Behaviour, bool], AbstractAsyncContextManager[Upstream]]


@asynccontextmanager
async def python_upstream(
    nursery: trio.Nursery, world: World, behaviour: Behaviour, tls13: bool
) -> AsyncIterator[Upstream]:
    """A Python ssl server: our SPIFFE ID from its getpeercert()."""
    send, receive = trio.open_memory_channel[Got](CLIENTS)
    uris: list[str] = []

    async def handler(bio: BioClient) -> None:
        cert = bio.obj.getpeercert()
        assert cert is not None, "the server requires a client certificate"
        sans: Any = cert["subjectAltName"]  # (("URI", "spiffe://..."), ...)
        uris.extend(value for kind, value in sans if kind == "URI")
        await behaviour(Tls(bio), send)

    async def identities(count: int) -> list[str]:
        await until(lambda: _at_least(uris, count))
        return uris

    context = server_context(world.ca, world.server, client_ca=world.ca, tls13=tls13)
    yield Upstream(await start_bio_server(nursery, context, handler), receive, identities, APP_ID)


async def _at_least(items: list[Any], count: int) -> bool:
    return len(items) >= count


async def start_plain_backend(
    nursery: trio.Nursery, behaviour: Behaviour
) -> tuple[int, trio.MemoryReceiveChannel[Got]]:
    """A plain backend behind a TLS front (nginx, tlsproxy) running `behaviour`."""
    send, receive = trio.open_memory_channel[Got](CLIENTS)

    async def handler(stream: trio.SocketStream) -> None:
        await behaviour(Plain(stream), send)

    return await start_backend(nursery, handler), receive


@asynccontextmanager
async def nginx_upstream(
    nursery: trio.Nursery, world: World, behaviour: Behaviour, tls13: bool
) -> AsyncIterator[Upstream]:
    """nginx's stream module: ssl_verify_client, proxy_pass to a plain
    backend, half-close passed on; our subject from $ssl_client_s_dn."""
    backend, receive = await start_plain_backend(nursery, behaviour)
    directory = world.directory / "nginx"
    directory.mkdir()
    log = directory / "stream.log"

    def blocks(ports: dict[str, int]) -> str:
        return f"""
stream {{
  log_format dn '$ssl_client_verify $ssl_client_s_dn';
  server {{
    listen 127.0.0.1:{ports["tls"]} ssl;
    ssl_certificate {world.server.cert}; ssl_certificate_key {world.server.key};
    ssl_protocols {"TLSv1.3" if tls13 else "TLSv1.2"};
    ssl_verify_client on; ssl_client_certificate {world.ca.ca_file};
    proxy_pass 127.0.0.1:{backend};
    proxy_half_close on;
    access_log {log} dn;
  }}
}}
"""

    async def identities(count: int) -> list[str]:
        """The DNs nginx logged, once it logged `count` sessions (at their end)."""
        lines: list[str] = []

        async def logged() -> bool:
            nonlocal lines
            lines = log.read_text().splitlines() if log.exists() else []
            return len(lines) >= count

        await until(logged)
        return [line.removeprefix("SUCCESS ") for line in lines]

    with nginx(directory, blocks, ["tls"], connections=NGINX_FAN_OUT) as ports:
        yield Upstream(ports["tls"], receive, identities, ME_DN)


@asynccontextmanager
async def tlsproxy_upstream(
    nursery: trio.Nursery, world: World, behaviour: Behaviour, tls13: bool
) -> AsyncIterator[Upstream]:
    """tlsproxy's own way in, client_auth = "require" and an allow table
    naming our SPIFFE ID: the ID from its access lines."""
    assert tls13, "the terminating listener has no maximum version"
    backend, receive = await start_plain_backend(nursery, behaviour)
    ingress = await start_server(
        nursery,
        ingress_config(world.directory, backend, world.ca, world.server, APP_ID),
    )

    async def identities(count: int) -> list[str]:
        lines = await ingress.access_log(count)
        assert all(line["outcome"] == "success" for line in lines), lines
        return [uri for line in lines for uri in line["client_san_uri"]]

    yield Upstream(ingress.port, receive, identities, APP_ID)


UPSTREAMS: dict[str, Starter] = {
    "python": python_upstream,
    "nginx": nginx_upstream,
    "tlsproxy": tlsproxy_upstream,
}


async def egress(nursery: trio.Nursery, world: World, port: int, **upstream: Any) -> Running:
    return await start_server(
        nursery, egress_config(world.directory, port, world.ca, world.me, **upstream)
    )


async def assert_counted(
    proxy: Running, connections: int, to_backend: int, to_client: int, *, bridged: bool = False
) -> None:
    """The listener's own account, once every connection is logged: one
    upstream success each and nothing else, the bytes exactly, and ingress
    handshake series only when TLS came in."""
    await proxy.access_log(connections)
    _, text = await scrape(proxy.admin_port)
    upstream = by_label(text, "tlsproxy_upstream_handshakes_total", "outcome")
    assert {k: v for k, v in upstream.items() if v} == {"success": connections}
    duration = "tlsproxy_upstream_handshake_duration_seconds_count"
    assert sample(text, duration, listener="web", result="success") == connections
    assert sample(text, duration, listener="web", result="failure") == 0
    bytes_total = "tlsproxy_bytes_total"
    assert sample(text, bytes_total, listener="web", direction="to_backend") == to_backend
    assert sample(text, bytes_total, listener="web", direction="to_client") == to_client
    if bridged:
        ingress = by_label(text, "tlsproxy_handshakes_total", "outcome")
        assert {k: v for k, v in ingress.items() if v} == {"success": connections}
    else:
        assert "tlsproxy_handshakes_total{" not in text


@asynccontextmanager
async def app_on(proxy: Running, world: World, *, bridged: bool = False) -> AsyncIterator[Peer]:
    """The app's connection: plaintext, or TLS to a bridging listener;
    closed at the end, however the test went."""
    app: Peer
    if bridged:
        app = Tls(await BioClient.connect(proxy.port, client_context(world.ca)))
    else:
        app = Plain(await raw_connect(proxy.port))
    try:
        yield app
    finally:
        await app.aclose()


async def through(
    nursery: trio.Nursery, world: World, upstream: Upstream, bridged: bool
) -> Running:
    """The egress listener to `upstream`: plaintext in, or bridging."""
    if not bridged:
        return await egress(nursery, world, upstream.port)
    front = world.ca.issue("front", "localhost")
    listener = {"tls": {"certificates": [front.pair()]}}
    return await egress(nursery, world, upstream.port, listener=listener)


async def one_exchange(
    nursery: trio.Nursery,
    world: World,
    kind: str,
    *,
    bridged: bool,
    behaviour: Behaviour,
    payload: bytes,
) -> tuple[Running, Got, Got]:
    """One app connection through the egress listener to a `kind` upstream
    running `behaviour`: the listener, what the app got back and what the
    upstream got. The upstream's own account of our certificate is checked."""
    async with UPSTREAMS[kind](nursery, world, behaviour, True) as upstream:
        proxy = await through(nursery, world, upstream, bridged)
        with trio.fail_after(BULK_STEP):
            async with app_on(proxy, world, bridged=bridged) as app:
                answer = await exchange(app, payload)
            got = await upstream.seen.receive()
        assert await upstream.identities(1) == [upstream.expected]
    return proxy, answer, got


# ---------------------------------------------------------------- the tests


MODES = [
    pytest.param("python", False, id="python"),
    pytest.param("nginx", False, id="nginx"),
    pytest.param("tlsproxy", False, id="tlsproxy"),
    pytest.param("nginx", True, id="nginx-bridged"),
]


@pytest.mark.parametrize(("kind", "bridged"), MODES)
async def test_20_mib_each_way_arrive_intact(
    nursery: trio.Nursery, world: World, kind: str, bridged: bool
) -> None:
    payload = os.urandom(BULK)
    expected = Got.of(payload)
    proxy, received, got = await one_exchange(
        nursery, world, kind, bridged=bridged, behaviour=echo, payload=payload
    )
    assert got == expected, "the upstream received other bytes than the app sent"
    assert received == expected, "the app received other bytes than the upstream sent"
    (line,) = await proxy.access_log()
    assert line["bytes_to_backend"] == line["bytes_to_client"] == BULK
    assert line["close_reason"] == "client_closed"  # the app's EOF came first
    await assert_counted(proxy, 1, BULK, BULK, bridged=bridged)


# The half-closes also across a bridge to a Python server: close_notify both ways.
HALF_CLOSE_MODES = [*MODES, pytest.param("python", True, id="python-bridged")]


@pytest.mark.parametrize(("kind", "bridged"), HALF_CLOSE_MODES)
async def test_the_app_half_closes_and_the_upstream_still_answers(
    nursery: trio.Nursery, world: World, kind: str, bridged: bool
) -> None:
    """The app's EOF reaches the upstream (close_notify, or nginx's FIN to
    its backend), which answers only then, on its still open half."""
    proxy, answer, got = await one_exchange(
        nursery, world, kind, bridged=bridged, behaviour=answer_at_eof, payload=REQUEST
    )
    assert got == Got.of(REQUEST)
    assert answer == Got.of(Got.of(REQUEST).sha256.encode())
    (line,) = await proxy.access_log()
    assert line["close_reason"] == "client_closed"
    await assert_counted(proxy, 1, len(REQUEST), answer.count, bridged=bridged)


@pytest.mark.parametrize(("kind", "bridged"), HALF_CLOSE_MODES)
async def test_the_upstream_half_closes_and_the_app_still_sends(
    nursery: trio.Nursery, world: World, kind: str, bridged: bool
) -> None:
    """The upstream's EOF reaches the app while the app's half stays open:
    what the app sends afterwards still reaches the upstream."""
    async with UPSTREAMS[kind](nursery, world, close_first, True) as upstream:
        proxy = await through(nursery, world, upstream, bridged)
        with trio.fail_after(STEP):
            async with app_on(proxy, world, bridged=bridged) as app:
                banner = await read_all(app)  # to the upstream's EOF
                assert banner == Got.of(BANNER)
                await app.send_all(REQUEST)
                await app.close_write()
                got = await upstream.seen.receive()
        assert got == Got.of(REQUEST)
        assert await upstream.identities(1) == [upstream.expected]
    (line,) = await proxy.access_log()
    assert line["close_reason"] == "backend_closed"
    await assert_counted(proxy, 1, len(REQUEST), len(BANNER), bridged=bridged)


@pytest.mark.parametrize("kind", ["python", "nginx", "tlsproxy"])
async def test_100_concurrent_apps_each_get_their_own_bytes_back(
    nursery: trio.Nursery, world: World, kind: str
) -> None:
    messages = [f"app {i} ".encode() * 1000 for i in range(CLIENTS)]
    failures: list[int] = []

    async def one(i: int, proxy: Running) -> None:
        async with app_on(proxy, world) as app:
            if await exchange(app, messages[i]) != Got.of(messages[i]):
                failures.append(i)

    async with UPSTREAMS[kind](nursery, world, echo, True) as upstream:
        proxy = await egress(nursery, world, upstream.port)
        with trio.fail_after(BULK_STEP):
            async with trio.open_nursery() as apps:
                for i in range(CLIENTS):
                    apps.start_soon(one, i, proxy)
            got = [await upstream.seen.receive() for _ in range(CLIENTS)]
        assert failures == []
        assert sorted(got, key=repr) == sorted(map(Got.of, messages), key=repr)
        assert await upstream.identities(CLIENTS) == [upstream.expected] * CLIENTS
    total = sum(map(len, messages))
    await assert_counted(proxy, CLIENTS, total, total)


def s_server_mtls(world: World) -> tuple[str, ...]:
    """s_server's certificate, and ours required and verified (a failed
    verify fails the handshake)."""
    return (
        *("-cert", str(world.server.cert), "-key", str(world.server.key)),
        *("-Verify", "1", "-verify_return_error", "-CAfile", str(world.ca.ca_file)),
    )


# The line s_server's verify callback prints for our certificate (depth 0:
# the leaf), once per full handshake.
S_SERVER_VERIFIED = "depth=0 O = tlsproxy tests, CN = me"


async def s_server_reading(app: Peer, peer: SServerPipe, first: bytes) -> None:
    """Send `first` and wait until s_server has written it out: it is past
    its handshake, in its copy loop. Only then may its stdin have data:
    readable stdin during the handshake makes s_server write 0.5-RTT data
    and then block reading the socket, with the rest of its stdin unsent
    until the peer sends again (seen with OpenSSL 3.0)."""
    await app.send_all(first)

    async def written() -> bool:
        return peer.received.stat().st_size >= len(first)

    await until(written)


async def test_s_server_pipes_20_mib_each_way_and_sees_our_certificate(
    nursery: trio.Nursery, world: World
) -> None:
    """`s_server -quiet`: its stdin comes to the app, what the app sends
    goes to its stdout. Its stdin stays open, so the connection's end is the
    app's: our close_notify ends s_server once both 20 MiB have moved."""
    download, upload = os.urandom(BULK), os.urandom(BULK)
    async with s_server_pipe(world.directory, *s_server_mtls(world)) as peer:
        proxy = await egress(nursery, world, peer.port)
        with trio.fail_after(BULK_STEP):
            received = hashlib.sha256()
            count = 0
            async with app_on(proxy, world) as app:
                await s_server_reading(app, peer, upload[:1])

                async def send() -> None:
                    for start in range(1, BULK, WRITE):
                        await app.send_all(upload[start : start + WRITE])

                async with trio.open_nursery() as moving:
                    moving.start_soon(peer.stdin.send_all, download)
                    moving.start_soon(send)
                    while count < BULK:
                        data = await app.recv()
                        assert data, "s_server closed before it sent its stdin"
                        received.update(data)
                        count += len(data)
                await app.close_write()
                assert await peer.process.wait() == 0
                assert await app.recv() == b""
    assert Got(count, received.hexdigest()) == Got.of(download)
    assert Got.of(peer.received.read_bytes()) == Got.of(upload)
    assert peer.log.read_text().splitlines().count(S_SERVER_VERIFIED) == 1
    (line,) = await proxy.access_log()
    assert line["upstream_tls_version"] == "TLSv1.3"
    await assert_counted(proxy, 1, BULK, BULK)


async def test_s_server_ending_at_its_stdin_eof_reaches_the_app_as_eof(
    nursery: trio.Nursery, world: World
) -> None:
    """The other way round: s_server ends the connection at its stdin's EOF
    (wholly: it has no half-close, and stops reading too). The app gets
    every byte, then the EOF."""
    async with s_server_pipe(world.directory, *s_server_mtls(world)) as peer:
        proxy = await egress(nursery, world, peer.port)
        with trio.fail_after(STEP):
            async with app_on(proxy, world) as app:
                await s_server_reading(app, peer, b"!")

                async def feed() -> None:
                    await peer.stdin.send_all(BANNER)
                    await peer.stdin.aclose()

                async with trio.open_nursery() as feeding:
                    feeding.start_soon(feed)
                    assert await read_all(app) == Got.of(BANNER)
            assert await peer.process.wait() == 0
    assert peer.received.read_bytes() == b"!"
    await assert_counted(proxy, 1, 1, len(BANNER))


async def test_nginx_http_serves_20_mib_to_our_verified_certificate(
    nursery: trio.Nursery, world: World
) -> None:
    """nginx http with ssl_verify_client on: a 20 MiB file downloaded through
    the egress listener, our subject in the header nginx adds."""
    directory = world.directory / "nginx"
    (directory / "www").mkdir(parents=True)
    body = os.urandom(BULK)
    (directory / "www" / "big").write_bytes(body)

    def blocks(ports: dict[str, int]) -> str:
        return f"""
http {{
  access_log off; {nginx_http_temp(directory)}
  server {{
    listen 127.0.0.1:{ports["tls"]} ssl;
    ssl_certificate {world.server.cert}; ssl_certificate_key {world.server.key};
    ssl_verify_client on; ssl_client_certificate {world.ca.ca_file};
    root {directory}/www;
    add_header X-Client-DN $ssl_client_s_dn always;
  }}
}}
"""

    request = b"GET /big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    with nginx(directory, blocks, ["tls"]) as ports:
        proxy = await egress(nursery, world, ports["tls"])
        with trio.fail_after(BULK_STEP):
            stream = await raw_connect(proxy.port)
            await stream.send_all(request)
            response = bytearray()
            while data := await stream.receive_some(READ):
                response += data
            await stream.aclose()
    head, _, received = bytes(response).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert f"X-Client-DN: {ME_DN}" in lines
    assert Got.of(received) == Got.of(body)
    await assert_counted(proxy, 1, len(request), len(response))


RESUMING = [
    pytest.param("python", True, True, id="python-TLSv1.3"),
    pytest.param("python", False, True, id="python-TLSv1.2"),
    pytest.param("nginx", True, True, id="nginx-TLSv1.3"),
    pytest.param("nginx", False, True, id="nginx-TLSv1.2"),
    pytest.param("tlsproxy", True, True, id="tlsproxy-TLSv1.3"),
    pytest.param("python", True, False, id="python-TLSv1.3-off"),
    pytest.param("nginx", False, False, id="nginx-TLSv1.2-off"),
]


@pytest.mark.parametrize(("kind", "tls13", "resumption"), RESUMING)
async def test_a_second_connection_resumes_the_upstream_session(
    nursery: trio.Nursery, world: World, kind: str, tls13: bool, resumption: bool
) -> None:
    """The session the first handshake left (for TLS 1.3, the ticket after
    it) is offered on the second: an abbreviated handshake the server
    accepted, still with our certificate; with session_resumption = false,
    none is offered."""
    version = "TLSv1.3" if tls13 else "TLSv1.2"
    async with UPSTREAMS[kind](nursery, world, echo, tls13) as upstream:
        proxy = await egress(nursery, world, upstream.port, session_resumption=resumption)
        for count in (1, 2):
            with trio.fail_after(STEP):
                async with app_on(proxy, world) as app:
                    assert await exchange(app, b"ping") == Got.of(b"ping")
                await proxy.access_log(count)
        assert await upstream.identities(2) == [upstream.expected] * 2
    first, second = await proxy.access_log(2)
    assert (first["upstream_tls_version"], second["upstream_tls_version"]) == (version, version)
    assert first["upstream_resumed"] is False
    assert second["upstream_resumed"] is resumption
    _, text = await scrape(proxy.admin_port)
    negotiated = "tlsproxy_upstream_tls_negotiated_total"
    counted = partial(sample, text, negotiated, listener="web", version=version)
    assert counted(resumed="true") == int(resumption)
    assert counted(resumed="false") == 2 - int(resumption)
    await assert_counted(proxy, 2, 8, 8)


@pytest.mark.parametrize("tls13", [True, False], ids=["TLSv1.3", "TLSv1.2"])
async def test_s_server_resumes_and_verifies_our_certificate_once(
    nursery: trio.Nursery, world: World, tls13: bool
) -> None:
    """Two connections to one s_server, which sends nothing and ends each at
    our close_notify: for TLS 1.3 the tickets are read with that end (the
    first read), and the second handshake resumes. s_server verified our
    certificate once: a resumed handshake carries none."""
    version = () if tls13 else ("-tls1_2",)
    async with s_server_pipe(world.directory, *s_server_mtls(world), *version, naccept=2) as peer:
        proxy = await egress(nursery, world, peer.port)
        for count in (1, 2):
            with trio.fail_after(STEP):
                async with app_on(proxy, world) as app:
                    assert await exchange(app, b"ping") == Got.of(b"")
                await proxy.access_log(count)
        with trio.fail_after(STEP):
            assert await peer.process.wait() == 0
    assert peer.received.read_bytes() == b"pingping"
    assert peer.log.read_text().splitlines().count(S_SERVER_VERIFIED) == 1
    first, second = await proxy.access_log(2)
    assert (first["upstream_resumed"], second["upstream_resumed"]) == (False, True)
    assert second["upstream_tls_version"] == ("TLSv1.3" if tls13 else "TLSv1.2")
    await assert_counted(proxy, 2, 8, 0)
