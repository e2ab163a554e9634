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
import stat
from contextlib import suppress
from dataclasses import dataclass, field

import trio

from proxy.config import Address, SocketOwner
from proxy.connection import ConnectionSet, ListenerState, handle_connection
from proxy.log import Logger
from proxy.socket_file import SocketFile

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

STALE_REMOVED_EVENT = "removed a stale socket file (nothing listened on it)"

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
    socket_file: SocketFile | None = None  # a unix listener's file, removed on close

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
        tcp = sock.family != socket.AF_UNIX  # Nagle is a TCP matter
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
                if tcp:
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
    close_listener(listener)


def close_listener(listener: Listener) -> None:
    """Close the listening socket (new connects are refused; live connections
    are unaffected) and remove its unix socket file if it is still ours."""
    listener.sock.close()
    if listener.socket_file is not None:
        listener.socket_file.remove()


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


def bind_unix(
    address: Address, what: str, mode: int, owner: SocketOwner | None, log: Logger
) -> tuple[socket.socket, SocketFile]:
    """A listening non-blocking unix socket, its file given `mode` and
    `owner`, or StartupError.

    A stale file (a socket nobody listens on: a daemon that was killed) is
    removed first; a live one, or anything that is not a socket, is left
    alone and refused. chmod and chown come between bind and listen: until
    listen() every connect is refused whatever the file's mode, so no client
    ever connects through the wrong permissions. (Binding a temporary name
    and renaming it into place would also be atomic, but the kernel would
    report the temporary name as the socket's address for good, and it would
    need a second name within sun_path.)
    """
    path = address.unix_path
    assert path is not None
    _clear_stale(path, what, log)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_file: SocketFile | None = None
    try:
        sock.bind(path)
        socket_file = SocketFile.at(path)
        socket_file.apply(mode, owner)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if socket_file is not None:
            socket_file.remove()
        hint = " (is another process using it?)" if exc.errno == errno.EADDRINUSE else ""
        raise StartupError(f"cannot listen on {address} ({what}): {exc.strerror}{hint}") from exc
    return sock, socket_file


def _clear_stale(path: str, what: str, log: Logger) -> None:
    """Remove a socket file nobody listens on; refuse anything else at `path`."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot listen on unix:{path} ({what}): {exc.strerror}") from exc
    if not stat.S_ISSOCK(found.st_mode):
        raise StartupError(
            f"cannot listen on unix:{path} ({what}): the path exists and is not a socket; "
            "it is left as it is: remove it or choose another path"
        )
    # Non-blocking, so a reload never waits here: a local connect answers at
    # once, refused (nobody listens: stale), accepted, or EAGAIN (a listener
    # whose backlog is full: alive).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            live = False
        except BlockingIOError:
            live = True
        except OSError as exc:
            raise StartupError(
                f"cannot listen on unix:{path} ({what}): cannot tell whether the socket "
                f"there is in use ({exc.strerror}); remove it if it is stale"
            ) from exc
        else:
            live = True
    if live:
        raise StartupError(
            f"cannot listen on unix:{path} ({what}): another process is listening "
            "on it (another tlsproxy?)"
        )
    with suppress(FileNotFoundError):  # removed meanwhile: as good
        os.unlink(path)
    log.warning(STALE_REMOVED_EVENT, address=f"unix:{path}", what=what)


def sockname(sock: socket.socket) -> tuple[str, int]:
    """(host, port); a unix socket's is (path, 0)."""
    name = sock.getsockname()
    if isinstance(name, str):
        return (name, 0)
    return (str(name[0]), int(name[1]))
