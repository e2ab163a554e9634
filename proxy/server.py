"""Listeners, the accept loops, and the daemon's lifecycle.

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

import errno
import os
import socket
import ssl
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from enum import StrEnum

import trio

from proxy.admin import Admin
from proxy.config import Address, Config, ConfigError, addresses_overlap, format_sockaddr
from proxy.connection import ConnectionSet, ListenerState, handle_connection
from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.runtime import (
    Expiries,
    ListenerRuntime,
    build_runtimes,
    certificate_expiries,
    export_certificates,
    export_limits,
)

# Pending connections the kernel queues per listener before refusing SYNs.
# Matches the Linux default somaxconn of 4096 (since 5.4); HAProxy uses the
# same order of magnitude.
LISTEN_BACKLOG = 4096

# Connections accepted per wakeup before yielding to other tasks, so a burst
# of connects neither starves established connections nor costs one epoll
# round trip per accept.
ACCEPT_BATCH = 64

# Seconds to pause accepting when the kernel is out of memory for sockets, or
# the process out of file descriptors without its spare one (see _Reserve);
# live connections keep being served and free descriptors as they close
# (trio's serve_listeners uses the same pause).
ACCEPT_BACKOFF = 0.1

EXHAUSTED_EVENT = (
    "cannot accept: out of file descriptors or memory; refusing new connections "
    "until connections close; raise the fd limit (ulimit -n) or lower max_connections"
)

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Out of descriptors: the reserve descriptor lets us accept one to close it.
_DESCRIPTOR_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
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


@dataclass(eq=False)
class _Listener:
    """A bound listening socket, its accept loop's scope, and its runtime."""

    state: ListenerState
    sock: socket.socket
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def name(self) -> str:
        return self.state.runtime.config.name


class Server:
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
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self._reuse_port = reuse_port  # a worker: the port is shared with the other workers
        self._with_admin = admin  # False in a worker: the supervisor serves the admin endpoint
        # False in a worker: it tells the supervisor, which counts the daemon's reloads
        self._count_reloads = count_reloads
        self._is_bound = False
        self.state = State.STARTING
        self.connections = ConnectionSet()
        self._drain_requested = trio.Event()
        self._reload_lock = trio.Lock()
        self._runtimes = build_runtimes(config, metrics, log)
        export_certificates(certificate_expiries(config), metrics)
        export_limits(config, metrics)
        self._bound: dict[Address, _Listener] = {}
        self._admin_socket: socket.socket | None = None
        self._accepting: trio.Nursery | None = None  # accept loops; None once draining
        self._handlers: trio.Nursery | None = None  # connection handlers
        self._reserve = _Reserve()

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
                    listener.sock.close()
                raise
        self._reserve.open()
        self._is_bound = True

    def listen_ports(self) -> dict[str, int]:
        """Each listener's bound port (after `bind`), e.g. when 0 was asked for."""
        return {listener.name: _sockname(listener.sock)[1] for listener in self._bound.values()}

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
                listener.sock.close()
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
                listener.sock.close()
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
            idle_watch = trio.CancelScope()
            handlers.start_soon(self._watch_idle, idle_watch)
            async with trio.open_nursery() as accepting:
                self._accepting = accepting
                for listener in self._bound.values():
                    self._start_accepting(listener)
                if admin_address is not None:
                    self.log.info("admin listening", address=format_sockaddr(admin_address))
                if self.state is State.STARTING:
                    self.state = State.SERVING
                started({b.name: _sockname(b.sock) for b in self._bound.values()})
                await self._drain_requested.wait()
                await self._drain_delay()
                self._accepting = None
                accepting.cancel_scope.cancel()
            await self._drain()
            idle_watch.cancel()

    async def _watch_idle(self, scope: trio.CancelScope) -> None:
        with scope:
            await self.connections.idle.run()

    def _start_accepting(self, listener: _Listener) -> None:
        self.log.info(
            "listening", listener=listener.name, address=format_sockaddr(_sockname(listener.sock))
        )

        handlers = self._handlers
        assert handlers is not None

        async def accept() -> None:
            sock = listener.sock
            try:
                with listener.scope:
                    await self._accept_loop(sock, listener.state, handlers)
            except (OSError, trio.ClosedResourceError):
                if sock.fileno() != -1:
                    raise
                # closed under the loop by a reload that moved the address (_release)
            finally:
                sock.close()  # refuse new connects; live ones are unaffected

        assert self._accepting is not None
        self._accepting.start_soon(accept)

    async def reload(self, load: Callable[[], Config], *, trigger: str) -> bool:
        """Build, validate, swap: the new config serves new connections only if
        all of it is good; otherwise the old one keeps serving. Never raises.

        A stop signal can arrive while the new config is being built (in a
        thread): the drain has then begun, and the finished build is dropped.
        """
        async with self._reload_lock:
            if not self._serving():
                self.log.warning("reload ignored: not serving", trigger=trigger)
                return False
            try:
                config, runtimes, expiries = await trio.to_thread.run_sync(self._build, load)
            except ConfigError as exc:
                self._reload_failed(trigger, list(exc.errors))
                return False
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._reload_failed(trigger, [str(exc)])
                return False
            except Exception as exc:  # a bug in a build step: logged with its traceback
                self._reload_failed(trigger, [f"unexpected {type(exc).__name__}: {exc}"], exc)
                return False
            if not self._serving():
                self.log.warning("reload ignored: draining", trigger=trigger)
                return False
            try:
                self._swap(config, runtimes, expiries)
            except StartupError as exc:
                self._reload_failed(trigger, [str(exc)])
                return False
            if self._count_reloads:
                self.metrics.config_reloads.labels("success").inc()
            self.log.info("config reloaded", trigger=trigger, listeners=len(runtimes))
            for warning in config.warnings:  # as at start: an expired CRL, say, at every reload
                self.log.warning("config warning", detail=warning)
            return True

    def _serving(self) -> bool:
        return self.state is State.SERVING and self._accepting is not None

    def _build(self, load: Callable[[], Config]) -> tuple[Config, list[ListenerRuntime], Expiries]:
        """Runs in a worker thread: every file read and all certificate parsing
        happen here, off the event loop, and each file is read once (by `load`)."""
        config = load()
        runtimes = build_runtimes(config, self.metrics, self.log)
        return config, runtimes, certificate_expiries(config)

    def _swap(self, config: Config, runtimes: list[ListenerRuntime], expiries: Expiries) -> None:
        """Put a built config in place. Binding the new addresses is the one
        step that can fail (StartupError), so it comes first and, failing,
        leaves the listeners as they were; the rest does no I/O."""
        added = self._bind_added(runtimes)
        wanted = {runtime.config.listen: runtime for runtime in runtimes}
        kept: dict[Address, _Listener] = {}
        for address, listener in self._bound.items():
            if address in wanted:
                listener.state.runtime = wanted[address]  # new handshakes only
                kept[address] = listener
            else:
                self.log.info("listener removed; its connections finish", listener=listener.name)
                listener.scope.cancel()
        self._bound = {**kept, **added}
        for listener in added.values():
            self._start_accepting(listener)
        if config.admin.listen != self.config.admin.listen:
            self.log.warning("admin.listen changed; restart to move the admin endpoint")
        self.config = config
        self._runtimes = runtimes
        export_certificates(expiries, self.metrics)
        export_limits(config, self.metrics)

    def _bind_added(self, runtimes: list[ListenerRuntime]) -> dict[Address, _Listener]:
        """Bind every address not bound yet (all at start-up); all or none.

        An added address that overlaps one being removed (the same port on
        another host: 127.0.0.1:P to 0.0.0.0:P) cannot be bound while the old
        socket listens, so that socket is closed first: connects to the port
        are refused for the moment in between. Should the reload fail after
        all, the old address is bound again.
        """
        wanted = {runtime.config.listen for runtime in runtimes}
        removed = {a: listener for a, listener in self._bound.items() if a not in wanted}
        added: dict[Address, _Listener] = {}
        released: dict[Address, _Listener] = {}
        try:
            for runtime in runtimes:
                address = runtime.config.listen
                if address in self._bound:
                    continue
                for old_address, old in removed.items():
                    if old_address not in released and addresses_overlap(old_address, address):
                        _release(old)
                        released[old_address] = old
                sock = bind_socket(
                    address, f"listener {runtime.config.name!r}", reuse_port=self._reuse_port
                )
                added[address] = _Listener(ListenerState(runtime), sock)
        except BaseException:
            for listener in added.values():
                listener.sock.close()
            for old_address, old in released.items():
                self._restore(old_address, old)
            raise
        return added

    def _restore(self, address: Address, released: _Listener) -> None:
        """Listen on a released listener's address again after a failed reload."""
        try:
            sock = bind_socket(address, f"listener {released.name!r}", reuse_port=self._reuse_port)
        except StartupError as exc:
            del self._bound[address]
            self.log.error(
                "listener lost its address; restart the daemon to serve it again",
                listener=released.name,
                error=str(exc),
            )
            return
        restored = _Listener(released.state, sock)
        self._bound[address] = restored
        self._start_accepting(restored)

    def _reload_failed(
        self, trigger: str, errors: list[str], unexpected: Exception | None = None
    ) -> None:
        if self._count_reloads:
            self.metrics.config_reloads.labels("failure").inc()
        for error in errors:
            self.log.error(
                "reload rejected; the previous config keeps serving",
                trigger=trigger,
                error=error,
                exc_info=unexpected,
            )

    async def _drain_delay(self) -> None:
        delay = self.config.process.drain_delay
        if delay > 0:
            self.log.info("not ready; the listeners close after drain_delay", drain_delay=delay)
            await trio.sleep(delay)

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
        exhausted = False  # inside an episode of EMFILE/ENFILE/ENOMEM: log it once
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
                    if exc.errno in _DESCRIPTOR_ERRNOS and self._reserve.ready:
                        if not self._reserve.refuse_one(sock):
                            # Nobody was waiting: Linux claims the descriptor
                            # before it looks at the queue, so an accept after
                            # the last one was taken says EMFILE regardless.
                            break
                        if not exhausted:
                            self._exhausted(state, exc)
                            exhausted = True
                        state.runtime.metrics.rejected("fd_exhausted")
                        continue
                    if not exhausted:
                        self._exhausted(state, exc)
                        exhausted = True
                    await trio.sleep(ACCEPT_BACKOFF)  # nothing to refuse with: wait
                    self._reserve.open()
                    break
                if exhausted:
                    self.log.info("accepting again", listener=state.runtime.config.name)
                    exhausted = False
                runtime = state.runtime
                if state.active >= runtime.config.max_connections:
                    conn.close()
                    runtime.metrics.rejected("max_connections")
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Counted here, not when the handler task first runs: the tasks
                # of one accept burst start only after the burst, and the
                # limit must already hold within it. The handler releases it.
                state.active += 1
                nursery.start_soon(handle_connection, conn, peer, state, self.connections)

    def _exhausted(self, state: ListenerState, exc: OSError) -> None:
        """One log line per episode, however long it lasts and however many
        connections it refuses (each of those is counted)."""
        self.log.error(
            EXHAUSTED_EVENT,
            listener=state.runtime.config.name,
            error=str(exc),
        )


class _Reserve:
    """One spare descriptor (on /dev/null), so that out of descriptors the
    process can still accept a pending connection, to close it at once: the
    client learns right away, and is counted, instead of waiting in the backlog
    for a descriptor that may not come. The accept loops run on one thread and
    use the reserve synchronously, so one serves every listener.
    """

    def __init__(self) -> None:
        self._fd: int | None = None

    @property
    def ready(self) -> bool:
        return self._fd is not None

    def open(self) -> None:
        """(Re)open the spare; out of descriptors still, try again later."""
        if self._fd is None:
            with suppress(OSError):
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def refuse_one(self, sock: socket.socket) -> bool:
        """Accept one pending connection with the spare descriptor and close
        it; False when no connection could be taken (none was pending)."""
        self.close()
        try:
            conn, _ = sock.accept()
        except OSError:  # nothing pending after all, or the descriptor went elsewhere
            return False
        else:
            conn.close()
            return True
        finally:
            self.open()


def _release(listener: _Listener) -> None:
    """Stop a listener and close its socket now, not when its accept task next
    runs, so that its port can be bound again at once."""
    listener.scope.cancel()
    trio.lowlevel.notify_closing(listener.sock)
    listener.sock.close()


def bind_socket(
    address: Address, what: str, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A bound (and unless told otherwise listening) non-blocking socket, or StartupError."""
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
        if reuse_port:
            # WARNING: any process of the same user may then bind this port
            # too and take a share of its connections; the supervisor checks
            # with a plain bind first that nobody else listens there.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        if listen:
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
