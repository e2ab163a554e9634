"""What a parked connection keeps, object by object: the Python heap it
holds, by the line of tlsproxy that allocated it.

    .venv/bin/python -m benchmarks.idle_objects [N] [--egress]

Runs the daemon's `Server` in this process (the clients and the echo
backend too, over real sockets), opens N TLS connections with one byte
echoed, waits until every one has parked, and compares two tracemalloc
snapshots: before the connections and with them parked. Each surviving
allocation is charged to the innermost frame of tlsproxy's code in its
traceback, so the clients' and the backend's allocations (no such frame)
are left out, and an allocation inside the stdlib or Trio is charged to our
line that called it. OpenSSL's own memory (its malloc, not Python's) is not
traced: it is given as a whole, glibc's `mallinfo2` before and after, and
`benchmarks/idle_rss.py` measures everything by RSS. With `--egress` the
connections are plaintext in and TLS out: the listener originates TLS to
a TLS echo backend, as the egress benchmark's listener does (no session
resumption).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import linecache
import ssl
import tempfile
import tracemalloc
from collections import defaultdict
from functools import partial
from pathlib import Path

import trio
import trustme
from prometheus_client import CollectorRegistry

from benchmarks.harness import echo, malloc_in_use
from proxy.config import parse_config
from proxy.log import make_logger
from proxy.metrics import Metrics
from proxy.server import Server

PROXY = str(Path(__file__).resolve().parent.parent / "proxy")
FRAMES = 40


def _site(trace: tracemalloc.Trace) -> str:
    """Our innermost line in the allocation's traceback."""
    for frame in reversed(trace.traceback):  # most recent last
        if frame.filename.startswith(PROXY):
            return f"{frame.filename[len(PROXY) - len('proxy') :]}:{frame.lineno}"
    return ""


def _held(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> dict[str, int]:
    """Bytes allocated between the snapshots and still held, by our line."""
    old = {(t.traceback, t.size) for t in before.traces}
    sizes: dict[str, int] = defaultdict(int)
    for trace in after.traces:
        if (trace.traceback, trace.size) in old:
            continue
        site = _site(trace)
        if site:
            sizes[site] += trace.size
    return sizes


async def _ingress(nursery: trio.Nursery, pem: Path) -> dict[str, object]:
    """A TLS listener in front of a plain echo backend."""
    (plain,) = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return {
        "name": "bench",
        "listen": "127.0.0.1:0",
        "backend": f"127.0.0.1:{plain.socket.getsockname()[1]}",
        "tls": {"certificates": [{"cert": str(pem), "key": str(pem)}]},
    }


async def _egress(nursery: trio.Nursery, served: ssl.SSLContext, ca: Path) -> dict[str, object]:
    """A plain listener originating TLS to a TLS echo backend, which sends
    two session tickets after each handshake (OpenSSL's default)."""

    async def tls_echo(stream: trio.SSLStream[trio.SocketStream]) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some():
                await stream.send_all(data)

    serve = partial(trio.serve_ssl_over_tcp, tls_echo, 0, served, host="127.0.0.1")
    (backend,) = await nursery.start(serve)
    port = backend.transport_listener.socket.getsockname()[1]
    return {
        "name": "bench",
        "listen": "127.0.0.1:0",
        "backend": f"127.0.0.1:{port}",
        "upstream_tls": {"server_name": "localhost", "ca": str(ca), "session_resumption": False},
    }


def _report(count: int, egress: bool, sizes: dict[str, int], heap: int) -> None:
    total = sum(sizes.values())
    kind = "egress (plain in, TLS out)" if egress else "ingress (TLS in)"
    print(f"{count} parked connections, {kind}: {total / count:.0f} bytes each of Python heap")
    print(
        f"malloc's heap grew {heap / count:.0f} bytes per connection (the whole process:"
        " OpenSSL's state, the Python heap above, tracemalloc's own records, the peers)"
    )
    print("| bytes per connection | allocated at | by |")
    print("| ---: | --- | --- |")
    root = Path(PROXY).parent
    for site, size in sorted(sizes.items(), key=lambda item: -item[1]):
        if size / count >= 8:
            path, _, line = site.rpartition(":")
            code = linecache.getline(str(root / path), int(line)).strip()
            print(f"| {size / count:.0f} | `{site}` | `{code}` |")


async def main(count: int, egress: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost")
        pem = Path(tmp) / "tls.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
        ca_pem = Path(tmp) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_pem))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(served)
        async with trio.open_nursery() as nursery:
            if egress:
                listener = await _egress(nursery, served, ca_pem)
            else:
                listener = await _ingress(nursery, pem)
            config = parse_config(
                {
                    "admin": {"listen": "127.0.0.1:0"},
                    "log": {"access_log": False},
                    "listeners": [listener],
                },
                Path(tmp),
            )
            server = Server(config, Metrics(CollectorRegistry()), make_logger(stream=io.StringIO()))
            bound = await nursery.start(server.run)
            port = bound.listeners["bench"][1]

            async def open_one() -> trio.abc.Stream:
                stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
                if not egress:
                    stream = trio.SSLStream(stream, context, server_hostname="localhost")
                await stream.send_all(b".")
                assert await stream.receive_some(1) == b"."
                return stream

            async def until_parked(parked: int) -> None:
                # a state of the server to poll, not an event it sets
                while len(server.connections.lot) != parked or server.connections.live:  # noqa: ASYNC110
                    await trio.sleep(0.05)

            for _ in range(50):  # warm up: the buffer pool, OpenSSL's tables, caches
                await trio.aclose_forcefully(await open_one())
            await until_parked(0)
            gc.collect()
            heap = malloc_in_use()
            tracemalloc.start(FRAMES)
            before = tracemalloc.take_snapshot()
            streams = [await open_one() for _ in range(count)]
            await until_parked(count)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            heap = malloc_in_use() - heap
            _report(count, egress, _held(before, after), heap)
            for stream in streams:
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("count", nargs="?", type=int, default=500)
    ap.add_argument("--egress", action="store_true", help="plaintext in, TLS out")
    args = ap.parse_args()
    trio.run(main, args.count, args.egress)
