"""The `tlsproxy` command line: run, check-config, --version.

Kept thin on purpose: parse arguments, build the config, hand over to
`Server`, translate signals into lifecycle calls. With `workers > 1`, `run`
hands over to the supervisor instead, which starts each worker as
`python -m proxy worker` (a hidden command: `run` plus the link to the
supervisor); see proxy/workers.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from proxy import __version__, membio, unraisable
from proxy.accept import StartupError
from proxy.config import Config, ConfigError, default_config, load_config, with_overrides
from proxy.fdlimit import ensure_fd_limit
from proxy.log import Logger, LogSink, make_logger
from proxy.metrics import Metrics
from proxy.openssl import PolicyUnavailable
from proxy.selfsigned import default_state_dir, ensure_self_signed
from proxy.server import Server, State
from proxy.watch import watch_files
from proxy.worker import SupervisorLink, inherited_listeners, pin_ports, prepare_worker
from proxy.workers import Supervisor

EXIT_CONFIG = 1
EXIT_STARTUP = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(Path(args.file), check_files=not args.no_files)
    if args.command in ("run", "worker"):
        return _run(args)
    _parser().print_help()
    return EXIT_STARTUP


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsproxy", description="TLS-terminating sidecar proxy on Trio."
    )
    parser.add_argument("--version", action="version", version=f"tlsproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{run,check-config}")
    run = sub.add_parser("run", help="run the proxy (the embedded default without --config)")
    _add_run_arguments(run)
    check = sub.add_parser("check-config", help="validate a config file and exit 0 or 1")
    check.add_argument(
        "--no-files",
        action="store_true",
        help="check the schema and values only, not the certificate, key and CA files "
        "(e.g. for the examples in config/, whose certificates do not exist)",
    )
    check.add_argument("file")
    worker = sub.add_parser("worker")  # started by `run` with workers > 1; not for people
    _add_run_arguments(worker)
    worker.add_argument("--control-fd", type=int, required=True)
    worker.add_argument("--pin", action="append", default=[], help="NAME=PORT")
    worker.add_argument(
        "--listen-fd", type=int, action="append", default=[], help="a unix listener's socket"
    )
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--config", help="TOML config file")
    run.add_argument("--listen", help="TLS address of the first listener, e.g. 0.0.0.0:8443")
    run.add_argument(
        "--backend", help="plaintext backend of the first listener, e.g. 127.0.0.1:8080"
    )
    run.add_argument("--admin", help="admin address for /metrics /healthz /readyz")
    run.add_argument("--cert", help="PEM certificate (chain) of the first listener")
    run.add_argument("--key", help="PEM private key of the first listener")


RUN_FLAGS = ("config", "listen", "backend", "admin", "cert", "key")


def _check_config(path: Path, *, check_files: bool) -> int:
    try:
        config = load_config(path, check_files=check_files)
    except ConfigError as exc:
        _print_errors(exc, str(path))
        return EXIT_CONFIG
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    unchecked = "" if check_files else "; certificate, key and CA files not checked (--no-files)"
    print(f"{path}: ok ({len(config.listeners)} listener(s)){unchecked}")
    return 0


def _print_errors(exc: ConfigError, what: str) -> None:
    for error in exc.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"{what}: {len(exc.errors)} error(s)", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    try:
        config = _load_for_run(args)
    except ConfigError as exc:
        _print_errors(exc, "not started")
        return EXIT_CONFIG
    sink = LogSink.stderr()
    try:
        return _run_logged(args, config, sink)
    finally:
        sink.close()  # what is buffered, within LOG_FLUSH_TIMEOUT


def _run_logged(args: argparse.Namespace, config: Config, sink: LogSink) -> int:
    log = make_logger(config.log.level, config.log.format, sink).bind(pid=os.getpid())
    unraisable.install(log)
    worker = args.command == "worker"
    if not worker:
        for warning in config.warnings:
            log.warning("config warning", detail=warning)
        ensure_fd_limit(config, log)  # a worker inherits the supervisor's limit
        if membio.UNAVAILABLE is not None:
            log.warning(
                "parked TLS connections keep their memory buffers (2 to 45 KiB each);"
                " run on CPython with its ssl module to have them freed",
                reason=membio.UNAVAILABLE,
            )
        if membio.RECORDS_UNAVAILABLE is not None:
            log.warning(
                "parked TLS connections that read a session ticket keep OpenSSL's 16 KiB"
                " read buffer; run with OpenSSL 3.0.14 or later to have it freed",
                reason=membio.RECORDS_UNAVAILABLE,
            )
    if config.process.workers > 1 and not worker:
        return _supervise(config, log, args, sink)
    if worker:
        prepare_worker()
    try:
        metrics = Metrics(CollectorRegistry())
        sink.count_drops(metrics.log_lines_dropped.inc)
        server = Server(
            config,
            metrics,
            log,
            reuse_port=worker,
            admin=not worker,
            count_reloads=not worker,
            inherited=inherited_listeners(args.listen_fd) if worker else None,
        )
        server.bind()
    except (StartupError, PolicyUnavailable) as exc:
        log.error(str(exc))
        return EXIT_STARTUP
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot load the certificate or key; run check-config", error=str(exc))
        return EXIT_STARTUP
    if config.source is None and not worker:
        _, pair = next(config.listeners[0].certificate_pairs())
        cert = pair.cert
        path = config.listeners[0].listen.unix_path
        port = server.listen_ports()[config.listeners[0].name]
        log.info(
            "running the embedded default config",
            certificate=str(cert),
            backend=str(config.listeners[0].backend),
            try_it=f"curl --unix-socket {path} --cacert {cert} https://localhost/"
            if path is not None
            else f"curl --cacert {cert} https://localhost:{port}/",
        )
    link = SupervisorLink(args.control_fd) if worker else None
    trio.run(_serve, server, log, partial(_load_for_run, args), link)
    return 0


def _supervise(config: Config, log: Logger, args: argparse.Namespace, sink: LogSink) -> int:
    command = [sys.executable, "-m", "proxy", "worker"]
    for flag in RUN_FLAGS:
        if (value := getattr(args, flag)) is not None:
            command += [f"--{flag}", value]
    supervisor = Supervisor(config, log, command, partial(_load_for_run, args))
    sink.count_drops(supervisor.metrics.count_log_drops)
    try:
        supervisor.bind()
        trio.run(supervisor.run)
    except (StartupError, PolicyUnavailable) as exc:
        log.error(str(exc))
        return EXIT_STARTUP
    except (OSError, ssl.SSLError) as exc:
        if supervisor.metrics_dir is not None:
            raise  # bound: not a certificate problem
        log.error("cannot load the certificate or key; run check-config", error=str(exc))
        return EXIT_STARTUP
    finally:
        supervisor.close()
    return 0


def _load_for_run(args: argparse.Namespace) -> Config:
    if args.config:
        config = load_config(Path(args.config))
    elif args.cert or args.key:
        if not (args.cert and args.key):
            raise ConfigError(("--cert and --key must be given together",))
        config = default_config(Path(args.cert).resolve(), Path(args.key).resolve())
    else:
        cert, key = ensure_self_signed(default_state_dir())
        config = default_config(cert, key)
    config = with_overrides(
        config,
        listen=args.listen,
        backend=args.backend,
        admin=args.admin,
        cert=args.cert if args.config else None,
        key=args.key if args.config else None,
    )
    return pin_ports(config, args.pin) if args.command == "worker" else config


async def _serve(
    server: Server, log: Logger, load: Callable[[], Config], link: SupervisorLink | None
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_handle_signals, server, log, load, link, nursery)
        if server.config.process.watch and link is None:  # a worker's supervisor watches
            nursery.start_soon(watch_files, server, load)
        if link is None:
            await server.run()
        else:
            await _serve_worker(server, log, link)
        nursery.cancel_scope.cancel()


async def _serve_worker(server: Server, log: Logger, link: SupervisorLink) -> None:
    """Serve without admin; tell the supervisor once accepting (and the
    signal handler is in place), and drain if it goes away."""
    async with trio.open_nursery() as nursery:

        async def serve(*, task_status: trio.TaskStatus[dict[str, tuple[str, int]]]) -> None:
            await server.run_listeners(task_status=task_status)
            nursery.cancel_scope.cancel()  # drained: stop watching the supervisor

        await nursery.start(serve)
        await link.report_ready()
        await link.drain_when_gone(server, log)


async def _reload(
    server: Server, load: Callable[[], Config], link: SupervisorLink | None, trigger: str
) -> None:
    ok = await server.reload(load, trigger=trigger)
    if link is not None:
        await link.report_reload(ok)


async def _handle_signals(
    server: Server,
    log: Logger,
    load: Callable[[], Config],
    link: SupervisorLink | None,
    nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP received; reloading")
                nursery.start_soon(_reload, server, load, link, "SIGHUP")
            elif server.state is State.DRAINING:
                log.warning("second stop signal: exiting now without waiting for connections")
                nursery.cancel_scope.cancel()
            else:
                log.info("stop signal received; draining", signal=signal.Signals(signum).name)
                server.request_drain()


if __name__ == "__main__":
    sys.exit(main())
