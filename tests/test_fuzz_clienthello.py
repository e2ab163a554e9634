"""Property-based tests of the code that reads a client's first bytes: the
ClientHello reassembler, its parser and the JA4 fingerprint, fed arbitrary
bytes and valid hellos (hand-built, and captured from Python ssl and openssl
s_client) mutated by lying length fields, edits, record re-splitting, byte
flips and truncation, cut into arbitrary chunks.

Each may only return a result (never raise): a `Progress`, a `ClientHello`
or None, a JA4 string. Each does work linear in its input, counted in lines
of proxy code executed (deterministic, unlike a clock). `make test` runs a
short fixed-seed budget, `make fuzz` a long random campaign (conftest.py).
"""

from __future__ import annotations

import itertools
import random
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, ModuleType, TracebackType
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import clienthello, ja4
from proxy.clienthello import DONE, NEED_MORE, ClientHello, Progress, Reassembler
from tests.hellos import (
    alpn,
    captured_hello,
    client_hello,
    extension,
    hello_message,
    mutate,
    records,
    resplit,
    sni,
    u16_list,
)
from tests.helpers import (
    STEP,
    Certs,
    build_config,
    echo_handler,
    outcomes,
    raw_connect,
    start_backend,
    start_server,
)

# Lines of proxy code a call may execute: per byte of its input, plus a
# constant per call. Measured on the corpus: the reassembler at most 4.5 per
# byte (1-byte records) plus 11 per chunk; the parser and JA4 together under
# 1.1 per byte. Re-reading the stream at every chunk, as the quadratic
# reassembler did, takes many times the bound.
LINES_PER_BYTE = 10
LINES_PER_CALL = 30

JA4_FORMAT = re.compile(
    r"t(13|12|11|10|s3|s2|d1|d2|d3|00)[di]\d{4}[0-9A-Za-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}"
)


class WorkBound:
    """Fails a call that executes more lines of the given modules than its
    input allows: a deterministic bound on its work, whatever the machine's
    load, and one that stops a runaway call at once instead of timing it."""

    def __init__(self, size: int, calls: int, *modules: ModuleType) -> None:
        self.files = {module.__file__ for module in modules}
        self.limit = LINES_PER_BYTE * size + LINES_PER_CALL * calls
        self.lines = 0
        self._previous: Any = None

    def __enter__(self) -> WorkBound:
        self._previous = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        sys.settrace(self._previous)

    def _call(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        return self._line if frame.f_code.co_filename in self.files else None

    def _line(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any]:
        if event == "line":
            self.lines += 1
            if self.lines > self.limit:
                raise AssertionError(f"more than {self.limit} lines of work")
        return self._line


# ---------------------------------------------------------------- the corpus


def _hand_built() -> list[bytes]:
    return [
        client_hello([0x1301], [sni("a.test")]),
        client_hello([0x0A0A, 0x002F], []),
        client_hello(
            [0x2A2A, 0x1301, 0xC02B],
            [
                extension(0x0A0A, b""),
                sni("example.com"),
                alpn(b"h2", b"http/1.1", b"\xab"),
                u16_list(0x002B, [0x3A3A, 0x0304, 0x0303], length_bytes=1),
                u16_list(0x000D, [0x0403, 0x0804]),
                extension(0x0015, bytes(200)),  # padding
            ],
        ),
        client_hello([0x1301], [sni("a" * 60 + ".test")] * 40),  # 3 KB
    ]


def _python_ssl(certs: Certs) -> Iterator[bytes]:
    context = certs.client_context()
    yield hello_message(captured_hello(context))
    context.set_alpn_protocols(["h2", "http/1.1"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    yield hello_message(captured_hello(context))
    context.set_alpn_protocols([f"padding-{i:03d}" for i in range(130)])  # 1.8 KB
    yield hello_message(captured_hello(context))
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    yield hello_message(captured_hello(bare, server_hostname=None))


def _s_client(*args: str) -> bytes:
    """The ClientHello message `openssl s_client ARGS` sends to a server that
    never answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(STEP)
        port = server.getsockname()[1]
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args]
        with subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as client:
            try:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(STEP)
                    reader = Reassembler()
                    while reader.progress is NEED_MORE and (chunk := conn.recv(65536)):
                        reader.feed(chunk)
                    return reader.message
            finally:
                client.kill()


S_CLIENT_ARGS = [
    ["-servername", "localhost"],
    ["-servername", "localhost", "-alpn", "h2,http/1.1", "-tls1_2"],
    ["-noservername", "-tls1_3", "-groups", "X25519:P-256:P-384"],
    ["-servername", "x" * 200 + ".test", "-cipher", "ALL:@SECLEVEL=0", "-no_tls1_3"],
]


@pytest.fixture(scope="module")
def corpus(certs: Certs) -> list[bytes]:
    """Valid ClientHello messages: hand-built and captured from real clients."""
    return [*_hand_built(), *_python_ssl(certs), *(_s_client(*args) for args in S_CLIENT_ARGS)]


def test_the_corpus_is_what_the_parser_reads(corpus: list[bytes]) -> None:
    """Every corpus hello is valid, fed whole: the mutations start from there."""
    assert len(corpus) == 12
    for message in corpus:
        assert _feed([records(message)]) == (DONE, message)
        assert len(records(message, size=1)) <= clienthello.MAX_HELLO_STREAM
        hello = clienthello.parse(message)
        assert hello is not None
        assert JA4_FORMAT.fullmatch(ja4.ja4(hello))


# ---------------------------------------------------------------- strategies


def _feed(chunks: Sequence[bytes]) -> tuple[Progress, bytes | None]:
    reader = Reassembler()
    for chunk in chunks:
        progress = reader.feed(chunk)
        assert isinstance(progress, Progress)
    return reader.progress, reader.message if reader.progress is DONE else None


@st.composite
def cut(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """`stream` cut at arbitrary points (empty chunks included)."""
    points = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def _stream_of(corpus: list[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, record-framed arbitrary bytes, and mutated corpus hellos."""
    return st.one_of(
        st.binary(max_size=600),
        st.binary(max_size=600).map(lambda body: records(b"\x01" + body)),
        st.tuples(st.sampled_from(corpus), st.randoms(use_true_random=False)).map(
            lambda pair: mutate(pair[0], pair[1])
        ),
    )


# ---------------------------------------------------------------- the reassembler


@given(data=st.data())
def test_any_stream_cut_anyhow_reads_the_same_and_in_linear_work(
    corpus: list[bytes], data: st.DataObject
) -> None:
    """The verdict (and the message) depend on the stream only, never on how
    it was cut into chunks; and a chunk is looked at once."""
    stream = data.draw(_stream_of(corpus), "stream")
    chunks = data.draw(cut(stream), "chunks")
    whole = _feed([stream])
    with WorkBound(len(stream), len(chunks), clienthello):
        pieces = _feed(chunks)
    assert pieces == whole
    progress, message = whole
    if progress is DONE:
        assert message is not None
        assert message[0] == clienthello.CLIENT_HELLO
        assert len(message) <= clienthello.MAX_HELLO_BYTES


@given(data=st.data())
def test_a_valid_hello_in_any_records_and_chunks_is_the_same_message(
    corpus: list[bytes], data: st.DataObject
) -> None:
    message = data.draw(st.sampled_from(corpus), "message")
    stream = resplit(message, data.draw(st.randoms(use_true_random=False), "framing"))
    chunks = data.draw(cut(stream), "chunks")
    assert len(stream) <= clienthello.MAX_HELLO_STREAM  # the corpus's largest, in 1-byte records
    assert _feed(chunks) == (DONE, message)


@given(
    data=st.data(),
    record=st.integers(1, 3),
    chunk=st.integers(1, 8),
)
def test_a_hello_in_tiny_records_and_chunks_takes_linear_work(
    corpus: list[bytes], data: st.DataObject, record: int, chunk: int
) -> None:
    """The worst case for work: thousands of records in thousands of chunks."""
    message = data.draw(st.sampled_from(corpus), "message")
    stream = records(message, size=record)
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    with WorkBound(len(stream), len(chunks), clienthello):
        assert _feed(chunks) == (DONE, message)


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_the_verdict_once_given_stays(first: bytes, then: bytes) -> None:
    reader = Reassembler()
    progress = reader.feed(first)
    if progress is not NEED_MORE:
        assert reader.feed(then) is progress


# ---------------------------------------------------------------- the parser and JA4


def _message_of(corpus: list[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes after a ClientHello header, and mutated corpus messages
    (what the reassembler would hand the parser)."""
    return st.one_of(
        st.binary(max_size=600).map(lambda body: b"\x01" + len(body).to_bytes(3, "big") + body),
        st.binary(max_size=100),
        st.tuples(st.sampled_from(corpus), st.randoms(use_true_random=False)).map(
            lambda pair: hello_message(records(mutate(pair[0], pair[1])))
        ),
    )


@given(data=st.data())
def test_parse_returns_a_hello_or_none_and_ja4_a_fingerprint(
    corpus: list[bytes], data: st.DataObject
) -> None:
    message = data.draw(_message_of(corpus), "message")
    with WorkBound(len(message), 2, clienthello, ja4):
        hello = clienthello.parse(message)
        fingerprint = ja4.ja4(hello) if hello is not None else None
    assert hello is None or isinstance(hello, ClientHello)
    if fingerprint is not None:
        assert JA4_FORMAT.fullmatch(fingerprint), fingerprint


UINT16 = st.integers(0, 0xFFFF)
UINT16S = st.lists(UINT16, max_size=200).map(tuple)


@given(
    st.builds(
        ClientHello,
        legacy_version=UINT16,
        ciphers=UINT16S,
        extensions=UINT16S,
        alpn=st.lists(st.binary(max_size=255), max_size=20).map(tuple),
        supported_versions=UINT16S,
        signature_algorithms=UINT16S,
    )
)
def test_ja4_of_any_hello_is_a_fingerprint(hello: ClientHello) -> None:
    """Whatever fields a hello has (any values, empty ALPN names, GREASE
    everywhere), the fingerprint has JA4's shape."""
    assert JA4_FORMAT.fullmatch(ja4.ja4(hello))


# ---------------------------------------------------------------- the live reader


async def test_mutated_hellos_each_end_in_one_outcome_and_none_is_internal(
    nursery: trio.Nursery,
    certs: Certs,
    corpus: list[bytes],
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The proxy itself, over real sockets, fed mutated hellos (its ALPN
    policy on, so that parsed hellos reach it): every connection ends in
    exactly one outcome, never `internal_error`, and a normal client is still
    served. As many connections as the profile's examples, 20 at a time."""
    echo_port = await start_backend(nursery, echo_handler)
    proxy = await start_server(
        nursery, build_config(certs, echo_port, tls={**_tls(certs), "alpn": ["h2"]})
    )
    rng = random.Random(0 if settings().derandomize else None)
    count = settings().max_examples

    async def one(stream: bytes) -> None:
        client = await raw_connect(proxy.port)
        try:
            await client.send_all(stream)
            await client.send_eof()  # the proxy never waits for more than was sent
            while await client.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass  # reset: the proxy gave up first
        finally:
            await client.aclose()

    with trio.fail_after(STEP * 3):
        for start in range(0, count, 20):
            async with trio.open_nursery() as clients:
                for _ in range(min(20, count - start)):
                    clients.start_soon(one, mutate(rng.choice(corpus), rng))
        lines = await proxy.access_log(count)
    seen = await outcomes(proxy.admin_port)
    assert sum(seen.values()) == count
    assert seen.get("internal_error", 0) == 0, [line for line in lines if "error" in line]
    assert not [line for line in proxy.log_events() if line.get("level") == "error"]
    if not settings().derandomize:  # `make fuzz`: counted like hypothesis counts the others
        with capsys.disabled():
            ended = {outcome: int(n) for outcome, n in seen.items() if n}
            print(f"\n{request.node.nodeid}:\n  - {count} passing, 0 failing connections {ended}")


def _tls(certs: Certs) -> dict[str, Any]:
    return {"certificates": [{"cert": str(certs.cert), "key": str(certs.key)}]}
