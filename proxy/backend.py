"""Connect to the backend, and say in one word why it failed when it does.

The reasons are a metric label (`backend_connect_failures_total{reason}`), so
the vocabulary is small and fixed: `refused` (nothing listens: the app is
down or still starting), `timeout` (no answer within `connect_timeout`),
`unreachable` (no route, or any other socket error), `resolve` (the name
did not resolve).
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from proxy.config import Address


class BackendConnectError(Exception):
    """The backend could not be reached; `reason` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


async def connect(address: Address, timeout: float) -> socket.socket:  # noqa: ASYNC109 - a timeout is a failure reason to report
    """Open a non-blocking TCP connection to the backend within `timeout` seconds."""
    with trio.move_on_after(timeout):
        family, sockaddr = await _resolve(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _connect(sock, sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock
    raise BackendConnectError("timeout", f"no answer from {address} within {timeout:g} s")


async def _resolve(address: Address) -> tuple[socket.AddressFamily, tuple[str, int]]:
    try:
        infos = await trio.socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise BackendConnectError("resolve", f"{address.host}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


async def _connect(sock: socket.socket, sockaddr: tuple[str, int]) -> None:
    err = sock.connect_ex(sockaddr)
    if err == errno.EINPROGRESS:
        await trio.lowlevel.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise BackendConnectError(_reason(err), f"{sockaddr[0]}:{sockaddr[1]}: {os.strerror(err)}")


def _reason(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "refused"
    if err == errno.ETIMEDOUT:
        return "timeout"
    return "unreachable"
