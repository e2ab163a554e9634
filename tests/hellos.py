"""Hand-built ClientHellos and a real client's hello captured from a memory BIO."""

from __future__ import annotations

import contextlib
import random
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


# ---------------------------------------------------------------- mutations, for the fuzz tests

EXT_SERVER_NAME, EXT_ALPN, EXT_SIGNATURE_ALGORITHMS, EXT_SUPPORTED_VERSIONS = 0, 16, 13, 43


def _u16_at(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 2], "big")


def length_fields(message: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every length field of a well-formed ClientHello
    message, down into the extensions the proxy reads: where an edit makes
    the structure lie about itself."""
    fields = [(1, 3)]
    pos = 4 + 2 + 32  # header, legacy_version, random
    for width in (1, 2, 1):  # session id, cipher suites, compression methods
        fields.append((pos, width))
        pos += width + int.from_bytes(message[pos : pos + width], "big")
    if pos + 2 > len(message):
        return fields
    fields.append((pos, 2))
    end = pos + 2 + _u16_at(message, pos)
    pos += 2
    while pos + 4 <= end:
        kind, length, body = _u16_at(message, pos), _u16_at(message, pos + 2), pos + 4
        fields.append((pos + 2, 2))
        if kind == EXT_SUPPORTED_VERSIONS and length:
            fields.append((body, 1))
        elif kind in (EXT_SERVER_NAME, EXT_ALPN, EXT_SIGNATURE_ALGORITHMS) and length >= 2:
            fields.append((body, 2))
            if kind == EXT_SERVER_NAME and length >= 5:
                fields.append((body + 3, 2))  # the host_name's length
            if kind == EXT_ALPN:
                item = body + 2
                while item < body + length:
                    fields.append((item, 1))
                    item += 1 + message[item]
        pos = body + length
    return fields


def resplit(message: bytes, rng: random.Random) -> bytes:
    """The message in handshake records of random sizes (1-byte ones too)."""
    out = bytearray()
    pos = 0
    while pos < len(message):
        size = rng.choice([1, 2, 3, rng.randint(1, 64), rng.randint(1, len(message))])
        out += records(message[pos : pos + size])
        pos += size
    return bytes(out)


def mutate(message: bytes, rng: random.Random) -> bytes:
    """A stream that was a valid ClientHello before a few random edits:
    lying length fields, bytes inserted, deleted or repeated, random record
    framing, then flipped bytes and truncation on the wire."""
    data = bytearray(message)
    fields = length_fields(message)
    for _ in range(rng.randint(0, 3)):
        offset, width = rng.choice(fields)
        old = int.from_bytes(data[offset : offset + width], "big")
        new = rng.choice([0, old - 1, old + 1, (1 << 8 * width) - 1, rng.getrandbits(8 * width)])
        data[offset : offset + width] = (new % (1 << 8 * width)).to_bytes(width, "big")
    for _ in range(rng.randint(0, 2)):
        at, size = rng.randrange(len(data) + 1), rng.randint(1, 16)
        edit = rng.randrange(3)
        if edit == 0:
            data[at:at] = rng.randbytes(size)
        elif edit == 1:
            del data[at : at + size]
        else:
            data[at:at] = data[at : at + size]
    stream = bytearray(resplit(bytes(data), rng) if rng.random() < 0.5 else records(bytes(data)))
    for _ in range(rng.randint(0, 3)):
        if stream:
            stream[rng.randrange(len(stream))] ^= 1 << rng.randrange(8)
    if rng.random() < 0.2:
        del stream[rng.randrange(len(stream) + 1) :]
    return bytes(stream)
