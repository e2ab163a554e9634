"""JA4 against FoxIO's published worked example (technical_details/JA4.md):
its cipher and extension lists, in their original wire order with GREASE added,
built into a real ClientHello, must give the published fingerprint."""

from __future__ import annotations

import pytest

from proxy import clienthello
from proxy.ja4 import CACHED, GREASE, ja4
from tests.hellos import alpn, client_hello, extension, sni, u16_list

# JA4_ro of the published example: ciphers and extensions in wire order.
CIPHERS = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8]
CIPHERS += [0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035]
EXTENSIONS = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D]
EXTENSIONS += [0x0005, 0x0023, 0x0012, 0x002B, 0xFF01, 0x000B, 0x000A, 0x0015]
SIGNATURE_ALGORITHMS = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
PUBLISHED = "t13d1516h2_8daaf6152771_e5627efa2ab1"


def _example(*, grease: bool = True, sigalgs: bool = True, first_alpn: bytes = b"h2") -> bytes:
    built: list[bytes] = [extension(0x0A0A, b"")] if grease else []
    for kind in EXTENSIONS:
        if kind == 0x0000:
            built.append(sni("example.com"))
        elif kind == 0x0010:
            built.append(alpn(first_alpn, b"http/1.1"))
        elif kind == 0x002B:
            built.append(u16_list(kind, [0x3A3A, 0x0304, 0x0303], length_bytes=1))
        elif kind == 0x000D:
            if sigalgs:
                built.append(u16_list(kind, [0x5A5A, *SIGNATURE_ALGORITHMS]))
            else:
                built.append(u16_list(kind, []))  # present, but no algorithms
        else:
            built.append(extension(kind, b""))
    ciphers = ([0x2A2A] if grease else []) + CIPHERS
    return client_hello(ciphers, built)


def _ja4(message: bytes) -> str:
    hello = clienthello.parse(message)
    assert hello is not None
    return ja4(hello)


def test_published_example() -> None:
    assert _ja4(_example()) == PUBLISHED


def test_grease_changes_nothing() -> None:
    assert _ja4(_example(grease=False)) == PUBLISHED


def test_published_extension_hash_without_signature_algorithms() -> None:
    # JA4.md: with no signature algorithms the list is hashed without "_":
    # "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01 = 6d807ffa2a79"
    assert _ja4(_example(sigalgs=False)).split("_")[2] == "6d807ffa2a79"


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"h2", "h2"),
        (b"http/1.1", "h1"),
        (b"x", "xx"),
        (b"\xab", "ab"),
        (b"\xab\xcd", "ad"),
        (b"\x30\xab", "3b"),
        (b"\x30\x31\xab\xcd", "3d"),
        (b"\x30\xab\xcd\x31", "01"),
    ],
)
def test_alpn_characters_follow_the_spec(first: bytes, expected: str) -> None:
    assert _ja4(_example(first_alpn=first))[8:10] == expected


def test_no_sni_no_alpn_no_extensions() -> None:
    message = client_hello([0x0A0A, 0x002F], [])
    assert _ja4(message) == "t12i010000_" + _ja4(message).split("_")[1] + "_000000000000"


def test_grease_values_are_rfc_8701s_sixteen() -> None:
    """RFC 8701: 0x?A?A with both bytes equal, and nothing else."""
    rule = {v for v in range(1 << 16) if (v & 0x0F0F) == 0x0A0A and v >> 8 == v & 0xFF}
    assert rule == GREASE
    assert len(GREASE) == 16


def test_a_hello_seen_again_is_fingerprinted_from_the_cache() -> None:
    """The clients of a deployment send the same hello on every connection:
    the second one is a cache hit, with the same answer."""
    ja4.cache_clear()
    first, again = _ja4(_example()), _ja4(_example())
    assert first == again == PUBLISHED
    assert (ja4.cache_info().misses, ja4.cache_info().hits) == (1, 1)


def test_hellos_that_differ_each_get_their_own_fingerprint() -> None:
    ja4.cache_clear()
    h2, other = _ja4(_example()), _ja4(_example(first_alpn=b"xy"))
    assert h2 != other
    assert (_ja4(_example()), _ja4(_example(first_alpn=b"xy"))) == (h2, other)
    assert ja4.cache_info().hits == 2


def test_the_cache_keeps_at_most_its_bound_of_hellos() -> None:
    """A peer sending ever new hellos turns the oldest out, no more is kept."""
    ja4.cache_clear()
    for cipher in range(CACHED + 20):
        _ja4(client_hello([0x1000 + cipher], [sni("a.test")]))
    assert ja4.cache_info().currsize == CACHED
