"""Addresses: `host:port`, `[v6]:port`, `unix:/path`; parsed, shown, compared.

Pure: no name is resolved here (the backend's names are resolved when
connecting, proxy/resolver.py).
"""

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    GetCoreSchemaHandler,
)
from pydantic_core import core_schema

from proxy.config.errors import (
    _show,
)

# Letters, digits, dots and hyphens, not starting or ending with a dot or hyphen;
# this covers IPv4 and DNS names and rejects typos such as "localhost 8080".
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return format_hostport(self.host, self.port)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _coerce_address, serialization=core_schema.to_string_ser_schema()
        )


def format_hostport(host: object, port: object) -> str:
    """`host:port`, with an IPv6 host in brackets: the one spelling of an
    address in logs and messages."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def format_sockaddr(sockaddr: object) -> str:
    """A socket address as the logs spell it: (host, port, ...) or a Unix path."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return format_hostport(sockaddr[0], sockaddr[1])
    if isinstance(sockaddr, str):
        return f"unix:{sockaddr}" if sockaddr else "unix"
    return str(sockaddr)


def parse_address(text: str) -> Address:
    """`host:port`, `[v6]:port` or `unix:/abs/path`; port 0 lets tests bind ephemeral ports."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(
                f"unix socket path must be absolute, e.g. 'unix:/run/app.sock'; got {text!r}"
            )
        return Address(host="", port=0, unix_path=path)
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"missing port in {text!r}; expected host:port, e.g. '127.0.0.1:8443'")
    return Address(host=_parse_host(host, text), port=_parse_port(port, text))


def _parse_host(host: str, text: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise ValueError(f"invalid IPv6 address {host!r} in {text!r}") from exc
        return host[1:-1]
    if ":" in host:
        raise ValueError(f"IPv6 addresses need brackets, e.g. '[::1]:8443'; got {text!r}")
    if not host:
        raise ValueError(f"missing host in {text!r}; use '0.0.0.0{text}' for all interfaces")
    looks_numeric = host.replace(".", "").isdigit()
    if not _HOSTNAME.fullmatch(host) or (looks_numeric and not _is_ipv4(host)):
        raise ValueError(f"invalid host {host!r} in {text!r}; expected an IP address or DNS name")
    return host


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _parse_port(port: str, text: str) -> int:
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"port {port!r} in {text!r} is not a number")
    if int(port) > 65535:
        raise ValueError(f"port {port} in {text!r} is out of range 0-65535")
    return int(port)


def _coerce_address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - pydantic collects ValueError, not TypeError
            f"expected an address like '127.0.0.1:8443', got {_show(value)}"
        )
    return parse_address(value)


def addresses_overlap(a: Address, b: Address) -> bool:
    """Whether listening on both at once fails (EADDRINUSE): the same port on
    the same host, or on a wildcard host that covers the other.

    Port 0 never overlaps (each bind picks a port of its own). Names are
    compared as written, never resolved: `localhost:P` and `127.0.0.1:P` are
    not known to collide until bound. Unix paths likewise: the same path
    collides, another spelling of it (`/run//a.sock`) is not known to.
    """
    if a.unix_path is not None or b.unix_path is not None:
        return a.unix_path == b.unix_path
    if a.port != b.port or a.port == 0:
        return False
    ip_a, ip_b = _ip(a.host), _ip(b.host)
    if ip_a is None or ip_b is None:
        return a.host == b.host
    return ip_a == ip_b or _covers(ip_a, ip_b) or _covers(ip_b, ip_a)


def is_ip_literal(host: str) -> bool:
    return _ip(host) is not None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _covers(
    wildcard: ipaddress.IPv4Address | ipaddress.IPv6Address,
    other: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    # [::] takes IPv4 too: Linux binds IPv6 sockets dual-stack unless
    # IPV6_V6ONLY is set (bindv6only=0), and the proxy never sets it.
    return wildcard.is_unspecified and (wildcard.version == 6 or other.version == 4)


# sockaddr_un.sun_path on Linux: 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


def _fits_sun_path(address: Address) -> Address:
    if address.unix_path is not None and len(address.unix_path.encode()) > UNIX_PATH_MAX:
        raise ValueError(
            f"unix socket path is longer than {UNIX_PATH_MAX} bytes, the most the kernel "
            f"accepts; use a shorter path: {address.unix_path!r}"
        )
    return address


def _tcp_only(address: Address) -> Address:
    if address.unix_path is not None:
        raise ValueError(
            "the admin endpoint listens on TCP only (Prometheus scrapes it over TCP); "
            f"expected host:port, e.g. '127.0.0.1:9090'; got '{address}'"
        )
    return address


ListenAddress = Annotated[Address, AfterValidator(_fits_sun_path)]
BackendAddress = Annotated[Address, AfterValidator(_fits_sun_path)]
AdminAddress = Annotated[Address, AfterValidator(_tcp_only)]
