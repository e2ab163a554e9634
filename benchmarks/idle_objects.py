"""What a parked connection keeps, object by object: the Python heap it
holds, by the line of tlsproxy that allocated it.

    .venv/bin/python -m benchmarks.idle_objects [N]

Runs the daemon's `Server` in this process (the clients and the echo
backend too, over real sockets), opens N TLS connections with one byte
echoed, waits until every one has parked, and compares two tracemalloc
snapshots: before the connections and with them parked. Each surviving
allocation is charged to the innermost frame of tlsproxy's code in its
traceback, so the clients' and the backend's allocations (no such frame)
are left out, and an allocation inside the stdlib or Trio is charged to our
line that called it. OpenSSL's own memory (its malloc, not Python's) is not
traced: `benchmarks/idle_rss.py` measures the whole by RSS.
"""

from __future__ import annotations

import gc
import io
import linecache
import ssl
import sys
import tempfile
import tracemalloc
from collections import defaultdict
from functools import partial
from pathlib import Path

import trio
import trustme
from prometheus_client import CollectorRegistry

from benchmarks.harness import echo
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


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost")
        pem = Path(tmp) / "tls.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with trio.open_nursery() as nursery:
            (backend,) = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            config = parse_config(
                {
                    "admin": {"listen": "127.0.0.1:0"},
                    "log": {"access_log": False},
                    "listeners": [
                        {
                            "name": "bench",
                            "listen": "127.0.0.1:0",
                            "backend": f"127.0.0.1:{backend.socket.getsockname()[1]}",
                            "tls": {"certificates": [{"cert": str(pem), "key": str(pem)}]},
                        }
                    ],
                },
                Path(tmp),
            )
            server = Server(config, Metrics(CollectorRegistry()), make_logger(stream=io.StringIO()))
            bound = await nursery.start(server.run)
            port = bound.listeners["bench"][1]

            async def open_one() -> trio.SSLStream[trio.SocketStream]:
                tls = trio.SSLStream(
                    await trio.open_tcp_stream("127.0.0.1", port),
                    context,
                    server_hostname="localhost",
                )
                await tls.send_all(b".")
                assert await tls.receive_some(1) == b"."
                return tls

            async def until_parked(parked: int) -> None:
                # a state of the server to poll, not an event it sets
                while len(server.connections.lot) != parked or server.connections.live:  # noqa: ASYNC110
                    await trio.sleep(0.05)

            for _ in range(50):  # warm up: the buffer pool, OpenSSL's tables, caches
                await trio.aclose_forcefully(await open_one())
            await until_parked(0)
            tracemalloc.start(FRAMES)
            gc.collect()
            before = tracemalloc.take_snapshot()
            streams = [await open_one() for _ in range(count)]
            await until_parked(count)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            sizes = _held(before, after)
            total = sum(sizes.values())
            print(f"{count} parked connections: {total / count:.0f} bytes each of Python heap")
            print("| bytes per connection | allocated at | by |")
            print("| ---: | --- | --- |")
            root = Path(PROXY).parent
            for site, size in sorted(sizes.items(), key=lambda item: -item[1]):
                if size / count >= 8:
                    path, _, line = site.rpartition(":")
                    code = linecache.getline(str(root / path), int(line)).strip()
                    print(f"| {size / count:.0f} | `{site}` | `{code}` |")
            for stream in streams:
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 500)
