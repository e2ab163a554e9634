"""The client's ClientHello, read from the first bytes off the socket (sans-IO).

Two pure steps, so both are table-tested without sockets:

1. `reassemble(data)` walks the TLS records at the start of `data` and returns
   the whole ClientHello handshake message once it is there, or how many bytes
   of the stream are needed before trying again, or `GIVE_UP`. A ClientHello
   may be split across TCP segments (it arrives in pieces) and across TLS
   records (a client may fragment it, e.g. a 1.8 KB post-quantum hello in
   512-byte records); both are handled, within `MAX_HELLO_STREAM`.
2. `parse(message)` extracts what the fingerprint and the ALPN policy need.

Nothing here ever decides a handshake's outcome: bytes that do not parse are
OpenSSL's to judge. Only well-formed structure is trusted: every length is
checked against what is left, and any inconsistency is a `None`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# The TLS record layer (RFC 8446, 5.1): every record starts with a 5-byte
# header (content type, legacy version, length); the first record of every
# TLS connection is a handshake record, content type 22.
HANDSHAKE_RECORD = 0x16
RECORD_HEADER = 5
CLIENT_HELLO = 0x01

# Real ClientHellos are 200 bytes to 2 KB; a post-quantum key share (ML-KEM-768
# hybrid, 1.2 KB) plus a resumption ticket and padding stays under 4 KB.
# OpenSSL itself accepts up to 128 KB, so larger hellos are still served; we
# only stop fingerprinting them (16 KB = one maximum-size TLS record).
MAX_HELLO_BYTES = 16 * 1024

# Bytes of stream we are willing to read for it: the hello plus the headers of
# a client fragmenting it into small records. A 1-byte-per-record hello would
# need 6x; such a client gets no fingerprint.
MAX_HELLO_STREAM = MAX_HELLO_BYTES + 2 * 1024

HANDSHAKE_HEADER = 4
EXTENSION_HEADER = 4  # type and length, two bytes each
_EXTENSION_HEADER = struct.Struct(">HH")

GIVE_UP: Final = 0  # `reassemble` result: this stream will never yield a hello we read

# Extension numbers (IANA "TLS ExtensionType Values").
EXT_SERVER_NAME = 0x0000
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What we use from a ClientHello; lists in wire order, GREASE included."""

    legacy_version: int
    ciphers: tuple[int, ...]
    extensions: tuple[int, ...]
    server_name: str | None
    alpn: tuple[bytes, ...]
    supported_versions: tuple[int, ...]
    signature_algorithms: tuple[int, ...]


def reassemble(data: bytes) -> bytes | int:
    """The ClientHello message (with its 4-byte header) if `data` holds all of
    it; else the stream length needed to make progress; else `GIVE_UP`."""
    body = bytearray()
    pos = 0
    wanted: int | None = None  # the message's full length, once its header is in
    while wanted is None or len(body) < wanted:
        if pos + RECORD_HEADER > len(data):
            return _need(pos + RECORD_HEADER)
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if data[pos] != HANDSHAKE_RECORD or length == 0:
            return GIVE_UP
        end = pos + RECORD_HEADER + length
        if end > MAX_HELLO_STREAM:
            return GIVE_UP
        if end > len(data):
            return end
        body += data[pos + RECORD_HEADER : end]
        pos = end
        if wanted is None and len(body) >= HANDSHAKE_HEADER:
            if body[0] != CLIENT_HELLO:
                return GIVE_UP
            wanted = HANDSHAKE_HEADER + int.from_bytes(body[1:4], "big")
            if wanted > MAX_HELLO_BYTES:
                return GIVE_UP
    return bytes(body[:wanted])


def _need(length: int) -> int:
    return length if length <= MAX_HELLO_STREAM else GIVE_UP


class _Reader:
    """Bounds-checked big-endian reads; any overrun raises ValueError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> _Reader:
        return _Reader(self.take(self.uint(length_bytes)))

    def done(self) -> bool:
        return self.pos == len(self.data)

    def uint16s(self) -> tuple[int, ...]:
        if len(self.data) % 2:
            raise ValueError("odd length")
        return struct.unpack(f">{len(self.data) // 2}H", self.data)


def parse(message: bytes) -> ClientHello | None:
    """The fields of a ClientHello message, or None if it is malformed."""
    try:
        return _parse(_Reader(message))
    except ValueError:
        return None


def _parse(r: _Reader) -> ClientHello | None:
    if r.uint(1) != CLIENT_HELLO or r.uint(3) != len(r.data) - HANDSHAKE_HEADER:
        return None
    legacy_version = r.uint(2)
    r.take(32)  # random
    r.vector(1)  # legacy_session_id
    ciphers = r.vector(2).uint16s()
    r.vector(1)  # compression methods
    extensions: list[int] = []
    fields: dict[int, bytes] = {}
    if not r.done():  # a TLS 1.0-era hello may have no extensions at all
        block = r.vector(2).data
        pos, end = 0, len(block)
        while pos < end:  # the hot loop of a handshake's Python work: flat reads
            if pos + EXTENSION_HEADER > end:
                raise ValueError("truncated")
            kind, length = _EXTENSION_HEADER.unpack_from(block, pos)
            pos += EXTENSION_HEADER + length
            if pos > end:
                raise ValueError("truncated")
            extensions.append(kind)
            if kind not in fields:
                fields[kind] = block[pos - length : pos]
    return ClientHello(
        legacy_version=legacy_version,
        ciphers=ciphers,
        extensions=tuple(extensions),
        server_name=_server_name(fields.get(EXT_SERVER_NAME)),
        alpn=_alpn(fields.get(EXT_ALPN)),
        supported_versions=_r(fields.get(EXT_SUPPORTED_VERSIONS), 1).uint16s(),
        signature_algorithms=_r(fields.get(EXT_SIGNATURE_ALGORITHMS), 2).uint16s(),
    )


def _r(data: bytes | None, length_bytes: int) -> _Reader:
    return _Reader(b"") if data is None else _Reader(data).vector(length_bytes)


def _server_name(data: bytes | None) -> str | None:
    names = _r(data, 2)
    while not names.done():
        kind, name = names.uint(1), names.vector(2).data
        if kind == 0:  # host_name
            return name.decode("ascii", "replace")
    return None


def _alpn(data: bytes | None) -> tuple[bytes, ...]:
    protocols = _r(data, 2)
    out: list[bytes] = []
    while not protocols.done():
        out.append(protocols.vector(1).data)
    return tuple(out)
