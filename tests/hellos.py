"""Hand-built ClientHellos and a real client's hello captured from a memory BIO."""

from __future__ import annotations

import contextlib
import ssl


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def vec(data: bytes, length_bytes: int) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def extension(kind: int, body: bytes) -> bytes:
    return u16(kind) + vec(body, 2)


def sni(name: str) -> bytes:
    return extension(0x0000, vec(b"\x00" + vec(name.encode(), 2), 2))


def alpn(*protocols: bytes) -> bytes:
    return extension(0x0010, vec(b"".join(vec(p, 1) for p in protocols), 2))


def u16_list(kind: int, values: list[int], length_bytes: int = 2) -> bytes:
    return extension(kind, vec(b"".join(u16(v) for v in values), length_bytes))


def client_hello(ciphers: list[int], extensions: list[bytes], version: int = 0x0303) -> bytes:
    """The handshake message (type, 3-byte length, body)."""
    body = u16(version) + bytes(32) + vec(bytes(32), 1)
    body += vec(b"".join(u16(c) for c in ciphers), 2) + vec(b"\x00", 1)
    body += vec(b"".join(extensions), 2)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, size: int = 16384) -> bytes:
    """The message framed in handshake records of at most `size` bytes."""
    return b"".join(
        b"\x16\x03\x01" + vec(message[i : i + size], 2) for i in range(0, len(message), size)
    )


def captured_hello(context: ssl.SSLContext, server_hostname: str | None = "localhost") -> bytes:
    """The records a real Python ssl client sends first."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def hello_message(stream: bytes) -> bytes:
    """The first handshake message in a stream of whole handshake records: the
    tests' own reading of a captured hello, independent of `proxy.clienthello`."""
    body = bytearray()
    pos = 0
    while pos + 5 <= len(stream):
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        body += stream[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(body[: 4 + int.from_bytes(body[1:4], "big")])
