"""Several worker processes sharing the listeners: supervision and merged metrics.

Theory of operation. With `[process] workers = N` (N > 1) the process that
`tlsproxy run` starts becomes a supervisor and serves no TLS itself:

1. It checks every listener address with a plain bind, which fails where
   anyone listens, even another process using SO_REUSEPORT that would
   otherwise silently share the port. That bind also turns port 0 into a
   real port, which every worker then uses. It then holds a bound,
   non-listening SO_REUSEPORT socket on the port until it exits: it keeps the
   port reserved and receives no connections (only listening sockets join
   the kernel's SO_REUSEPORT group).
2. It binds the admin port and serves /metrics, /healthz and /readyz itself.
3. It starts N workers, `python -m proxy worker ...` (a fresh interpreter, so
   there is no fork inside a running Trio loop). Each worker loads the config
   as `run` does, binds every listener with SO_REUSEPORT (the kernel spreads
   new connections over the workers' accept queues by a hash of the
   addresses and ports) and runs the ordinary `Server` without its admin
   endpoint. SO_REUSEPORT does not apply to unix sockets: the supervisor
   binds and listens on each unix listener itself (step 1), passes the
   descriptor to every worker, and the kernel gives each connection to one
   of the workers accepting on that one socket. Its copy keeps the socket
   open while a worker restarts; it closes it when draining and removes the
   file at exit.
4. It supervises them. Each worker gets one end of a socketpair: the worker
   writes "ready" once it accepts, and reads EOF if the supervisor dies, which
   makes it drain and exit rather than linger as an orphan. A worker that
   exits on its own is logged, counted (`tlsproxy_worker_restarts_total`) and
   restarted after a back-off that doubles while it keeps failing.

Signals go to the supervisor only: workers run in their own session, so a
terminal's Ctrl-C does not reach them twice. SIGHUP is forwarded to every
worker and each reloads the config itself, exactly as one process does: a
bad config is rejected by each worker, which keeps the old one. Each worker
answers on its link (`reloaded` or `reload rejected`), and the supervisor
counts the daemon's one reload once all have answered: a failure if any
rejected it. The file watch runs in the supervisor, not in the workers, so
one change is one such reload too. SIGTERM/SIGINT mark the supervisor draining
(/readyz 503) and are forwarded; each worker drains and exits, and the
supervisor exits 0 once all have. A second signal is forwarded too, which
makes each worker exit at once.

Metrics: workers write prometheus-client's multiprocess files into one
directory ($TLSPROXY_METRICS_DIR, else a temporary directory removed at
exit), emptied at start; the supervisor's /metrics merges them. The client
library picks multiprocess mode from PROMETHEUS_MULTIPROC_DIR when it is
first imported, so only the workers, which get the variable in their
environment from their first instruction, run in it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import mark_process_dead

from proxy.accept import StartupError
from proxy.admin import Admin
from proxy.config import Config, ConfigError, format_sockaddr
from proxy.log import Logger
from proxy.metrics import SupervisorMetrics
from proxy.server import State
from proxy.socket_file import SocketFile
from proxy.supervisor_start import SupervisorStart
from proxy.watch import watch_files
from proxy.worker import READY, RELOADED

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds before a worker that exited on its own is started again. Doubled
# for each further exit, up to the cap, so a crash loop costs one start every
# 30 s rather than a core; back to the first delay once a worker has stayed up
# for STABLE_AFTER (systemd's RestartSec and Kubernetes' CrashLoopBackOff
# work the same way, with a cap of 5 minutes).
RESTART_BACKOFF_FIRST = 0.5
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0

# Seconds a new worker may take to start the interpreter, load and check the
# config and bind (under a second normally; certificate checks dominate).
WORKER_START_TIMEOUT = 30.0

# Seconds workers get to exit after a second stop signal before SIGKILL.
EXIT_GRACE = 5.0

# Bytes read from a worker's control link at once: its messages are a few bytes.
CONTROL_READ = 256

# ---------------------------------------------------------------------------
# The supervisor


@dataclass(eq=False)
class _Worker:
    slot: int
    process: trio.Process
    restarts: int  # of this slot, before this process
    ready: bool = False
    reload_pending: bool = False  # a SIGHUP arrived before it could take one
    reloading: _Reload | None = None  # the reload whose answer it owes


class _Reload:
    """One reload of the daemon: the workers sent SIGHUP, and their answers."""

    def __init__(self, workers: Iterable[_Worker]) -> None:
        self.waiting = set(workers)
        self.rejected = 0
        self.done = trio.Event()
        for worker in self.waiting:
            worker.reloading = self
        self._check()

    def answer(self, worker: _Worker, ok: bool | None) -> None:
        """`ok` None: the worker exited without answering; a restarted one
        reads the config file as it is then, so it neither passes nor fails."""
        worker.reloading = None
        self.waiting.discard(worker)
        self.rejected += ok is False
        self._check()

    def _check(self) -> None:
        if not self.waiting:
            self.done.set()


class Supervisor(SupervisorStart):
    """Starts, watches, signals and restarts the workers; serves the admin endpoint."""

    def __init__(
        self, config: Config, log: Logger, command: Sequence[str], load: Callable[[], Config]
    ) -> None:
        self.config = config
        self.log = log
        self._load = load  # the config as `run` reads it: for the file watch's paths
        self._reload_lock = trio.Lock()
        self.command = list(command)  # `python -m proxy worker` and the run flags
        self.count = config.process.workers
        self.state = State.STARTING
        self.workers: dict[int, _Worker] = {}
        self.registry = CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry)
        self.metrics_dir: Path | None = None
        self._temporary_dir = False
        self._reservations: list[socket.socket] = []
        self._unix_listeners: list[tuple[socket.socket, SocketFile]] = []
        self._admin_socket: socket.socket | None = None
        self._pins: list[str] = []
        self._stop = trio.Event()
        self._failure: str | None = None

    # -- running

    def is_ready(self) -> bool:
        """Serving and at least one worker accepting: during a worker's restart
        the others serve, and the kernel sends new connections only to them."""
        return self.state is State.SERVING and any(w.ready for w in self.workers.values())

    async def run(self) -> None:
        """Run the workers until they have all exited after a stop signal.

        Raises StartupError when a worker exits before all of them were ready.
        """
        assert self._admin_socket is not None and self.metrics_dir is not None
        admin = Admin(self.registry, self.is_ready, self.log)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._handle_signals, nursery)
            if self.config.process.watch:
                # One watch for the daemon, here: one file change, one reload.
                nursery.start_soon(watch_files, self, self._load)
            address = await nursery.start(admin.serve, self._admin_socket)
            self.log.info("admin listening", address=format_sockaddr(address))
            async with trio.open_nursery() as slots:
                for slot in range(self.count):
                    slots.start_soon(self._keep_running, slot)
            nursery.cancel_scope.cancel()
        if self._failure is not None:
            raise StartupError(self._failure)
        self.state = State.STOPPED
        self.log.info("stopped")

    def request_drain(self) -> None:
        if self.state in (State.STARTING, State.SERVING):
            self.state = State.DRAINING
            self._stop.set()
            self._signal_all(signal.SIGTERM)
            self.close_unix_listeners()

    async def _handle_signals(
        self, nursery: trio.Nursery, *, task_status: trio.TaskStatus[None]
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.log.info("SIGHUP received; every worker reloads the config")
                    nursery.start_soon(partial(self.reload, self._load, trigger="SIGHUP"))
                elif self.state is State.DRAINING:
                    self.log.warning(
                        "second stop signal: exiting now without waiting for connections"
                    )
                    self._signal_all(signal.SIGTERM)  # a draining worker exits at once
                    nursery.start_soon(self._kill_after, EXIT_GRACE)
                else:
                    self.log.info(
                        "stop signal received; draining", signal=signal.Signals(signum).name
                    )
                    self.request_drain()

    async def reload(self, load: Callable[[], Config], *, trigger: str) -> bool:
        """One reload of the daemon: every worker reloads, and it is counted
        once, a failure if any worker rejected it. Never raises.

        One at a time, so each worker owes at most one answer. Then `load`
        (in a thread) gives the file watch the files the new config names.
        """
        async with self._reload_lock:
            if self.state is not State.SERVING:
                self.log.warning("reload ignored: not serving", trigger=trigger)
                return False
            reload = _Reload(self._forward_reload())
            await reload.done.wait()
            ok = reload.rejected == 0
            result = "success" if ok else "failure"
            self.metrics.config_reloads.labels(result).inc()
            self.log.info(
                "reload counted", trigger=trigger, result=result, rejected_by=reload.rejected
            )
            if not ok:
                return False
            with suppress(ConfigError, OSError, ValueError):  # changed again: seen by the watch
                self.config = await trio.to_thread.run_sync(load)
            return True

    def _forward_reload(self) -> list[_Worker]:
        """SIGHUP to every ready worker (those are the ones to answer)."""
        signalled = []
        for worker in self.workers.values():
            if worker.ready:
                worker.process.send_signal(signal.SIGHUP)
                signalled.append(worker)
            else:
                # WARNING: SIGHUP kills a Python process that has not yet
                # installed its handler; send it once the worker is ready.
                worker.reload_pending = True
        return signalled

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers.values():
            worker.process.send_signal(signum)

    async def _kill_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        for worker in self.workers.values():
            self.log.warning("worker did not exit; killing it", worker_pid=worker.process.pid)
            worker.process.kill()

    async def _keep_running(self, slot: int) -> None:
        """One worker slot: run a worker, and another when it exits on its own."""
        delay = RESTART_BACKOFF_FIRST
        restarts = 0
        while True:
            started = trio.current_time()
            pid, code = await self._run_worker(slot, restarts)
            if self.state is State.DRAINING:
                return
            if self.state is State.STARTING:
                self._fail(f"worker {slot} exited during start-up ({_describe(code)})")
                return
            if trio.current_time() - started >= STABLE_AFTER:
                delay = RESTART_BACKOFF_FIRST
            self.log.error(
                "worker exited unexpectedly; restarting it",
                slot=slot,
                worker_pid=pid,
                exit=_describe(code),
                restart_in=delay,
            )
            with trio.move_on_after(delay):
                await self._stop.wait()
            if self._stop.is_set():
                return
            delay = min(delay * 2, RESTART_BACKOFF_MAX)
            restarts += 1
            self.metrics.worker_restarts.inc()

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = message
        self.state = State.DRAINING
        self._stop.set()
        self._signal_all(signal.SIGTERM)

    async def _run_worker(self, slot: int, restarts: int) -> tuple[int, int]:
        """Start one worker and wait for it to exit: (pid, exit code)."""
        assert self.metrics_dir is not None
        ours, theirs = socket.socketpair()
        # (closed once draining: a worker started then stops at once anyway)
        listen_fds = [s.fileno() for s, _ in self._unix_listeners if s.fileno() != -1]
        try:
            process = await trio.lowlevel.open_process(
                [
                    *self.command,
                    "--control-fd",
                    str(theirs.fileno()),
                    *_pin_flags(self._pins),
                    *(flag for fd in listen_fds for flag in ("--listen-fd", str(fd))),
                ],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), *listen_fds),
                env={**os.environ, MULTIPROC_ENV: str(self.metrics_dir)},
                start_new_session=True,  # signals come from us only
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(slot, process, restarts)
        self.workers[slot] = worker
        self.log.info("worker started", slot=slot, worker_pid=process.pid)
        if self._stop.is_set():  # the stop signal came while it was being started
            process.send_signal(signal.SIGTERM)
        try:
            with trio.socket.from_stdlib_socket(ours) as control:
                async with trio.open_nursery() as watch:
                    watch.start_soon(self._await_ready, worker, control)
                    await process.wait()
                    watch.cancel_scope.cancel()
        finally:
            del self.workers[slot]
            if worker.reloading is not None:
                worker.reloading.answer(worker, None)
            if process.returncode is None:  # we are being cancelled
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            mark_process_dead(process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        assert process.returncode is not None
        return process.pid, process.returncode

    async def _await_ready(self, worker: _Worker, control: trio.socket.SocketType) -> None:
        """Wait for `ready`, then take the worker's answers to reloads."""
        ready = False
        with trio.move_on_after(WORKER_START_TIMEOUT) as starting:
            ready = await control.recv(len(READY)) == READY
        if starting.cancelled_caught:
            self.log.error(
                f"worker not ready after {WORKER_START_TIMEOUT:g} s; killing it",
                slot=worker.slot,
                worker_pid=worker.process.pid,
            )
            worker.process.kill()
        elif ready:  # else EOF: it exited; _run_worker sees that
            self._ready(worker)
            await self._take_answers(worker, control)

    async def _take_answers(self, worker: _Worker, control: trio.socket.SocketType) -> None:
        pending = b""
        while chunk := await control.recv(CONTROL_READ):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if worker.reloading is not None:  # else: a SIGHUP sent at its start
                    worker.reloading.answer(worker, line + b"\n" == RELOADED)

    def _ready(self, worker: _Worker) -> None:
        worker.ready = True
        self.log.info(
            "worker ready",
            slot=worker.slot,
            worker_pid=worker.process.pid,
            restarts=worker.restarts,
        )
        if worker.reload_pending:
            worker.process.send_signal(signal.SIGHUP)
        ready = [w for w in self.workers.values() if w.ready]
        if self.state is State.STARTING and len(ready) == self.count:
            self.state = State.SERVING
            self.log.info(
                "workers ready",
                workers=self.count,
                worker_pids=sorted(w.process.pid for w in ready),
            )


def _pin_flags(pins: list[str]) -> list[str]:
    return [flag for pin in pins for flag in ("--pin", pin)]


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
