"""The client's ClientHello, read from the first bytes off the socket (sans-IO).

Two pure steps, so both are table-tested without sockets:

1. A `Reassembler` is fed the stream as it arrives, chunk by chunk, and says
   after each chunk whether the whole ClientHello handshake message is in
   (`DONE`, then `message` holds it), more is needed (`NEED_MORE`), or this
   stream will never yield a hello we read (`GIVE_UP`). A ClientHello may be
   split across TCP segments (it arrives in pieces) and across TLS records
   (a client may fragment it, e.g. a 1.8 KB post-quantum hello in 512-byte
   records); both are handled, within `MAX_HELLO_STREAM`. It keeps its place
   between chunks, so every byte is looked at once: the work is linear in
   the stream however it is cut, where re-reading the stream from its start
   at each chunk cost seconds of CPU for one hello sent a byte per segment.
2. `parse(message)` extracts what the fingerprint and the ALPN policy need.

Nothing here ever decides a handshake's outcome: bytes that do not parse are
OpenSSL's to judge. Only well-formed structure is trusted: every length is
checked against what is left, and any inconsistency is a `None`.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import NamedTuple

# The TLS record layer (RFC 8446, 5.1): every record starts with a 5-byte
# header (content type, legacy version, length); the first record of every
# TLS connection is a handshake record, content type 22. A peer that refuses
# our hello answers with an alert record, content type 21, instead.
HANDSHAKE_RECORD = 0x16
ALERT_RECORD = 0x15
RECORD_HEADER = 5
CLIENT_HELLO = 0x01

# Real ClientHellos are 200 bytes to 2 KB; a post-quantum key share (ML-KEM-768
# hybrid, 1.2 KB) plus a resumption ticket and padding stays under 4 KB.
# OpenSSL itself accepts up to 128 KB, so larger hellos are still served; we
# only stop fingerprinting them (16 KB = one maximum-size TLS record).
MAX_HELLO_BYTES = 16 * 1024

# Bytes of stream we are willing to read for it: the hello plus the headers of
# a client fragmenting it into small records. In 1-byte records a hello takes
# 6 bytes of stream per byte: one of up to 3 KB is still read, a larger one
# gets no fingerprint.
MAX_HELLO_STREAM = MAX_HELLO_BYTES + 2 * 1024

HANDSHAKE_HEADER = 4
# The legacy_session_id's length byte: after the header, the legacy version
# (2 bytes) and the random (32).
_SESSION_ID = HANDSHAKE_HEADER + 2 + 32
EXTENSION_HEADER = 4  # type and length, two bytes each
_EXTENSION_HEADER = struct.Struct(">HH")

# Extension numbers (IANA "TLS ExtensionType Values").
EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_GROUPS = 0x000A
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B
# The extensions whose bodies are read (the first of each kind).
_KEPT = frozenset(
    (EXT_SUPPORTED_GROUPS, EXT_SIGNATURE_ALGORITHMS, EXT_ALPN, EXT_SUPPORTED_VERSIONS)
)


class ClientHello(NamedTuple):
    """What we use from a ClientHello; lists in wire order, GREASE included.

    A named tuple: built in one call, and hashed and compared in C, for the
    fingerprint's cache (`proxy.ja4`)."""

    legacy_version: int
    ciphers: tuple[int, ...]
    extensions: tuple[int, ...]
    alpn: tuple[bytes, ...]
    supported_versions: tuple[int, ...]
    signature_algorithms: tuple[int, ...]
    # The supported_groups extension's body, undecoded: only a failed
    # handshake's log reads it (`supported_groups`), so no handshake pays for it.
    groups_extension: bytes = b""


class Progress(Enum):
    """Where a `Reassembler` stands after a chunk."""

    NEED_MORE = "need_more"
    DONE = "done"
    GIVE_UP = "give_up"  # final: this stream will never yield a hello we read


NEED_MORE, DONE, GIVE_UP = Progress.NEED_MORE, Progress.DONE, Progress.GIVE_UP


class Reassembler:
    """The first ClientHello message of a stream, reassembled as chunks arrive.

    The state between chunks is where the stream stands (bytes read, a
    partial record header, what is left of the current record) and the
    message so far; a chunk is looked at once and never again.
    """

    __slots__ = ("_body", "_header", "_left", "_read", "_wanted", "progress")

    def __init__(self) -> None:
        self.progress = NEED_MORE
        self._read = 0  # stream bytes consumed so far
        self._header = bytearray()  # the current record's header, while incomplete
        self._left = 0  # body bytes of the current record not yet read
        self._body = bytearray()  # the handshake message so far
        self._wanted = 0  # the message's whole length, once its header is in

    @property
    def message(self) -> bytes:
        """The ClientHello message (with its 4-byte header); only once `DONE`."""
        if self.progress is not DONE:
            raise ValueError(f"no ClientHello yet: {self.progress.value}")
        return bytes(self._body[: self._wanted])

    def feed(self, chunk: bytes | bytearray | memoryview) -> Progress:
        """Take the next bytes of the stream; once `DONE` or `GIVE_UP`, that stays."""
        view = memoryview(chunk)
        while view and self.progress is NEED_MORE:
            if self._left:
                piece = view[: self._left]
                self._left -= len(piece)
                self._read += len(piece)
                self._body += piece
                self.progress = self._check_message()
            else:
                piece = view[: RECORD_HEADER - len(self._header)]
                self._read += len(piece)
                self._header += piece
                if len(self._header) == RECORD_HEADER:
                    self.progress = self._start_record()
            view = view[len(piece) :]
        return self.progress

    def _start_record(self) -> Progress:
        header = self._header
        length = int.from_bytes(header[3:5], "big")
        if header[0] != HANDSHAKE_RECORD or length == 0:
            return GIVE_UP
        if self._read + length > MAX_HELLO_STREAM:
            return GIVE_UP
        header.clear()
        self._left = length
        return NEED_MORE

    def _check_message(self) -> Progress:
        body = self._body
        if not self._wanted and len(body) >= HANDSHAKE_HEADER:
            if body[0] != CLIENT_HELLO:
                return GIVE_UP
            self._wanted = HANDSHAKE_HEADER + int.from_bytes(body[1:4], "big")
            if self._wanted > MAX_HELLO_BYTES:
                return GIVE_UP
        if self._wanted and len(body) >= self._wanted:
            return DONE
        return NEED_MORE


def parse(message: bytes) -> ClientHello | None:
    """The fields of a ClientHello message, or None if it is malformed.

    One flat pass over the message with index arithmetic: it runs for every
    TLS connection, and a reader object with a call per field took twice
    as long (BENCHMARKS.md)."""
    try:
        return _parse(message)
    except ValueError:
        return None


def _parse(m: bytes) -> ClientHello | None:
    end = len(m)
    if end < _SESSION_ID or m[0] != CLIENT_HELLO:
        return None
    if int.from_bytes(m[1:4], "big") != end - HANDSHAKE_HEADER:
        return None
    legacy_version = m[4] << 8 | m[5]
    _, stop = _span(m, _SESSION_ID, 1, end)  # legacy_session_id
    start, stop = _span(m, stop, 2, end)
    ciphers = _uint16s(m[start:stop])
    _, stop = _span(m, stop, 1, end)  # compression methods
    extensions: list[int] = []
    fields: dict[int, bytes] = {}
    if stop < end:  # a TLS 1.0-era hello may have no extensions at all
        pos, block_end = _span(m, stop, 2, end)
        while pos < block_end:  # the hot loop of a handshake's Python work: flat reads
            if pos + EXTENSION_HEADER > block_end:
                raise ValueError("truncated")
            kind, length = _EXTENSION_HEADER.unpack_from(m, pos)
            pos += EXTENSION_HEADER + length
            if pos > block_end:
                raise ValueError("truncated")
            extensions.append(kind)
            if kind in _KEPT and kind not in fields:
                fields[kind] = m[pos - length : pos]
    versions = fields.get(EXT_SUPPORTED_VERSIONS)
    algorithms = fields.get(EXT_SIGNATURE_ALGORITHMS)
    protocols = fields.get(EXT_ALPN)
    return ClientHello(
        legacy_version,
        ciphers,
        tuple(extensions),
        () if protocols is None else _alpn(protocols),
        () if versions is None else _uint16s(_vector(versions, 1)),
        () if algorithms is None else _uint16s(_vector(algorithms, 2)),
        fields.get(EXT_SUPPORTED_GROUPS, b""),
    )


def supported_groups(hello: ClientHello) -> tuple[int, ...]:
    """The IANA codes of the groups the client offers; a malformed list is none."""
    try:
        return _uint16s(_vector(hello.groups_extension, 2)) if hello.groups_extension else ()
    except ValueError:
        return ()


def _span(data: bytes, pos: int, width: int, end: int) -> tuple[int, int]:
    """Where the body of the vector at `pos` (a `width`-byte length, then
    that many bytes) starts and stops; ValueError if it runs past `end`."""
    start = pos + width
    stop = start + int.from_bytes(data[pos:start], "big")
    if start > end or stop > end:
        raise ValueError("truncated")
    return start, stop


def _vector(data: bytes, width: int) -> bytes:
    """The body of the vector that starts an extension (bytes after it are ignored)."""
    start, stop = _span(data, 0, width, len(data))
    return data[start:stop]


def _uint16s(data: bytes) -> tuple[int, ...]:
    if len(data) % 2:
        raise ValueError("odd length")
    return struct.unpack(f">{len(data) // 2}H", data)


def _alpn(data: bytes) -> tuple[bytes, ...]:
    body = _vector(data, 2)
    out: list[bytes] = []
    pos, end = 0, len(body)
    while pos < end:
        start, pos = _span(body, pos, 1, end)
        out.append(body[start:pos])
    return tuple(out)
