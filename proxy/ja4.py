"""The JA4 TLS-client fingerprint of a ClientHello (FoxIO's published algorithm).

    t13d1516h2_8daaf6152771_e5627efa2ab1
    a: transport, version, SNI, cipher count, extension count, ALPN
    b: sha256 of the sorted cipher list, 12 hex characters
    c: sha256 of the sorted extensions (minus SNI and ALPN), "_", the
       signature algorithms in wire order; 12 hex characters

GREASE values (RFC 8701: 0x?a?a with equal bytes) are ignored everywhere.
JA4 goes to the access log only: it is unbounded, never a metric label.
"""

from __future__ import annotations

import functools
import hashlib
import struct

from proxy.clienthello import EXT_ALPN, EXT_SERVER_NAME, ClientHello

_VERSIONS = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}

# The hash of nothing is spelled as zeros, so an empty list is visible as such.
_EMPTY = "000000000000"


# RFC 8701's sixteen values, as a set: the fingerprint filters every cipher,
# extension and algorithm of each hello, and a lookup beats a call per value.
GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))


# Fingerprints remembered, by the hello's fields: the clients of one
# deployment send a few kinds of hello, each the same for every connection,
# and computing one (two SHA-256, sorting, formatting) costs about as much
# as parsing the hello (BENCHMARKS.md). A remembered hello is about 1 KB,
# and a peer sending ever new ones only turns the oldest out.
CACHED = 128


@functools.lru_cache(maxsize=CACHED)
def ja4(hello: ClientHello) -> str:
    """The fingerprint, for TLS over TCP ("t")."""
    ciphers = [c for c in hello.ciphers if c not in GREASE]
    extensions = [e for e in hello.extensions if e not in GREASE]
    part_a = (
        "t"
        + _version(hello)
        + ("d" if EXT_SERVER_NAME in extensions else "i")
        + f"{min(len(ciphers), 99):02d}"
        + f"{min(len(extensions), 99):02d}"
        + _alpn(hello.alpn[0] if hello.alpn else b"")
    )
    return f"{part_a}_{_cipher_hash(ciphers)}_{_extension_hash(hello, extensions)}"


def _version(hello: ClientHello) -> str:
    offered = [v for v in hello.supported_versions if v not in GREASE]
    version = max(offered) if offered else hello.legacy_version
    return _VERSIONS.get(version, "00")


def _alpn(first: bytes) -> str:
    if not first:
        return "00"
    head, tail = first[:1], first[-1:]
    if head.isalnum() and tail.isalnum() and head.isascii() and tail.isascii():
        return (head + tail).decode("ascii")
    hexed = first.hex()
    return hexed[0] + hexed[-1]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12]


def _hex_list(values: list[int]) -> str:
    """Four hex digits per value, comma-separated (packed, then hexed in C)."""
    return struct.pack(f">{len(values)}H", *values).hex(",", 2)


def _cipher_hash(ciphers: list[int]) -> str:
    return _hash(_hex_list(sorted(ciphers))) if ciphers else _EMPTY


def _extension_hash(hello: ClientHello, extensions: list[int]) -> str:
    kept = sorted(e for e in extensions if e not in (EXT_SERVER_NAME, EXT_ALPN))
    if not kept:
        return _EMPTY
    text = _hex_list(kept)
    algorithms = [a for a in hello.signature_algorithms if a not in GREASE]
    if algorithms:
        text += "_" + _hex_list(algorithms)
    return _hash(text)
