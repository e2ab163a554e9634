"""Reload when the config file or a certificate, key, CA or CRL file changes.

Polling, on purpose. Certificates in a sidecar arrive through mounts that
inotify watches badly: a Kubernetes Secret volume swaps a `..data` symlink
to a new timestamped directory atomically, so the watched file's own inode
never changes; editors and cert-manager replace files by rename. `os.stat`
follows symlinks, so comparing (device, inode, size, mtime) of every
referenced path once a second sees all of these, costs a handful of system
calls, and needs no thread.

A change is acted on only once the files have stopped changing for one
`SETTLE` period, so a burst of writes is one reload. A half-written file can
still fail a reload; the watcher then retries a few times with back-off
while nothing changes, and the writer finishing its file is a new change
anyway, so a transient failure never sticks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import trio

from proxy.config import Config


class Reloadable(Protocol):
    """What the watch reloads: a Server, or with workers > 1 the supervisor."""

    config: Config

    async def reload(self, load: Callable[[], Config], *, trigger: str) -> bool: ...


# Seconds between polls. Kubernetes propagates a Secret update to the mount
# within its sync period (about a minute), so a second is plenty.
WATCH_INTERVAL = 1.0

# Seconds the files must stay unchanged before reloading: longer than any
# sane writer takes between the writes of one update.
SETTLE = 0.5

# A failed reload is retried after these many seconds while nothing changes,
# then the watcher waits for the next change.
RETRY_BACKOFF = (1.0, 2.0, 4.0)

Snapshot = tuple[tuple[str, tuple[int, int, int, int] | None], ...]


def watched_paths(config: Config) -> Iterator[Path]:
    """The config file itself and every file it references."""
    if config.source is not None:
        yield config.source
    for listener in config.listeners:
        tls, upstream = listener.tls, listener.upstream_tls
        for _, pair in listener.certificate_pairs():
            yield pair.cert
            yield pair.key
        if tls is not None and tls.client_ca is not None:
            yield tls.client_ca
        if tls is not None:
            yield from tls.client_crl
        if upstream is not None and upstream.ca is not None:
            yield upstream.ca


def snapshot(paths: Iterator[Path]) -> Snapshot:
    """What the files look like now; a missing file is a state too."""
    states: list[tuple[str, tuple[int, int, int, int] | None]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            states.append((str(path), None))
        else:
            states.append((str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)))
    return tuple(states)


async def watch_files(
    server: Reloadable,
    load: Callable[[], Config],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload `server` whenever its files change; runs until cancelled.

    Reports started once it has seen the files, so any later change counts.
    """
    seen = snapshot(watched_paths(server.config))
    task_status.started()
    while True:
        await trio.sleep(WATCH_INTERVAL)
        now = snapshot(watched_paths(server.config))
        if now == seen:
            continue
        now = await _settle(server, now)
        if await server.reload(load, trigger="file change"):
            seen = _rebase(now, server.config)
        else:
            seen = now
            await _retry(server, load, seen)


def _rebase(now: Snapshot, config: Config) -> Snapshot:
    """The snapshot to compare against after a reload that may watch other files."""
    paths = list(watched_paths(config))
    if [str(path) for path in paths] == [name for name, _ in now]:
        return now  # same files: what the reload read is what we saw settle
    return snapshot(iter(paths))


async def _settle(server: Reloadable, now: Snapshot) -> Snapshot:
    while True:
        await trio.sleep(SETTLE)
        again = snapshot(watched_paths(server.config))
        if again == now:
            return now
        now = again


async def _retry(server: Reloadable, load: Callable[[], Config], seen: Snapshot) -> None:
    """Retry a failed reload while the files stay as they were; a newer change
    ends the retries and is picked up by the main loop."""
    for delay in RETRY_BACKOFF:
        await trio.sleep(delay)
        if snapshot(watched_paths(server.config)) != seen:
            return
        if await server.reload(load, trigger="file change (retry)"):
            return
