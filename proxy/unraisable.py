"""Exceptions CPython cannot raise to anyone, as log lines, or as a handshake's outcome.

CPython reports an exception it cannot propagate (in a finaliser, or in an
OpenSSL callback) through `sys.unraisablehook`, whose default prints a
traceback to stderr: lines that break a JSON log. `install` replaces it with
one log line per exception.

One such exception is the client's doing, not ours: CPython decodes the SNI
host name as ASCII before it calls `sni_callback`, and a client may send any
bytes there (RFC 6066 asks for ASCII; OpenSSL only refuses NUL). The decoding
fails, CPython reports it as unraisable and fails the handshake with an
internal_error alert, and OpenSSL says only "callback failed". So the
handshake loop runs inside a `Stray`: an unraisable exception while it
runs belongs to that handshake, is not logged on its own, and `explain` turns
it into the handshake's outcome and error (`protocol_error`, saying that the
SNI was not ASCII; any other exception in a callback is our bug,
`internal_error`).

The attribution uses a context variable: the hook runs synchronously inside
`do_handshake`, in the handshake task's own context (each Trio task has one),
so concurrent handshakes never see each other's.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar, Token
from typing import Any

from proxy.log import Logger
from proxy.outcome import Outcome


class ServerNameNotASCII(ValueError):
    """The client's SNI host name holds bytes outside ASCII."""

    def __init__(self, name: bytes) -> None:
        super().__init__(f"the client's server name (SNI) is not ASCII: {name!r}")
        self.name = name


class Stray:
    """The first unraisable exception seen while the code run inside (`with
    Stray() as stray:`) ran, in this task: a context manager of its own, not
    a generator-based one, since one is entered per handshake."""

    __slots__ = ("_token", "error", "object")

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.object: Any = None
        self._token: Token[Stray | None] | None = None

    def __enter__(self) -> Stray:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *_: object) -> None:
        assert self._token is not None
        _CURRENT.reset(self._token)


_CURRENT: ContextVar[Stray | None] = ContextVar("tlsproxy_unraisable", default=None)


def explain(stray: Stray) -> tuple[Outcome, BaseException]:
    """The outcome and error of a handshake that failed after `stray` was seen."""
    error, obj = stray.error, stray.object
    assert error is not None
    if isinstance(error, UnicodeDecodeError) and isinstance(obj, bytes):
        return Outcome.PROTOCOL_ERROR, ServerNameNotASCII(obj)
    return Outcome.INTERNAL_ERROR, error


def install(log: Logger) -> None:
    """Make every unraisable exception one log line (or a handshake's)."""

    def hook(unraisable: Any) -> None:
        stray = _CURRENT.get()
        if stray is not None:
            if stray.error is None:
                stray.error, stray.object = unraisable.exc_value, unraisable.object
            return
        error = unraisable.exc_value
        log.error(
            "unraisable exception; please report this",
            error_type=getattr(unraisable.exc_type, "__name__", str(unraisable.exc_type)),
            error=str(error),
            message=unraisable.err_msg,
            object=repr(unraisable.object),
            exc_info=error if error is not None else False,
        )

    sys.unraisablehook = hook
