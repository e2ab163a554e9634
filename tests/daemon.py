"""The real daemon as a subprocess: start it, read its JSON log, signal it.

Shared by the tests that must exercise what only a process has: the CLI,
signals, exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import STEP, Certs, echo_on, scrape, tls_connect

PYTHON_M_PROXY = (sys.executable, "-m", "proxy")


def env_for(state_dir: Path) -> dict[str, str]:
    """The daemon never touches the real ~/.local/state, whatever a test does."""
    return {**os.environ, "TLSPROXY_STATE_DIR": str(state_dir)}


def toml_str(value: object) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(str(value))


def config_text(
    cert: object,
    key: object,
    *,
    backend_port: int = 1,
    backend: str | None = None,
    listen: str = "127.0.0.1:0",
    drain_timeout: float = 30.0,
    process_lines: str = "",
    listener_lines: str = "",
    tls_lines: str = "",
    more_listeners: str = "",
) -> str:
    """One listener named "web" (its backend `backend`, else 127.0.0.1 at
    `backend_port`), `tls_lines` after its certificate (in [listeners.tls],
    whose subtables may follow); `more_listeners` from `listener_table`."""
    backend = backend or f"127.0.0.1:{backend_port}"
    return f"""\
[admin]
listen = "127.0.0.1:0"

[process]
drain_timeout = {drain_timeout}
{process_lines}

[[listeners]]
name = "web"
listen = "{listen}"
backend = "{backend}"
{listener_lines}

[listeners.tls]
certificates = [{{ cert = {toml_str(cert)}, key = {toml_str(key)} }}]
{tls_lines}
{more_listeners}"""


def listener_table(name: str, listen: str, backend_port: int, cert: object, key: object) -> str:
    return f"""
[[listeners]]
name = "{name}"
listen = "{listen}"
backend = "127.0.0.1:{backend_port}"
[listeners.tls]
certificates = [{{ cert = {toml_str(cert)}, key = {toml_str(key)} }}]
"""


def write_config(path: Path, certs: Certs, **kwargs: Any) -> Path:
    path.write_text(config_text(certs.cert, certs.key, **kwargs), encoding="utf-8")
    return path


class Daemon:
    """A running `python -m proxy run ...` and everything it has printed so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self.eof = trio.Event()

    def output(self) -> str:
        return "\n".join(self.lines)

    @contextmanager
    def deadline(self, seconds: float, what: str) -> Iterator[None]:
        """fail_after, but a timeout shows what the daemon said."""
        try:
            with trio.fail_after(seconds):
                yield
        except trio.TooSlowError:
            raise AssertionError(
                f"timed out after {seconds}s waiting for {what}; daemon output:\n{self.output()}"
            ) from None

    async def pump(self) -> None:
        """Read stdout+stderr line by line until the process closes them."""
        assert self.process.stdout is not None
        pending = b""
        try:
            async for chunk in self.process.stdout:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    self._add(raw.decode(errors="replace"))
        except trio.ClosedResourceError:
            pass
        finally:
            if pending:
                self._add(pending.decode(errors="replace"))
            self.eof.set()
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

    def find(self, event: str, **fields: Any) -> dict[str, Any] | None:
        for record in self.events:
            if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                return record
        return None

    async def wait_for(self, event: str, **fields: Any) -> dict[str, Any]:
        """The first log line with this event (and these fields), waiting for it."""
        with self.deadline(STEP, f"log event {event!r} {fields or ''}"):
            while (record := self.find(event, **fields)) is None:
                if self.eof.is_set():
                    raise AssertionError(
                        f"daemon exited without logging {event!r}:\n{self.output()}"
                    )
                await self._changed.wait()
        return record

    async def wait_until(self, check: Callable[[], bool], what: str) -> None:
        """Wait until `check()` holds, re-checking as each line arrives."""
        with self.deadline(STEP, what):
            while not check():
                if self.eof.is_set():
                    raise AssertionError(f"daemon exited before {what}:\n{self.output()}")
                await self._changed.wait()

    async def started(self) -> tuple[int, int]:
        """(TLS port, admin port) once the daemon is accepting."""
        listening = await self.wait_for("listening")
        admin = await self.wait_for("admin listening")
        return port_of(listening["address"]), port_of(admin["address"])

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit_code(self, within: float = STEP) -> int:
        """Wait for the process to exit by itself and for all of its output."""
        with self.deadline(within, "the daemon to exit"):
            code = await self.process.wait()
            await self.eof.wait()
        return code


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@asynccontextmanager
async def spawn(
    nursery: trio.Nursery,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
    errors_expected: bool = False,
) -> AsyncIterator[Daemon]:
    """Start `argv` with stderr merged into stdout; always kill and reap it.

    When the test body passed, the daemon itself must not have failed: no
    traceback, and no error-level line unless the test provokes one.
    """
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=dict(env),
        preexec_fn=preexec_fn,
    )
    daemon = Daemon(process)
    try:
        nursery.start_soon(daemon.pump)
        yield daemon
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(STEP):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await daemon.eof.wait()
        if process.stdout is not None:
            with trio.CancelScope(shield=True):
                await process.stdout.aclose()
    assert "Traceback" not in daemon.output(), daemon.output()
    if not errors_expected:
        assert not [e for e in daemon.events if e.get("level") == "error"], daemon.output()


@asynccontextmanager
async def run_daemon(nursery: trio.Nursery, cwd: Path, *args: str | Path) -> AsyncIterator[Daemon]:
    """`python -m proxy run ARGS` in `cwd`, its state directory inside it."""
    argv = [*PYTHON_M_PROXY, "run", *map(str, args)]
    async with spawn(nursery, argv, env=env_for(cwd / "state"), cwd=cwd) as daemon:
        yield daemon


async def poll_status(admin_port: int, path: str, expected: int) -> None:
    """Poll an admin endpoint until it answers `expected`."""
    status = None
    try:
        with trio.fail_after(STEP):
            while True:
                status, _ = await scrape(admin_port, path)
                if status == expected:
                    return
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(
            f"{path} still answers {status} after {STEP}s, not {expected}"
        ) from None


async def assert_refused(port: int) -> None:
    sock = trio.socket.socket()
    with sock, trio.fail_after(STEP), pytest.raises(ConnectionRefusedError):
        await sock.connect(("127.0.0.1", port))


async def echo_through(port: int, context: ssl.SSLContext) -> None:
    with trio.fail_after(STEP):
        tls = await tls_connect(port, context)
        try:
            await echo_on(tls, b"hello through the daemon")
        finally:
            await tls.aclose()


# A drained transfer: big enough to be many TLS records and socket buffers,
# sent in chunks so it is still in flight when the stop signal arrives.
CHUNK = 64 * 1024


class GatedStream:
    """A backend that streams `payload` in chunks and stops halfway until told to go on."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.go_on = trio.Event()

    async def handler(self, stream: trio.SocketStream) -> None:
        try:
            for offset in range(0, len(self.payload), CHUNK):
                if offset == len(self.payload) // 2:
                    await self.go_on.wait()
                await stream.send_all(self.payload[offset : offset + CHUNK])
                await trio.sleep(0.001)
        except trio.BrokenResourceError:
            pass  # the proxy cut it (a second stop signal)
        # returning closes the stream (trio.serve_tcp): the backend's FIN


async def transfer_across_sigterm(
    daemon: Daemon,
    ports: tuple[int, int],
    context: ssl.SSLContext,
    backend: GatedStream,
    while_draining: Callable[[], Awaitable[None]],
) -> bytes:
    """Receive the backend's payload through the daemon with a SIGTERM in the
    middle. While the backend holds the second half back: /readyz is 503,
    /healthz 200, new connects are refused, the daemon still runs, and
    `while_draining` checks the rest. Returns everything received."""
    port, admin_port = ports
    tls = await tls_connect(port, context)
    received = bytearray()
    some_arrived, all_arrived = trio.Event(), trio.Event()

    async def read_to_the_end() -> None:
        while chunk := await tls.receive_some(65536):
            received.extend(chunk)
            some_arrived.set()
        all_arrived.set()

    try:
        async with trio.open_nursery() as client:
            client.start_soon(read_to_the_end)
            with daemon.deadline(STEP, "the first bytes"):
                await some_arrived.wait()

            daemon.signal(signal.SIGTERM)
            await poll_status(admin_port, "/readyz", 503)
            assert (await scrape(admin_port, "/healthz"))[0] == 200
            await while_draining()
            await assert_refused(port)
            assert not all_arrived.is_set()
            assert len(received) < len(backend.payload)
            assert daemon.process.returncode is None

            backend.go_on.set()
            with daemon.deadline(STEP, "the rest of the transfer"):
                await all_arrived.wait()
    finally:
        await tls.aclose()
    return bytes(received)
