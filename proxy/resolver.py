"""Backend names resolved once and reused for a while, not once per connection.

getaddrinfo blocks, so each lookup costs a trip through Trio's thread pool
(and, for a DNS name, a query): per connection, that is a thread hand-off on
the data path and a query storm when connections arrive in bursts. So an
answer is kept for `RESOLVE_TTL` seconds and shared by every connection to
that name meanwhile.

- getaddrinfo reports no TTL, so the time an answer is kept is a constant
  of ours (see `RESOLVE_TTL`).
- A failed lookup is kept for `NEGATIVE_TTL`: while DNS is down, each new
  connection fails at once instead of each spending a thread on a query
  that will fail too, and the name is looked up again within a second of
  DNS coming back.
- Concurrent lookups of one name share one resolution: the first caller
  resolves, in its own task (no background task to outlive it), and the
  others wait for its answer. If it is cancelled (its client went away, its
  deadline passed), a waiter takes over the lookup.
- At most `MAX_CACHED_NAMES` answers are kept, the least recently used
  dropped first.

The cache is per Trio run (a RunVar): a daemon has one; two in-process test
servers in one run share it, as two listeners of one daemon do.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import trio

Sockaddr = Any  # (host, port[, flowinfo, scope_id]) or a Unix path
Target = tuple[socket.AddressFamily, Sockaddr]

# Seconds an answer is reused. getaddrinfo gives no TTL; this is the TTL
# Kubernetes' cluster DNS gives its Service records by default (CoreDNS
# `kubernetes` plugin, 5 s), the usual home of a sidecar's backend name: an
# address that changes (a headless Service's pods rolling over) is seen
# within that bound, as through a caching resolver, while a burst of
# connections costs one lookup per name per 5 s instead of one each.
RESOLVE_TTL = 5.0

# Seconds a failed lookup is reused; see the module docstring.
NEGATIVE_TTL = 1.0

# Names kept. The names looked up come from the config (a listener's backend
# and its routes), so a few are in use at once; the bound only keeps names
# dropped by reloads from piling up.
MAX_CACHED_NAMES = 1024


class ResolveError(Exception):
    """The name did not resolve; the message says why, as the resolver did."""


@dataclass(frozen=True, slots=True)
class _Answer:
    expires: float  # trio.current_time()
    targets: tuple[Target, ...]
    error: str | None  # the failed lookup's message, or None


class ResolveCache:
    """Answers by (host, port), and the lookups under way."""

    def __init__(self) -> None:
        self._answers: OrderedDict[tuple[str, int], _Answer] = OrderedDict()
        self._pending: dict[tuple[str, int], trio.Event] = {}

    async def resolve(self, host: str, port: int) -> tuple[Target, ...]:
        """The addresses of `host`, in the resolver's order; raises ResolveError."""
        key = (host, port)
        while True:
            answer = self._answers.get(key)
            if answer is not None and answer.expires > trio.current_time():
                self._answers.move_to_end(key)
                return _result(answer)
            pending = self._pending.get(key)
            if pending is None:
                break
            await pending.wait()  # then look again: its answer, or our turn to resolve
        done = self._pending[key] = trio.Event()
        try:
            answer = await _lookup(host, port)
            self._store(key, answer)
        finally:
            del self._pending[key]
            done.set()
        return _result(answer)

    def _store(self, key: tuple[str, int], answer: _Answer) -> None:
        self._answers[key] = answer
        self._answers.move_to_end(key)
        while len(self._answers) > MAX_CACHED_NAMES:
            self._answers.popitem(last=False)


_CACHE: trio.lowlevel.RunVar[ResolveCache] = trio.lowlevel.RunVar("tlsproxy_resolve_cache")


def cache() -> ResolveCache:
    """This run's cache, created on first use."""
    try:
        return _CACHE.get()
    except LookupError:
        found = ResolveCache()
        _CACHE.set(found)
        return found


async def _lookup(host: str, port: int) -> _Answer:
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        return _Answer(trio.current_time() + NEGATIVE_TTL, (), f"{host}: {exc.strerror}")
    targets = tuple((family, sockaddr) for family, _, _, _, sockaddr in infos)
    return _Answer(trio.current_time() + RESOLVE_TTL, targets, None)


def _result(answer: _Answer) -> tuple[Target, ...]:
    if answer.error is not None:
        raise ResolveError(answer.error)
    return answer.targets
