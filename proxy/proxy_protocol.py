"""PROXY protocol headers (v1 text, v2 binary with TLVs), as pure functions.

Theory of operation
-------------------

The backend sees a connection from the proxy, not from the client. With
`proxy_protocol` set, the first bytes the proxy writes to the backend,
before any plaintext, are a header naming the real client, as specified in
HAProxy's "The PROXY protocol, versions 1 & 2" (doc/proxy-protocol.txt):

    v1:  "PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n"     (at most 107 bytes)

    v2:  12-byte signature  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
         ver_cmd  0x21      version 2, command PROXY
         fam      0x11      AF_INET + STREAM   (0x21 for AF_INET6)
         len      uint16    bytes that follow: addresses + TLVs
         addresses          src addr, dst addr, src port, dst port
         TLVs               type (1 byte), length (uint16), value

The TLVs carry what the TLS handshake taught us: ALPN (0x01), the authority
(0x02, the SNI the client asked for) and the SSL TLV (0x20):

         client   uint8     PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | ..._SESS
                            (CERT_SESS alone on a resumed session: the
                            certificate came with an earlier connection)
         verify   uint32    0 only when a client certificate was verified
         sub-TLVs           version (0x21), CN (0x22), cipher (0x23)

and, in the range the spec leaves to applications (0xE0-0xEF), the client
certificate's SPIFFE ID (0xE0, `PP2_TYPE_TLSPROXY_SPIFFE_ID`): the URI as
ASCII, only for a verified certificate with exactly one valid SPIFFE ID.

"src" is the client as accepted, "dst" the listener address it connected
to. Everything here is bytes in, bytes out: no sockets, so the byte layout
is unit-tested against the spec and against an independent parser.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_VERSION_PROXY = 0x21  # high nibble: version 2; low nibble: PROXY (not LOCAL)
_V2_FAMILY = {4: 0x11, 6: 0x21}  # AF_INET / AF_INET6, each over STREAM
_V2_LOCAL = 0x20  # version 2, command LOCAL: not a relayed client's connection
_V2_UNSPEC = 0x00  # AF_UNSPEC: no addresses follow
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
# Application-specific (PP2_TYPE_MIN_CUSTOM 0xE0 .. PP2_TYPE_MAX_CUSTOM 0xEF):
# the first of them, published in the README.
PP2_TYPE_TLSPROXY_SPIFFE_ID = 0xE0

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02  # a client certificate was presented on this connection
PP2_CLIENT_CERT_SESS = 0x04  # ... or at least once in this TLS session

# The spec: `verify` is zero only "if the client presented a certificate and
# it was successfully verified, and non-zero otherwise". HAProxy itself
# sends 0 when no certificate was presented; we follow the spec's words, so
# a backend that trusts `verify == 0` cannot be fooled by a client that
# simply sent no certificate.
VERIFY_OK = 0
VERIFY_NONE = 1

_TLV_HEAD = struct.Struct("!BH")
_MAX_TLV_VALUE = 0xFFFF  # the length field is a uint16

Version = Literal["v1", "v2"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class TLSFacts:
    """What the handshake established, as the v2 TLVs carry it (v1 has no room)."""

    version: str | None = None  # "TLSv1.3"
    cipher: str | None = None  # OpenSSL's name, "TLS_AES_256_GCM_SHA384"
    alpn: str | None = None  # the negotiated protocol, "h2"
    sni: str | None = None  # the server name the client asked for
    client_cn: str | None = None  # CN of a client certificate that was verified
    client_spiffe_id: str | None = None  # its SPIFFE ID, when it has exactly one
    # The session was resumed: the verified certificate (if any) was presented
    # on an earlier connection of this TLS session, not on this one.
    resumed: bool = False


def encode(
    version: Version,
    source: tuple[str, int] | None,
    dest: tuple[str, int] | None,
    tls: TLSFacts | None = None,
) -> bytes:
    """The header announcing `source` (the client) connected to `dest`.

    None for either (a client of a unix-socket listener has no IP address
    and port): v1 says `PROXY UNKNOWN`, v2 `LOCAL` with no addresses
    (AF_UNSPEC), as HAProxy sends for such a client; both tell the backend
    to take the connection's own endpoints. The v2 TLVs follow all the same.
    """
    if source is None or dest is None:
        return V1_UNKNOWN if version == "v1" else encode_v2_local(tls)
    if version == "v1":
        return encode_v1(source, dest)
    return encode_v2(source, dest, tls)


def encode_v1(source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    src, dst = _same_family(source[0], dest[0])
    protocol = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {protocol} {src} {dst} {source[1]} {dest[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int], dest: tuple[str, int], tls: TLSFacts | None = None) -> bytes:
    src, dst = _same_family(source[0], dest[0])
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], dest[1])
    body = addresses + (tlvs(tls) if tls is not None else b"")
    head = struct.pack("!BBH", _V2_VERSION_PROXY, _V2_FAMILY[src.version], len(body))
    return V2_SIGNATURE + head + body


def encode_v2_local(tls: TLSFacts | None = None) -> bytes:
    """A v2 LOCAL header with no addresses: the receiver keeps the
    connection's own endpoints; the TLVs still say what TLS established."""
    body = tlvs(tls) if tls is not None else b""
    return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, _V2_UNSPEC, len(body)) + body


def tlvs(tls: TLSFacts) -> bytes:
    """ALPN, authority, SSL and SPIFFE ID TLVs, in ascending type order, as
    HAProxy writes its own."""
    out = b""
    if tls.alpn:
        out += tlv(PP2_TYPE_ALPN, tls.alpn.encode("ascii"))
    if tls.sni:
        out += tlv(PP2_TYPE_AUTHORITY, tls.sni.encode("utf-8"))
    out += tlv(PP2_TYPE_SSL, ssl_value(tls))
    if tls.client_spiffe_id is not None:
        out += tlv(PP2_TYPE_TLSPROXY_SPIFFE_ID, tls.client_spiffe_id.encode("ascii"))
    return out


def ssl_value(tls: TLSFacts) -> bytes:
    """The PP2_TYPE_SSL value: client flags, verify result, then sub-TLVs."""
    verified = tls.client_cn is not None
    client = PP2_CLIENT_SSL
    if verified:
        client |= PP2_CLIENT_CERT_SESS
        if not tls.resumed:
            client |= PP2_CLIENT_CERT_CONN
    out = struct.pack("!BI", client, VERIFY_OK if verified else VERIFY_NONE)
    if tls.version:
        out += tlv(PP2_SUBTYPE_SSL_VERSION, tls.version.encode("ascii"))
    if tls.client_cn is not None:
        out += tlv(PP2_SUBTYPE_SSL_CN, tls.client_cn.encode("utf-8"))
    if tls.cipher:
        out += tlv(PP2_SUBTYPE_SSL_CIPHER, tls.cipher.encode("ascii"))
    return out


def tlv(kind: int, value: bytes) -> bytes:
    if len(value) > _MAX_TLV_VALUE:
        raise ValueError(f"TLV 0x{kind:02x} value is {len(value)} bytes; at most 65535 fit")
    return _TLV_HEAD.pack(kind, len(value)) + value


def _same_family(source: str, dest: str) -> tuple[IPAddress, IPAddress]:
    """Both addresses in one family, as both header versions require.

    A dual-stack listener reports IPv4 clients as IPv4-mapped IPv6
    (::ffff:192.0.2.1); when both sides are IPv4 underneath, say so plainly,
    otherwise lift the IPv4 side into the IPv6 family.
    """
    src, dst = _unmapped(source), _unmapped(dest)
    if src.version == dst.version:
        return src, dst
    return _as_v6(src), _as_v6(dst)


def _unmapped(text: str) -> IPAddress:
    address = ipaddress.ip_address(text.partition("%")[0])  # drop an IPv6 zone id
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _as_v6(address: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(f"::ffff:{address}")


# ---------------------------------------------------------------------------
# Receiving: a load balancer's header in front of the client's bytes.
#
# `parse_header(data, accept)` is the sans-IO half: it judges the bytes read
# so far and says the header is complete (`Received`, with how many bytes it
# took; the rest are the client's TLS bytes), needs more (`NEED_MORE`), or is
# not acceptable (`HeaderError`, whose message says why with any bytes shown
# escaped). Every length is checked before it is used, and a header is never
# longer than the spec allows (v1) or `MAX_V2_LENGTH` (v2), so a sender
# cannot make us buffer more than that.

# The spec: a v1 line is at most 107 bytes, CRLF included.
MAX_V1_HEADER = 107
V1_PREFIX = b"PROXY "
# A v2 header's fixed part: signature, ver_cmd, family, length.
V2_HEADER = 16
# The most v2 bytes after the fixed part that we accept. The addresses take
# at most 216 (AF_UNIX); load balancers add a few TLVs: an AWS NLB its VPC
# endpoint id (0xEA, ~25 bytes), HAProxy a unique id or the SSL TLV (well
# under 300 with a client CN), Azure a link id. 1 KiB is several times all of
# them together, and bounds what an unauthenticated sender can make a
# connection hold before TLS starts.
MAX_V2_LENGTH = 1024

Accept = Literal["v1", "v2", "any"]

_V2_ADDRESSES = {0x11: (4, 12), 0x21: (16, 36)}  # TCP4 / TCP6: address bytes, block size
_V1_FAMILIES = {b"TCP4": 4, b"TCP6": 6}
_PORT = struct.Struct("!H")


class HeaderError(ValueError):
    """Not an acceptable PROXY header; the message says what was wrong."""


class _NeedMore:
    """`parse_header`: the header is not complete yet."""

    __slots__ = ()


NEED_MORE = _NeedMore()


@dataclass(frozen=True, slots=True)
class Received:
    """A complete header. `source` None: LOCAL (v2) or UNKNOWN (v1), a
    connection of the balancer's own, so the socket's peer is the client."""

    version: Version
    length: int  # bytes of the stream the header took
    source: tuple[str, int] | None
    dest: tuple[str, int] | None


def parse_header(data: bytes, accept: Accept) -> Received | _NeedMore:
    """Judge the first bytes of a connection; raises HeaderError."""
    if accept != "v2" and data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)]:
        return _parse_v1(data)
    if accept != "v1" and data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data)
    expected = {"v1": "a v1 line", "v2": "a v2 signature", "any": "a v1 line or v2 signature"}
    raise HeaderError(f"expected {expected[accept]}, got {bytes(data[:16])!r}")


def _parse_v1(data: bytes) -> Received | _NeedMore:
    end = data.find(b"\r\n", 0, MAX_V1_HEADER)
    if end < 0:
        if len(data) >= MAX_V1_HEADER:
            raise HeaderError(f"v1 line without CRLF in its first {MAX_V1_HEADER} bytes")
        return NEED_MORE
    line = bytes(data[:end])
    fields = line.split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:  # the rest of the line is to be ignored
        return Received("v1", end + 2, None, None)
    if len(fields) != 6 or fields[1] not in _V1_FAMILIES:
        raise HeaderError(f"malformed v1 line {line!r}")
    family = _V1_FAMILIES[fields[1]]
    src, dst = (_v1_address(field, family, line) for field in fields[2:4])
    sport, dport = (_v1_port(field, line) for field in fields[4:6])
    return Received("v1", end + 2, (src, sport), (dst, dport))


def _v1_address(field: bytes, family: int, line: bytes) -> str:
    try:
        address = ipaddress.ip_address(field.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError(f"bad address {field!r} in v1 line {line!r}") from None
    if address.version != family:
        raise HeaderError(f"address {field!r} is not IPv{family} in v1 line {line!r}")
    return str(address)


def _v1_port(field: bytes, line: bytes) -> int:
    # Decimal without a leading zero (the spec), 0-65535.
    if not (field.isdigit() and (field == b"0" or not field.startswith(b"0"))):
        raise HeaderError(f"bad port {field!r} in v1 line {line!r}")
    port = int(field)
    if port > 0xFFFF:
        raise HeaderError(f"port {port} out of range in v1 line {line!r}")
    return port


def _parse_v2(data: bytes) -> Received | _NeedMore:
    if len(data) < V2_HEADER:
        return NEED_MORE
    ver_cmd, family, length = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    if ver_cmd not in (_V2_VERSION_PROXY, _V2_LOCAL):
        raise HeaderError(f"v2 version/command byte 0x{ver_cmd:02x}; expected 0x21 or 0x20")
    if length > MAX_V2_LENGTH:
        raise HeaderError(f"v2 header declares {length} bytes; at most {MAX_V2_LENGTH} accepted")
    if len(data) < V2_HEADER + length:
        return NEED_MORE
    total = V2_HEADER + length
    if ver_cmd == _V2_LOCAL or family == _V2_UNSPEC:
        return Received("v2", total, None, None)
    if family not in _V2_ADDRESSES:
        raise HeaderError(f"v2 address family 0x{family:02x}; only TCP over IPv4 or IPv6")
    size, block = _V2_ADDRESSES[family]
    if length < block:
        raise HeaderError(f"v2 header of {length} bytes is too short for its addresses")
    body = bytes(data[V2_HEADER : V2_HEADER + block])
    cls = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    src, dst = cls(body[:size]), cls(body[size : 2 * size])
    (sport,) = _PORT.unpack_from(body, 2 * size)
    (dport,) = _PORT.unpack_from(body, 2 * size + 2)
    return Received("v2", total, (str(src), sport), (str(dst), dport))
