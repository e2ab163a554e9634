"""Reassembling the ClientHello (records, segments, bounds), and the
handshake loop reading it without spinning while the rest is on its way."""

from __future__ import annotations

import os
import select
import socket
import ssl
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from proxy import clienthello
from proxy.ja4 import ja4
from tests.daemon import run_daemon, write_config
from tests.hellos import captured_hello, client_hello, hello_message, records, sni
from tests.helpers import STEP, BioClient, Certs, Running, echo_handler, raw_connect, start_backend


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


# ---------------------------------------------------------------- CPU per byte, real daemon

# ALPN names that pad a real Python ssl ClientHello to about 1.8 KB, so that
# a cost quadratic in the hello's size stands far above a linear one.
PADDING_ALPN = [f"padding-{i:03d}" for i in range(130)]

# How long the sender waits for the daemon to go back to sleep after one
# segment before sending the next anyway (a descheduled daemon, a stray
# wakeup): long enough for the slowest per-byte work of the quadratic code
# (about a millisecond at the end of a 1.8 KB hello), short enough that a
# lost wakeup costs little. And the pause between two looks at it.
PACE_LIMIT = 0.05
PACE_POLL = 20e-6

# The daemon's CPU time for a 1.8 KB hello as 1-byte records, one byte per TCP
# segment (about 11 000 segments), and the rest of the handshake. Measured on
# this 2-core machine: 5.1-5.8 s when every segment re-walked the stream from
# its start, 0.3-0.4 s with the incremental reassembler (a wakeup, a recv and
# a few dozen bytecodes per segment).
CPU_BOUND = 1.5


def _cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (proc(5): fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        fields = file.read().rpartition(")")[2].split()  # field 3 on, after the name
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _voluntary_switches(pid: int) -> int:
    """How often the daemon's main thread (the event loop) went to sleep."""
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")


def _send_one_byte_per_segment(sock: socket.socket, data: bytes, pid: int) -> None:
    """Each byte its own TCP segment (TCP_NODELAY), sent once the daemon has
    gone back to sleep after the previous one, so that it reads one byte per
    recv. Past the step deadline the rest goes unpaced: the test ends anyway."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    unpaced_after = time.monotonic() + STEP
    for i in range(len(data)):
        asleep = _voluntary_switches(pid)
        while True:  # a non-blocking socket: trio owns it
            try:
                sock.send(data[i : i + 1])
                break
            except BlockingIOError:
                select.select([], [sock], [], STEP)
        wait_until = min(time.monotonic() + PACE_LIMIT, unpaced_after)
        while _voluntary_switches(pid) == asleep and time.monotonic() < wait_until:
            time.sleep(PACE_POLL)


async def test_a_hello_in_one_byte_segments_costs_the_daemon_little_cpu(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    """The worst a client can send: a 1.8 KB hello as 1-byte records, one byte
    per TCP segment. The daemon reads each on its own, and its CPU time for
    the connection stays linear in the hello's size; the handshake succeeds
    and the hello is fingerprinted."""
    echo_port = await start_backend(nursery, echo_handler)
    config = write_config(
        tmp_path / "proxy.toml",
        certs,
        backend_port=echo_port,
        # room for the seconds of CPU the quadratic code spent, on a busy machine
        listener_lines="handshake_timeout = 120.0",
    )
    context = certs.client_context()
    context.set_alpn_protocols(PADDING_ALPN)
    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        port, _ = await daemon.started()
        pid = daemon.process.pid
        sock = socket.create_connection(("127.0.0.1", port))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        client = BioClient(stream, context)
        with pytest.raises(ssl.SSLWantReadError):
            client.obj.do_handshake()
        message = hello_message(client.outgoing.read())
        assert len(message) > 1700
        hello = clienthello.parse(message)
        assert hello is not None
        cpu = _cpu_seconds(pid)
        await trio.to_thread.run_sync(
            _send_one_byte_per_segment, sock, records(message, size=1), pid
        )
        with daemon.deadline(STEP, "the rest of the handshake"):
            await client._retry(client.obj.do_handshake)
            await client.send_all(b"ping")
            assert await client.recv() == b"ping"
            await stream.aclose()
        line = await daemon.wait_for("connection")
        used = _cpu_seconds(pid) - cpu
    assert line["outcome"] == "success"
    assert line["ja4"] == ja4(hello)
    assert used < CPU_BOUND, f"{used:.2f} s of CPU for one hello"
