"""Scale: ten thousand established TLS connections in one worker, and the rate
of new full handshakes while they are held.

    .venv/bin/python -m benchmarks.scale [N]     (make scale; N defaults to 10000)

Why: the daemon must carry a large idle population without new connections
getting slower (issue: "10 000 concurrent established connections in one
worker, with the handshake rate of new connections measured at that load").

How: the daemon (one process, `workers = 1`) runs pinned to one CPU with
`taskset`; this process (the echo backend) and a client process (started as
`python -m benchmarks.scale --clients PORT CA_FILE`, driven by JSON lines on
its stdin and stdout) share the other CPU. Only the daemon holds two
descriptors per connection (client and backend side); the backend and the
clients hold one each, in different processes, so the daemon's descriptor
limit alone decides how many connections fit. The daemon's soft limit is
raised to the hard limit; where that is below what N needs (a container
without CAP_SYS_RESOURCE cannot raise it), N is capped and the output says so.

1. A warm-up load, then LOAD_COUNT full handshakes (connect, handshake, one
   byte echoed, close; sessions never reused) at LOAD_CONCURRENCY: the rate
   at zero population.
2. The population: N connections, handshake done and one byte echoed (so the
   backend connection exists), then idle. Reports the time to open them and
   the daemon's RSS growth per connection.
3. The same load again with the population held: the rate at load, and its
   ratio to the rate at zero. Both rates are also given per daemon
   CPU-second, which is less sensitive to other work on the machine, with
   how busy the daemon's CPU was: under 100 % means the load side (which
   spends about as much CPU per handshake as the daemon) set the pace.

The daemon keeps running_daemon's config: an idle_timeout of an hour, far
longer than a run, and session tickets on; the clients never offer a
session, and every load handshake is checked not to have resumed one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from benchmarks.harness import OPEN_CONCURRENCY, Daemon, raise_fd_limit, running_daemon
from proxy.accept import EXHAUSTED_EVENT

TARGET = 10_000  # established connections (the goal)
LOAD_CONCURRENCY = 16  # new connections in flight during a load
LOAD_COUNT = 4000  # full handshakes per load: several seconds at the expected rate
LOAD_DEADLINE = 60.0  # seconds; a load that has not finished by then is reported as is
WARM_UP = 500  # handshakes before the first load: one-time costs are not measured
OPEN_DEADLINE = 180.0  # seconds to open the population
# Descriptors the daemon may open besides its idle set and the connections:
# re-reading the config file when it changes, an admin request.
TRANSIENT_FDS = 16
# Daemon descriptors per load connection: two while it is in flight, and two
# more for one the client has already closed but the daemon (a CPU behind)
# has not yet reaped.
FDS_PER_LOAD_CONNECTION = 4
# Seconds to let the daemon settle before reading RSS or descriptors: a
# reading, not a synchronisation.
SETTLE = 1.0
FD_SAMPLE_EVERY = 0.25  # seconds between counts of the daemon's descriptors during a load

# --- the client process: stdlib ssl sockets driven by one selector ----------

# What a connection waits for next: a socket and the selector events.
Wait = tuple[socket.socket, int]
T = TypeVar("T")


def _until_done(tls: ssl.SSLSocket, call: Callable[[], T]) -> Generator[Wait, None, T]:
    """Call a non-blocking TLS operation until OpenSSL wants nothing more."""
    while True:
        try:
            return call()
        except ssl.SSLWantReadError:
            yield tls, selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            yield tls, selectors.EVENT_WRITE


@contextmanager
def _closed_on_error(sock: socket.socket) -> Iterator[None]:
    """Close the socket if the block fails or its connection is abandoned."""
    try:
        yield
    except BaseException:
        sock.close()
        raise


def _open_tls(
    address: tuple[str, int], context: ssl.SSLContext
) -> Generator[Wait, None, ssl.SSLSocket]:
    """Connect, complete a full handshake and echo one byte, as harness.open_tls."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with _closed_on_error(raw):
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio's clients
        raw.connect_ex(address)  # EINPROGRESS; the outcome is read below
        yield raw, selectors.EVENT_WRITE
        if error := raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            raise OSError(error, os.strerror(error))
        tls = context.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
    with _closed_on_error(tls):
        yield from _until_done(tls, tls.do_handshake)
        if tls.session_reused:
            raise ConnectionError("the handshake resumed a session; it must be a full one")
        yield from _until_done(tls, lambda: tls.send(b"."))
        if (yield from _until_done(tls, lambda: tls.recv(1))) != b".":
            raise ConnectionError("the proxy did not echo the byte")
    return tls


def _handshake_and_close(
    address: tuple[str, int], context: ssl.SSLContext
) -> Generator[Wait, None, None]:
    (yield from _open_tls(address, context)).close()


@dataclass
class Batch:
    """What the client process reports for one batch of connections."""

    done: int
    failed: int
    seconds: float
    first_error: str


def _run_batch(
    connection: Callable[[], Generator[Wait, None, ssl.SSLSocket | None]],
    count: int,
    concurrency: int,
    deadline: float,
    held: list[ssl.SSLSocket],
) -> Batch:
    """Run `count` connections, `concurrency` at a time, for at most `deadline`
    seconds; keep the sockets that connections return in `held`."""
    done = failed = started = 0
    first_error = ""
    start = time.monotonic()
    end = start + deadline
    selector = selectors.DefaultSelector()

    def advance(step: Generator[Wait, None, ssl.SSLSocket | None]) -> None:
        nonlocal done, failed, first_error
        try:
            sock, events = step.send(None)
        except StopIteration as stop:
            done += 1
            if stop.value is not None:
                held.append(stop.value)
        except OSError as exc:  # ssl.SSLError and ConnectionError included
            failed += 1
            first_error = first_error or repr(exc)
        else:
            selector.register(sock, events, step)

    with selector:
        try:
            while done + failed < count and (now := time.monotonic()) < end:
                while started < count and len(selector.get_map()) < concurrency:
                    started += 1
                    advance(connection())
                for key, _ in selector.select(end - now):
                    selector.unregister(key.fileobj)
                    advance(key.data)
        finally:
            for key in list(selector.get_map().values()):
                key.data.close()  # closes the socket of a connection cut by the deadline
    return Batch(done, failed, time.monotonic() - start, first_error)


def client_process(port: int, ca_file: Path) -> None:
    """Serve the benchmark's commands, one JSON object a line: `hold` keeps
    the connections open until stdin closes, otherwise each one is closed
    after its echo."""
    context = ssl.create_default_context(cafile=str(ca_file))
    address = ("127.0.0.1", port)
    held: list[ssl.SSLSocket] = []
    for line in sys.stdin:
        command = json.loads(line)
        step = _open_tls if command["hold"] else _handshake_and_close
        batch = _run_batch(
            partial(step, address, context),
            command["count"],
            command["concurrency"],
            command["deadline"],
            held,
        )
        print(json.dumps(asdict(batch)), flush=True)
    for tls in held:
        tls.close()


# --- the benchmark process -------------------------------------------------


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_limit(pid: int) -> int:
    """The process's soft RLIMIT_NOFILE, the one that makes accept fail."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no open-files limit for pid {pid}")


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    batch: Batch
    daemon_cpu: float  # daemon CPU-seconds spent during the load
    peak_fds: int  # most daemon descriptors seen in a sample

    @property
    def rate(self) -> float:
        return self.batch.done / self.batch.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.batch.done / self.daemon_cpu if self.daemon_cpu else 0.0

    def __str__(self) -> str:
        return (
            f"{self.batch.done} in {self.batch.seconds:.1f} s = {self.rate:.0f}/s; "
            f"daemon CPU {self.daemon_cpu / self.batch.seconds * 100:.0f} % busy, "
            f"{self.per_cpu_second:.0f} per daemon CPU-s; {self.batch.failed} failed"
            + (f" (first: {self.batch.first_error})" if self.batch.failed else "")
        )


@dataclass
class Clients:
    process: trio.Process
    pending: bytes = b""

    async def run(self, count: int, concurrency: int, deadline: float, *, hold: bool) -> Batch:
        command = {"count": count, "concurrency": concurrency, "deadline": deadline, "hold": hold}
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")
        # The client process answers once the batch's deadline has passed at the latest.
        with trio.fail_after(deadline + 30):
            while b"\n" not in self.pending:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError("the client process exited")
                self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return Batch(**json.loads(line))

    async def load(self, daemon: Daemon, count: int) -> Load:
        pid = daemon.process.pid
        peak = _fd_count(pid)
        cpu = _cpu_seconds(pid)
        async with trio.open_nursery() as nursery:

            async def sample() -> None:
                nonlocal peak
                while True:
                    await trio.sleep(FD_SAMPLE_EVERY)
                    peak = max(peak, _fd_count(pid))

            nursery.start_soon(sample)
            batch = await self.run(count, LOAD_CONCURRENCY, LOAD_DEADLINE, hold=False)
            nursery.cancel_scope.cancel()
        return Load(batch, _cpu_seconds(pid) - cpu, peak)


@asynccontextmanager
async def client_process_for(daemon: Daemon) -> AsyncIterator[Clients]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "benchmarks.scale", "--clients", str(daemon.port),
         str(daemon.ca_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield Clients(process)
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def main(target: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs: one for the daemon, one for the clients and backend")
    daemon_cpu, load_cpu = cpus[:2]
    # This process (the echo backend) and the client process it starts run on
    # the load CPU; the daemon gets the other one to itself.
    os.sched_setaffinity(0, {load_cpu})
    # The daemon and the client process inherit the raised soft limit; how
    # many connections that lets the daemon hold is worked out below, from
    # the daemon's own figures.
    raise_fd_limit(target)
    async with (
        running_daemon(command_prefix=("taskset", "-c", str(daemon_cpu))) as daemon,
        client_process_for(daemon) as clients,
    ):
        pid = daemon.process.pid
        print(f"daemon pid {pid} on CPU {daemon_cpu}; clients and backend on CPU {load_cpu}")
        await clients.run(WARM_UP, LOAD_CONCURRENCY, LOAD_DEADLINE, hold=False)
        zero = await clients.load(daemon, LOAD_COUNT)
        print(f"full handshakes at zero population: {zero}", flush=True)
        if not zero.batch.done:
            raise SystemExit("no handshake succeeded; nothing to compare")

        await trio.sleep(SETTLE)
        idle_fds, limit = _fd_count(pid), _fd_limit(pid)
        headroom = idle_fds + FDS_PER_LOAD_CONNECTION * LOAD_CONCURRENCY + TRANSIENT_FDS
        fits = (limit - headroom) // 2
        print(
            f"descriptor budget: daemon limit {limit} - headroom {headroom} "
            f"({idle_fds} held idle + {FDS_PER_LOAD_CONNECTION} x {LOAD_CONCURRENCY} for the "
            f"load + {TRANSIENT_FDS} transient) = {limit - headroom}, "
            f"2 per connection: {fits} connections fit"
        )
        count = min(target, fits)
        if count < target:
            print(
                f"CAPPED: {target} connections need {2 * target + headroom} descriptors in the "
                f"daemon, more than its limit of {limit}: the hard limit "
                f"({resource.getrlimit(resource.RLIMIT_NOFILE)[1]}) cannot be raised without "
                f"CAP_SYS_RESOURCE; holding {count}"
            )
        before = daemon.rss_kib
        opened = await clients.run(count, OPEN_CONCURRENCY, OPEN_DEADLINE, hold=True)
        await trio.sleep(SETTLE)
        after = daemon.rss_kib
        held_fds = _fd_count(pid)
        print(
            f"population: {opened.done} of {count} connections opened in {opened.seconds:.1f} s "
            f"({opened.done / opened.seconds:.0f}/s at concurrency {OPEN_CONCURRENCY}), "
            f"{opened.failed} failed"
            + (f" (first: {opened.first_error})" if opened.failed else "")
            + f"; daemon holds {held_fds} descriptors of {limit}"
        )
        if opened.done:
            print(
                f"daemon RSS {before} KiB -> {after} KiB: "
                f"{(after - before) / opened.done:.1f} KiB per held connection"
            )
        loaded = await clients.load(daemon, LOAD_COUNT)
        print(f"full handshakes with {opened.done} held: {loaded}")
        print(
            f"  daemon descriptors: peak sampled {loaded.peak_fds} of {limit}, "
            f"{_fd_count(pid)} after the load; accepts paused for want of descriptors "
            f"{daemon.events[EXHAUSTED_EVENT]} times in the whole run"
        )
        print(
            f"ratio at load / at zero: {loaded.rate / zero.rate:.2f} "
            f"(per daemon CPU-second: {loaded.per_cpu_second / zero.per_cpu_second:.2f})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connections", type=int, nargs="?", default=TARGET)
    parser.add_argument("--clients", nargs=2, metavar=("PORT", "CA_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients:
        client_process(int(args.clients[0]), Path(args.clients[1]))
    else:
        trio.run(main, args.connections)
