"""An empty memory BIO gives its buffer back, and the heap its pages."""

from __future__ import annotations

import ctypes
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from proxy import membio
from tests.daemon import echo_through, env_for, spawn, write_config
from tests.helpers import Certs, echo_handler, start_backend
from tests.test_tlsio import _malloc_in_use

BIOS = 200
BURST = 40 * 1024  # grows a BIO to about 53 KiB: below glibc's mmap threshold, so on its heap
DATA = bytes(BURST)


def test_this_python_passes_the_probe() -> None:
    """The daemon's parked connections give their buffers back here (on
    this CPython and its OpenSSL), not only in principle."""
    assert membio.UNAVAILABLE is None


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
    before = _malloc_in_use()
    for bio in bios:
        memory.release(bio)
    freed = before - _malloc_in_use()
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
        port, _ = await daemon.started()
        await echo_through(port, certs.client_context())
