"""Resident memory per idle TLS connection in the daemon.

    .venv/bin/python benchmarks/idle_rss.py 1000 10000

For each count N: open N TLS connections (handshake done, one byte echoed,
so the backend connection exists too), let them idle (they park, see
proxy/parking.py), and report (RSS with N open - RSS before) / N, and the
daemon's CPU while it holds them, idle, for HOLD seconds (its idle scans
and the parked connections' timeout checks). The baseline is taken after a
warm-up round of connections has been opened and closed, so one-time costs
(imports, OpenSSL tables, the buffer pool) are not charged to connections.

Then each connection in turn echoes BURST bytes (several TLS records both
ways, so its memory BIOs grow to about a record and a third) and they idle
again: the RSS per connection once they have parked again is the memory an
idle connection keeps after it has moved data (proxy/membio.py).
"""

from __future__ import annotations

import sys

import trio

from benchmarks.harness import (
    cpu_seconds,
    open_many,
    raise_fd_limit,
    running_daemon,
)

WARM_UP = 200

# Seconds to let the daemon settle (freed memory returned, tasks parked)
# before reading RSS: a reading, not a synchronisation.
SETTLE = 1.0
# Seconds over which the daemon's CPU is read while it holds them, idle.
HOLD = 10.0
# Bytes each connection echoes before it idles again.
BURST = 64 * 1024


async def _close_all(streams: list[trio.SSLStream[trio.SocketStream]]) -> None:
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def measure(count: int) -> float:
    async with running_daemon() as daemon:
        await _close_all(await open_many(daemon, WARM_UP))
        await trio.sleep(SETTLE)
        before = daemon.rss_kib
        start = trio.current_time()
        streams = await open_many(daemon, count)
        opened = trio.current_time() - start
        await trio.sleep(SETTLE)
        after = daemon.rss_kib
        cpu = cpu_seconds(daemon.process.pid)
        await trio.sleep(HOLD)
        held = (cpu_seconds(daemon.process.pid) - cpu) / HOLD
        for stream in streams:
            await _echo_burst(stream)
        await trio.sleep(SETTLE)
        moved = daemon.rss_kib
        await _close_all(streams)
    per = (after - before) / count
    print(
        f"{count:>6} idle TLS connections: RSS {before} KiB -> {after} KiB, "
        f"{per:.1f} KiB per connection (opened in {opened:.1f} s); holding them "
        f"costs {held * 100:.2f} % of a core; after a {BURST // 1024} KiB echo each, "
        f"idle again: {(moved - before) / count:.1f} KiB per connection",
        flush=True,
    )
    return per


async def _echo_burst(stream: trio.SSLStream[trio.SocketStream]) -> None:
    await stream.send_all(bytes(BURST))
    got = 0
    while got < BURST:
        got += len(await stream.receive_some(BURST))


async def main(counts: list[int]) -> None:
    fits = raise_fd_limit(max(counts))
    for count in counts:
        if count > fits:
            print(f"{count} connections need more descriptors than the hard limit allows; "
                  f"measuring {fits}", flush=True)  # fmt: skip
        await measure(min(count, fits))


if __name__ == "__main__":
    trio.run(main, [int(arg) for arg in sys.argv[1:]] or [1000, 10000])
