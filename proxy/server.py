"""Listeners, the accept loops, and the daemon's lifecycle.

Lifecycle is an explicit state: starting -> serving -> draining -> stopped.
Draining is terminal. `/readyz` reads it, so a load balancer stops sending
new clients before the listeners close.

Drain, in order: mark draining (readyz 503), stop the accept loops and close
the listening sockets (new connects are refused by the kernel), give live
connections `drain_timeout` to finish on their own, then cancel the rest;
each cut connection gets a close_notify and logs `close_reason=drain`.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from enum import StrEnum

import trio

from proxy.admin import Admin
from proxy.config import Address, Config
from proxy.connection import ConnectionSet, ListenerState, handle_connection
from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.runtime import build_runtimes, export_certificates

# Pending connections the kernel queues per listener before refusing SYNs.
# Matches the Linux default somaxconn of 4096 (since 5.4); HAProxy uses the
# same order of magnitude.
LISTEN_BACKLOG = 4096

# Connections accepted per wakeup before yielding to other tasks, so a burst
# of connects neither starves established connections nor costs one epoll
# round trip per accept.
ACCEPT_BATCH = 64

# Seconds to pause accepting when the process is out of file descriptors or
# kernel memory; live connections keep being served and free descriptors as
# they close (trio's serve_listeners uses the same pause).
ACCEPT_BACKOFF = 0.1

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A client that reset before we accepted it: skip it, keep accepting.
_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class StartupError(Exception):
    """The daemon cannot start; the message says what to change."""


class State(StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class BoundAddresses:
    """What `Server.run` reports once serving; tests bind port 0 and read this."""

    listeners: dict[str, tuple[str, int]]
    admin: tuple[str, int]


class Server:
    """The daemon: admin endpoint, one accept loop per listener, and drain."""

    def __init__(self, config: Config, metrics: Metrics, log: Logger) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self.state = State.STARTING
        self.connections = ConnectionSet()
        self._drain_requested = trio.Event()
        self._sockets: list[socket.socket] = []
        self._admin_socket: socket.socket | None = None
        runtimes = build_runtimes(config, metrics, log)
        self.listeners = [ListenerState(runtime) for runtime in runtimes]
        export_certificates(runtimes, metrics)

    def is_ready(self) -> bool:
        return self.state is State.SERVING

    def request_drain(self) -> None:
        """Begin draining (SIGTERM/SIGINT); idempotent."""
        if self.state in (State.STARTING, State.SERVING):
            self.state = State.DRAINING
            self._drain_requested.set()

    def bind(self) -> None:
        """Bind every listener and the admin port, or raise StartupError.

        Done synchronously, before any task starts, so that a port in use is
        one clear message rather than a failure inside a nursery.
        """
        if self._admin_socket is not None:
            return
        sockets: list[socket.socket] = []
        try:
            for state in self.listeners:
                lc = state.runtime.config
                sockets.append(_bind(lc.listen, f"listener {lc.name!r}"))
            sockets.append(_bind(self.config.admin.listen, "admin"))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._admin_socket = sockets.pop()
        self._sockets = sockets

    def listen_ports(self) -> dict[str, int]:
        """Each listener's bound port (after `bind`), e.g. when 0 was asked for."""
        return {
            state.runtime.config.name: _sockname(sock)[1]
            for sock, state in zip(self._sockets, self.listeners, strict=True)
        }

    async def run(
        self, *, task_status: trio.TaskStatus[BoundAddresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until drained; report the bound addresses once accepting."""
        self.bind()
        assert self._admin_socket is not None
        admin = Admin(self.metrics.registry, self.is_ready, self.log)
        try:
            async with trio.open_nursery() as services:
                admin_address = await services.start(admin.serve, self._admin_socket)
                await self._serve(self._sockets, admin_address, task_status)
                services.cancel_scope.cancel()
        finally:
            for sock in (*self._sockets, self._admin_socket):
                sock.close()
        self.state = State.STOPPED
        self.log.info("stopped")

    async def _serve(
        self,
        sockets: list[socket.socket],
        admin_address: tuple[str, int],
        task_status: trio.TaskStatus[BoundAddresses],
    ) -> None:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for sock, state in zip(sockets, self.listeners, strict=True):
                    accepting.start_soon(self._accept_loop, sock, state, connections)
                bound = {
                    state.runtime.config.name: _sockname(sock)
                    for sock, state in zip(sockets, self.listeners, strict=True)
                }
                for name, address in bound.items():
                    self.log.info("listening", listener=name, address=_format(address))
                self.log.info("admin listening", address=_format(admin_address))
                if self.state is State.STARTING:
                    self.state = State.SERVING
                task_status.started(BoundAddresses(listeners=bound, admin=admin_address))
                await self._drain_requested.wait()
                accepting.cancel_scope.cancel()
            for sock in sockets:
                sock.close()
            await self._drain()

    async def _drain(self) -> None:
        timeout = self.config.process.drain_timeout
        live = len(self.connections.live)
        self.log.info("draining", connections=live, drain_timeout=timeout)
        with trio.move_on_after(timeout):
            await self.connections.wait_idle()
        if self.connections.live:
            self.log.warning(
                "drain_timeout expired; closing the remaining connections",
                connections=len(self.connections.live),
            )
            self.connections.cut()

    async def _accept_loop(
        self, sock: socket.socket, state: ListenerState, nursery: trio.Nursery
    ) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, peer = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _TRANSIENT_ERRNOS:
                        continue
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    await self._back_off(state, exc)
                    break
                runtime = state.runtime
                if state.active >= runtime.config.max_connections:
                    conn.close()
                    runtime.metrics.rejected("max_connections")
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(handle_connection, conn, peer, state, self.connections)

    async def _back_off(self, state: ListenerState, exc: OSError) -> None:
        state.runtime.metrics.rejected("fd_exhausted")
        self.log.error(
            "cannot accept: out of file descriptors or memory; raise the fd limit "
            "(ulimit -n) or lower max_connections",
            listener=state.runtime.config.name,
            error=str(exc),
        )
        await trio.sleep(ACCEPT_BACKOFF)


def _bind(address: Address, what: str) -> socket.socket:
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address.host or None,
            address.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {address} ({what}): {exc.strerror}") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = " (is another process using it?)" if exc.errno == errno.EADDRINUSE else ""
        raise StartupError(f"cannot listen on {address} ({what}): {exc.strerror}{hint}") from exc
    return sock


def _sockname(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return (str(name[0]), int(name[1]))


def _format(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
