"""The supervisor's start-up (workers > 1): synchronous, all or nothing.

It checks every certificate, reserves every listener's port (a plain bind
first, then a bound, non-listening SO_REUSEPORT socket held until exit; step
1 of the story in proxy/workers.py), binds and listens on every unix
listener's socket (which the workers inherit), binds the admin port and
prepares the workers' metrics directory. Any failure is one StartupError (exit 2), with
nothing left behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from proxy.accept import StartupError, bind_socket, bind_unix
from proxy.config import Address, Config
from proxy.log import Logger
from proxy.metrics import MergedWorkers, SupervisorMetrics
from proxy.socket_file import SocketFile
from proxy.tls import build_context
from proxy.tls_upstream import build_upstream_context

METRICS_DIR_ENV = "TLSPROXY_METRICS_DIR"


class SupervisorStart:
    """`Supervisor.bind` and `close`; mixed into `Supervisor`, which holds
    what they reserve."""

    config: Config
    registry: CollectorRegistry
    metrics: SupervisorMetrics
    metrics_dir: Path | None
    _temporary_dir: bool
    _reservations: list[socket.socket]
    _unix_listeners: list[tuple[socket.socket, SocketFile]]
    log: Logger
    _admin_socket: socket.socket | None
    _pins: list[str]

    # -- start-up, synchronous: every failure is one StartupError (exit 2)

    def bind(self) -> None:
        """Check the certificates, reserve every port, bind admin, prepare the
        metrics directory; raise StartupError (or OSError / ssl.SSLError for
        certificate files) with nothing left behind."""
        try:
            for listener in self.config.listeners:
                if listener.tls is not None:
                    build_context(listener.tls)
                if listener.upstream_tls is not None:
                    build_upstream_context(listener.upstream_tls)
            self._reserve_ports()
            self._admin_socket = bind_socket(self.config.admin.listen, "admin")
            self.metrics_dir = self._prepare_metrics_dir()
        except BaseException:
            self.close()
            raise
        self.registry.register(MergedWorkers(str(self.metrics_dir), self.metrics))

    def _reserve_ports(self) -> None:
        seen: dict[Address, str] = {}
        for listener in self.config.listeners:
            address, what = listener.listen, f"listener {listener.name!r}"
            if address.unix_path is not None:
                # SO_REUSEPORT does not apply to unix sockets: bound and
                # listening here, once; every worker inherits the descriptor
                # and the kernel hands each connection to one of them.
                self._unix_listeners.append(
                    bind_unix(address, what, listener.socket_mode, listener.listen_owner, self.log)
                )
                continue
            if address.port and address in seen:
                raise StartupError(f"cannot listen on {address} ({what}): {seen[address]} does")
            seen[address] = what
            # A plain bind first: it fails wherever anyone listens.
            with bind_socket(address, what, listen=False) as probe:
                port = int(probe.getsockname()[1])
            self._reservations.append(
                bind_socket(Address(address.host, port), what, reuse_port=True, listen=False)
            )
            if address.port == 0:
                self._pins.append(f"{listener.name}={port}")

    def _prepare_metrics_dir(self) -> Path:
        configured = os.environ.get(METRICS_DIR_ENV)
        if not configured:
            self._temporary_dir = True
            return Path(tempfile.mkdtemp(prefix="tlsproxy-metrics-"))
        path = Path(configured)
        try:
            path.mkdir(parents=True, exist_ok=True)
            for stale in path.glob("*.db"):  # a previous run's workers: not ours to merge
                stale.unlink()
        except OSError as exc:
            raise StartupError(
                f"cannot use {METRICS_DIR_ENV}={configured} for the workers' metrics: "
                f"{exc.strerror}; point it at a writable directory"
            ) from exc
        return path

    def close_unix_listeners(self) -> None:
        """Close our copies of the unix listeners (draining: once the workers
        close theirs, connects are refused), keeping the files until `close`."""
        for sock, _ in self._unix_listeners:
            sock.close()

    def close(self) -> None:
        for sock in self._reservations:
            sock.close()
        self.close_unix_listeners()
        for _, socket_file in self._unix_listeners:
            socket_file.remove()
        if self._admin_socket is not None:
            self._admin_socket.close()
        if self._temporary_dir and self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
