"""Reading a load balancer's PROXY header off an accepted socket, before TLS.

With `accept_proxy_protocol` set, the first bytes of every connection must be
a PROXY header (judged by the pure `proxy_protocol.parse_header`); the bytes
after it, which may arrive in the same segment, are the client's and go to
the ClientHello reader untouched. The header must be complete within the
connection's `handshake_timeout` (a balancer writes it at once; a sender
trickling it is cut at the deadline), and it is bounded in size by the
parser, so a connection holds at most that much before TLS starts.
"""

from __future__ import annotations

import socket

import trio

from proxy.proxy_protocol import (
    MAX_V2_LENGTH,
    NEED_MORE,
    V2_HEADER,
    Accept,
    HeaderError,
    Received,
    parse_header,
)

# Bytes asked of the socket at once: a whole header of the largest size we
# accept, so a balancer's header (and the hello behind it) takes one read.
READ_SIZE = V2_HEADER + MAX_V2_LENGTH


class HeaderRefused(Exception):
    """The connection brought no acceptable header; the message says why."""


async def read_header(
    sock: socket.socket,
    accept: Accept,
    timeout: float,  # noqa: ASYNC109 - the deadline is part of what is refused
) -> tuple[Received, bytes]:
    """The header and the bytes that followed it; raises HeaderRefused."""
    data = b""
    with trio.move_on_after(timeout):
        while True:
            try:
                chunk = sock.recv(READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                raise HeaderRefused(f"connection failed before the header: {exc.strerror}") from exc
            if not chunk:
                raise HeaderRefused(f"connection closed after {len(data)} bytes of a PROXY header")
            data += chunk
            try:
                verdict = parse_header(data, accept)
            except HeaderError as exc:
                raise HeaderRefused(str(exc)) from exc
            if verdict is not NEED_MORE:
                assert isinstance(verdict, Received)
                return verdict, data[verdict.length :]
    raise HeaderRefused(
        f"no complete PROXY header within handshake_timeout ({timeout:g} s): "
        f"{len(data)} bytes arrived"
    )
