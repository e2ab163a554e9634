"""The daemon as a process: its JSON log lines, its ports, its exit code.

Every wait is event-driven (a log line, an exit) under a deadline, and a
timeout shows everything the daemon printed.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio

from tests.helpers import STEP


class Daemon:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()

    def output(self) -> str:
        return "\n".join(self.lines)

    async def pump(self) -> None:
        """Read the merged stdout/stderr line by line until it closes."""
        assert self.process.stdout is not None
        pending = b""
        with suppress(trio.ClosedResourceError):
            async for chunk in self.process.stdout:
                *complete, pending = (pending + chunk).split(b"\n")
                for raw in complete:
                    self._add(raw.decode(errors="replace"))
        if pending:
            self._add(pending.decode(errors="replace"))
        self._notify()

    def _add(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("{"):
            with suppress(json.JSONDecodeError):
                self.events.append(json.loads(line))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, event: str, within: float = STEP) -> dict[str, Any]:
        with trio.move_on_after(within):
            while True:
                for line in self.events:
                    if line.get("event") == event:
                        return line
                if self.process.returncode is not None:
                    break
                await self._changed.wait()
        raise AssertionError(f"no {event!r} log line within {within}s:\n{self.output()}")

    async def ports(self) -> tuple[int, int]:
        """The first listener's TLS port and the admin port, from the startup log."""
        tls = await self.wait_for("listening")
        admin = await self.wait_for("admin listening")
        return _port(tls["address"]), _port(admin["address"])

    async def exit_code(self, within: float = STEP) -> int:
        with trio.move_on_after(within):
            return await self.process.wait()
        raise AssertionError(f"still running after {within}s:\n{self.output()}")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@asynccontextmanager
async def run_daemon(
    nursery: trio.Nursery, argv: Sequence[str], env: Mapping[str, str]
) -> AsyncIterator[Daemon]:
    """Start argv with stderr merged into stdout; kill it if the test leaves early."""
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env),
    )
    daemon = Daemon(process)
    nursery.start_soon(daemon.pump)
    try:
        yield daemon
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(STEP):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
