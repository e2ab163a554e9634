"""The open-file limit against `max_connections`, checked once at start.

Every proxied connection holds two descriptors, the client's and the
backend's, and `RLIMIT_NOFILE`'s soft limit is what accept() and connect()
run into (the daemon then pauses accepting: `fd_exhausted`). Distributions
still default the soft limit to 1024, far below the default
`max_connections` of 10 000, while the hard limit is usually much higher
(systemd's default is 524 288): like many daemons, tlsproxy raises its soft
limit to the hard limit when that is enough, and warns, naming the numbers,
when even the hard limit is too small. Workers inherit the limit the
supervisor set.

`raise_to` is the whole decision, a pure function of the three numbers.
"""

from __future__ import annotations

import resource

from proxy.config import Config
from proxy.log import Logger

# Descriptors the process holds besides its connections' and its listeners':
# stdio (3), epoll and Trio's wake-up socketpair (3), the admin listener and a
# few concurrent scrapes, the supervisor link, the descriptor the accept loop
# keeps in reserve, and the config, certificate and watch files a reload
# opens, with room to spare: 64.
FD_HEADROOM = 64

# Descriptors per proxied connection: the client's socket and the backend's.
FDS_PER_CONNECTION = 2


def descriptors_needed(config: Config) -> int:
    """Descriptors for every listener full at max_connections, and the rest."""
    listeners = config.listeners
    connections = sum(listener.max_connections for listener in listeners)
    return FDS_PER_CONNECTION * connections + len(listeners) + FD_HEADROOM


def raise_to(soft: int, hard: int, needed: int) -> int | None:
    """The soft limit to set: None when it holds what is needed already (or
    cannot be raised at all), else the hard limit (what is needed when there
    is no hard limit), which may still be short."""
    if _at_least(soft, needed):
        return None
    if hard == resource.RLIM_INFINITY:
        return needed
    return hard if hard > soft else None


def _at_least(limit: int, needed: int) -> bool:
    return limit == resource.RLIM_INFINITY or limit >= needed


def ensure_fd_limit(config: Config, log: Logger) -> None:
    """Raise the soft limit if that is enough; log what was done or what to do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = descriptors_needed(config)
    target = raise_to(soft, hard, needed)
    limit = soft
    if target is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            limit = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit (RLIMIT_NOFILE)", error=str(exc))
    numbers = {"limit": limit, "hard_limit": hard, "needed": needed}
    if limit != soft and _at_least(limit, needed):
        log.info(
            f"raised the open-file limit (RLIMIT_NOFILE) from {soft} to {limit}"
            f"{' (the hard limit)' if limit == hard else ''} to hold max_connections: "
            f"{needed} descriptors needed",
            previous_limit=soft,
            **numbers,
        )
    elif not _at_least(limit, needed):
        log.warning(
            f"the open-file limit (RLIMIT_NOFILE) is {limit} (hard limit {hard}), but "
            f"max_connections needs {needed} descriptors ({FDS_PER_CONNECTION} per "
            f"connection plus {FD_HEADROOM} and one per listener); raise it (ulimit -n, "
            "systemd LimitNOFILE=, docker --ulimit nofile=) or lower max_connections",
            **numbers,
        )
