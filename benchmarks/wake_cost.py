"""What waking a parked connection costs the daemon, in CPU per request.

    .venv/bin/python -m benchmarks.wake_cost [N] [ROUNDS]

N TLS connections to the real daemon (a subprocess, on CPU 0, the clients
and the echo backend in this process on CPU 1). A round sends one byte on
every connection, all at once, and reads every echo. Rounds 0.1 s apart
keep every connection running (it parks only after `PARK_AFTER` without a
byte); rounds `PARK_AFTER` + 1 s apart let every connection park between
two rounds, so each of its requests wakes it. The daemon's CPU time per
request (user + system, from /proc) is compared: the difference is what a
park and a wake cost. The gaps between rounds cost the daemon its idle
scans, a few per second whatever the load, which the longer gaps count a
little more of.
"""

from __future__ import annotations

import os
import sys

import trio

from benchmarks.harness import (
    cpu_seconds,
    open_many,
    raise_fd_limit,
    running_daemon,
)
from proxy.parking import PARK_AFTER

RUNNING_GAP = 0.1
PARKED_GAP = PARK_AFTER + 1.0


async def _round(streams: list[trio.SSLStream[trio.SocketStream]]) -> None:
    async def one(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.send_all(b"y")
        assert await stream.receive_some(1) == b"y"

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(one, stream)


async def _cpu_per_request(
    pid: int, streams: list[trio.SSLStream[trio.SocketStream]], rounds: int, gap: float
) -> float:
    await _round(streams)  # the first round of a phase wakes or keeps them as the last left
    await trio.sleep(gap)
    before = cpu_seconds(pid)
    for _ in range(rounds):
        await _round(streams)
        await trio.sleep(gap)
    return (cpu_seconds(pid) - before) / (rounds * len(streams))


async def main(count: int, rounds: int) -> None:
    count = min(count, raise_fd_limit(count))
    async with running_daemon(command_prefix=("taskset", "-c", "0")) as daemon:
        pid = daemon.process.pid
        streams = await open_many(daemon, count)
        running = await _cpu_per_request(pid, streams, rounds, RUNNING_GAP)
        parked = await _cpu_per_request(pid, streams, rounds, PARKED_GAP)
        for stream in streams:
            await trio.aclose_forcefully(stream)
    print(
        f"{count} connections, {rounds} rounds each: {running * 1e6:.0f} us of daemon CPU "
        f"per request kept running ({RUNNING_GAP} s apart), {parked * 1e6:.0f} us parked "
        f"and woken ({PARKED_GAP} s apart): a park and a wake cost "
        f"{(parked - running) * 1e6:.0f} us, {parked / running:.2f}x a running request"
    )


if __name__ == "__main__":
    os.sched_setaffinity(0, {1})
    count, rounds = ([int(arg) for arg in sys.argv[1:]] + [1000, 10][len(sys.argv) - 1 :])[:2]
    trio.run(main, count, rounds)
