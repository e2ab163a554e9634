"""The listening sockets and the accept loops: bind, accept, hand over.

One accept loop per listening socket takes connections in batches, holds
each listener's max_connections, and hands every accepted socket to
`handle_connection`. Out of descriptors, the spare descriptor (`Reserve`)
lets a loop still take a pending connection, to close it at once. Nothing
here knows about reload or drain: the server starts and cancels the loops.
"""

from __future__ import annotations

import errno
import os
import socket
from contextlib import suppress
from dataclasses import dataclass, field

import trio

from proxy.config import Address
from proxy.connection import ConnectionSet, ListenerState, handle_connection
from proxy.log import Logger

# Pending connections the kernel queues per listener before refusing SYNs.
# Matches the Linux default somaxconn of 4096 (since 5.4); HAProxy uses the
# same order of magnitude.
LISTEN_BACKLOG = 4096

# Connections accepted per wakeup before yielding to other tasks, so a burst
# of connects neither starves established connections nor costs one epoll
# round trip per accept.
ACCEPT_BATCH = 64

# Seconds to pause accepting when the kernel is out of memory for sockets, or
# the process out of file descriptors without its spare one (see Reserve);
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


@dataclass(eq=False)
class Listener:
    """A bound listening socket, its accept loop's scope, and its runtime."""

    state: ListenerState
    sock: socket.socket
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def name(self) -> str:
        return self.state.runtime.config.name


class Acceptor:
    """The accept loops of one process: they share its connection set and its
    spare descriptor, and log an exhaustion episode once."""

    def __init__(self, connections: ConnectionSet, reserve: Reserve, log: Logger) -> None:
        self.connections = connections
        self._reserve = reserve
        self.log = log

    async def accept_loop(
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


class Reserve:
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


def release(listener: Listener) -> None:
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


def sockname(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return (str(name[0]), int(name[1]))
