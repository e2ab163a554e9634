"""The admin HTTP server: /metrics, /healthz, /readyz, on h11.

Small and strict: GET (and HEAD) only, bounded request size and time, one
request at a time per connection with keep-alive, so Prometheus can reuse
its connection and a stuck admin client cannot pile up.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.log import Logger

# Seconds a client may take to send one request, and to sit idle between
# keep-alive requests (Prometheus scrapes every 15-60 s and reconnects).
REQUEST_TIMEOUT = 10.0

# Bytes read per receive; requests to these endpoints are a few hundred bytes.
RECV_BYTES = 8192

# h11's bound on a request head; the default 16 KiB is generous for ours.
MAX_REQUEST_HEAD = 8192


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
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        sockname = sock.getsockname()
        task_status.started((str(sockname[0]), int(sockname[1])))
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
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


async def _next_event(
    stream: trio.SocketStream, conn: h11.Connection
) -> h11.Event | type[h11.PAUSED]:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]  # h11 types NEED_DATA as a class
        conn.receive_data(await stream.receive_some(RECV_BYTES))
