"""Giving back the buffer an empty memory BIO keeps, which Python's `ssl`
has no call for.

Why: an OpenSSL memory BIO (`BIO_s_mem`, behind `ssl.MemoryBIO`) grows its
buffer to a third more than the most it ever held, and keeps it when it is
empty. After a handshake, a server's outgoing BIO has held the first flight
(certificate chain and signature: about 1 KiB with ECDSA P-256, 1.8 KiB with
RSA-2048) and its incoming BIO the ClientHello; after a transfer of a few
records, each holds a record and a third (about 22 KiB). OpenSSL frees its
own record buffers between records (`SSL_MODE_RELEASE_BUFFERS`, which Python
sets); the BIOs are ours, and only we know when they will stay empty: when a
connection parks (`proxy.parking`). BENCHMARKS.md has the bytes.

How: `BIO_ctrl(3)`'s `BIO_C_SET_BUF_MEM` gives a memory BIO another
`BUF_MEM` and frees the one it had. With a new empty one (`BUF_MEM_new`) the
BIO is as a new BIO, and grows again on its next write; its end-of-data
setting (`write_eof`) is kept apart from the buffer and stays. Python
exposes no BIO pointer: CPython's `MemoryBIO` object holds it right after
the object header (`{PyObject_HEAD; BIO *bio; int eof_written;}`, the same
since Python 3.5). The functions are looked up through the `_ssl` extension
itself, whose lookups search the libcrypto it was linked with, so they are
those of the BIO's own library. Each assumption is checked once, on a probe
BIO, before any connection's is touched: if one does not hold,
`Releaser.release` does nothing and `UNAVAILABLE` says why (the daemon logs
it at start).

OpenSSL's own record buffers are released between records, but not after
a post-handshake message: a client that has read a TLS 1.3 session ticket
(which most servers send, two by default, right after the handshake) keeps
its 16 KiB read buffer for the connection's life, 16.6 KiB more C heap per
egress connection (BENCHMARKS.md). `SSL_free_buffers(3)` frees them (they
are allocated again on the next read or write) and refuses while a record
is partly read; it is called on a parked connection's TLS ends too, through
the `SSL *` CPython's `_ssl._SSLSocket` holds after its weak reference to
the socket (`{PyObject_HEAD; PyObject *Socket; SSL *ssl; ...}`), checked at
import against `SSL_get_rbio` and `SSL_get_wbio`, which must be the probe's
own memory BIOs. OpenSSL before 3.0.14 (3.1.6, 3.2.2, 3.3.1; 1.1.1y) could
use freed memory in `SSL_free_buffers` (CVE-2024-4741): there it is not
called, and `RECORDS_UNAVAILABLE` says so.

Freed is not yet returned: glibc's `free` gives the kernel back only the
top of the heap, and a BIO's buffer sits among the live connections' other
allocations, so the freed pages stay resident until a later allocation
reuses them. `Releaser.trim` returns them (`malloc_trim(3)`) once
`TRIM_BYTES` have been released since the last time: measured, 500
connections that each echoed 64 KiB and parked again hold 55 to 57 KiB of
resident memory each without the trim, 13 to 14 KiB with it (BENCHMARKS.md).
"""

from __future__ import annotations

import _ssl
import contextlib
import ctypes
import ssl
import sys
from collections.abc import Callable
from typing import Any, TypeVar

# openssl/bio.h
_BIO_CTRL_PENDING = 10
_BIO_C_SET_BUF_MEM = 114
_BIO_C_GET_BUF_MEM_PTR = 115
_BIO_TYPE_MEM = 1 | 0x0400
_BIO_CLOSE = 1  # the BIO frees the buffer it is given when it is freed

_PROBE_BYTES = 3000

CallsT = TypeVar("CallsT")

# Released bytes that make a `trim` worth its cost: it walks every free
# chunk of the heap (at most 0.65 ms with 9 488 connections parking,
# BENCHMARKS.md), so not for one small buffer, but soon enough that
# a burst of parks is returned within a scan or two. A handshake leaves about
# 2 KiB in a connection's BIOs, a transfer about 44 KiB: 1 MiB is some five
# hundred parks after handshakes, or two dozen after transfers.
TRIM_BYTES = 1 << 20


class _BufMem(ctypes.Structure):
    """openssl/buffer.h's `BUF_MEM`: what `capacity` reads."""

    _fields_ = [
        ("length", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("max", ctypes.c_size_t),
        ("flags", ctypes.c_ulong),
    ]


_OFFSET = object.__basicsize__  # the object header, before `BIO *bio`


def _pointer(bio: ssl.MemoryBIO) -> int | None:
    return ctypes.c_void_p.from_address(id(bio) + _OFFSET).value


def _function(library: Any, name: str, restype: Any, *argtypes: Any) -> Callable[..., Any]:
    function = getattr(library, name)
    function.restype = restype
    function.argtypes = argtypes
    return function  # type: ignore[no-any-return]


class _Calls:
    """libcrypto's functions that releasing and `capacity` use."""

    def __init__(self, library: Any) -> None:
        pointer = ctypes.c_void_p
        self.ctrl = _function(
            library, "BIO_ctrl", ctypes.c_long, pointer, ctypes.c_int, ctypes.c_long, pointer
        )
        self.method_type = _function(library, "BIO_method_type", ctypes.c_int, pointer)
        self.buf_mem_new = _function(library, "BUF_MEM_new", pointer)


class _RecordCalls:
    """libssl's functions that free an SSL's record buffers, and check its pointer."""

    def __init__(self, library: Any) -> None:
        pointer = ctypes.c_void_p
        self.free_buffers = _function(library, "SSL_free_buffers", ctypes.c_int, pointer)
        self.get_rbio = _function(library, "SSL_get_rbio", pointer, pointer)
        self.get_wbio = _function(library, "SSL_get_wbio", pointer, pointer)


# The first release of each OpenSSL 3 line whose SSL_free_buffers is safe
# (CVE-2024-4741), by minor version: its patch number. 3.4 on all are;
# in 1.1.1 it is 1.1.1y, patch letter 25.
_SAFE_FREE_BUFFERS = {0: 14, 1: 6, 2: 2, 3: 1}
_SAFE_1_1_1 = 25


def free_buffers_safe(version: tuple[int, int, int, int, int]) -> bool:
    """Whether SSL_free_buffers of this `ssl.OPENSSL_VERSION_INFO` is safe."""
    major, minor, fix, patch, _status = version
    if major == 3 and minor in _SAFE_FREE_BUFFERS:
        return patch >= _SAFE_FREE_BUFFERS[minor]
    if major == 1:
        return (minor, fix) == (1, 1) and patch >= _SAFE_1_1_1
    return major >= 3


def _ssl_pointer(engine: Any) -> int | None:
    """The `SSL *` of a `_ssl._SSLSocket`, after its header and weak reference."""
    return ctypes.c_void_p.from_address(id(engine) + _OFFSET + ctypes.sizeof(ctypes.c_void_p)).value


def _load() -> tuple[_Calls | None, str | None]:
    """The calls, or why memory BIOs keep their buffers here."""
    if sys.implementation.name != "cpython":
        return None, f"not CPython ({sys.implementation.name})"
    layout = _OFFSET + ctypes.sizeof(ctypes.c_void_p) + ctypes.sizeof(ctypes.c_int)
    if not layout <= ssl.MemoryBIO.__basicsize__ <= layout + ctypes.sizeof(ctypes.c_void_p):
        return None, f"ssl.MemoryBIO's layout is not the known one ({ssl.MemoryBIO.__basicsize__})"
    return _checked(_Calls, _probe, "libcrypto's BIO functions")


def _checked(
    make: Callable[[Any], CallsT], probe: Callable[[CallsT], str | None], what: str
) -> tuple[CallsT | None, str | None]:
    """`make`'s functions, looked up through `_ssl` and then probed; or why not."""
    try:
        calls = make(ctypes.PyDLL(_ssl.__file__))  # the GIL held: each call is short
    except (AttributeError, OSError) as exc:
        return None, f"{what} not found through _ssl: {exc}"
    problem = probe(calls)
    return (None, problem) if problem else (calls, None)


def _probe(calls: _Calls) -> str | None:
    """Whether the pointer is a memory BIO and a swap leaves it working."""
    bio = ssl.MemoryBIO()
    bio.write(b"p" * _PROBE_BYTES)
    pointer = _pointer(bio)
    if not pointer or calls.method_type(pointer) != _BIO_TYPE_MEM:
        return "ssl.MemoryBIO does not hold a memory BIO where expected"
    if calls.ctrl(pointer, _BIO_CTRL_PENDING, 0, None) != _PROBE_BYTES:
        return "the memory BIO's pending count does not match ssl.MemoryBIO's"
    bio.read()
    _swap(calls, pointer)
    if _capacity(calls, pointer) != 0:
        return "BIO_C_SET_BUF_MEM did not replace the buffer"
    bio.write(b"after")
    bio.write_eof()
    if bio.read() != b"after" or not bio.eof:
        return "a memory BIO did not work after its buffer was replaced"
    return None


def _swap(calls: _Calls, pointer: int) -> None:
    fresh = calls.buf_mem_new()
    if fresh:  # out of memory: keep the old buffer
        calls.ctrl(pointer, _BIO_C_SET_BUF_MEM, _BIO_CLOSE, fresh)


def _capacity(calls: _Calls, pointer: int) -> int:
    buf = ctypes.c_void_p()
    calls.ctrl(pointer, _BIO_C_GET_BUF_MEM_PTR, 0, ctypes.byref(buf))
    assert buf.value is not None
    return int(_BufMem.from_address(buf.value).max)


_CALLS, UNAVAILABLE = _load()


def _load_records() -> tuple[_RecordCalls | None, str | None]:
    """The record-buffer calls, or why parked connections keep those buffers."""
    if sys.implementation.name != "cpython":
        return None, f"not CPython ({sys.implementation.name})"
    if not free_buffers_safe(ssl.OPENSSL_VERSION_INFO):
        return None, f"{ssl.OPENSSL_VERSION} has CVE-2024-4741 in SSL_free_buffers"
    return _checked(_RecordCalls, _probe_records, "libssl's SSL_free_buffers")


def _probe_records(calls: _RecordCalls) -> str | None:
    """Whether the pointer is the SSL of its BIOs, and one works after a free."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(incoming, outgoing, server_hostname="p")
    engine = getattr(obj, "_sslobj", None)
    if type(engine).__name__ != "_SSLSocket":
        return "ssl.SSLObject does not hold a _ssl._SSLSocket"
    if type(engine).__basicsize__ < _OFFSET + 2 * ctypes.sizeof(ctypes.c_void_p):
        return f"_ssl._SSLSocket's layout is not the known one ({type(engine).__basicsize__})"
    pointer = _ssl_pointer(engine)
    if (
        not pointer
        or calls.get_rbio(pointer) != _pointer(incoming)
        or calls.get_wbio(pointer) != _pointer(outgoing)
    ):
        return "_ssl._SSLSocket does not hold its SSL where expected"
    if calls.free_buffers(pointer) != 1:
        return "SSL_free_buffers refused a new SSL"
    with contextlib.suppress(ssl.SSLWantReadError):  # the ClientHello written, the reply awaited
        obj.do_handshake()
    if outgoing.read()[:1] != b"\x16":
        return "an SSL did not write its ClientHello after SSL_free_buffers"
    return None


_RECORDS, RECORDS_UNAVAILABLE = _load_records()
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; musl has none


class Releaser:
    """The process's released buffers, counted until a `trim` returns them."""

    __slots__ = ("records_freed", "released", "trims")

    def __init__(self) -> None:
        self.released = 0  # bytes freed since the last trim
        self.trims = 0
        self.records_freed = 0  # SSLs whose record buffers were freed (or had none)

    def release(self, bio: ssl.MemoryBIO) -> None:
        """Free `bio`'s buffer if it is empty; it grows again when written."""
        if _CALLS is not None and not bio.pending:
            pointer = _pointer(bio)
            assert pointer is not None  # a MemoryBIO always has its BIO
            held = _capacity(_CALLS, pointer)
            if held:
                _swap(_CALLS, pointer)
                self.released += held

    def release_records(self, engine: Any) -> None:
        """Free the record buffers of an SSL (a `_ssl._SSLSocket`) with no
        record partly read or written; they are allocated again when needed.
        Their size is not known here, so `trim` counts only the BIOs'."""
        if _RECORDS is not None:
            pointer = _ssl_pointer(engine)
            assert pointer is not None  # a live _SSLSocket always has its SSL
            self.records_freed += _RECORDS.free_buffers(pointer)

    def trim(self) -> bool:
        """Return the freed pages to the kernel if `TRIM_BYTES` were
        released since the last trim; whether it did."""
        if self.released < TRIM_BYTES or _malloc_trim is None:
            return False
        self.released = 0
        self.trims += 1
        _malloc_trim(0)
        return True


def capacity(bio: ssl.MemoryBIO) -> int | None:
    """Bytes `bio`'s buffer holds, used or not; None where unknown."""
    if _CALLS is None:
        return None
    pointer = _pointer(bio)
    assert pointer is not None
    return _capacity(_CALLS, pointer)
