"""Idle connections park (no task) and wake with their state intact: every
transition over real sockets, with a real TLS client and a real backend.

A connection is parked when it is in the lot and no task holds it: the
server's live set (the cancel scopes of connections' tasks) is empty and the
idle watch scans nothing, while `tlsproxy_connections_active` still counts it.
"""

from __future__ import annotations

import math
import resource
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from prometheus_client import CollectorRegistry

from proxy import membio
from proxy.buffers import BufferPool
from proxy.connection import ConnectionSet
from proxy.ends import BACKEND, CLIENT, CloseReason, PlainEnd, TLSEnd
from proxy.metrics import Metrics
from proxy.parking import PARK_AFTER, SCAN_MAX, ParkingLot
from proxy.splice import Splice
from proxy.tlsio import TLS_RECORD
from tests.helpers import (
    STEP,
    BioClient,
    Certs,
    Running,
    build_config,
    echo_handler,
    issue_leaf,
    sample,
    scrape,
    start_backend,
    start_server,
    tls_connect,
    until,
)
from tests.pki import CA, client_context
from tests.test_egress import bridge_config, echo_peer, start_tls_server
from tests.upstream_peers import server_context

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def parked(connections: ConnectionSet, count: int = 1) -> bool:
    return len(connections.lot) == count and not connections.live and not len(connections.idle)


async def until_parked(proxy: Running, count: int = 1) -> None:
    async def check() -> bool:
        return parked(proxy.server.connections, count)

    await until(check)


async def until_stopped(proxy: Running) -> None:
    async def check() -> bool:
        return proxy.server.state == "stopped"

    await until(check)


async def echoed_then_parked(proxy: Running, certs: Certs, first: bytes = b"x") -> BioClient:
    """A TLS client through the proxy that echoed `first`, once parked."""
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        await client.send_all(first)
        assert await client.recv() == first
    await until_parked(proxy)
    return client


async def active(proxy: Running) -> float:
    _, text = await scrape(proxy.admin_port)
    return sample(text, "tlsproxy_connections_active", listener="web")


async def _proxy(nursery: trio.Nursery, certs: Certs, handler: Handler, **listener: Any) -> Running:
    port = await start_backend(nursery, handler)
    return await start_server(nursery, build_config(certs, port, **listener))


async def test_an_idle_connection_parks_and_client_bytes_wake_it(
    nursery: trio.Nursery, certs: Certs
) -> None:
    proxy = await _proxy(nursery, certs, echo_handler)
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        await client.send_all(b"one")
        assert await client.recv() == b"one"
        start = trio.current_time()
    await until_parked(proxy)
    # not before PARK_AFTER without a byte; the proxy's last byte came before `start`
    assert trio.current_time() - start >= PARK_AFTER - 0.05
    assert await active(proxy) == 1  # parked is still live
    with trio.fail_after(STEP):
        for word in (b"two", b"three"):
            await client.send_all(word)
            assert await client.recv() == word
            await until_parked(proxy)  # and parks again
        await client.close_notify()
        assert await client.recv() == b""  # the echo's half-close, as close_notify
        await client.stream.aclose()
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "client_closed"
    assert event["bytes_to_backend"] == event["bytes_to_client"] == len(b"onetwothree")
    assert await active(proxy) == 0
    assert len(proxy.server.connections) == 0


async def test_a_connection_silent_after_its_handshake_parks_before_its_pumps_run(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """A pool's connection opened ahead of use: parked as soon as it is
    established, with no idle interval; its first bytes wake it."""
    proxy = await _proxy(nursery, certs, echo_handler)
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        start = trio.current_time()
    await until_parked(proxy)
    assert trio.current_time() - start < PARK_AFTER, "parked only after the idle interval"
    with trio.fail_after(STEP):
        await client.send_all(b"first")
        assert await client.recv() == b"first"
        await client.close_notify()
        assert await client.recv() == b""
        await client.stream.aclose()
    (event,) = await proxy.access_log()
    assert (event["bytes_to_backend"], event["bytes_to_client"]) == (5, 5)
    assert event["close_reason"] == "client_closed"


async def test_bytes_from_the_backend_wake_a_parked_connection(
    nursery: trio.Nursery, certs: Certs
) -> None:
    speak = trio.Event()

    async def answer_later(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(10) == b"ask"
        await speak.wait()
        await stream.send_all(b"answer")
        await stream.aclose()

    proxy = await _proxy(nursery, certs, answer_later)
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        await client.send_all(b"ask")
    await until_parked(proxy)
    speak.set()
    with trio.fail_after(STEP):
        assert await client.recv_all() == b"answer"  # then the backend's FIN as close_notify
        await client.close_notify()
        await client.stream.aclose()
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "backend_closed"
    assert (event["bytes_to_backend"], event["bytes_to_client"]) == (3, 6)


async def test_a_client_half_close_while_parked_reaches_the_backend_which_still_answers(
    nursery: trio.Nursery, certs: Certs
) -> None:
    got = bytearray()

    async def read_to_eof_then_answer(stream: trio.SocketStream) -> None:
        async for data in stream:
            got.extend(data)
        await stream.send_all(b"after your eof")
        await stream.aclose()

    proxy = await _proxy(nursery, certs, read_to_eof_then_answer)
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        await client.send_all(b"request")
    await until_parked(proxy)
    with trio.fail_after(STEP):
        await client.close_notify()
        assert await client.recv_all() == b"after your eof"
        await client.stream.aclose()
    assert bytes(got) == b"request"
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "client_closed"


async def test_a_backend_half_close_while_parked_and_then_a_park_with_one_direction_open(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """The backend's FIN wakes the connection and reaches the client as
    close_notify; the client's direction stays open, parks alone, and the
    client's later bytes wake it and reach the backend."""
    fin = trio.Event()
    got = bytearray()
    backend_done = trio.Event()

    async def fin_first_then_read(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(10) == b"hello"
        await fin.wait()
        await stream.send_eof()
        async for data in stream:
            got.extend(data)
        backend_done.set()

    proxy = await _proxy(nursery, certs, fin_first_then_read)
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        await client.send_all(b"hello")
    await until_parked(proxy)
    fin.set()
    with trio.fail_after(STEP):
        assert await client.recv() == b""  # close_notify: the backend is done sending
    await until_parked(proxy)  # one direction open: parked on the client's socket only
    (splice,) = proxy.server.connections.lot._cars.values()
    assert splice.sources() == [splice.client.sock]
    with trio.fail_after(STEP):
        await client.send_all(b" and more")
        await client.close_notify()
        await backend_done.wait()
        await client.stream.aclose()
    assert bytes(got) == b" and more"
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "backend_closed"
    assert (event["bytes_to_backend"], event["bytes_to_client"]) == (14, 0)


RECORDS_BURST = 64 * 1024  # several records each way


def tls_buffers(proxy: Running) -> list[int | None]:
    """The capacity of each memory BIO of the one parked connection."""
    (splice,) = proxy.server.connections.lot._cars.values()
    return [
        membio.capacity(bio)
        for end in (splice.client, splice.backend)
        if isinstance(end, TLSEnd)
        for bio in (end.conn.incoming, end.conn.outgoing)
    ]


async def echo_burst(stream: trio.SSLStream[trio.SocketStream]) -> None:
    await stream.send_all(bytes(RECORDS_BURST))
    got = 0
    while got < RECORDS_BURST:
        got += len(await stream.receive_some())


async def test_a_parked_connection_gives_back_its_tls_buffers_and_grows_them_again_woken(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """After a burst each memory BIO holds a record and a third (about 22
    KiB); parked, none."""
    proxy = await _proxy(nursery, certs, echo_handler)
    with trio.fail_after(STEP):
        stream = await tls_connect(proxy.port, certs.client_context())
        await echo_burst(stream)
    await until_parked(proxy)
    assert tls_buffers(proxy) == [0, 0]
    with trio.fail_after(STEP):
        await echo_burst(stream)  # woken: the BIOs grow again, and work
    await until_parked(proxy)
    assert tls_buffers(proxy) == [0, 0]
    assert proxy.server.connections.memory.released >= 4 * TLS_RECORD  # 2 parks x 2 BIOs
    assert proxy.server.connections.memory.records_freed >= 2  # and OpenSSL's, at each park
    with trio.fail_after(STEP):
        await stream.aclose()
    (event,) = await proxy.access_log()
    assert event["bytes_to_backend"] == event["bytes_to_client"] == 2 * RECORDS_BURST


@pytest.mark.skipif(membio._malloc_trim is None, reason="not glibc: no malloc_trim")
async def test_the_idle_scan_returns_what_parked_connections_released(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """Enough connections parking after a burst release more than
    TRIM_BYTES between them; a scan then trims, which starts the count anew."""
    proxy = await _proxy(nursery, certs, echo_handler)
    memory = proxy.server.connections.memory
    streams = []

    async def parked_after_a_burst(count: int) -> None:
        with trio.fail_after(STEP):
            for _ in range(count):
                stream = await tls_connect(proxy.port, certs.client_context())
                await echo_burst(stream)
                streams.append(stream)
        await until_parked(proxy, len(streams))

    await parked_after_a_burst(1)
    one = memory.released  # what one connection gives back
    assert one >= TLS_RECORD  # a burst's, not only the handshake's 2 KiB
    await parked_after_a_burst(math.ceil(1.5 * membio.TRIM_BYTES / one))

    async def trimmed() -> bool:
        return memory.trims >= 1

    await until(trimmed)
    assert memory.released < membio.TRIM_BYTES
    with trio.fail_after(STEP):
        for stream in streams:
            await stream.aclose()


async def test_a_parked_bridging_connection_gives_back_the_buffers_of_both_tls_ends(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = CA(tmp_path)
    upstream = ca.issue("upstream", "localhost")
    port = await start_tls_server(nursery, server_context(ca, upstream, client_ca=None), echo_peer)
    front = ca.issue("front", "localhost")
    proxy = await start_server(
        nursery, bridge_config(tmp_path, port, front, {"ca": str(ca.ca_file)})
    )
    with trio.fail_after(STEP):
        stream = await tls_connect(proxy.port, client_context(ca))
        await echo_burst(stream)
    await until_parked(proxy)
    assert tls_buffers(proxy) == [0, 0, 0, 0]
    memory = proxy.server.connections.memory
    freed = memory.records_freed
    with trio.fail_after(STEP):
        await echo_burst(stream)
    await until_parked(proxy)  # one park more: OpenSSL's record buffers freed at both ends
    assert memory.records_freed - freed == 2
    with trio.fail_after(STEP):
        await stream.aclose()


async def test_a_parked_connection_idles_out_after_idle_timeout(
    nursery: trio.Nursery, certs: Certs
) -> None:
    idle_timeout = 3 * PARK_AFTER
    proxy = await _proxy(nursery, certs, echo_handler, idle_timeout=idle_timeout)
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        await client.send_all(b"x")
        assert await client.recv() == b"x"
        idle_since = trio.current_time()  # a little after the proxy's last byte
    await until_parked(proxy)
    assert trio.current_time() - idle_since < idle_timeout, "parked only at the timeout"
    with trio.fail_after(STEP):
        assert await client.recv() == b""  # close_notify
    idle_for = trio.current_time() - idle_since
    await client.stream.aclose()
    # at the timeout, at most two scans late (a scan stamps activity one scan late)
    assert idle_timeout - 0.1 <= idle_for <= idle_timeout + 2 * SCAN_MAX + 1.0, idle_for
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "idle_timeout"
    assert event["bytes_to_backend"] == event["bytes_to_client"] == 1
    assert await active(proxy) == 0


async def test_drain_cuts_a_parked_connection_with_close_reason_drain(
    nursery: trio.Nursery, certs: Certs
) -> None:
    proxy = await _proxy(nursery, certs, echo_handler, drain_timeout=0.2)
    client = await echoed_then_parked(proxy, certs)
    proxy.server.request_drain()
    with trio.fail_after(STEP):
        assert await client.recv() == b""  # close_notify at the drain timeout
        await client.stream.aclose()
    await until_stopped(proxy)
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "drain"
    (draining,) = proxy.log_events("draining")
    assert draining["connections"] == 1  # the parked connection is counted
    assert proxy.log_events("drain_timeout expired; closing the remaining connections")


async def test_a_drain_waits_for_a_parked_connection_that_finishes_on_its_own(
    nursery: trio.Nursery, certs: Certs
) -> None:
    proxy = await _proxy(nursery, certs, echo_handler, drain_timeout=60.0)
    client = await echoed_then_parked(proxy, certs)
    proxy.server.request_drain()
    await trio.sleep(2 * SCAN_MAX)
    assert proxy.server.state == "draining", "the drain did not wait for the parked connection"
    with trio.fail_after(STEP):
        await client.send_all(b"last")
        assert await client.recv() == b"last"
        await client.close_notify()
        assert await client.recv() == b""
        await client.stream.aclose()
    await until_stopped(proxy)
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "client_closed"


async def test_a_reset_while_parked_is_seen_at_once(nursery: trio.Nursery, certs: Certs) -> None:
    proxy = await _proxy(nursery, certs, echo_handler)
    client = await echoed_then_parked(proxy, certs)
    client.stream.socket.setsockopt(
        trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    client.stream.socket.close()
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "client_reset"
    assert len(proxy.server.connections) == 0


async def test_a_parked_connection_counts_against_max_connections(
    nursery: trio.Nursery, certs: Certs
) -> None:
    proxy = await _proxy(nursery, certs, echo_handler, max_connections=1)
    client = await echoed_then_parked(proxy, certs)
    with trio.fail_after(STEP):
        refused = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        assert await refused.receive_some(10) == b""  # accepted and closed at once
        await refused.aclose()
        await client.close_notify()
        assert await client.recv() == b""
        await client.stream.aclose()
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_connections_rejected_total", reason="max_connections") == 1


async def test_a_connection_parked_across_a_reload_wakes_on_its_own_runtime(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    """The reload swaps the listener's runtime (a new certificate, a new
    idle_timeout) under a parked connection; woken, it goes on as it was:
    served, and not idled out by the new, shorter timeout."""
    port = await start_backend(nursery, echo_handler)
    proxy = await start_server(nursery, build_config(certs, port))
    client = await echoed_then_parked(proxy, certs, b"before")
    cert, key, serial = issue_leaf(certs.ca, tmp_path, "rotated")
    rotated = replace(certs, cert=cert, key=key)
    short = 3 * PARK_AFTER
    assert await proxy.server.reload(
        lambda: build_config(rotated, port, idle_timeout=short), trigger="test"
    )
    with trio.fail_after(STEP):
        fresh = await tls_connect(proxy.port, certs.client_context())
        der = fresh.getpeercert(binary_form=True)
        assert der is not None and x509.load_der_x509_certificate(der).serial_number == serial
        await fresh.aclose()
    await trio.sleep(short + 2 * SCAN_MAX + 0.5)  # past the new timeout, parked all along
    with trio.fail_after(STEP):
        await client.send_all(b"after")
        assert await client.recv() == b"after"
        await client.close_notify()
        assert await client.recv() == b""
        await client.stream.aclose()
    events = await proxy.access_log(2)
    (event,) = [e for e in events if e["bytes_to_backend"]]
    assert event["close_reason"] == "client_closed"
    assert event["bytes_to_backend"] == len(b"beforeafter")


ROOT = Path(__file__).parent.parent
# Connections in the burst: 10 000, or what the open-file limit lets the
# test process (the daemon's two descriptors per connection) hold.
BURST = 10_000


@pytest.fixture
def burst_size() -> Iterator[int]:
    """BURST, or fewer under the hard open-file limit (the soft one raised to it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield min(BURST, (hard - 512) // 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_thousands_of_parked_connections_woken_in_one_burst(
    nursery: trio.Nursery, certs: Certs, burst_size: int
) -> None:
    """Every connection parks; one byte on each, sent all at once, wakes
    every one, every echo comes back, and they all park again. The clients
    and the echo backend run in another process (tests/burst_peer.py), so
    that this one's descriptors are the daemon's."""
    count = burst_size
    peer = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.burst_peer", str(certs.ca_file), str(count)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert peer.stdin is not None and peer.stdout is not None
    lines = _Lines(peer.stdout)
    try:
        with trio.fail_after(STEP):
            backend = int(await lines.next())
        config = build_config(certs, backend, max_connections=count + 10)
        proxy = await start_server(nursery, config)
        await peer.stdin.send_all(f"{proxy.port}\n".encode())
        with trio.fail_after(STEP + count / 50):
            assert await lines.next() == "opened"
        await until_parked(proxy, count)
        await peer.stdin.send_all(b"wake\n")
        with trio.fail_after(STEP + count / 200):
            assert await lines.next() == "echoed"
        await until_parked(proxy, count)
        await peer.stdin.send_all(b"close\n")
        with trio.fail_after(STEP + count / 200):
            assert await lines.next() == "closed"

        async def none_active() -> bool:
            return await active(proxy) == 0

        await until(none_active)
        # Every line the log buffer kept (it drops, and counts, what does not fit)
        events = proxy.log_events("connection")
        _, text = await scrape(proxy.admin_port)
        assert len(events) + sample(text, "tlsproxy_log_lines_dropped_total") == count
        assert {(e["bytes_to_backend"], e["bytes_to_client"]) for e in events} == {(2, 2)}
        assert {e["close_reason"] for e in events} == {"client_closed"}
    finally:
        peer.kill()
        await peer.wait()


class _Lines:
    """The burst peer's lines, as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(4096)
            if not chunk:
                raise AssertionError(f"the burst peer exited: {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


# ------------------------------------------------- when a splice may park
# Over socket pairs, with the ends' states set as the pumps set them: the
# cases a scan can meet that the transitions above reach only by chance.


@dataclass
class Ends:
    """A splice between two plain ends over socket pairs, and the far sides."""

    splice: Splice
    client: PlainEnd
    backend: PlainEnd
    client_peer: socket.socket


@pytest.fixture
async def ends() -> AsyncIterator[Ends]:
    pool = BufferPool()
    client_sock, client_peer = socket.socketpair()
    backend_sock, backend_peer = socket.socketpair()
    for sock in (client_sock, backend_sock):
        sock.setblocking(False)
    metrics = Metrics(CollectorRegistry()).for_listener("web", terminates=False, originates=False)
    client = PlainEnd(client_sock, CLIENT, pool, speaks_first=True)
    backend = PlainEnd(backend_sock, BACKEND, pool, speaks_first=False)
    splice = Splice(client, backend, 60.0, metrics)
    splice.scope = trio.CancelScope()
    client.waiting = backend.waiting = True  # both pumps in their read waits
    yield Ends(splice, client, backend, client_peer)
    for sock in (client_sock, backend_sock, client_peer, backend_peer):
        sock.close()


async def test_a_splice_whose_pumps_both_wait_to_read_an_empty_socket_parks(ends: Ends) -> None:
    assert ends.splice.parkable()


async def test_a_splice_whose_directions_have_both_ended_never_parks(ends: Ends) -> None:
    """Between its last pump's end and its task's: parked, nothing would wake it."""
    ends.client.done = ends.backend.done = True
    assert not ends.splice.parkable()


async def test_a_splice_with_one_direction_ended_parks_on_the_other(ends: Ends) -> None:
    ends.backend.done = True
    assert ends.splice.parkable()
    assert ends.splice.sources() == [ends.client.sock]


async def test_a_splice_whose_pump_is_not_in_its_read_wait_does_not_park(ends: Ends) -> None:
    ends.backend.waiting = False  # e.g. writing, held up by a full socket
    assert not ends.splice.parkable()


@pytest.mark.parametrize("what", ["bytes", "fin"])
async def test_a_splice_whose_socket_is_readable_does_not_park(ends: Ends, what: str) -> None:
    """The pump's wait already answered by the kernel, its task not yet run:
    it still shows as waiting, and parking would lose the wake-up."""
    if what == "bytes":
        ends.client_peer.send(b"x")
    else:
        ends.client_peer.shutdown(socket.SHUT_WR)
    assert not ends.splice.parkable()


async def test_a_splice_is_quiet_before_its_first_run_only_when_neither_socket_has_bytes(
    ends: Ends,
) -> None:
    assert ends.splice.quiet()
    ends.client_peer.send(b"GET /")
    assert not ends.splice.quiet()


async def test_a_cancelled_splice_does_not_park(ends: Ends) -> None:
    assert ends.splice.scope is not None
    ends.splice.scope.cancel()
    assert not ends.splice.parkable()


async def test_the_lot_expires_each_parked_connection_at_its_own_timeout() -> None:
    """The lot looks at its connections only when the earliest timeout has
    come: one parked later with a shorter timeout still closes on time, and
    one with a longer timeout stays."""
    pool = BufferPool()
    metrics = Metrics(CollectorRegistry()).for_listener("web", terminates=False, originates=False)
    closed: list[tuple[str, CloseReason]] = []
    lot: ParkingLot[str] = ParkingLot(_never_resumed, lambda car, why: closed.append((car, why)))
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        now = trio.current_time()
        for car, timeout, (a, _), (b, _) in (
            ("long", 300.0, pairs[0], pairs[1]),
            ("short", 10.0, pairs[2], pairs[3]),
        ):
            splice = Splice(
                PlainEnd(a, CLIENT, pool, speaks_first=True),
                PlainEnd(b, BACKEND, pool, speaks_first=False),
                timeout,
                metrics,
            )
            lot.park(car, splice)
        lot.expire(now + 9.0)
        assert closed == [] and len(lot) == 2
        lot.expire(now + 10.5)
        assert closed == [("short", CloseReason.IDLE_TIMEOUT)]
        assert "long" in lot and "short" not in lot
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


async def _never_resumed(car: str) -> None:
    raise AssertionError("nothing woke")


async def test_a_lot_that_cannot_watch_a_socket_takes_nothing(ends: Ends) -> None:
    """All or nothing: a source the kernel refuses (here a closed one) leaves
    the lot without the connection and without its other socket, so the
    caller can close it as any other connection."""
    lot: ParkingLot[str] = ParkingLot(_never_resumed, lambda car, why: None)
    backend = ends.backend.sock
    ends.backend.sock = socket.socket()
    ends.backend.sock.close()
    with pytest.raises((OSError, ValueError)):
        lot.park("car", ends.splice)
    assert len(lot) == 0 and "car" not in lot
    ends.backend.sock = backend
    lot.park("car", ends.splice)  # the client's socket was not left registered
    assert "car" in lot
