"""Property-based tests of the PROXY header parser: arbitrary bytes, and
valid v1 and v2 headers (with TLVs and the client's bytes behind them) cut
at every length and mutated. The parser may only return `NEED_MORE` or a
`Received`, or raise `HeaderError`; a complete header is recognised from
the first byte that completes it, whatever follows; it never asks for more
than its size bound. The budget is conftest.py's (`make fuzz` for long runs).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy import proxy_protocol as pp
from proxy.proxy_protocol import NEED_MORE, HeaderError, Received

MODES = st.sampled_from(["v1", "v2", "any"])
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORTS = st.integers(0, 0xFFFF)


def _judge(data: bytes, mode: pp.Accept) -> Received | str | None:
    """The parser's verdict, as a value: Received, None (more), or the error."""
    try:
        verdict = pp.parse_header(data, mode)
    except HeaderError as exc:
        return str(exc)
    if verdict is NEED_MORE:
        return None
    assert isinstance(verdict, Received)
    return verdict


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int], tuple[str, int], str]:
    family = draw(st.sampled_from([IPV4, IPV6]))
    source, dest = (draw(family), draw(PORTS)), (draw(family), draw(PORTS))
    version = draw(st.sampled_from(["v1", "v2"]))
    if version == "v1":
        return pp.encode_v1(source, dest), source, dest, version
    tlvs = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5))
    header = pp.encode_v2(source, dest)
    extra = b"".join(pp.tlv(kind, value) for kind, value in tlvs)
    length = int.from_bytes(header[14:16], "big") + len(extra)
    return header[:14] + length.to_bytes(2, "big") + header[16:] + extra, source, dest, version


@given(st.binary(max_size=2048), MODES)
def test_arbitrary_bytes_give_a_verdict_and_nothing_else(data: bytes, mode: pp.Accept) -> None:
    verdict = _judge(data, mode)
    if verdict is None:  # waiting for more is bounded by the size limits
        assert len(data) < pp.V2_HEADER + pp.MAX_V2_LENGTH
    if isinstance(verdict, Received):
        assert 0 < verdict.length <= len(data)


@given(headers(), st.binary(max_size=64), MODES)
def test_a_valid_header_is_recognised_exactly_when_complete(
    case: tuple[bytes, tuple[str, int], tuple[str, int], str], tail: bytes, mode: pp.Accept
) -> None:
    header, source, dest, version = case
    accepted = mode in (version, "any")
    for cut in range(len(header)):
        verdict = _judge(header[:cut], mode)
        assert verdict is None or (not accepted and isinstance(verdict, str)), (cut, verdict)
    verdict = _judge(header + tail, mode)
    if not accepted:
        assert isinstance(verdict, str)
        return
    assert isinstance(verdict, Received)
    assert verdict.length == len(header)
    assert verdict.version == version
    assert verdict.source == (str(pp._unmapped(source[0])), source[1])
    assert verdict.dest == (str(pp._unmapped(dest[0])), dest[1])


@given(headers(), st.integers(0, 200), st.integers(0, 255))
def test_a_mutated_header_gives_a_verdict_and_nothing_else(
    case: tuple[bytes, tuple[str, int], tuple[str, int], str], where: int, byte: int
) -> None:
    header = bytearray(case[0])
    header[where % len(header)] = byte
    verdict = _judge(bytes(header), "any")
    if isinstance(verdict, Received):
        assert verdict.length <= len(header)
