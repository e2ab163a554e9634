"""Reload: build, validate, swap, or keep the running config.

A reload builds a complete new set of runtimes in a worker thread (every
file read once, every certificate parsed there), and only if all of it is
good puts it in place: binding the listeners it adds is the one step of the
swap that can fail, so it comes first. A listener whose address stays keeps
its socket and its live connections; only new handshakes see the new
runtime. The server (proxy/server.py) says whether it is serving; this is
the part of it that changes what it serves.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Mapping

import trio

from proxy.accept import (
    Listener,
    StartupError,
    bind_socket,
    bind_unix,
    close_listener,
    release,
)
from proxy.config import Address, Config, ConfigError, addresses_overlap
from proxy.connection import ListenerState
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
from proxy.socket_file import SocketFile


class Reloading:
    """`Server.reload` and the swap it makes; mixed into `Server`, whose
    state (the bound listeners, the running config) it replaces."""

    config: Config
    metrics: Metrics
    log: Logger
    _bound: dict[Address, Listener]
    _runtimes: list[ListenerRuntime]
    _reload_lock: trio.Lock
    _reuse_port: bool
    _count_reloads: bool
    _inherited: Mapping[Address, socket.socket] | None

    def _serving(self) -> bool:
        """Whether a reload may still swap: the server's lifecycle says."""
        raise NotImplementedError

    def _start_accepting(self, listener: Listener) -> None:
        """Start a bound listener's accept loop: the server's nursery runs it."""
        raise NotImplementedError

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
        kept: dict[Address, Listener] = {}
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

    def _bind_added(self, runtimes: list[ListenerRuntime]) -> dict[Address, Listener]:
        """Bind every address not bound yet (all at start-up); all or none.

        An added address that overlaps one being removed (the same port on
        another host: 127.0.0.1:P to 0.0.0.0:P) cannot be bound while the old
        socket listens, so that socket is closed first: connects to the port
        are refused for the moment in between. Should the reload fail after
        all, the old address is bound again.
        """
        wanted = {runtime.config.listen for runtime in runtimes}
        removed = {a: listener for a, listener in self._bound.items() if a not in wanted}
        self._check_inherited(wanted)
        added: dict[Address, Listener] = {}
        released: dict[Address, Listener] = {}
        try:
            for runtime in runtimes:
                address = runtime.config.listen
                if address in self._bound:
                    self._refresh_socket_file(self._bound[address], runtime)
                    continue
                for old_address, old in removed.items():
                    if old_address not in released and addresses_overlap(old_address, address):
                        release(old)
                        released[old_address] = old
                added[address] = self._bind_listener(runtime)
        except BaseException:
            for listener in added.values():
                close_listener(listener)
            for old_address, old in released.items():
                self._restore(old_address, old)
            raise
        return added

    def _bind_listener(self, runtime: ListenerRuntime) -> Listener:
        """A new listener's socket: bound here, or a worker's unix socket as
        the supervisor bound it."""
        config = runtime.config
        address, what = config.listen, f"listener {config.name!r}"
        state = ListenerState(runtime)
        if address.unix_path is None:
            return Listener(state, bind_socket(address, what, reuse_port=self._reuse_port))
        if self._inherited is not None:
            try:
                socket_file = SocketFile.at(address.unix_path, owned=False)  # the supervisor's
            except OSError as exc:
                raise StartupError(f"cannot listen on {address} ({what}): {exc.strerror}") from exc
            return Listener(state, self._inherited[address], socket_file=socket_file)
        sock, socket_file = bind_unix(
            address, what, config.socket_mode, config.listen_owner, self.log
        )
        return Listener(state, sock, socket_file=socket_file)

    def _check_inherited(self, wanted: set[Address]) -> None:
        """A worker's unix listeners are the supervisor's sockets, bound at
        start: a reload may not add, move or remove one (StartupError)."""
        if self._inherited is None:
            return
        unix = {address for address in wanted if address.unix_path is not None}
        if unix != set(self._inherited):
            changed = ", ".join(sorted(str(a) for a in unix ^ set(self._inherited)))
            raise StartupError(
                "with workers > 1 the unix listeners are bound by the supervisor at start: "
                f"adding, moving or removing one needs a restart ({changed})"
            )

    def _refresh_socket_file(self, listener: Listener, runtime: ListenerRuntime) -> None:
        """A kept unix listener's file takes the reloaded mode and owner."""
        config, socket_file = runtime.config, listener.socket_file
        if socket_file is None:
            return
        try:
            socket_file.apply(config.socket_mode, config.listen_owner)
        except OSError as exc:
            raise StartupError(
                f"cannot set the mode or owner of {config.listen} "
                f"(listener {config.name!r}): {exc.strerror}"
            ) from exc

    def _restore(self, address: Address, released: Listener) -> None:
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
        restored = Listener(released.state, sock)
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
