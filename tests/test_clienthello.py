"""Reassembling the ClientHello (records, segments, bounds), and the
handshake loop reading it without spinning while the rest is on its way."""

from __future__ import annotations

import ssl
import time

import pytest
import trio
import trio.testing

from proxy import clienthello, handshake
from proxy.ja4 import ja4
from tests.hellos import captured_hello, client_hello, hello_message, records, sni
from tests.helpers import (
    STEP,
    BioClient,
    Certs,
    Running,
    build_config,
    raw_connect,
    start_server,
)
from tests.test_fuzz_clienthello import WorkBound


def _feed(*chunks: bytes) -> clienthello.Reassembler:
    reader = clienthello.Reassembler()
    for chunk in chunks:
        reader.feed(chunk)
    return reader


def test_whole_hello_in_one_record() -> None:
    message = client_hello([0x1301], [sni("a.test")])
    reader = _feed(records(message))
    assert reader.progress is clienthello.DONE
    assert reader.message == message


def test_hello_fragmented_across_records() -> None:
    message = client_hello([0x1301], [sni("a.test")])
    assert _feed(records(message, size=3)).message == message


def test_hello_fed_a_byte_at_a_time_across_1_byte_records() -> None:
    message = client_hello([0x1301], [sni("a.test")])
    stream = records(message, size=1)
    reader = clienthello.Reassembler()
    progress = [reader.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert progress == [clienthello.NEED_MORE] * (len(stream) - 1) + [clienthello.DONE]
    assert reader.message == message


def test_bytes_after_the_hello_change_nothing() -> None:
    """The rest of a chunk (the client's next record) is not the hello's; the
    verdict, once given, stays."""
    message = client_hello([0x1301], [sni("a.test")])
    reader = _feed(records(message) + b"\x14\x03\x03\x00\x01\x01", b"GET / HTTP/1.1\r\n")
    assert reader.progress is clienthello.DONE
    assert reader.message == message


@pytest.mark.parametrize("cut", [0, 1, 4, 5, 6, 9, 20])
def test_a_prefix_asks_for_more(cut: int) -> None:
    stream = records(client_hello([0x1301], [sni("a.test")]), size=8)
    reader = _feed(stream[:cut])
    assert reader.progress is clienthello.NEED_MORE
    with pytest.raises(ValueError, match="need_more"):
        _ = reader.message


@pytest.mark.parametrize(
    "stream",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a 16 MB hello
        b"\x16\x03\x01\x00\x02\x01\x00\x17\x03\x03\x00\x01",  # then application data
        b"\x16\x03\x01\x48\x01",  # a record ending beyond the read budget
    ],
)
def test_give_up_on_what_is_not_a_hello_we_read(stream: bytes) -> None:
    assert _feed(stream).progress is clienthello.GIVE_UP
    assert _feed(*(stream[i : i + 1] for i in range(len(stream)))).progress is clienthello.GIVE_UP


def test_give_up_is_final() -> None:
    reader = _feed(b"GET / HTTP/1.1\r\n")
    assert reader.feed(records(client_hello([0x1301], []))) is clienthello.GIVE_UP


def test_tiny_records_beyond_the_read_budget_give_up() -> None:
    message = client_hello([0x1301], [sni("a" * 60 + ".test")] * 60)
    assert len(records(message, size=1)) > clienthello.MAX_HELLO_STREAM
    assert _feed(records(message, size=1)).progress is clienthello.GIVE_UP


def test_a_hello_of_3_kb_in_1_byte_records_is_within_the_read_budget() -> None:
    message = client_hello([0x1301], [sni("a" * 60 + ".test")] * 40)
    assert 2900 < len(message) <= clienthello.MAX_HELLO_STREAM // 6
    assert _feed(records(message, size=1)).message == message


@pytest.mark.parametrize("cut", [5, 40, 45, 50])
def test_parse_rejects_truncated_messages(cut: int) -> None:
    message = client_hello([0x1301], [sni("a.test")])
    assert clienthello.parse(message[:cut]) is None


def test_parse_a_real_client_hello(certs: Certs) -> None:
    context = certs.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    hello = clienthello.parse(_feed(captured_hello(context)).message)
    assert hello is not None
    assert clienthello.EXT_SERVER_NAME in hello.extensions
    assert hello.alpn == (b"h2", b"http/1.1")
    assert 0x0304 in hello.supported_versions
    assert ja4(hello).startswith("t13d")


@pytest.mark.parametrize("record_size", [16384, 100])
async def test_hello_in_slow_pieces_is_fingerprinted_without_spinning(
    proxy: Running, certs: Certs, record_size: int
) -> None:
    """The hello arrives in three TCP segments 0.3 s apart (and, second case,
    in 100-byte records): the handshake succeeds, the log has the same JA4 as
    the hello, and the proxy does not burn CPU while waiting."""
    context = certs.client_context()
    stream = await raw_connect(proxy.port)
    client = BioClient(stream, context)
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.do_handshake()
    message = hello_message(client.outgoing.read())
    expected = clienthello.parse(message)
    assert expected is not None
    wire = records(message, size=record_size)
    third = len(wire) // 3
    cpu = time.process_time()
    with trio.fail_after(STEP):
        for piece in (wire[:third], wire[third : 2 * third], wire[2 * third :]):
            await stream.send_all(piece)
            await trio.sleep(0.3)
        assert time.process_time() - cpu < 0.3  # a spinning read loop would use ~0.6 s
        await client._retry(client.obj.do_handshake)
        await client.send_all(b"ping")
        assert await client.recv() == b"ping"
        await stream.aclose()
        (line,) = await proxy.access_log(1)
    assert line["outcome"] == "success"
    assert line["ja4"] == ja4(expected)
    assert line["wants_read"] >= 1


# A fatal handshake_failure alert in a plaintext record.
HANDSHAKE_FAILURE_ALERT = bytes.fromhex("15 03 03 00 02 02 28")


async def test_bytes_read_after_the_hello_reach_openssl(proxy: Running, certs: Certs) -> None:
    """The hello and an alert in one segment, read together: OpenSSL gets the
    alert too (were it dropped, OpenSSL would wait for the client until the
    handshake timeout)."""
    stream = await raw_connect(proxy.port)
    client = BioClient(stream, certs.client_context())
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.do_handshake()
    with trio.fail_after(STEP):
        await stream.send_all(client.outgoing.read() + HANDSHAKE_FAILURE_ALERT)
        (line,) = await proxy.access_log(1)
        await stream.aclose()
    assert line["outcome"] == "protocol_error"
    assert "ALERT_HANDSHAKE_FAILURE" in line["error"]
    assert line["handshake_ms"] < 1000 * 2.0  # the fixture's handshake_timeout


# Segments that cut 1-byte records (6 bytes each) anywhere: in a header, between
# header and body, across two records.
SEGMENT = 4


async def test_one_byte_records_are_reassembled(proxy: Running, certs: Certs) -> None:
    """The most fragmented hello a client can send, in 1-byte records, arriving
    in 4-byte TCP segments that the proxy reads one at a time (the test waits
    until the proxy is blocked again before sending the next): the handshake
    succeeds and the hello still gets its fingerprint."""
    context = certs.client_context()
    stream = await raw_connect(proxy.port)
    client = BioClient(stream, context)
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.do_handshake()
    message = hello_message(client.outgoing.read())
    hello = clienthello.parse(message)
    assert hello is not None
    wire = records(message, size=1)
    with trio.fail_after(STEP):
        for start in range(0, len(wire), SEGMENT):
            await stream.send_all(wire[start : start + SEGMENT])
            await trio.testing.wait_all_tasks_blocked()  # the proxy has read it
        await client._retry(client.obj.do_handshake)
        await stream.aclose()
        (line,) = await proxy.access_log(1)
    assert line["outcome"] == "success"
    assert line["ja4"] == ja4(hello)


# ---------------------------------------------------------------- work per byte, real sockets

# ALPN names that pad a real Python ssl ClientHello to about 1.8 KB, so that
# a cost quadratic in the hello's size stands far above a linear one.
PADDING_ALPN = [f"padding-{i:03d}" for i in range(130)]


async def test_a_hello_in_one_byte_segments_takes_the_server_linear_work(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    """The worst a client can send: a 1.8 KB hello as 1-byte records, one byte
    per TCP segment, each read on its own (about 11 000 reads). The server's
    work for it, counted in lines of its hello-reading code executed, stays
    linear in the stream's size: the count is the same on a busy machine as
    on an idle one, where the CPU time this test once measured moved tenfold
    from run to run. Re-walking the stream from its start at each segment,
    as the quadratic reassembler did, executes thousands of times more. The
    handshake then succeeds and the hello is fingerprinted."""
    config = build_config(certs, echo_port, handshake_timeout=STEP)
    proxy = await start_server(nursery, config)
    context = certs.client_context()
    context.set_alpn_protocols(PADDING_ALPN)
    stream = await raw_connect(proxy.port)
    client = BioClient(stream, context)
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.do_handshake()
    message = hello_message(client.outgoing.read())
    assert len(message) > 1700
    hello = clienthello.parse(message)
    assert hello is not None
    wire = records(message, size=1)
    with trio.fail_after(STEP), WorkBound(len(wire), len(wire), clienthello, handshake):
        try:
            for start in range(len(wire)):
                await stream.send_all(wire[start : start + 1])
                await trio.testing.wait_all_tasks_blocked()  # the server has read it
        except trio.BrokenResourceError:  # the bound, raised in the server's task, closed it
            pytest.fail(f"the server gave up on the hello:\n{proxy.log.getvalue()[-600:]}")
    with trio.fail_after(STEP):
        await client._retry(client.obj.do_handshake)
        await client.send_all(b"ping")
        assert await client.recv() == b"ping"
        await stream.aclose()
        (line,) = await proxy.access_log(1)
    assert line["outcome"] == "success"
    assert line["ja4"] == ja4(hello)
