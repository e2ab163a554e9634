"""TLS over a memory BIO pair (`proxy.tlsio`): the write path that encrypts
a record at a time and sends the records gathered, over a real socket pair
with a real TLS client."""

from __future__ import annotations

import gc
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.harness import malloc_in_use
from proxy.buffers import BufferPool
from proxy.tlsio import TLS_RECORD, Engine, TLSConn, engine_of, unsent
from tests.helpers import Certs, Running, echo_on, tls_connect

# ------------------------------------------------- what a gathered send left


@pytest.mark.parametrize(
    ("records", "sent", "left"),
    [
        ([b"abc", b"de"], 0, [b"abc", b"de"]),
        ([b"abc", b"de"], 2, [b"c", b"de"]),
        ([b"abc", b"de"], 3, [b"de"]),
        ([b"abc", b"de"], 4, [b"e"]),
        ([b"abc", b"de"], 5, []),
        ([b"abc"], 3, []),
    ],
)
def test_unsent_is_the_tail_of_the_records_after_the_sent_bytes(
    records: list[bytes], sent: int, left: list[bytes]
) -> None:
    assert [bytes(part) for part in unsent(list(records), sent)] == left


@given(st.lists(st.binary(min_size=1), min_size=1), st.data())
def test_unsent_joined_is_the_joined_records_less_what_was_sent(
    records: list[bytes], data: st.DataObject
) -> None:
    whole = b"".join(records)
    sent = data.draw(st.integers(0, len(whole)))
    left = unsent(list(records), sent)
    assert b"".join(left) == whole[sent:]
    assert all(left)  # no empty buffer handed to the next sendmsg


# ------------------------------------------------- the engine, not the SSLObject


def test_an_sslobject_has_the_engine_the_data_path_calls() -> None:
    """`engine_of` reaches past `SSLObject` to its C object (`_sslobj`, not
    a documented name): on a Python where it is gone or has other methods,
    this fails first."""
    obj = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost"
    )
    engine = engine_of(obj)
    names = {name for name in vars(Engine) if not name.startswith("_")}
    assert names == {
        "read", "write", "pending", "do_handshake", "shutdown", "getpeercert",
        "version", "cipher", "selected_alpn_protocol", "session", "session_reused",
    }  # fmt: skip
    assert all(hasattr(engine, name) for name in names)


async def test_an_established_connection_keeps_no_sslobject(proxy: Running, certs: Certs) -> None:
    """Once the handshake is done the daemon keeps OpenSSL's C object only:
    the `SSLObject` in front of it (its dict, our notes) is freed, about
    130 bytes of every connection, and the connections go on working."""
    before = _server_side_sslobjects()
    clients = [await tls_connect(proxy.port, certs.client_context()) for _ in range(3)]
    try:
        for client in clients:
            await echo_on(client, b"first")
        assert _server_side_sslobjects() == before
        for client in clients:
            await echo_on(client, b"and again")
    finally:
        for client in clients:
            await trio.aclose_forcefully(client)


def _server_side_sslobjects() -> int:
    """The daemon's, in this process (the clients' are client side)."""
    gc.collect()
    return sum(isinstance(obj, ssl.SSLObject) and obj.server_side for obj in gc.get_objects())


# ------------------------------------------------- writes over a socket pair


async def _handshake(conn: TLSConn) -> None:
    """The want-read loop, as `proxy.handshake` drives it."""
    while True:
        try:
            conn.engine.do_handshake()
        except ssl.SSLWantReadError:
            await conn.flush()
            await conn.fill()
        else:
            await conn.flush()
            return


async def _connected(certs: Certs) -> tuple[TLSConn, trio.SSLStream[trio.SocketStream]]:
    """Our server side over one end of a socket pair, a trio TLS client on
    the other; the server's send buffer small, so a large write fills it."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    conn, _ = TLSConn.server(ours, context, BufferPool(), b"")
    client = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(theirs)),
        certs.client_context(),
        server_hostname="localhost",
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        await _handshake(conn)
    return conn, client


@pytest.fixture
async def tls_pair(
    certs: Certs,
) -> AsyncIterator[tuple[TLSConn, trio.SSLStream[trio.SocketStream]]]:
    conn, client = await _connected(certs)
    yield conn, client
    conn.close()
    await trio.aclose_forcefully(client)


async def test_a_write_of_many_records_arrives_whole_through_a_full_socket(
    tls_pair: tuple[TLSConn, trio.SSLStream[trio.SocketStream]],
) -> None:
    """Several writes of four records each, sent while the client reads only
    after a pause: the gathered sends stop part-way through a record and go
    on from there, and the client decrypts every byte in order."""
    conn, client = tls_pair
    payload = bytes(range(256)) * (4 * TLS_RECORD // 256) * 4  # 256 KiB
    received = bytearray()
    waits = 0

    async def writer() -> None:
        nonlocal waits
        view = memoryview(payload)
        for start in range(0, len(payload), 4 * TLS_RECORD):
            waits += await conn.write(view[start : start + 4 * TLS_RECORD])

    async def reader() -> None:
        await trio.sleep(0.2)  # let the writer meet a full socket first
        while len(received) < len(payload):
            received.extend(await client.receive_some())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(reader)
    assert bytes(received) == payload
    assert waits > 0  # the socket was full: the partial sends were taken


async def test_a_record_the_socket_takes_in_part_is_sent_first_and_whole_after(
    tls_pair: tuple[TLSConn, trio.SSLStream[trio.SocketStream]],
) -> None:
    """`write_at_once` sends without waiting; once the socket is full it
    keeps what the send left first in line, so the next write and the
    flush deliver every byte in order."""
    conn, client = tls_pair
    record = bytes(range(256)) * (TLS_RECORD // 256)
    written = bytearray()
    for _ in range(MAX_RECORDS_TO_FILL):
        assert conn.write_at_once(memoryview(record))
        written += record
        if conn.outgoing.pending:
            break  # the socket took part of this one
    else:
        raise AssertionError(f"the socket took {MAX_RECORDS_TO_FILL} records without filling")
    tail = b"the last write"
    assert not conn.write_at_once(memoryview(tail)) or conn.outgoing.pending
    received = bytearray()

    async def reader() -> None:
        while len(received) < len(written) + len(tail):
            received.extend(await client.receive_some())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            if conn.outgoing.pending:
                await conn.flush()
            await conn.write(memoryview(tail))
    assert bytes(received) == bytes(written) + tail


# A socket pair with a 4 KiB send buffer fills within a few records.
MAX_RECORDS_TO_FILL = 1000


@pytest.mark.parametrize("second", [5, 2 * TLS_RECORD + 7], ids=["small", "large"])
async def test_writes_from_both_tasks_keep_their_order(
    tls_pair: tuple[TLSConn, trio.SSLStream[trio.SocketStream]], second: int
) -> None:
    """A large write held up by a full socket, and another one from a second
    task meanwhile: the second waits its turn (a large one before it takes
    its records out of OpenSSL), and the client reads the first one's bytes
    first (out of order, the records would not decrypt)."""
    conn, client = tls_pair
    first = b"F" * (3 * TLS_RECORD + 100)
    then = b"S" * second
    received = bytearray()

    async def first_writer(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await conn.write(memoryview(first))

    async def reader() -> None:
        await trio.sleep(0.2)
        while len(received) < len(first) + len(then):
            received.extend(await client.receive_some())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(first_writer)
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await conn.write(memoryview(then))
    assert bytes(received) == first + then


async def test_a_connection_that_sent_a_burst_keeps_about_one_record_of_outgoing_buffer(
    certs: Certs,
) -> None:
    """The outgoing memory BIO keeps the largest size it ever held. Written
    whole, a 64 KiB burst would leave each connection holding about 64 KiB
    of it from then on (measured: 63 KiB more than after a 100-byte write);
    a record at a time, about one record (20 KiB)."""
    pairs = [await _connected(certs) for _ in range(CONNECTIONS)]
    burst = memoryview(bytes(4 * TLS_RECORD))

    async def send_all(size: int) -> None:
        for conn, client in pairs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_discard, client, size)
                await conn.write(burst[:size])

    try:
        await send_all(100)
        before = malloc_in_use()
        await send_all(len(burst))
        grown = (malloc_in_use() - before) / CONNECTIONS
    finally:
        for conn, client in pairs:
            conn.close()
            await trio.aclose_forcefully(client)
    assert grown < 1.5 * TLS_RECORD, f"{grown / 1024:.1f} KiB more per connection"


CONNECTIONS = 100


async def _discard(client: trio.SSLStream[trio.SocketStream], size: int) -> None:
    """Read the ciphertext of `size` bytes off the socket without decrypting
    it: the client's own buffers then stay out of the measurement."""
    got = 0
    while got < size:
        got += len(await client.transport_stream.receive_some(1 << 20))
