"""Bounded churn soak: open, transfer, close, in a loop, and watch the daemon's RSS.

    .venv/bin/python -m benchmarks.soak [--minutes 10]     (make soak)

WORKERS clients each loop: connect, handshake, echo PAYLOAD bytes, close;
meanwhile IDLERS connections stay open the whole run, each echoing one
byte after a pause long enough for it to park (`proxy.parking`), so the
parking lot takes and wakes connections all along. RSS is sampled
every SAMPLE_EVERY seconds. The verdict compares RSS at the end with RSS
at one fifth of the run (minute 2 of 10), once start-up allocations and
pools have reached their steady size: the issue's bound is under 5 %
growth. Exit status 1 when it grows more.
"""

from __future__ import annotations

import argparse
import random
import sys

import trio

from benchmarks.harness import Daemon, open_tls, raise_fd_limit, running_daemon

WORKERS = 32  # concurrent clients; enough to keep both cores busy
PAYLOAD = 16 * 1024  # bytes echoed per connection: a few TLS records each way
SAMPLE_EVERY = 10.0  # seconds between RSS samples
MAX_GROWTH = 0.05  # the bound between minute 2 and minute 10
REFERENCE_FRACTION = 0.2  # minute 2 of 10
IDLERS = 500  # connections held for the whole run
IDLE_GAP = (1.0, 3.0)  # seconds between an idler's bytes: each one parks in between
OPENING = 32  # idlers' handshakes in flight at the start


async def _churn(daemon: Daemon, counter: list[int]) -> None:
    data = b"x" * PAYLOAD
    while True:
        tls = await open_tls(daemon)
        try:
            await tls.send_all(data)
            received = 0
            while received < PAYLOAD:
                chunk = await tls.receive_some(65536)
                if not chunk:
                    raise RuntimeError("the proxy closed mid-transfer")
                received += len(chunk)
        finally:
            await trio.aclose_forcefully(tls)
        counter[0] += 1


async def _idle(
    daemon: Daemon, wakes: list[int], rng: random.Random, opening: trio.Semaphore
) -> None:
    async with opening:
        tls = await open_tls(daemon)
    try:
        while True:
            await trio.sleep(rng.uniform(*IDLE_GAP))
            await tls.send_all(b"z")
            if await tls.receive_some(1) != b"z":
                raise RuntimeError("the proxy closed an idle connection")
            wakes[0] += 1
    finally:
        await trio.aclose_forcefully(tls)


async def main(minutes: float) -> int:
    raise_fd_limit(WORKERS * 4 + IDLERS * 2)
    duration = minutes * 60
    samples: list[tuple[float, int, int]] = []
    counter, wakes = [0], [0]
    rng = random.Random(0)
    opening = trio.Semaphore(OPENING)
    async with running_daemon() as daemon, trio.open_nursery() as nursery:
        for _ in range(IDLERS):
            nursery.start_soon(_idle, daemon, wakes, rng, opening)
        for _ in range(WORKERS):
            nursery.start_soon(_churn, daemon, counter)
        start = trio.current_time()
        while (elapsed := trio.current_time() - start) < duration:
            await trio.sleep(min(SAMPLE_EVERY, duration - elapsed))
            elapsed = trio.current_time() - start
            samples.append((elapsed, daemon.rss_kib, counter[0]))
            print(f"{elapsed:7.0f} s  RSS {samples[-1][1]:>7} KiB  {counter[0]:>8} connections"
                  f"  {wakes[0]:>7} idle wakes", flush=True)  # fmt: skip
        nursery.cancel_scope.cancel()
    reference = next(s for s in samples if s[0] >= duration * REFERENCE_FRACTION)
    final = samples[-1]
    growth = (final[1] - reference[1]) / reference[1]
    print(
        f"RSS at {reference[0] / 60:.1f} min: {reference[1]} KiB; at {final[0] / 60:.1f} min: "
        f"{final[1]} KiB; growth {growth * 100:+.2f} % (bound {MAX_GROWTH * 100:.0f} %); "
        f"{final[2]} connections, {final[2] / final[0]:.0f}/s; {IDLERS} idle connections "
        f"woken {wakes[0]} times"
    )
    return 0 if growth < MAX_GROWTH else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    sys.exit(trio.run(main, parser.parse_args().minutes))
