"""The far side of test_parking's burst, in a process of its own: N TLS
clients of the daemon and the echo backend behind it.

    python -m tests.burst_peer CA_FILE N

On stdout, one line per step; on stdin, the test's commands:

    -> the backend's port
    <- the daemon's port      open N connections: handshake, one byte echoed
    -> opened
    <- wake                   one byte on every connection at once, every echo read
    -> echoed
    <- close                  close_notify on each, the daemon's close_notify read
    -> closed
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from tests.helpers import BioClient, echo_handler

# TLS handshakes in flight while opening: a bounded load on the daemon.
OPENING = 64


async def _each(clients: list[BioClient], step: Callable[[BioClient], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(step, client)


async def main(ca_file: str, count: int) -> None:
    context = ssl.create_default_context(cafile=ca_file)
    stdin = trio.lowlevel.FdStream(0)
    buffered = b""

    async def command() -> str:
        nonlocal buffered
        while b"\n" not in buffered:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                raise SystemExit(0)
            buffered += chunk
        line, _, buffered = buffered.partition(b"\n")
        return line.decode()

    def say(line: str) -> None:
        print(line, flush=True)

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1")
        )
        say(str(listener.socket.getsockname()[1]))
        port = int(await command())
        clients: list[BioClient] = []
        opening = trio.Semaphore(OPENING)

        async def open_one() -> None:
            async with opening:
                client = await BioClient.connect(port, context)
                await client.send_all(b"x")
                assert await client.recv() == b"x"
                clients.append(client)

        async with trio.open_nursery() as openers:
            for _ in range(count):
                openers.start_soon(open_one)
        say("opened")

        assert await command() == "wake"
        for client in clients:  # all written before any echo is read
            client.obj.write(b"y")
            await client.stream.send_all(client.outgoing.read())

        async def echoed(client: BioClient) -> None:
            assert await client.recv() == b"y"

        await _each(clients, echoed)
        say("echoed")

        assert await command() == "close"

        async def close(client: BioClient) -> None:
            await client.close_notify()
            assert await client.recv() == b""
            await client.stream.aclose()

        await _each(clients, close)
        say("closed")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
