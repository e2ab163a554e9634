"""Slow, malformed and hostile clients: each input in its own test, each
asserting the one outcome counted on /metrics and a normal client served
right afterwards (the proxy survived it)."""

from __future__ import annotations

import contextlib
import random
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from proxy.outcome import Outcome
from tests.daemon import run_daemon, write_config
from tests.helpers import (
    STEP,
    BioClient,
    Certs,
    Running,
    echo_handler,
    expect_outcome,
    raw_connect,
    start_backend,
    tls_connect,
)

RECORD_HEADER = struct.Struct("!BHH")  # content type, legacy version, length
HANDSHAKE = 0x16
TLS10 = 0x0301


async def _expect(
    proxy: Running, certs: Certs, outcome: Outcome, client: Callable[[], Awaitable[None]]
) -> None:
    await expect_outcome(proxy, outcome.value, client, certs.client_context())


async def _until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the proxy sends until it closes (EOF or reset)."""
    received = b""
    try:
        while chunk := await stream.receive_some(65536):
            received += chunk
    except trio.BrokenResourceError:
        pass
    return received


async def _send_then_wait_closed(port: int, data: bytes) -> bytes:
    stream = await raw_connect(port)
    # the proxy may give up before reading everything: that is the point
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(data)
    received = await _until_closed(stream)
    await stream.aclose()
    return received


def _client_hello(certs: Certs) -> tuple[BioClient, bytes]:
    """A real Python ssl client's first flight, not sent yet."""
    client = BioClient(None, certs.client_context())  # type: ignore[arg-type]
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.do_handshake()
    return client, client.outgoing.read()


def _records(body: bytes, size: int) -> bytes:
    return b"".join(
        RECORD_HEADER.pack(HANDSHAKE, TLS10, len(body[i : i + size])) + body[i : i + size]
        for i in range(0, len(body), size)
    )


async def _finish_handshake_and_echo(client: BioClient) -> None:
    await client._retry(client.obj.do_handshake)
    await client.send_all(b"hello")
    assert await client.recv() == b"hello"
    await client.close_notify()
    await client.stream.aclose()


# ---------------------------------------------------------------- must succeed


async def test_client_hello_in_one_byte_tcp_segments_succeeds(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        bio, hello = _client_hello(certs)
        bio.stream = await raw_connect(proxy.port)  # TCP_NODELAY: one segment per send
        for i in range(len(hello)):
            await bio.stream.send_all(hello[i : i + 1])
            await trio.lowlevel.checkpoint()
        await _finish_handshake_and_echo(bio)

    await _expect(proxy, certs, Outcome.SUCCESS, client)


async def test_client_hello_split_over_many_tls_records_succeeds(
    proxy: Running, certs: Certs
) -> None:
    async def client() -> None:
        bio, hello = _client_hello(certs)
        (kind, _, length) = RECORD_HEADER.unpack(hello[:5])
        assert kind == HANDSHAKE and len(hello) == 5 + length
        fragments = _records(hello[5:], 16)  # ~33 records of 16 bytes
        bio.stream = await raw_connect(proxy.port)
        await bio.stream.send_all(fragments)
        await _finish_handshake_and_echo(bio)

    await _expect(proxy, certs, Outcome.SUCCESS, client)


# ---------------------------------------------------------------- malformed


async def test_oversized_record_is_a_protocol_error(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        # 65535 bytes announced: far beyond TLS's 2^14 (+2048) record limit.
        await _send_then_wait_closed(proxy.port, RECORD_HEADER.pack(HANDSHAKE, TLS10, 0xFFFF))

    await _expect(proxy, certs, Outcome.PROTOCOL_ERROR, client)


async def test_sslv2_style_hello_is_unsupported_version(proxy: Running, certs: Certs) -> None:
    ciphers = bytes.fromhex("0700c0 050080 030080 010080 080080 060040 040080 020080")
    challenge = bytes(range(16))
    body = b"\x01\x00\x02" + struct.pack("!HHH", len(ciphers), 0, len(challenge))
    body += ciphers + challenge

    async def client() -> None:
        await _send_then_wait_closed(proxy.port, struct.pack("!H", 0x8000 | len(body)) + body)

    await _expect(proxy, certs, Outcome.UNSUPPORTED_VERSION, client)


async def test_flood_of_zero_length_records_is_cut_short(proxy: Running, certs: Certs) -> None:
    empty = RECORD_HEADER.pack(HANDSHAKE, TLS10, 0)

    async def client() -> None:
        # 10 000 empty records (50 kB): OpenSSL gives up after a few dozen.
        await _send_then_wait_closed(proxy.port, empty * 10_000)

    await _expect(proxy, certs, Outcome.PROTOCOL_ERROR, client)


async def test_truncated_hello_then_close_is_client_closed(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        _, hello = _client_hello(certs)
        stream = await raw_connect(proxy.port)
        await stream.send_all(hello[: len(hello) // 2])
        await stream.aclose()

    await _expect(proxy, certs, Outcome.CLIENT_CLOSED, client)


def _random_bytes(seed: int) -> bytes:
    return random.Random(seed).randbytes(64 * 1024)


async def test_64_kib_of_random_bytes_is_not_tls(proxy: Running, certs: Certs) -> None:
    data = _random_bytes(2)
    assert data[0] < 0x80 and data[0] != HANDSHAKE  # the seed picks a plain first byte

    async def client() -> None:
        await _send_then_wait_closed(proxy.port, data)

    await _expect(proxy, certs, Outcome.NOT_TLS, client)


async def test_random_bytes_with_the_high_bit_set_are_not_tls(proxy: Running, certs: Certs) -> None:
    data = _random_bytes(0)
    assert data[0] >= 0x80 and data[2] != 0x01  # high bit set, yet no SSLv2 CLIENT-HELLO

    async def client() -> None:
        await _send_then_wait_closed(proxy.port, data)

    await _expect(proxy, certs, Outcome.NOT_TLS, client)


async def test_64_kib_of_random_bytes_in_tls_records_is_a_protocol_error(
    proxy: Running, certs: Certs
) -> None:
    async def client() -> None:
        await _send_then_wait_closed(proxy.port, _records(_random_bytes(5), 16 * 1024))

    await _expect(proxy, certs, Outcome.PROTOCOL_ERROR, client)


# A fatal unrecognized_name alert (RFC 6066 section 3) in a plaintext record.
UNRECOGNIZED_NAME_ALERT = bytes.fromhex("15 03 03 00 02 02 70")


async def test_a_server_name_beyond_ascii_is_refused_and_the_log_stays_json(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    """RFC 6066: a host_name is ASCII. CPython's ssl decodes it as ASCII before
    the SNI callback, and a byte beyond prints an "Exception ignored"
    traceback on stderr, the daemon's JSON log. The proxy refuses such a
    hello itself: an unrecognized_name alert, protocol_error, JSON lines only."""
    _, hello = _client_hello(certs)
    assert hello.count(b"localhost") == 1
    hostile = hello.replace(b"localhost", b"l\xf8calhost")
    echo_port = await start_backend(nursery, echo_handler)
    config = write_config(tmp_path / "proxy.toml", certs, backend_port=echo_port)
    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        port, _ = await daemon.started()
        with daemon.deadline(STEP, "the refusal"):
            assert await _send_then_wait_closed(port, hostile) == UNRECOGNIZED_NAME_ALERT
        line = await daemon.wait_for("connection")
        with daemon.deadline(STEP, "a normal client"):
            tls = await tls_connect(port, certs.client_context())
            await tls.aclose()
        await daemon.wait_until(
            lambda: sum(e.get("event") == "connection" for e in daemon.events) == 2,
            "the normal client's access-log line",
        )
    assert line["outcome"] == "protocol_error"
    assert "not ASCII" in line["error"]
    assert [text for text in daemon.lines if not text.startswith("{")] == []


# ---------------------------------------------------------------- after the handshake


async def test_garbage_after_a_good_handshake_ends_the_connection(
    proxy: Running, certs: Certs
) -> None:
    async def client() -> None:
        bio = await BioClient.connect(proxy.port, certs.client_context())
        await bio.send_all(b"hi")
        assert await bio.recv() == b"hi"
        await bio.stream.send_all(_random_bytes(3)[:4096])  # raw bytes, not TLS records
        await _until_closed(bio.stream)
        await bio.stream.aclose()

    await _expect(proxy, certs, Outcome.SUCCESS, client)
    first = (await proxy.access_log(2))[0]
    assert first["close_reason"] == "client_protocol_error"
    assert first["bytes_to_backend"] == 2


async def test_tls12_renegotiation_is_refused(proxy: Running, certs: Certs) -> None:
    async def client() -> None:
        # s_client's "R" command starts a renegotiation on a TLS 1.2 session.
        result = await trio.run_process(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-tls1_2",
             "-servername", "localhost", "-CAfile", str(certs.ca_file)],
            stdin=b"R\n",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert b"RENEGOTIATING" in output, output
        assert b"no renegotiation" in output, output

    await _expect(proxy, certs, Outcome.SUCCESS, client)
    first = (await proxy.access_log(2))[0]
    assert first["tls_version"] == "TLSv1.2"
    assert first["close_reason"] == "client_protocol_error"


# ---------------------------------------------------------------- a huge hello

UNKNOWN_CIPHERS = 300  # unassigned code points; a server must ignore them
UNKNOWN_EXTENSIONS = 200


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!HH", kind, len(data)) + data


def _vector(data: bytes, length_bytes: int = 2) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def _huge_tls12_hello() -> bytes:
    ciphers = [0x7A00 + i for i in range(UNKNOWN_CIPHERS)] + [0xC02B, 0xC02F]
    name = b"localhost"
    extensions = b"".join(
        [
            _extension(0x0000, _vector(b"\x00" + _vector(name))),  # server_name
            _extension(0x000A, _vector(struct.pack("!HH", 0x001D, 0x0017))),  # groups
            _extension(0x000B, _vector(b"\x00", 1)),  # ec_point_formats: uncompressed
            _extension(0x000D, _vector(struct.pack("!HHH", 0x0403, 0x0804, 0x0401))),
            *(_extension(0x7A00 + i, b"\x00" * 4) for i in range(UNKNOWN_EXTENSIONS)),
        ]
    )
    body = (
        struct.pack("!H", 0x0303)
        + random.Random(4).randbytes(32)
        + _vector(b"", 1)  # session id
        + _vector(b"".join(struct.pack("!H", c) for c in ciphers))
        + _vector(b"\x00", 1)  # compression: null
        + _vector(extensions)
    )
    message = b"\x01" + _vector(body, 3)
    return _records(message, 16 * 1024)


async def test_hello_with_hundreds_of_ciphers_and_extensions_is_answered(
    proxy: Running, certs: Certs
) -> None:
    async def client() -> None:
        stream = await raw_connect(proxy.port)
        await stream.send_all(_huge_tls12_hello())
        reply = await stream.receive_some(5 + 4)
        assert reply[0] == HANDSHAKE and reply[5] == 0x02  # a ServerHello: accepted
        await stream.aclose()  # and leave: the hand-made client cannot go on

    await _expect(proxy, certs, Outcome.CLIENT_CLOSED, client)


async def test_real_client_offering_every_cipher_and_200_alpn_names_succeeds(
    proxy: Running, certs: Certs
) -> None:
    async def client() -> None:
        context = certs.client_context()
        context.set_ciphers("ALL:@SECLEVEL=0")
        context.set_alpn_protocols([f"proto-{i}" for i in range(200)])
        tls = await tls_connect(proxy.port, context)
        await tls.send_all(b"x")
        assert await tls.receive_some(1) == b"x"
        await tls.aclose()

    await _expect(proxy, certs, Outcome.SUCCESS, client)
