"""What the daemon benchmarks need: a throwaway CA, an echo backend, the
real daemon as a subprocess, TLS clients, and the daemon's resident memory."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import ssl
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
import trustme

# Client connections opened at once while building up a population: enough
# to go fast, few enough not to make the handshakes time out on two cores.
OPEN_CONCURRENCY = 64

# Descriptors each process may need: the daemon holds two per connection
# (client and backend), this process two as well (client and echo side).
FDS_PER_CONNECTION = 2
FD_HEADROOM = 1024


def raise_fd_limit(connections: int) -> int:
    """Raise the descriptor limit for `connections` (children inherit it) and
    return how many connections fit: a container without CAP_SYS_RESOURCE
    cannot raise the hard limit, even as root."""
    need = connections * FDS_PER_CONNECTION + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return connections
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return (hard - FD_HEADROOM) // FDS_PER_CONNECTION
    return connections


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass
class Daemon:
    process: trio.Process
    port: int
    context: ssl.SSLContext
    ca_file: Path  # the CA's certificate, for clients in other processes
    # The daemon's log lines since it listened, by event (message).
    events: Counter[str] = field(default_factory=Counter)

    @property
    def rss_kib(self) -> int:
        return rss_kib(self.process.pid)


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2`, ten counters."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int:
    """Bytes the C heap has handed out (glibc's `mallinfo2`): OpenSSL's
    buffers, which Python's own accounting does not see."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().uordblks)


async def echo(stream: trio.SocketStream) -> None:
    """The benchmarks' backend: echo until EOF."""
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def _started(process: trio.Process) -> int:
    assert process.stderr is not None
    pending = b""
    async for chunk in process.stderr:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"{") and json.loads(line).get("event") == "listening":
                return int(json.loads(line)["address"].rpartition(":")[2])
    raise RuntimeError("the daemon exited before listening")


async def _drain(stream: trio.abc.ReceiveStream, events: Counter[str]) -> None:
    """Keep reading the daemon's log so a full pipe never blocks it, and
    count its events."""
    pending = b""
    async for chunk in stream:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"{"):
                events[json.loads(line).get("event", "")] += 1


@asynccontextmanager
async def running_daemon(
    idle_timeout: float = 3600.0,
    command_prefix: Sequence[str] = (),
    backend_handler: Callable[[trio.SocketStream], Awaitable[None]] = echo,
) -> AsyncIterator[Daemon]:
    """The daemon, started as `*command_prefix python -m proxy run` (a prefix
    such as `taskset -c 0` must exec the command, keeping the PID), in
    front of a backend in this process (by default `echo`)."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(directory / "ca.pem"))
        leaf = ca.issue_cert("localhost")
        leaf.private_key_and_cert_chain_pem.write_to_path(str(directory / "tls.pem"))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with trio.open_nursery() as nursery:
            backend = await nursery.start(
                partial(trio.serve_tcp, backend_handler, 0, host="127.0.0.1")
            )
            config = directory / "tlsproxy.toml"
            config.write_text(
                f"""\
[admin]
listen = "127.0.0.1:0"
[log]
access_log = false
[[listeners]]
name = "bench"
listen = "127.0.0.1:0"
backend = "127.0.0.1:{backend[0].socket.getsockname()[1]}"
idle_timeout = {idle_timeout}
max_connections = 1000000
[listeners.tls]
certificates = [{{ cert = "tls.pem", key = "tls.pem" }}]
"""
            )
            process = await trio.lowlevel.open_process(
                [*command_prefix, sys.executable, "-m", "proxy", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=directory,
            )
            try:
                with trio.fail_after(30):
                    port = await _started(process)
                daemon = Daemon(process, port, context, directory / "ca.pem")
                assert process.stderr is not None
                nursery.start_soon(_drain, process.stderr, daemon.events)
                yield daemon
            finally:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
                nursery.cancel_scope.cancel()


async def open_tls(daemon: Daemon) -> trio.SSLStream[trio.SocketStream]:
    """A client with the handshake done and one byte echoed, so the daemon's
    backend connection exists too."""
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
    tls = trio.SSLStream(stream, daemon.context, server_hostname="localhost")
    try:
        await tls.send_all(b".")
        assert await tls.receive_some(1) == b"."
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls


async def open_many(daemon: Daemon, count: int) -> list[trio.SSLStream[trio.SocketStream]]:
    """`count` clients as `open_tls` makes them, OPEN_CONCURRENCY at a time."""
    streams: list[trio.SSLStream[trio.SocketStream]] = []
    limit = trio.Semaphore(OPEN_CONCURRENCY)

    async def one() -> None:
        async with limit:
            streams.append(await open_tls(daemon))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return streams
