"""Connect to the backend, send the PROXY header, and say in one word why it
failed when it does.

The reasons are a metric label (`backend_connect_failures_total{reason}`), so
the vocabulary is small and fixed: `refused` (nothing listens: the app is
down or still starting), `timeout` (no answer within `connect_timeout`),
`unreachable` (no route, or any other socket error), `resolve` (the name
did not resolve).

A name may resolve to several addresses (`localhost` is often ::1 and
127.0.0.1, and the app listens on only one): they are tried in the
resolver's order, all within the one `connect_timeout`, and the last
failure is reported.

The PROXY header (if any) is written as part of the connect, under the same
deadline: a backend that accepts but never reads is a backend that did not
answer.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import ssl
from typing import Any

import trio

from proxy import proxy_protocol
from proxy.config import Address, format_sockaddr
from proxy.tls import server_name
from proxy.tlsio import TLSConn

# A Unix-socket connect fails at once with these when the socket file exists
# but nobody accepts (ECONNREFUSED), does not exist yet (ENOENT: the app has
# not started), or its accept queue is full (EAGAIN: the app is not keeping
# up). The application is not taking connections in all three cases.
_REFUSED_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN})

Sockaddr = Any  # (host, port[, flowinfo, scope_id]) or a Unix path


class BackendConnectError(Exception):
    """The backend could not be reached; `reason` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


async def connect(
    address: Address,
    timeout: float,  # noqa: ASYNC109 - a timeout is a failure reason to report
    preamble: bytes = b"",
) -> socket.socket:
    """A non-blocking connection to the backend, `preamble` already written,
    within `timeout` seconds."""
    with trio.move_on_after(timeout):
        targets = _literal_targets(address) or await _resolve(address)
        error: BackendConnectError | None = None
        for family, sockaddr in targets:
            try:
                return await _open(family, sockaddr, preamble)
            except BackendConnectError as exc:
                error = exc
        assert error is not None  # getaddrinfo never returns an empty list
        raise error
    raise BackendConnectError("timeout", f"no answer from {address} within {timeout:g} s")


def proxy_header(version: proxy_protocol.Version, tls: TLSConn, peer: tuple[str, int]) -> bytes:
    """The PROXY header for a client at `peer` that completed the handshake on `tls`.

    `peer` is the address from accept: `getpeername()` fails once the client
    has reset, while the local address of the accepted socket stays known.
    """
    local = tls.sock.getsockname()
    obj = tls.obj
    cipher = obj.cipher()
    facts = proxy_protocol.TLSFacts(
        version=obj.version(),
        cipher=cipher[0] if cipher else None,
        alpn=obj.selected_alpn_protocol(),
        sni=server_name(obj),
        client_cn=verified_client_cn(obj),
        resumed=bool(obj.session_reused),
    )
    return proxy_protocol.encode(version, (peer[0], peer[1]), (local[0], local[1]), facts)


def verified_client_cn(obj: ssl.SSLObject) -> str | None:
    """The subject CN of the client's certificate, which OpenSSL has verified
    against `client_ca` if it is there at all: with `client_auth` optional or
    require, a certificate that fails verification fails the handshake, so
    after a successful one a certificate is a verified one (on a resumed
    session, the one verified when the session began). None without a
    certificate, or with a certificate that has no CN (the SANs are what
    name it then, and the TLV has no room for them).

    The first CN of the subject, as HAProxy sends it.
    """
    cert = obj.getpeercert()
    if not cert:
        return None
    rdns: Any = cert.get("subject", ())
    for rdn in rdns:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


@functools.lru_cache(maxsize=1024)
def _literal_targets(address: Address) -> tuple[tuple[socket.AddressFamily, Sockaddr], ...]:
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


async def _resolve(address: Address) -> list[tuple[socket.AddressFamily, Sockaddr]]:
    try:
        infos = await trio.socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise BackendConnectError("resolve", f"{address.host}: {exc.strerror}") from exc
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


async def _open(family: socket.AddressFamily, sockaddr: Sockaddr, preamble: bytes) -> socket.socket:
    try:
        # Non-blocking from birth: no separate system call to make it so.
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:  # EMFILE/ENFILE: this connection cannot be served now
        raise BackendConnectError("unreachable", f"cannot open a socket: {exc.strerror}") from exc
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await _connect(sock, sockaddr)
        await _send_all(sock, sockaddr, preamble)
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
