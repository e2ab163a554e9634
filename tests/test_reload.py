"""Reload: build, validate, swap; never drop a connection; survive every bad reload."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from cryptography import x509

from proxy.config import Config, load_config
from proxy.runtime import ListenerRuntime, build_runtimes
from proxy.server import State
from proxy.watch import watch_files
from tests import pki
from tests.daemon import Daemon, config_text, listener_table, run_daemon, toml_str
from tests.helpers import (
    STEP,
    Certs,
    Running,
    echo_on,
    free_port,
    issue_leaf,
    sample,
    scrape,
    start_server,
    tls_connect,
    until,
)


def _config(
    cert: Path, key: Path, backend_port: int, *, more_listeners: str = "", watch: bool = False
) -> str:
    return config_text(
        cert,
        key,
        backend_port=backend_port,
        process_lines=f"watch = {str(watch).lower()}",
        more_listeners=more_listeners,
    )


def _replace(path: Path, text: str) -> None:
    """Write a file the way config management does: a new file renamed over the old."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def _serial(port: int, context: ssl.SSLContext) -> int:
    with trio.fail_after(STEP):
        tls = await tls_connect(port, context)
        der = tls.getpeercert(binary_form=True)
        await tls.aclose()
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def _serial_is(port: int, context: ssl.SSLContext, serial: int) -> bool:
    return await _serial(port, context) == serial


async def _failed_reloads_reach(proxy: Running, count: float) -> bool:
    return (await _reloads(proxy))[1] >= count


async def _reloads(proxy: Running) -> tuple[float, float]:
    _, text = await scrape(proxy.admin_port)
    return (
        sample(text, "tlsproxy_config_reloads_total", result="success"),
        sample(text, "tlsproxy_config_reloads_total", result="failure"),
    )


@pytest.fixture
def config_file(tmp_path: Path, certs: Certs, echo_port: int) -> Path:
    path = tmp_path / "tlsproxy.toml"
    path.write_text(_config(certs.cert, certs.key, echo_port))
    return path


@pytest.fixture
async def proxy(nursery: trio.Nursery, config_file: Path) -> Running:
    return await start_server(nursery, load_config(config_file))


def _loader(path: Path) -> Callable[[], Config]:
    return lambda: load_config(path)


async def test_reload_serves_the_new_certificate_while_an_old_connection_keeps_working(
    proxy: Running, config_file: Path, certs: Certs, tmp_path: Path, echo_port: int
) -> None:
    context = certs.client_context()
    old_serial = await _serial(proxy.port, context)
    with trio.fail_after(STEP):
        established = await tls_connect(proxy.port, context)
        await echo_on(established, b"before")
    cert, key, new_serial = issue_leaf(certs.ca, tmp_path, "rotated")
    _replace(config_file, _config(cert, key, echo_port))

    assert await proxy.server.reload(_loader(config_file), trigger="test")

    assert await _serial(proxy.port, context) == new_serial != old_serial
    with trio.fail_after(STEP):
        for _ in range(25):  # 5 s: the old connection, on the old context, is untouched
            await echo_on(established, b"still here")
            await trio.sleep(0.2)
        await established.aclose()
    assert await _reloads(proxy) == (1.0, 0.0)


def _bad_syntax(path: Path, certs: Certs, port: int, busy: int) -> None:
    path.write_text("[[listeners]\nname = ")


def _unknown_key(path: Path, certs: Certs, port: int, busy: int) -> None:
    path.write_text(
        _config(certs.cert, certs.key, port).replace("[process]", "[process]\ncolor = 1")
    )


def _missing_file(path: Path, certs: Certs, port: int, busy: int) -> None:
    path.write_text(_config(certs.cert.with_name("gone.pem"), certs.key, port))


def _mismatched_key(path: Path, certs: Certs, port: int, busy: int) -> None:
    other = trustme.CA().issue_cert("localhost")
    key = path.with_name("other.key")
    key.write_bytes(other.private_key_pem.bytes())
    path.write_text(_config(certs.cert, key, port))


def _port_in_use(path: Path, certs: Certs, port: int, busy: int) -> None:
    extra = listener_table("second", f"127.0.0.1:{busy}", port, certs.cert, certs.key)
    path.write_text(_config(certs.cert, certs.key, port, more_listeners=extra))


@pytest.mark.parametrize(
    "break_it", [_bad_syntax, _unknown_key, _missing_file, _mismatched_key, _port_in_use]
)
async def test_bad_reload_keeps_the_old_config_serving_and_counts_a_failure(
    proxy: Running,
    config_file: Path,
    certs: Certs,
    echo_port: int,
    break_it: Callable[[Path, Certs, int, int], None],
) -> None:
    good = await trio.Path(config_file).read_text()
    serial = await _serial(proxy.port, certs.client_context())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        break_it(config_file, certs, echo_port, busy.getsockname()[1])
        assert not await proxy.server.reload(_loader(config_file), trigger="test")

    assert await _serial(proxy.port, certs.client_context()) == serial
    assert await _reloads(proxy) == (0.0, 1.0)
    errors = [e for e in proxy.log_events() if e.get("level") == "error"]
    assert errors, "a rejected reload must say why"
    assert all("previous config keeps serving" in e["event"] for e in errors)

    await trio.Path(config_file).write_text(good)
    assert await proxy.server.reload(_loader(config_file), trigger="test")
    assert await _reloads(proxy) == (1.0, 1.0)


async def test_reload_adds_and_removes_a_listener(
    proxy: Running, config_file: Path, certs: Certs, echo_port: int
) -> None:
    # Port 0 twice would be "the same address": give the new listener its own.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    extra = listener_table("second", f"127.0.0.1:{free}", echo_port, certs.cert, certs.key)
    _replace(config_file, _config(certs.cert, certs.key, echo_port, more_listeners=extra))
    assert await proxy.server.reload(_loader(config_file), trigger="test")
    assert [s.runtime.config.name for s in proxy.server.listeners] == ["web", "second"]

    context = certs.client_context()
    with trio.fail_after(STEP):
        on_second = await tls_connect(free, context)
        await echo_on(on_second, b"new listener")

    _replace(config_file, _config(certs.cert, certs.key, echo_port))
    assert await proxy.server.reload(_loader(config_file), trigger="test")
    assert [s.runtime.config.name for s in proxy.server.listeners] == ["web"]
    with trio.fail_after(STEP):
        await echo_on(on_second, b"removed listener, live connection")  # drains, not cut
        await on_second.aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", free)  # no longer accepting
        await _serial(proxy.port, context)  # the kept listener never stopped


def _kubelet_secret(mount: Path, cert: Path, key: Path, generation: int) -> None:
    """Project a Secret the way the kubelet does: a timestamped directory, a
    `..data` symlink swapped atomically by rename, and stable file symlinks."""
    version = mount / f"..2026_11_27_{generation:02d}"
    version.mkdir()
    (version / "tls.crt").write_bytes(cert.read_bytes())
    (version / "tls.key").write_bytes(key.read_bytes())
    staged = mount / "..data_tmp"
    staged.symlink_to(version.name)
    old = (mount / "..data").resolve() if (mount / "..data").exists() else None
    staged.replace(mount / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")
    if old is not None:
        for child in old.iterdir():
            child.unlink()
        old.rmdir()


async def test_file_watch_reloads_on_a_kubernetes_secret_symlink_swap(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path, echo_port: int
) -> None:
    mount = tmp_path / "secret"
    mount.mkdir()
    first_cert, first_key, first_serial = issue_leaf(certs.ca, tmp_path, "first")
    _kubelet_secret(mount, first_cert, first_key, 1)
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text(_config(mount / "tls.crt", mount / "tls.key", echo_port, watch=True))
    proxy = await start_server(nursery, load_config(config_file))
    await nursery.start(watch_files, proxy.server, _loader(config_file))
    context = certs.client_context()
    assert await _serial(proxy.port, context) == first_serial

    cert, key, serial = issue_leaf(certs.ca, tmp_path, "second")
    _kubelet_secret(mount, cert, key, 2)

    await until(lambda: _serial_is(proxy.port, context, serial))
    success, failure = await _reloads(proxy)
    assert (success, failure) == (1.0, 0.0)


async def test_file_watch_recovers_from_a_half_written_certificate(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path, echo_port: int
) -> None:
    cert, key, first_serial = issue_leaf(certs.ca, tmp_path, "live")
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text(_config(cert, key, echo_port, watch=True))
    proxy = await start_server(nursery, load_config(config_file))
    await nursery.start(watch_files, proxy.server, _loader(config_file))
    context = certs.client_context()

    new_cert, new_key, new_serial = issue_leaf(certs.ca, tmp_path, "next")
    pem = new_cert.read_bytes()
    cert.write_bytes(pem[: len(pem) // 2])  # a writer caught half way, long enough to settle
    await until(lambda: _failed_reloads_reach(proxy, 1))
    assert await _serial(proxy.port, context) == first_serial  # the old pair keeps serving

    key.write_bytes(new_key.read_bytes())
    cert.write_bytes(pem)  # the writer finishes
    await until(lambda: _serial_is(proxy.port, context, new_serial))
    assert (await _reloads(proxy))[0] >= 1


async def test_sighup_reloads_the_daemon_and_keeps_connections(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path, echo_port: int
) -> None:
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text(_config(certs.cert, certs.key, echo_port))
    context = certs.client_context()
    async with run_daemon(nursery, tmp_path, "--config", config_file) as daemon:
        port, _ = await daemon.started()
        with trio.fail_after(STEP):
            established = await tls_connect(port, context)
            await echo_on(established, b"before")
        cert, key, serial = issue_leaf(certs.ca, tmp_path, "hup")
        _replace(config_file, _config(cert, key, echo_port))
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for("config reloaded", trigger="SIGHUP")
        assert await _serial(port, context) == serial
        with trio.fail_after(STEP):
            await echo_on(established, b"after")
            await established.aclose()
        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0


# The reload-under-load test: bounded in reloads and clients, on loopback only.
# At least LOAD_RELOADS reloads, and more (up to LOAD_RELOADS_MAX) until some
# request has started while a reload was being built: whether one does in a
# given reload is up to the scheduler, not the test.
LOAD_RELOADS = 10
LOAD_RELOADS_MAX = 100
LOAD_CLIENTS = 10


@dataclass(frozen=True)
class _Request:
    """One client connection, placed among the reloads by what the daemon had
    logged when it started and when it ended."""

    hups_before: int  # SIGHUPs sent when it started
    reloads_before: int  # "config reloaded" lines seen when it started
    hups_after: int  # SIGHUPs sent when it ended
    serial: int  # the certificate it was served


def _reloads_logged(daemon: Daemon) -> int:
    return sum(1 for e in daemon.events if e.get("event") == "config reloaded")


def _reloaded(daemon: Daemon, count: int) -> bool:
    return _reloads_logged(daemon) >= count


def _overlapping(requests: list[_Request]) -> bool:
    """Whether a request started after a SIGHUP and before its reload was logged."""
    return any(r.reloads_before < r.hups_before for r in requests)


async def test_reload_under_load_fails_no_client_connection(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path, echo_port: int
) -> None:
    leaves = [issue_leaf(certs.ca, tmp_path, f"alt{i}") for i in range(2)]
    configs = [_config(cert, key, echo_port) for cert, key, _ in leaves]
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text(configs[0])
    context = certs.client_context()
    requests: list[_Request] = []
    hups = 0
    progress = trio.Event()  # set, and replaced, as each request completes

    async def client() -> None:
        while True:  # any failure fails the test: the load nursery re-raises it
            hups_before, reloads_before = hups, _reloads_logged(daemon)
            with trio.fail_after(STEP):
                tls = await tls_connect(port, context)
                try:
                    der = tls.getpeercert(binary_form=True)
                    await echo_on(tls, b"x" * 64)
                finally:
                    await trio.aclose_forcefully(tls)
            assert der is not None
            serial = x509.load_der_x509_certificate(der).serial_number
            requests.append(_Request(hups_before, reloads_before, hups, serial))
            nonlocal progress
            progress.set()
            progress = trio.Event()

    async def served_after(reload: int) -> None:
        """Let the load run on until LOAD_CLIENTS requests that started once
        reload `reload` was logged have completed."""
        with trio.fail_after(STEP):
            while sum(r.reloads_before == reload for r in requests) < LOAD_CLIENTS:
                await progress.wait()

    async with run_daemon(nursery, tmp_path, "--config", config_file) as daemon:
        port, _ = await daemon.started()
        async with trio.open_nursery() as load:
            for _ in range(LOAD_CLIENTS):
                load.start_soon(client)
            await served_after(0)  # a baseline without reloads
            reload = 0
            while reload < LOAD_RELOADS or (
                not _overlapping(requests) and reload < LOAD_RELOADS_MAX
            ):
                reload += 1
                _replace(config_file, configs[reload % 2])
                hups += 1
                daemon.signal(signal.SIGHUP)
                await daemon.wait_until(partial(_reloaded, daemon, reload), f"reload {reload}")
                await served_after(reload)
            load.cancel_scope.cancel()
        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0
    assert _reloads_logged(daemon) == hups  # one reload per SIGHUP, none rejected
    assert daemon.find("reload rejected; the previous config keeps serving") is None
    _each_settled_request_got_its_certificate(requests, [serial for _, _, serial in leaves])
    assert _overlapping(requests), f"no request was in flight while any of {hups} reloads was built"


def _each_settled_request_got_its_certificate(requests: list[_Request], serials: list[int]) -> None:
    for reload in range(LOAD_RELOADS + 1):
        # between reload `reload` being logged and the next SIGHUP: served the
        # certificate that reload put in place, every one of them
        settled = {r.serial for r in requests if r.reloads_before == r.hups_after == reload}
        assert settled == {serials[reload % 2]}, f"after reload {reload}"


# Certificate pairs in the overlap test's config: enough to make a reload's
# build take tens of milliseconds, so that a SIGTERM sent as soon as the
# daemon logs the SIGHUP lands while the build is still running.
OVERLAP_CERTIFICATES = 40
OVERLAP_TRIES = 4
OVERLAP_CLIENTS = 4
OVERLAP_ECHOES = 3


async def _overlap_sighup_with_sigterm(
    nursery: trio.Nursery, directory: Path, certs: Certs, echo_port: int
) -> Daemon:
    """SIGHUP, then SIGTERM the moment the daemon says it is reloading, with
    clients busy; returns the exited daemon. A connection that completed its
    handshake must finish its exchange; only new ones may fail once stopping."""
    await trio.Path(directory).mkdir()
    text = config_text(certs.cert, certs.key, backend_port=echo_port, drain_timeout=STEP)
    pair = text.partition("certificates = [")[2].partition("]")[0]
    others = []
    for index in range(1, OVERLAP_CERTIFICATES):  # each for its own name: all are served
        leaf = certs.ca.issue_cert(f"overlap{index}.example")
        cert, key = directory / f"overlap{index}.crt", directory / f"overlap{index}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        others.append(f"{{ cert = {toml_str(cert)}, key = {toml_str(key)} }}")
    config_file = directory / "tlsproxy.toml"
    await trio.Path(config_file).write_text(text.replace(pair, ", ".join([pair, *others])))
    context = certs.client_context()
    stopping = False
    served = 0

    async def client() -> None:
        nonlocal served
        while not stopping:
            try:
                with trio.fail_after(STEP):
                    tls = await tls_connect(port, context)
            except (OSError, ssl.SSLError, trio.BrokenResourceError):
                if stopping:
                    return  # refused, or reset in the closed listener's queue
                raise
            try:
                with trio.fail_after(STEP):
                    for _ in range(OVERLAP_ECHOES):  # in flight: must never fail
                        await echo_on(tls, b"y" * 64)
            finally:
                await trio.aclose_forcefully(tls)
            served += 1

    async with run_daemon(nursery, directory, "--config", config_file) as daemon:
        port, _ = await daemon.started()
        async with trio.open_nursery() as load:
            for _ in range(OVERLAP_CLIENTS):
                load.start_soon(client)
            await daemon.wait_until(lambda: served >= OVERLAP_CLIENTS, "some load")
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for("SIGHUP received; reloading")
            stopping = True
            daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0, daemon.output()
    return daemon


async def test_sigterm_during_a_reload_drains_and_exits_0(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path, echo_port: int
) -> None:
    overlapped = 0
    for attempt in range(OVERLAP_TRIES):
        daemon = await _overlap_sighup_with_sigterm(
            nursery, tmp_path / f"try{attempt}", certs, echo_port
        )
        assert daemon.find("stopped") is not None
        overlapped += daemon.find("reload ignored: draining") is not None
    # the point of the test: the build was under way when the drain began
    assert overlapped > 0, "no SIGTERM arrived while a reload was being built"


async def _drained(proxy: Running) -> bool:
    return proxy.server.state is State.STOPPED


async def test_a_reload_that_finds_the_daemon_draining_is_ignored_and_the_drain_completes(
    proxy: Running, config_file: Path, certs: Certs
) -> None:
    entered, release = threading.Event(), threading.Event()

    def blocking_load() -> Config:
        entered.set()
        release.wait(STEP)
        return load_config(config_file)

    results: list[bool] = []

    async def reload() -> None:
        results.append(await proxy.server.reload(blocking_load, trigger="test"))

    with trio.fail_after(STEP):
        held = await tls_connect(proxy.port, certs.client_context())
        await echo_on(held, b"before")
    async with trio.open_nursery() as reloading:
        reloading.start_soon(reload)
        assert await trio.to_thread.run_sync(entered.wait, STEP)  # the build is under way
        proxy.server.request_drain()
        await until(lambda: _logged(proxy, "draining"))
        release.set()
    assert results == [False]
    assert proxy.log_events("reload ignored: draining")
    with trio.fail_after(STEP):
        await echo_on(held, b"the drain goes on")  # the drain was not aborted
        await held.aclose()
    await until(lambda: _drained(proxy))
    assert proxy.log_events("stopped")
    assert not [e for e in proxy.log_events() if e.get("level") == "error"]


async def _logged(proxy: Running, event: str) -> bool:
    return bool(proxy.log_events(event))


async def test_a_load_that_raises_something_unexpected_is_a_failed_reload(
    proxy: Running, certs: Certs
) -> None:
    def broken_load() -> Config:
        raise RuntimeError("a bug in the loader")

    serial = await _serial(proxy.port, certs.client_context())
    assert not await proxy.server.reload(broken_load, trigger="test")
    assert await _reloads(proxy) == (0.0, 1.0)
    assert await _serial(proxy.port, certs.client_context()) == serial
    (error,) = [e for e in proxy.log_events() if e.get("level") == "error"]
    assert "a bug in the loader" in error["exception"]


def _listening_on(proxy: Running) -> list[str]:
    return [e["address"] for e in proxy.log_events("listening")]


def _on_loopback(config_file: Path, certs: Certs, echo_port: int) -> int:
    """Write a config listening on 127.0.0.1 and a free port; that port."""
    port = free_port()
    config_file.write_text(
        config_text(certs.cert, certs.key, backend_port=echo_port, listen=f"127.0.0.1:{port}")
    )
    return port


def _move_to_any_host(config_file: Path, port: int) -> None:
    text = config_file.read_text()
    _replace(config_file, text.replace(f"127.0.0.1:{port}", f"0.0.0.0:{port}"))


async def test_reload_moves_a_listener_to_another_host_on_the_same_port(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int
) -> None:
    config_file = tmp_path / "tlsproxy.toml"
    port = _on_loopback(config_file, certs, echo_port)
    proxy = await start_server(nursery, load_config(config_file))
    context = certs.client_context()
    with trio.fail_after(STEP):
        established = await tls_connect(port, context)
        await echo_on(established, b"before the move")

    _move_to_any_host(config_file, port)
    assert await proxy.server.reload(_loader(config_file), trigger="test")

    assert _listening_on(proxy) == [f"127.0.0.1:{port}", f"0.0.0.0:{port}"]
    await _serial(port, context)  # the new socket accepts
    with trio.fail_after(STEP):
        await echo_on(established, b"after the move")  # an accepted connection stays
        await established.aclose()
    assert await _reloads(proxy) == (1.0, 0.0)


async def test_a_move_that_cannot_bind_restores_the_old_address(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int
) -> None:
    config_file = tmp_path / "tlsproxy.toml"
    port = _on_loopback(config_file, certs, echo_port)
    proxy = await start_server(nursery, load_config(config_file))
    context = certs.client_context()
    serial = await _serial(port, context)
    with socket.socket() as busy:  # someone else holds the port on another address
        busy.bind(("127.0.0.2", port))
        busy.listen()
        _move_to_any_host(config_file, port)
        assert not await proxy.server.reload(_loader(config_file), trigger="test")

    assert await _serial(port, context) == serial  # the old address serves again
    # released for the new address, then bound again when that failed
    assert _listening_on(proxy) == [f"127.0.0.1:{port}"] * 2
    assert await _reloads(proxy) == (0.0, 1.0)
    (error,) = [e for e in proxy.log_events() if e.get("level") == "error"]
    assert f"cannot listen on 0.0.0.0:{port}" in error["error"]


async def _expiry(proxy: Running) -> float:
    _, text = await scrape(proxy.admin_port)
    return sample(text, "tlsproxy_certificate_expiry_timestamp_seconds", listener="web")


def _not_after(leaf: pki.Leaf) -> float:
    return x509.load_pem_x509_certificate(leaf.cert.read_bytes()).not_valid_after_utc.timestamp()


@pytest.mark.parametrize("change", ["replaced", "removed"])
async def test_a_certificate_file_changing_after_the_build_does_not_change_what_the_reload_serves(
    nursery: trio.Nursery,
    tmp_path: Path,
    echo_port: int,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    ca = pki.CA(tmp_path)
    now = datetime.now(UTC)
    first, served, later = (
        ca.issue(stem, "localhost", not_after=now + timedelta(days=days))
        for stem, days in (("first", 30), ("served", 60), ("later", 90))
    )
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text(_config(first.cert, first.key, echo_port))
    proxy = await start_server(nursery, load_config(config_file))
    context = pki.client_context(ca)
    assert await _expiry(proxy) == _not_after(first)

    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(served.cert, cert)
    shutil.copy(served.key, key)
    _replace(config_file, _config(cert, key, echo_port))

    def build_then_change(*args: Any) -> list[ListenerRuntime]:
        """The build thread's last step; the swap is next, on the event loop."""
        runtimes = build_runtimes(*args)
        if change == "replaced":
            shutil.copy(later.cert, cert)
        else:
            cert.unlink()
        return runtimes

    monkeypatch.setattr("proxy.reload.build_runtimes", build_then_change)
    assert await proxy.server.reload(_loader(config_file), trigger="test")

    assert await _serial(proxy.port, context) == served.serial
    assert await _expiry(proxy) == _not_after(served)
    assert await _reloads(proxy) == (1.0, 0.0)


async def test_without_memfd_a_pair_is_served_from_a_private_file_removed_at_once(
    nursery: trio.Nursery,
    tmp_path: Path,
    certs: Certs,
    echo_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where there is no memfd (not Linux), start-up and reload still load
    the pair from the bytes validation read."""
    monkeypatch.delattr(os, "memfd_create")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text(_config(certs.cert, certs.key, echo_port))
    proxy = await start_server(nursery, load_config(config_file))
    context = certs.client_context()
    await _serial(proxy.port, context)
    cert, key, serial = issue_leaf(certs.ca, tmp_path, "next")
    _replace(config_file, _config(cert, key, echo_port))
    assert await proxy.server.reload(_loader(config_file), trigger="test")
    assert await _serial(proxy.port, context) == serial
    assert list(temporary.iterdir()) == []
