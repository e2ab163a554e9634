"""The daemon's CPU per GiB of bulk data, this tree against another, paired.

    .venv/bin/python -m benchmarks.bulk_cost [--base DIR] [--pairs N]
        [--mib M] [--connections C]

C TLS clients (this process, on CPU 1) each ask a backend (this process)
for M MiB through the real daemon (a subprocess on CPU 0), the way
`make bench`'s bulk download does: the backend writes 1 MiB at a time,
and the daemon encrypts what it reads. With `--upload` the clients send
the M MiB instead and the backend reads it, so the daemon decrypts. The
daemon's CPU time (user + system, from /proc) over the transfer, per GiB,
is the figure: the system calls and their loopback work are in it, which
callgrind's instruction counts leave out.

Why paired: on this shared machine one build's figure moves by a third
from one minute to the next, more than most changes. With `--base DIR`
(a source tree, e.g. a detached worktree of an older commit) each pair
runs this tree, then that one, and the ratio of the two is taken pair by
pair; the median ratio is the result, with its spread.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import trio

from benchmarks.harness import Daemon, cpu_seconds, running_daemon

CHUNK = 64 * 1024
MIB = 1 << 20
GIB = 1 << 30


async def _source_or_sink(stream: trio.SocketStream) -> None:
    """The backend: a request `<bytes> <down|up>` is answered with that many
    bytes, or that many are read and one byte sent back."""
    request = b""
    while not request.endswith(b"\n"):
        request += await stream.receive_some(64)
    size, way = request.split()
    total = int(size)
    if way == b"down":
        block = bytes(MIB)
        for _ in range(total // MIB):
            await stream.send_all(block)
    else:
        while total:
            total -= len(await stream.receive_some(MIB))
        await stream.send_all(b".")


async def _transfer(stream: trio.SSLStream[trio.SocketStream], total: int, upload: bool) -> None:
    await stream.send_all(b"%d %s\n" % (total, b"up" if upload else b"down"))
    if upload:
        block = bytes(CHUNK)
        for _ in range(total // CHUNK):
            await stream.send_all(block)
        assert await stream.receive_some(1) == b"."
        return
    while total:
        total -= len(await stream.receive_some(MIB))


async def _connect(daemon: Daemon) -> trio.SSLStream[trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
    tls = trio.SSLStream(stream, daemon.context, server_hostname="localhost")
    await tls.do_handshake()
    return tls


async def cpu_per_gib(tree: Path | None, mib: int, connections: int, upload: bool) -> float:
    """One run: the daemon of `tree` (None: this interpreter's own)."""
    prefix = ("env", f"PYTHONPATH={tree}") if tree is not None else ()
    async with running_daemon(
        command_prefix=(*prefix, "taskset", "-c", "0"), backend_handler=_source_or_sink
    ) as daemon:
        streams = [await _connect(daemon) for _ in range(connections)]
        before = cpu_seconds(daemon.process.pid)
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(_transfer, stream, mib * MIB, upload)
        spent = cpu_seconds(daemon.process.pid) - before
        for stream in streams:
            await trio.aclose_forcefully(stream)
    return spent / (connections * mib * MIB / GIB)


async def main(args: argparse.Namespace) -> None:
    ratios: list[float] = []
    for pair in range(args.pairs):
        this = await cpu_per_gib(None, args.mib, args.connections, args.upload)
        line = f"pair {pair + 1}: this tree {this:.3f} CPU-s per GiB"
        if args.base is not None:
            base = await cpu_per_gib(args.base, args.mib, args.connections, args.upload)
            ratios.append(this / base)
            line += f", base {base:.3f}, ratio {this / base:.3f}"
        print(line, flush=True)
    if ratios:
        print(
            f"this tree / base, median of {len(ratios)} pairs: {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
        )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--base", type=Path, help="a source tree to compare against, pair by pair")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256, help="MiB each client echoes")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--upload", action="store_true", help="clients send, the backend reads")
    args = ap.parse_args()
    if args.base is not None:
        args.base = args.base.resolve()
        if not (args.base / "proxy" / "__main__.py").is_file():
            ap.error(f"--base: not a tlsproxy source tree: {args.base}")
    if not 1 <= args.pairs <= 50 or not 1 <= args.mib <= 4096 or not 1 <= args.connections <= 64:
        ap.error("--pairs 1..50, --mib 1..4096, --connections 1..64")
    return args


if __name__ == "__main__":
    os.sched_setaffinity(0, {1})
    trio.run(main, parse_args())
