"""Reassembling the ClientHello (records, segments, bounds), and the
handshake loop reading it without spinning while the rest is on its way."""

from __future__ import annotations

import ssl
import time

import pytest
import trio

from proxy import clienthello
from proxy.ja4 import ja4
from tests.hellos import captured_hello, client_hello, records, sni
from tests.helpers import STEP, BioClient, Certs, Running, raw_connect


def test_whole_hello_in_one_record() -> None:
    message = client_hello([0x1301], [sni("a.test")])
    assert clienthello.reassemble(records(message)) == message


def test_hello_fragmented_across_records() -> None:
    message = client_hello([0x1301], [sni("a.test")])
    assert clienthello.reassemble(records(message, size=3)) == message


@pytest.mark.parametrize("cut", [0, 1, 4, 5, 6, 9, 20])
def test_a_prefix_asks_for_more(cut: int) -> None:
    stream = records(client_hello([0x1301], [sni("a.test")]), size=8)
    need = clienthello.reassemble(stream[:cut])
    assert isinstance(need, int)
    assert cut < need <= len(stream)


@pytest.mark.parametrize(
    "stream",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a 16 MB hello
    ],
)
def test_give_up_on_what_is_not_a_hello_we_read(stream: bytes) -> None:
    assert clienthello.reassemble(stream) == clienthello.GIVE_UP


def test_tiny_records_beyond_the_read_budget_give_up() -> None:
    message = client_hello([0x1301], [sni("a" * 60 + ".test")] * 60)
    assert clienthello.reassemble(records(message, size=1)) == clienthello.GIVE_UP


@pytest.mark.parametrize("cut", [5, 40, 45, 50])
def test_parse_rejects_truncated_messages(cut: int) -> None:
    message = client_hello([0x1301], [sni("a.test")])
    assert clienthello.parse(message[:cut]) is None


def test_parse_a_real_client_hello(certs: Certs) -> None:
    context = certs.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    message = clienthello.reassemble(captured_hello(context))
    assert isinstance(message, bytes)
    hello = clienthello.parse(message)
    assert hello is not None
    assert hello.server_name == "localhost"
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
    sent = client.outgoing.read()
    message = clienthello.reassemble(sent)
    assert isinstance(message, bytes)
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


async def test_one_byte_records_are_reassembled(proxy: Running, certs: Certs) -> None:
    """The most fragmented hello a client can send still gets its fingerprint."""
    context = certs.client_context()
    stream = await raw_connect(proxy.port)
    client = BioClient(stream, context)
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.do_handshake()
    message = clienthello.reassemble(client.outgoing.read())
    assert isinstance(message, bytes)
    hello = clienthello.parse(message)
    assert hello is not None
    with trio.fail_after(STEP):
        await stream.send_all(records(message, size=1))
        await client._retry(client.obj.do_handshake)
        await stream.aclose()
        (line,) = await proxy.access_log(1)
    assert line["outcome"] == "success"
    assert line["ja4"] == ja4(hello)
