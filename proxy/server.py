"""The daemon's lifecycle: start, serve, drain, stop; `Server` is its entry point.

Lifecycle is an explicit state: starting -> serving -> draining -> stopped.
Draining is terminal. `/readyz` reads it, so a load balancer stops sending
new clients before the listeners close.

Drain, in order: mark draining (readyz 503); keep accepting for
`drain_delay` seconds, serving new connections normally, so that a load
balancer that polls /readyz (a Kubernetes Service's endpoints) has stopped
sending new clients before anyone is refused; then stop the accept loops and
close the listening sockets (new connects are refused by the kernel), give
live connections `drain_timeout` to finish on their own, then cancel the
rest; each cut connection gets a close_notify and logs `close_reason=drain`.
A second stop signal during any of this exits at once. A reload is ignored
once draining has begun, including one whose build was already running.

With `workers > 1` each worker process runs one Server without the admin
endpoint (`run_listeners`), its listeners bound with SO_REUSEPORT; the
supervisor in proxy/workers.py serves the admin endpoint for all of them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import trio

from proxy.accept import (
    Acceptor,
    Listener,
    Reserve,
    StartupError,
    bind_socket,
    close_listener,
    sockname,
)
from proxy.admin import Admin
from proxy.config import Address, Config, format_sockaddr
from proxy.connection import ConnectionSet, ListenerState
from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.reload import Reloading
from proxy.runtime import build_runtimes, certificate_expiries, export_certificates, export_limits


class State(StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class BoundAddresses:
    """What `Server.run` reports once serving; tests bind port 0 and read this.
    A unix listener's is (path, 0)."""

    listeners: dict[str, tuple[str, int]]
    admin: tuple[str, int]


class Server(Reloading):
    """The daemon: admin endpoint, one accept loop per listener, reload and drain."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        log: Logger,
        *,
        reuse_port: bool = False,
        admin: bool = True,
        count_reloads: bool = True,
        inherited: Mapping[Address, socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self._reuse_port = reuse_port  # a worker: the port is shared with the other workers
        self._with_admin = admin  # False in a worker: the supervisor serves the admin endpoint
        # False in a worker: it tells the supervisor, which counts the daemon's reloads
        self._count_reloads = count_reloads
        # A worker's unix listeners, bound by the supervisor (None: not a worker)
        self._inherited = inherited
        self._is_bound = False
        self.state = State.STARTING
        self.connections = ConnectionSet()
        self._drain_requested = trio.Event()
        self._reload_lock = trio.Lock()
        self._runtimes = build_runtimes(config, metrics, log)
        export_certificates(certificate_expiries(config), metrics)
        export_limits(config, metrics)
        self._bound: dict[Address, Listener] = {}
        self._admin_socket: socket.socket | None = None
        self._accepting: trio.Nursery | None = None  # accept loops; None once draining
        self._handlers: trio.Nursery | None = None  # connection handlers
        self._reserve = Reserve()
        self._acceptor = Acceptor(self.connections, self._reserve, log)

    @property
    def listeners(self) -> list[ListenerState]:
        """The listeners now accepting, in config order."""
        return [listener.state for listener in self._bound.values()]

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
        if self._is_bound:
            return
        self._bound = self._bind_added(self._runtimes)
        if self._with_admin:
            try:
                self._admin_socket = bind_socket(self.config.admin.listen, "admin")
            except StartupError:
                for listener in self._bound.values():
                    close_listener(listener)
                raise
        self._reserve.open()
        self._is_bound = True

    def listen_ports(self) -> dict[str, int]:
        """Each listener's bound port (after `bind`), e.g. when 0 was asked for."""
        return {listener.name: sockname(listener.sock)[1] for listener in self._bound.values()}

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

                def started(listeners: dict[str, tuple[str, int]]) -> None:
                    task_status.started(BoundAddresses(listeners=listeners, admin=admin_address))

                await self._serve(admin_address, started)
                services.cancel_scope.cancel()
        finally:
            for listener in self._bound.values():
                close_listener(listener)
            self._admin_socket.close()
            self._reserve.close()
        self.state = State.STOPPED
        self.log.info("stopped")

    async def run_listeners(
        self,
        *,
        task_status: trio.TaskStatus[dict[str, tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """`run` without the admin endpoint, for a worker process: serve until
        drained; report each listener's bound address once accepting."""
        self.bind()
        try:
            await self._serve(None, task_status.started)
        finally:
            for listener in self._bound.values():
                close_listener(listener)
            self._reserve.close()
        self.state = State.STOPPED
        self.log.info("stopped")

    async def _serve(
        self,
        admin_address: tuple[str, int] | None,
        started: Callable[[dict[str, tuple[str, int]]], None],
    ) -> None:
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            services = trio.CancelScope()  # the idle watch and the parking lot
            handlers.start_soon(self._watch_idle, services, handlers)
            async with trio.open_nursery() as accepting:
                self._accepting = accepting
                for listener in self._bound.values():
                    self._start_accepting(listener)
                if admin_address is not None:
                    self.log.info("admin listening", address=format_sockaddr(admin_address))
                if self.state is State.STARTING:
                    self.state = State.SERVING
                started({b.name: sockname(b.sock) for b in self._bound.values()})
                await self._drain_requested.wait()
                await self._drain_delay()
                self._accepting = None
                accepting.cancel_scope.cancel()
            await self._drain()
            services.cancel()

    async def _watch_idle(self, scope: trio.CancelScope, handlers: trio.Nursery) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.connections.lot.run, handlers)
                await self.connections.idle.run()

    def _start_accepting(self, listener: Listener) -> None:
        self.log.info(
            "listening",
            listener=listener.name,
            address=format_sockaddr(listener.sock.getsockname()),
        )

        handlers = self._handlers
        assert handlers is not None

        async def accept() -> None:
            sock = listener.sock
            try:
                with listener.scope:
                    await self._acceptor.accept_loop(sock, listener.state, handlers)
            except (OSError, trio.ClosedResourceError):
                if sock.fileno() != -1:
                    raise
                # closed under the loop by a reload that moved the address (release)
            finally:
                close_listener(listener)  # refuse new connects; live ones are unaffected

        assert self._accepting is not None
        self._accepting.start_soon(accept)

    def _serving(self) -> bool:
        return self.state is State.SERVING and self._accepting is not None

    async def _drain_delay(self) -> None:
        delay = self.config.process.drain_delay
        if delay > 0:
            self.log.info("not ready; the listeners close after drain_delay", drain_delay=delay)
            await trio.sleep(delay)

    async def _drain(self) -> None:
        timeout = self.config.process.drain_timeout
        self.log.info("draining", connections=len(self.connections), drain_timeout=timeout)
        with trio.move_on_after(timeout):
            await self.connections.wait_idle()
        if self.connections:
            self.log.warning(
                "drain_timeout expired; closing the remaining connections",
                connections=len(self.connections),
            )
            self.connections.cut()
