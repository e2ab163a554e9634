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
from dataclasses import dataclass
from enum import Enum

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
EXTENSION_HEADER = 4  # type and length, two bytes each
_EXTENSION_HEADER = struct.Struct(">HH")

# Extension numbers (IANA "TLS ExtensionType Values").
EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_GROUPS = 0x000A
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
        groups_extension=fields.get(EXT_SUPPORTED_GROUPS, b""),
    )


def supported_groups(hello: ClientHello) -> tuple[int, ...]:
    """The IANA codes of the groups the client offers; a malformed list is none."""
    try:
        return _r(hello.groups_extension, 2).uint16s()
    except ValueError:
        return ()


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
