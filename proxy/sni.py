"""Server-name matching: which configured name a client's SNI selects.

One table serves both uses of the SNI: picking the certificate (its DNS SANs
are the names) and picking the backend (`[[listeners.routes]]`). The rules are
RFC 6125's, as browsers apply them:

- names compare case-insensitively, and a trailing dot is ignored;
- an exact name wins over a wildcard, whatever the order in the config;
- a wildcard is a whole leftmost label, `*.example.com`, and stands for exactly
  one label: it matches `a.example.com`, not `example.com` nor `a.b.example.com`;
- among equal candidates, the first configured wins.

Everything is decided when the table is built, so a lookup is at most two dict
probes: the hot path never parses or scans.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

# RFC 1035 label syntax, relaxed to allow underscores (seen in real internal
# names) and kept to the 63-byte label limit.
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")

# The SNI host_name is at most 255 bytes (RFC 6066 section 3).
MAX_NAME_LENGTH = 255


def normalize(name: str) -> str:
    return name.lower().removesuffix(".")


def check_pattern(pattern: str) -> str | None:
    """Why `pattern` cannot be a configured name, or None when it can.

    Accepts `host.example.com` and `*.example.com`; rejects partial-label
    wildcards (`f*.example.com`), which RFC 6125 allows clients to refuse.
    """
    name = normalize(pattern)
    if not name or len(name) > MAX_NAME_LENGTH:
        return "must be a DNS name of 1 to 255 characters"
    if name.startswith("*."):
        name = name[2:]
        if "." not in name:
            return "a wildcard needs at least two labels after '*.', e.g. '*.example.com'"
    if "*" in name:
        return "'*' may only be the whole leftmost label, e.g. '*.example.com'"
    if not _NAME.fullmatch(name):
        return "must be a DNS name: letters, digits, '-' and '.' (IDNs in xn-- form)"
    return None


class NameTable(Generic[T]):
    """Maps configured names (exact or `*.` wildcard) to values."""

    __slots__ = ("_exact", "_wildcard")

    def __init__(self, entries: Iterable[tuple[str, T]]) -> None:
        self._exact: dict[str, tuple[str, T]] = {}
        self._wildcard: dict[str, tuple[str, T]] = {}
        for pattern, value in entries:
            name = normalize(pattern)
            if name.startswith("*."):
                self._wildcard.setdefault(name[2:], (pattern, value))
            else:
                self._exact.setdefault(name, (pattern, value))

    def __bool__(self) -> bool:
        return bool(self._exact or self._wildcard)

    def lookup(self, server_name: str | None) -> tuple[str, T] | None:
        """The matched configured name and its value, or None."""
        if not server_name:
            return None
        name = normalize(server_name)
        found = self._exact.get(name)
        if found is not None:
            return found
        _, dot, parent = name.partition(".")
        return self._wildcard.get(parent) if dot else None
