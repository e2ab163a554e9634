"""Connect to the backend, send the PROXY header, and say in one word why it
failed when it does.

Theory of operation
-------------------

The reasons are a metric label (`backend_connect_failures_total{reason}`), so
the vocabulary is small and fixed: `refused` (nothing listens: the app is
down or still starting), `timeout` (no answer within `connect_timeout`),
`unreachable` (no route, or any other socket error), `resolve` (the name
did not resolve), `fd_exhausted` (the proxy is out of file descriptors and
could not even open the socket: its limit, not the app, is the problem).

An IP literal or a Unix path is worked out once per backend. A name goes
through `proxy.resolver`, which keeps each answer for a few seconds and
shares one lookup among the connections that need it meanwhile.

A name may resolve to several addresses (`localhost` is often ::1 and
127.0.0.1, and the app listens on only one; a name may list an address that
is down). Trying them strictly in turn lets one silent address (a dropped
SYN, a dead host) use up the whole `connect_timeout`, so they are raced as
RFC 8305 (Happy Eyeballs v2) does: the families interleaved, the first
attempt started at once and each further one `CONNECTION_ATTEMPT_DELAY`
after the previous one started, or as soon as it failed, while the earlier
ones go on. The first connection to complete wins; the other attempts are
cancelled and their sockets closed. The attempts are tasks of one nursery
under the one `connect_timeout`; when all have failed, the last failure is
the reason. A single address is connected to directly, with no nursery.

The PROXY header (if any) is written to the winner only (a loser's backend
sees a connection close, never a header without its client), as part of
the connect, under the same deadline: a backend that accepts but never
reads is a backend that did not answer.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import os
import socket
from collections.abc import Sequence

import trio

from proxy import proxy_protocol, resolver
from proxy.config import Address, format_sockaddr
from proxy.identity import Identity
from proxy.resolver import Sockaddr, Target
from proxy.tlsio import TLSConn

# Seconds an attempt to one address gets before the next address is tried
# beside it: RFC 8305's recommended Connection Attempt Delay (section 5).
# Over loopback or a cluster network a connect that works completes in well
# under a millisecond, so a working first address always wins; a silent one
# costs a quarter of a second instead of all of `connect_timeout`.
CONNECTION_ATTEMPT_DELAY = 0.25

# A Unix-socket connect fails at once with these when the socket file exists
# but nobody accepts (ECONNREFUSED), does not exist yet (ENOENT: the app has
# not started), or its accept queue is full (EAGAIN: the app is not keeping
# up). The application is not taking connections in all three cases.
_REFUSED_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN})

# socket() failing with these: the process (EMFILE) or the whole system
# (ENFILE) has no descriptor left for the backend socket.
_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


# The log line of a failed connect: where to look, by reason. Out of
# descriptors, the application is fine and the proxy's own limit is what
# needs raising (or its load lowering).
BACKEND_DOWN_EVENT = "backend connect failed; is the application listening?"
FD_EXHAUSTED_EVENT = (
    "backend connect failed: out of file descriptors; raise the descriptor limit "
    "(ulimit -n, systemd LimitNOFILE) or lower max_connections"
)


class BackendConnectError(Exception):
    """The backend could not be reached; `reason` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def event(self) -> str:
        """The message to log: what to do about it."""
        return FD_EXHAUSTED_EVENT if self.reason == "fd_exhausted" else BACKEND_DOWN_EVENT


async def connect(
    address: Address,
    timeout: float,  # noqa: ASYNC109 - a timeout is a failure reason to report
    preamble: bytes = b"",
) -> socket.socket:
    """A non-blocking connection to the backend, `preamble` already written,
    within `timeout` seconds."""
    with trio.move_on_after(timeout):
        targets = _literal_targets(address) or await _resolve(address)
        if len(targets) == 1:
            family, sockaddr = targets[0]
            sock = await _open(family, sockaddr)
        else:
            sock, sockaddr = await _race(interleave(targets))
        try:
            await _send_all(sock, sockaddr, preamble)
        except BaseException:
            sock.close()
            raise
        return sock
    raise BackendConnectError("timeout", f"no answer from {address} within {timeout:g} s")


def proxy_header(
    version: proxy_protocol.Version,
    client: socket.socket,
    tls: TLSConn | None,
    peer: object,
    *,
    identity: Identity | None = None,
    sni: str | None = None,
) -> bytes:
    """The PROXY header for a client at `peer` (a socket address), accepted
    on `client`, that completed the handshake on `tls` (None: a plaintext
    client, no TLS facts).

    `peer` is the address from accept: `getpeername()` fails once the client
    has reset, while the local address of the accepted socket stays known.
    `sni` is the name the client's hello asked for.
    `identity` is the identity of the client's certificate, read once by the
    connection: with `client_auth` optional or require, a certificate that
    fails verification fails the handshake, so after a successful one a
    certificate is a verified one (on a resumed session, the one verified
    when the session began). The TLVs carry its first subject CN, as
    HAProxy sends it, and its SPIFFE ID when it has exactly one.
    """
    local = client.getsockname()
    facts = None if tls is None else _tls_facts(tls, identity, sni)
    return proxy_protocol.encode(version, _ip_endpoint(peer), _ip_endpoint(local), facts)


def _tls_facts(tls: TLSConn, identity: Identity | None, sni: str | None) -> proxy_protocol.TLSFacts:
    engine = tls.engine
    cipher = engine.cipher()
    return proxy_protocol.TLSFacts(
        version=engine.version(),
        cipher=cipher[0] if cipher else None,
        alpn=engine.selected_alpn_protocol(),
        sni=sni,
        client_cn=identity.cn[0] if identity is not None and identity.cn else None,
        client_spiffe_id=identity.spiffe_id() if identity is not None else None,
        resumed=bool(engine.session_reused),
    )


def _ip_endpoint(sockaddr: object) -> tuple[str, int] | None:
    """(host, port) of an IP socket address; None for a unix one (a path, or
    '' for an unnamed client), which a PROXY header cannot carry."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return (str(sockaddr[0]), int(sockaddr[1]))
    return None


@functools.lru_cache(maxsize=1024)
def _literal_targets(address: Address) -> tuple[Target, ...]:
    """Where an address needs no resolver (a path or an IP literal), worked
    out once per backend instead of once per connection; else ()."""
    if address.unix_path is not None:
        return ((socket.AF_UNIX, address.unix_path),)
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return ()
    if ip.version == 6:
        return ((socket.AF_INET6, (address.host, address.port, 0, 0)),)
    return ((socket.AF_INET, (address.host, address.port)),)


async def _resolve(address: Address) -> tuple[Target, ...]:
    try:
        return await resolver.cache().resolve(address.host, address.port)
    except resolver.ResolveError as exc:
        raise BackendConnectError("resolve", str(exc)) from exc


def interleave(targets: Sequence[Target]) -> list[Target]:
    """The addresses in the resolver's order, but alternating between address
    families, starting with the first one's (RFC 8305 section 4): a family
    that does not work on this host (IPv6 without a route) then delays the
    other by one attempt, not by all of its addresses."""
    first = targets[0][0]
    same = [target for target in targets if target[0] == first]
    other = [target for target in targets if target[0] != first]
    out: list[Target] = []
    for pair in itertools.zip_longest(same, other):
        out.extend(target for target in pair if target is not None)
    return out


async def _race(targets: Sequence[Target]) -> tuple[socket.socket, Sockaddr]:
    """The first of `targets` to connect, the attempts staggered by
    CONNECTION_ATTEMPT_DELAY; raises the last failure if none connects."""
    winner: tuple[socket.socket, Sockaddr] | None = None
    error: BackendConnectError | None = None

    async def attempt(family: socket.AddressFamily, sockaddr: Sockaddr, failed: trio.Event) -> None:
        nonlocal winner, error
        try:
            sock = await _open(family, sockaddr)
        except BackendConnectError as exc:
            error = exc
            failed.set()
            return
        if winner is None:
            winner = (sock, sockaddr)
            nursery.cancel_scope.cancel()
        else:  # connected in the same scheduler batch as the winner
            sock.close()

    try:
        async with trio.open_nursery() as nursery:
            for family, sockaddr in targets:
                failed = trio.Event()
                nursery.start_soon(attempt, family, sockaddr, failed)
                with trio.move_on_after(CONNECTION_ATTEMPT_DELAY):
                    await failed.wait()
    except BaseException:  # the deadline passed just as one connected
        if winner is not None:
            winner[0].close()
        raise
    if winner is not None:
        return winner
    assert error is not None  # every attempt ended, and none connected
    raise error


async def _open(family: socket.AddressFamily, sockaddr: Sockaddr) -> socket.socket:
    try:
        # Non-blocking from birth: no separate system call to make it so.
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:
        reason = "fd_exhausted" if exc.errno in _FD_ERRNOS else "unreachable"
        raise BackendConnectError(reason, f"cannot open a socket: {exc.strerror}") from exc
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await _connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(sock: socket.socket, sockaddr: Sockaddr) -> None:
    err = sock.connect_ex(sockaddr)
    if err == errno.EINPROGRESS:
        if _connected(sock):
            err = 0
        else:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise BackendConnectError(_reason(err), f"{format_sockaddr(sockaddr)}: {os.strerror(err)}")


def _connected(sock: socket.socket) -> bool:
    """Whether a connect that said EINPROGRESS has in fact completed.

    Over loopback (a sidecar's usual backend) the kernel runs the whole TCP
    handshake inside connect() and still says EINPROGRESS; asking costs one
    system call, where waiting for writability costs an epoll registration
    and a trip through the scheduler.
    """
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def _send_all(sock: socket.socket, sockaddr: Sockaddr, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        except OSError as exc:
            raise BackendConnectError(
                _reason(exc.errno or 0), f"{format_sockaddr(sockaddr)}: {exc.strerror}"
            ) from exc


def _reason(err: int) -> str:
    if err in _REFUSED_ERRNOS:
        return "refused"
    if err == errno.ETIMEDOUT:
        return "timeout"
    return "unreachable"
