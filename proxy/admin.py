"""The admin HTTP server: /metrics, /healthz, /readyz, on h11.

Small and strict: GET (and HEAD) only, bounded request size and time, one
request at a time per connection with keep-alive, so Prometheus can reuse
its connection and a stuck admin client cannot pile up. At most
MAX_CONNECTIONS at once: this port shares the process's descriptors with
the TLS listeners, so however many clients connect here, the data plane
keeps its descriptors.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.log import Logger

# Seconds a connection may take over one whole request, from the end of the
# previous response (or the accept) to the last byte of its own response:
# idling before it, sending it, and reading the answer. A slowloris that
# trickles its request a byte at a time is cut here, however often it sends.
# Prometheus scrapes every 15-60 s and reconnects when its keep-alive
# connection was closed meanwhile; its scrape timeout is 10 s by default.
REQUEST_TIMEOUT = 10.0

# Bytes read per receive; requests to these endpoints are a few hundred bytes.
RECV_BYTES = 8192

# h11's bound on a request head; the default 16 KiB is generous for ours.
MAX_REQUEST_HEAD = 8192

# Admin connections served at once. Who connects: the kubelet's probes (a new
# connection per probe, a few milliseconds each: readiness every 5 s,
# liveness every 10 s, perhaps a startup probe, so rarely more than 3 at
# once), Prometheus (one keep-alive connection per scraper: an HA pair, and
# maybe a second Prometheus or a federation, 4) and a person with curl: 8.
# Twice that leaves room for reconnects overlapping the old connection.
# Beyond it a connection is accepted and closed at once rather than left in
# the listen backlog: the backlog is first come, first served, so a flood
# queued there would be served, each for up to REQUEST_TIMEOUT, before the
# probes that arrived behind it, long after the flood stopped; closed at
# once, the queue stays empty, the next probe gets the next free slot, and
# the client learns at once (EOF, no answer) instead of timing out.
MAX_CONNECTIONS = 16


class Admin:
    """Serves the endpoints from the registry and the daemon's readiness."""

    def __init__(
        self, registry: CollectorRegistry, is_ready: Callable[[], bool], log: Logger
    ) -> None:
        self.registry = registry
        self.is_ready = is_ready
        self.log = log

    async def serve(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[tuple[str, int]]
    ) -> None:
        """Serve on an already bound, listening socket until cancelled."""
        slots = trio.Semaphore(MAX_CONNECTIONS)
        listener = _BoundedListener(
            trio.SocketListener(trio.socket.from_stdlib_socket(sock)), slots
        )
        sockname = sock.getsockname()
        task_status.started((str(sockname[0]), int(sockname[1])))
        await trio.serve_listeners(partial(self._handle, slots), [listener])

    async def _handle(self, slots: trio.Semaphore, stream: trio.SocketStream) -> None:
        """Serve one connection, holding the slot its accept took until it closes."""
        try:
            await self._serve_connection(stream)
        finally:
            slots.release()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            while True:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    event = await _next_event(stream, conn)
                    if not isinstance(event, h11.Request):
                        return
                    await self._respond(stream, conn, event)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, req: h11.Request
    ) -> None:
        status, content_type, body = self._route(req)
        while not isinstance(
            await _next_event(stream, conn), (h11.EndOfMessage, h11.ConnectionClosed)
        ):
            pass  # discard any request body
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
        ]
        out = conn.send(h11.Response(status_code=status, headers=headers))
        if req.method != b"HEAD":
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)

    def _route(self, req: h11.Request) -> tuple[int, str, bytes]:
        path = req.target.split(b"?", 1)[0]
        if req.method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == b"/healthz":
            return 200, "text/plain", b"ok\n"
        if path == b"/readyz":
            if self.is_ready():
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready\n"
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"


class _BoundedListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts like the socket listener, and closes at once what finds no slot.

    The slot is taken here, at accept, not when the handler task first runs:
    serve_listeners accepts the next connection before that task starts.
    """

    def __init__(self, inner: trio.SocketListener, slots: trio.Semaphore) -> None:
        self._inner = inner
        self._slots = slots

    async def accept(self) -> trio.SocketStream:
        while True:
            stream = await self._inner.accept()
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                await trio.aclose_forcefully(stream)
                continue
            return stream

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _next_event(
    stream: trio.SocketStream, conn: h11.Connection
) -> h11.Event | type[h11.PAUSED]:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]  # h11 types NEED_DATA as a class
        conn.receive_data(await stream.receive_some(RECV_BYTES))
