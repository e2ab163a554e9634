"""An empty memory BIO gives its buffer back, and the heap its pages."""

from __future__ import annotations

import contextlib
import ctypes
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from benchmarks.harness import malloc_in_use
from proxy import membio
from tests.daemon import echo_through, env_for, spawn, write_config
from tests.helpers import Certs, echo_handler, start_backend

BIOS = 200
BURST = 40 * 1024  # grows a BIO to about 53 KiB: below glibc's mmap threshold, so on its heap
DATA = bytes(BURST)


def test_this_python_passes_the_probe() -> None:
    """The daemon's parked connections give their buffers back here (on
    this CPython and its OpenSSL), not only in principle."""
    assert membio.UNAVAILABLE is None
    assert membio.RECORDS_UNAVAILABLE is None


@pytest.mark.parametrize(
    ("version", "safe"),
    [
        ((3, 0, 0, 13, 0), False),
        ((3, 0, 0, 14, 0), True),
        ((3, 0, 0, 19, 0), True),
        ((3, 1, 0, 5, 0), False),
        ((3, 1, 0, 6, 0), True),
        ((3, 2, 0, 1, 0), False),
        ((3, 2, 0, 2, 0), True),
        ((3, 3, 0, 0, 0), False),
        ((3, 3, 0, 1, 0), True),
        ((3, 4, 0, 0, 0), True),
        ((3, 6, 0, 0, 0), True),
        ((4, 0, 0, 0, 0), True),
        ((1, 1, 1, 24, 15), False),  # 1.1.1x
        ((1, 1, 1, 25, 15), True),  # 1.1.1y
        ((1, 1, 0, 30, 15), False),
        ((1, 0, 2, 30, 15), False),
    ],
)
def test_ssl_free_buffers_is_called_only_where_cve_2024_4741_is_fixed(
    version: tuple[int, int, int, int, int], safe: bool
) -> None:
    assert membio.free_buffers_safe(version) is safe


def test_on_an_openssl_with_the_cve_the_record_buffers_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ssl, "OPENSSL_VERSION_INFO", (3, 0, 0, 13, 0))
    calls, reason = membio._load_records()
    assert calls is None
    assert reason is not None and "CVE-2024-4741" in reason


CLIENTS = 20
READ_BUFFER = 16 * 1024  # OpenSSL's record read buffer, SSL3_RT_MAX_PLAIN_LENGTH


End = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]  # the object, incoming, outgoing


def _end(context: ssl.SSLContext, *, server_side: bool) -> End:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hostname = None if server_side else "localhost"
    obj = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=hostname)
    return obj, incoming, outgoing


def _pump(a: End, b: End) -> None:
    """Move what each side wrote to the other's incoming BIO."""
    b[1].write(a[2].read())
    a[1].write(b[2].read())


def _connected(certs: Certs) -> list[tuple[End, End]]:
    """Clients, over memory BIOs, that read the two session tickets their
    server sent after the handshake, and one byte after them."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs.cert, certs.key)
    client_context = certs.client_context()
    pairs = []
    for _ in range(CLIENTS):
        client = _end(client_context, server_side=False)
        server = _end(server_context, server_side=True)
        for _ in range(4):
            for side in (client, server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side[0].do_handshake()
            _pump(client, server)
        server[0].write(b".")  # after the tickets
        _pump(client, server)
        assert client[0].read(1) == b"."
        pairs.append((client, server))
    return pairs


def test_a_client_that_read_session_tickets_gives_its_read_buffer_back(certs: Certs) -> None:
    """OpenSSL keeps a client's 16 KiB read buffer once it has read a
    post-handshake message; SSL_free_buffers frees it, and the connection
    reads and writes as before."""
    pairs = _connected(certs)
    memory = membio.Releaser()
    before = malloc_in_use()
    for client, _ in pairs:
        memory.release_records(client[0]._sslobj)  # type: ignore[attr-defined]
    freed = before - malloc_in_use()
    assert freed >= CLIENTS * READ_BUFFER, f"{freed / CLIENTS:.0f} bytes freed per client"
    assert memory.records_freed == CLIENTS
    for client, server in pairs:
        client[0].write(b"ping")
        _pump(client, server)
        assert server[0].read(4) == b"ping"
        server[0].write(b"pong")
        _pump(client, server)
        assert client[0].read(4) == b"pong"


def _grown(count: int) -> list[ssl.MemoryBIO]:
    """BIOs read empty after a burst."""
    bios = []
    for _ in range(count):
        bio = ssl.MemoryBIO()
        bio.write(DATA)
        assert len(bio.read()) == BURST
        bios.append(bio)
    return bios


def test_a_released_bio_frees_its_buffer_and_works_as_a_new_one() -> None:
    bios = _grown(BIOS)
    held = membio.capacity(bios[0])
    assert held is not None and held >= BURST  # read out, still held
    memory = membio.Releaser()
    before = malloc_in_use()
    for bio in bios:
        memory.release(bio)
    freed = before - malloc_in_use()
    assert freed >= BIOS * BURST, f"{freed / BIOS:.0f} bytes freed per BIO"
    assert memory.released >= BIOS * BURST
    assert {membio.capacity(bio) for bio in bios} == {0}
    bio = bios[0]
    bio.write(b"again")
    assert bio.pending == 5
    assert bio.read() == b"again"


def test_a_released_bio_still_reports_the_end_of_data_to_openssl(certs: Certs) -> None:
    """The end-of-data mark lives outside the buffer: after the swap OpenSSL
    still reads an end (a want-read would leave a closed peer hanging)."""
    (bio,) = _grown(1)
    bio.write_eof()
    membio.Releaser().release(bio)
    assert membio.capacity(bio) == 0
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    with pytest.raises(ssl.SSLEOFError):
        context.wrap_bio(bio, ssl.MemoryBIO(), server_side=True).do_handshake()


def test_a_bio_with_bytes_waiting_keeps_them() -> None:
    bio = ssl.MemoryBIO()
    bio.write(b"x" * BURST)
    held = membio.capacity(bio)
    memory = membio.Releaser()
    memory.release(bio)
    assert memory.released == 0
    assert membio.capacity(bio) == held
    assert bio.read() == b"x" * BURST


def _resident_kib() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


@pytest.mark.skipif(membio._malloc_trim is None, reason="not glibc: no malloc_trim")
def test_trim_returns_the_released_pages_to_the_kernel_once_enough_were_released() -> None:
    """In a process of its own: the trim's test sets how glibc's `free`
    returns memory, for the whole process."""
    run = subprocess.run(
        [sys.executable, "-c", f"import {__name__} as t; t.trim_scenario()"],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr


M_TRIM_THRESHOLD = -1  # malloc.h


def trim_scenario() -> None:
    """A freed buffer among live allocations stays resident; the trim
    returns it, once TRIM_BYTES have been released, and not again for
    nothing.

    `free` returns the top of the heap by itself when it grows past a
    threshold, and where the buffers land relative to the top varies from
    run to run; with that off, only the trim can return them.
    """
    assert ctypes.CDLL(None).mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    bios = _grown(BIOS)
    memory = membio.Releaser()
    memory.release(bios[0])
    assert not memory.trim(), "trimmed for one buffer"
    for bio in bios[1:]:
        memory.release(bio)
    freed_kib = memory.released // 1024
    assert memory.released >= membio.TRIM_BYTES
    released = _resident_kib()
    assert memory.trim()
    returned = released - _resident_kib()
    assert returned >= freed_kib // 2, f"{returned} of {freed_kib} KiB returned"
    assert not memory.trim(), "trimmed again with nothing released"


# The daemon, as `python -m proxy` runs it, where `_ssl` is not a shared
# object ctypes can open (as in a Python with it linked in).
NO_SHARED_SSL = (
    "import _ssl, runpy; _ssl.__file__ = '/nonexistent/_ssl.so'; "
    "runpy.run_module('proxy', run_name='__main__', alter_sys=True)"
)


async def test_where_buffers_cannot_be_given_back_the_daemon_warns_and_serves(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    backend_port = await start_backend(nursery, echo_handler)
    config = write_config(tmp_path / "proxy.toml", certs, backend_port=backend_port)
    argv = [sys.executable, "-c", NO_SHARED_SSL, "run", "--config", str(config)]
    async with spawn(nursery, argv, env=env_for(tmp_path / "state"), cwd=tmp_path) as daemon:
        warning = await daemon.wait_for(
            "parked TLS connections keep their memory buffers (2 to 45 KiB each);"
            " run on CPython with its ssl module to have them freed"
        )
        assert warning["level"] == "warning"
        assert "not found through _ssl" in warning["reason"]
        records = await daemon.wait_for(
            "parked TLS connections that read a session ticket keep OpenSSL's 16 KiB"
            " read buffer; run with OpenSSL 3.0.14 or later to have it freed"
        )
        assert "SSL_free_buffers not found through _ssl" in records["reason"]
        port, _ = await daemon.started()
        await echo_through(port, certs.client_context())
