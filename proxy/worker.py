"""A worker's side of workers > 1: its end of the control link, its settings.

The link is one end of a socketpair the supervisor (proxy/workers.py, whose
docstring tells the whole story) hands each worker: the worker writes
`ready` once it accepts and one answer per reload; EOF from the supervisor
means it died, and the worker drains.
"""

from __future__ import annotations

import socket
import warnings
from collections.abc import Iterable
from contextlib import suppress

import trio

from proxy.config import Address, Config
from proxy.log import Logger
from proxy.server import Server

READY = b"ready\n"
# A worker's answer to each SIGHUP, on the same link: the supervisor counts
# one reload per SIGHUP (or file change), not one per worker.
RELOADED = b"reloaded\n"
RELOAD_REJECTED = b"reload rejected\n"


class SupervisorLink:
    """A worker's end of its socketpair with the supervisor."""

    def __init__(self, fd: int) -> None:
        self._sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))

    async def report_ready(self) -> None:
        await self._sock.send(READY)

    async def report_reload(self, ok: bool) -> None:
        with suppress(OSError):  # the supervisor is gone: drain_when_gone sees to that
            await self._sock.send(RELOADED if ok else RELOAD_REJECTED)

    async def drain_when_gone(self, server: Server, log: Logger) -> None:
        """The supervisor never writes: EOF means it died. Drain then, so no
        worker outlives it (nobody would restart or stop it)."""
        with self._sock:
            while await self._sock.recv(64):
                pass
        log.warning("the supervisor is gone; draining")
        server.request_drain()


def prepare_worker() -> None:
    """Process-wide settings of a worker, before its Server is built."""
    # runtime.export_certificates clears the expiry gauge before setting it;
    # multiprocess files cannot forget a series, so a subject removed by a
    # reload keeps its last value until the worker exits (README, Workers).
    warnings.filterwarnings(
        "ignore", "Clearing labels has not been implemented", UserWarning, "prometheus_client"
    )


def inherited_listeners(fds: Iterable[int]) -> dict[Address, socket.socket]:
    """The unix listeners the supervisor bound, by their address (each socket
    knows its own path)."""
    sockets = [socket.socket(fileno=fd) for fd in fds]
    return {Address("", 0, str(sock.getsockname())): sock for sock in sockets}


def pin_ports(config: Config, pins: Iterable[str]) -> Config:
    """Give each `NAME=PORT` pin's listener that port where the config says 0.

    The supervisor resolved port 0 once for all workers; every load in a
    worker, at start and on reload, must agree with it, or a reload would see
    a changed address and move the listener to a fresh port of its own.
    """
    ports = {name: int(port) for name, _, port in (pin.partition("=") for pin in pins)}
    if not ports:
        return config
    listeners = tuple(
        listener.model_copy(update={"listen": Address(listener.listen.host, ports[listener.name])})
        if listener.listen.port == 0 and listener.name in ports
        else listener
        for listener in config.listeners
    )
    return config.model_copy(update={"listeners": listeners})
