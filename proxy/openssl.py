"""Key-exchange groups and TLS 1.3 cipher suites of an SSLContext, set in libssl.

Theory of operation
-------------------

Python's `ssl` has no call for either: `set_ecdh_curve` takes one curve and
`set_ciphers` reaches only TLS 1.2 and below. OpenSSL has both on the
`SSL_CTX` (`SSL_CTX_set1_groups_list`, a macro over `SSL_CTX_ctrl` with
`SSL_CTRL_SET_GROUPS_LIST`, and `SSL_CTX_set_ciphersuites`), and those set
what every SSL object made from that context afterwards uses, so they are
per listener and take effect on reload like everything else in a context.
`OPENSSL_CONF` can set the same, but process-wide and outside the TOML.

This module calls them through `ctypes`, in the very libssl that CPython's
`_ssl` extension links (found in the process's memory map once `ssl` is
imported: calling into another copy of OpenSSL with this `SSL_CTX` would
corrupt memory). The `SSL_CTX *` is reached from the `SSLContext` object:

    typedef struct {            CPython 3.11, Modules/_ssl.c
        PyObject_HEAD           object.__basicsize__ bytes
        SSL_CTX *ctx;           the pointer we read
        ...
    } PySSLContext;

WARNING: that layout is CPython's private business; nothing promises it.
Before writing anything through a pointer read this way, `_guarded_pointer`
checks that it really is this context's SSL_CTX, twice, independently:

1. `SSL_CTX_get_options(ptr)` equals `context.options` (a 64-bit value with
   several bits set on every context Python makes);
2. an option bit flipped through Python (`context.options ^= bit`) is seen
   flipped through the pointer, and flipped back: a stray pointer that
   happened to hold equal bits would not follow.

And after writing, the suites read back through Python (`get_ciphers()`) must
be exactly the ones asked for. If libssl cannot be found, or a check fails (a
CPython that laid the struct out otherwise, a statically linked `_ssl`), the
daemon does not start, and `check-config` says why: serving without the
configured policy would silently weaken it.

Every context of a listener (one per certificate set, selected by SNI) gets
the same lists, at start and on every reload; the config validation applies
each name to a scratch context first, so an unknown group or suite is a
config error with its TOML path, not a failed reload.
"""

from __future__ import annotations

import ctypes
import ssl
from functools import cache
from pathlib import Path

from proxy.clienthello import ClientHello, supported_groups

# OpenSSL 3 ssl.h: SSL_CTX_set1_groups_list(ctx, s) is
# SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, (char *)(s)).
SSL_CTRL_SET_GROUPS_LIST = 92
# SSL_CTX_set_session_cache_mode / SSL_CTX_get_session_cache_mode likewise.
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_GET_SESS_CACHE_MODE = 45
SSL_SESS_CACHE_OFF = 0

# The option bit the guard flips and restores: one that changes nothing for a
# context no connection has been made from yet, and that Python's setter can
# both set and clear.
_PROBE_OPTION = ssl.OP_CIPHER_SERVER_PREFERENCE

_MAPS = Path("/proc/self/maps")

# Where PySSLContext keeps its SSL_CTX *: right after the object header.
SSL_CTX_OFFSET = object.__basicsize__


# IANA "TLS Supported Groups" codes of the names OpenSSL accepts for them,
# so a ClientHello's supported_groups can be compared with `groups`.
GROUP_CODES = {
    name: code
    for code, names in (
        (0x0017, ("P-256", "prime256v1", "secp256r1")),
        (0x0018, ("P-384", "secp384r1")),
        (0x0019, ("P-521", "secp521r1")),
        (0x001D, ("X25519", "x25519")),
        (0x001E, ("X448", "x448")),
        (0x0100, ("ffdhe2048",)),
        (0x0101, ("ffdhe3072",)),
        (0x0102, ("ffdhe4096",)),
        (0x0103, ("ffdhe6144",)),
        (0x0104, ("ffdhe8192",)),
    )
    for name in names
}

# OpenSSL's reasons that can only mean no group in common.
_NO_GROUP_REASONS = frozenset({"NO_SUITABLE_KEY_SHARE", "NO_SHARED_GROUPS"})


def shares_no_group(
    hello: ClientHello | None, groups: tuple[str, ...], error: BaseException | None
) -> bool:
    """Whether a failed handshake had no key-exchange group in common: said
    by OpenSSL (TLS 1.3), or seen in the hello (TLS 1.2, where OpenSSL then
    reports only "no shared cipher", the ECDHE suites being unusable)."""
    if isinstance(error, ssl.SSLError) and error.reason in _NO_GROUP_REASONS:
        return True
    ours = {GROUP_CODES.get(name) for name in groups}
    if hello is None or None in ours:  # a name we cannot compare: do not guess
        return False
    return ours.isdisjoint(supported_groups(hello))


class PolicyUnavailable(Exception):
    """The groups or suites cannot be set in this process; the message says why."""


@cache
def _libssl() -> ctypes.CDLL:
    """The libssl that `_ssl` is linked with: the only one mapped."""
    try:
        maps = _MAPS.read_text()
    except OSError as exc:
        raise PolicyUnavailable(f"cannot read {_MAPS} to find libssl: {exc.strerror}") from exc
    paths = {path for path in _mapped_paths(maps) if Path(path).name.startswith("libssl.so")}
    if len(paths) != 1:
        found = ", ".join(sorted(paths)) or "none"
        raise PolicyUnavailable(
            f"expected exactly one libssl mapped in this process (the one Python's ssl "
            f"links), found {found}; groups and ciphersuites cannot be set"
        )
    lib = ctypes.CDLL(paths.pop())
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.OpenSSL_version_num.restype = ctypes.c_ulong
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise PolicyUnavailable(
            f"the libssl mapped in this process is not the OpenSSL Python's ssl was built "
            f"with ({ssl.OPENSSL_VERSION}); groups and ciphersuites cannot be set"
        )
    return lib


def _mapped_paths(maps: str) -> set[str]:
    """The files in /proc/self/maps: the sixth field of a line, when it has one."""
    fields = (line.split(maxsplit=5) for line in maps.splitlines())
    return {parts[5] for parts in fields if len(parts) == 6}


def _guarded_pointer(lib: ctypes.CDLL, context: ssl.SSLContext) -> int:
    """The context's SSL_CTX *, once both checks (module docstring) agree."""
    # WARNING: reads CPython's private PySSLContext layout; see the docstring.
    pointer = ctypes.c_void_p.from_address(id(context) + SSL_CTX_OFFSET).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(context.options):
        raise PolicyUnavailable(
            "this Python's SSLContext is not laid out as tlsproxy expects (its options "
            "differ from those of the SSL_CTX found); groups and ciphersuites cannot be set"
        )
    original = context.options
    context.options = original ^ _PROBE_OPTION
    followed = lib.SSL_CTX_get_options(pointer) == int(context.options)
    context.options = original
    if not followed or lib.SSL_CTX_get_options(pointer) != int(original):
        raise PolicyUnavailable(
            "this Python's SSLContext is not laid out as tlsproxy expects (an option set "
            "through Python did not show in the SSL_CTX found); groups and ciphersuites "
            "cannot be set"
        )
    return pointer


def set_groups(context: ssl.SSLContext, groups: tuple[str, ...]) -> None:
    """The key-exchange groups the context accepts, in preference order.

    Raises ValueError for a name OpenSSL does not know, PolicyUnavailable
    when this process cannot set groups at all.
    """
    lib = _libssl()
    pointer = _guarded_pointer(lib, context)
    if not lib.SSL_CTX_ctrl(pointer, SSL_CTRL_SET_GROUPS_LIST, 0, ":".join(groups).encode()):
        raise ValueError(f"OpenSSL accepts not all of the groups {':'.join(groups)}")


def set_ciphersuites(context: ssl.SSLContext, suites: tuple[str, ...]) -> None:
    """The TLS 1.3 cipher suites of the context, in preference order.

    OpenSSL skips names it does not know without saying so; the suites read
    back must therefore be exactly the ones asked for, or ValueError.
    """
    lib = _libssl()
    pointer = _guarded_pointer(lib, context)
    if not lib.SSL_CTX_set_ciphersuites(pointer, ":".join(suites).encode()):
        raise ValueError(f"OpenSSL accepts not all of the suites {':'.join(suites)}")
    got = tls13_suites(context)
    if got != suites:
        raise ValueError(f"OpenSSL took the suites {':'.join(got) or 'none'}, not {suites}")


def disable_session_cache(context: ssl.SSLContext) -> None:
    """No server-side session cache: no resumption by TLS 1.2 session ID
    (Python's ssl has no call for SSL_CTX_set_session_cache_mode)."""
    lib = _libssl()
    pointer = _guarded_pointer(lib, context)
    lib.SSL_CTX_ctrl(pointer, SSL_CTRL_SET_SESS_CACHE_MODE, SSL_SESS_CACHE_OFF, None)
    if lib.SSL_CTX_ctrl(pointer, SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != SSL_SESS_CACHE_OFF:
        raise PolicyUnavailable("the session cache could not be turned off")


def tls13_suites(context: ssl.SSLContext) -> tuple[str, ...]:
    """The TLS 1.3 suites a context offers, in order."""
    return tuple(c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.3")
