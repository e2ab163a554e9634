"""Every kind of backend address (IPv4, IPv6, a name, a Unix socket), and every
backend failure reason counted once, with the client closed cleanly (a
close_notify) within connect_timeout; a name's addresses raced (a silent one
does not use up connect_timeout) and its answer cached; a backend socket()
out of descriptors reported as fd_exhausted."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from proxy import resolver
from proxy.backend import CONNECTION_ATTEMPT_DELAY, BackendConnectError, connect, interleave
from proxy.config import Address, ConfigError, parse_config
from proxy.resolver import NEGATIVE_TTL, RESOLVE_TTL
from tests.daemon import PYTHON_M_PROXY, Daemon, env_for, spawn, write_config
from tests.helpers import (
    STEP,
    BioClient,
    Certs,
    build_config,
    echo_handler,
    echo_on,
    free_port,
    listener_table,
    raw_connect,
    sample,
    scrape,
    start_server,
    tls_connect,
    until,
)

# Short enough to keep the suite fast, long enough never to fire by accident
# on a loaded machine for the failures that are immediate.
CONNECT_TIMEOUT = 3.0


async def _echo_once(port: int, certs: Certs) -> None:
    with trio.fail_after(STEP):
        tls = await tls_connect(port, certs.client_context())
        await tls.send_all(b"ping")
        assert await tls.receive_some(10) == b"ping"
        await tls.aclose()


async def _serve_unix(nursery: trio.Nursery, path: Path, handler: Any) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    await nursery.start(partial(trio.serve_listeners, handler, [trio.SocketListener(sock)]))


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_backend(nursery: trio.Nursery, certs: Certs) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, echo_handler, 0, host="::1"))
    port = listeners[0].socket.getsockname()[1]
    proxy = await start_server(nursery, build_config(certs, 0, backend=f"[::1]:{port}"))
    await _echo_once(proxy.port, certs)
    (event,) = await proxy.access_log()
    assert event["backend"] == f"[::1]:{port}"


async def test_unix_backend(
    nursery: trio.Nursery, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("unix") / "app.sock"
    await _serve_unix(nursery, path, echo_handler)
    proxy = await start_server(nursery, build_config(certs, 0, backend=f"unix:{path}"))
    await _echo_once(proxy.port, certs)
    (event,) = await proxy.access_log()
    assert event["backend"] == f"unix:{path}"
    assert event["close_reason"] == "client_closed"


async def test_unix_backend_receives_the_proxy_header(
    nursery: trio.Nursery, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("unix") / "app.sock"
    lines: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n" not in data:
            data += await stream.receive_some(4096)
        line, _, rest = data.partition(b"\r\n")
        lines.append(line)
        await stream.send_all(rest)
        await echo_handler(stream)

    await _serve_unix(nursery, path, handler)
    config = build_config(certs, 0, backend=f"unix:{path}", proxy_protocol="v1")
    proxy = await start_server(nursery, config)
    await _echo_once(proxy.port, certs)
    (line,) = lines
    assert line.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    assert line.endswith(f" {proxy.port}".encode())


def _refused_tcp() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        pytest.param(_refused_tcp, "refused", id="tcp-refused"),
        pytest.param(lambda: "unix:/nonexistent/app.sock", "refused", id="unix-missing"),
        # the limited broadcast address has no route for a TCP connect: ENETUNREACH
        pytest.param(lambda: "255.255.255.255:80", "unreachable", id="unreachable"),
        pytest.param(lambda: "no-such-host.invalid:80", "resolve", id="resolve"),  # RFC 6761
    ],
)
async def test_backend_failure_is_counted_and_client_gets_close_notify_in_time(
    nursery: trio.Nursery, certs: Certs, backend: Any, reason: str
) -> None:
    address = backend()
    config = build_config(certs, 0, backend=address, connect_timeout=CONNECT_TIMEOUT)
    proxy = await start_server(nursery, config)
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        start = trio.current_time()
        assert await client.recv() == b""  # a clean close_notify, not a reset
        elapsed = trio.current_time() - start
        await client.stream.aclose()
    assert elapsed < CONNECT_TIMEOUT
    _, text = await scrape(proxy.admin_port)
    failures = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tlsproxy_backend_connect_failures_total{")
    }
    assert {name: count for name, count in failures.items() if count} == {reason: 1.0}
    (event,) = await proxy.access_log()
    assert event["close_reason"] == f"backend_{reason}"
    assert event["backend"] == address


def test_config_accepts_unix_backends_and_proxy_protocol_versions(certs: Certs) -> None:
    for version in ("off", "v1", "v2"):
        config = build_config(certs, 0, backend="unix:/run/app.sock", proxy_protocol=version)
        assert config.listeners[0].backend.unix_path == "/run/app.sock"
        assert config.listeners[0].proxy_protocol == version


def test_config_rejects_a_unix_path_longer_than_the_kernel_allows(certs: Certs) -> None:
    path = "/run/" + "a" * 103  # 108 bytes: no room for sun_path's NUL
    table = listener_table(certs, 0, backend=f"unix:{path}")
    with pytest.raises(ConfigError) as caught:
        parse_config({"listeners": [table]}, certs.cert.parent)
    (error,) = caught.value.errors
    assert error.startswith("listeners[0].backend: unix socket path is longer than 107 bytes")


# ---------------------------------------------------------------- names, from a hosts file
#
# The daemon runs in its own mount namespace with a test-owned file bound over
# /etc/hosts, so a name resolves through the real resolver (glibc, nsswitch
# "files") to addresses in an order the test chooses. Loopback is 127/8:
# every 127.0.0.x is a distinct local address to listen on.

NAME = "app.backend.test"
BLACK_HOLED, WORKING, OTHER = "127.0.0.2", "127.0.0.3", "127.0.0.4"

_UNSHARE = shutil.which("unshare")
# $0 is the hosts file, "$@" the command to run with it as /etc/hosts.
_OWN_HOSTS = ("--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"')


def _can_bind_hosts() -> bool:
    """Root (or CAP_SYS_ADMIN) and a kernel that allows mount namespaces."""
    if _UNSHARE is None or os.geteuid() != 0:
        return False
    return subprocess.run([_UNSHARE, "--mount", "true"], check=False).returncode == 0


needs_hosts_file = pytest.mark.skipif(
    not _can_bind_hosts(), reason="needs root and unshare --mount (util-linux)"
)


def _with_hosts(hosts: Path, *argv: str) -> list[str]:
    assert _UNSHARE is not None
    return [_UNSHARE, *_OWN_HOSTS, str(hosts), *argv]


def _write_hosts(hosts: Path, *addresses: str) -> None:
    """In place (same inode), so a mount bound over /etc/hosts sees the change."""
    with hosts.open("w", encoding="ascii") as file:
        file.writelines(f"{address} {NAME}\n" for address in addresses)


async def _resolved(hosts: Path, port: int) -> list[str]:
    """What getaddrinfo answers for NAME with `hosts` as /etc/hosts, in its
    order: glibc sorts the answers (RFC 6724), so each test checks that the
    order it relies on is the order the daemon will get."""
    script = (
        "import json, socket, sys;"
        f"print(json.dumps([a[4][0] for a in socket.getaddrinfo({NAME!r}, {port},"
        " type=socket.SOCK_STREAM)]))"
    )
    with trio.fail_after(STEP):
        done = await trio.run_process(
            _with_hosts(hosts, sys.executable, "-c", script), capture_stdout=True
        )
    return list(json.loads(done.stdout))


@asynccontextmanager
async def _daemon_with_hosts(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, hosts: Path, port: int, **config: Any
) -> AsyncIterator[tuple[Daemon, int, int]]:
    """The daemon, in front of NAME:`port`, resolving NAME through `hosts`."""
    path = write_config(
        tmp_path / "tlsproxy.toml", certs, backend=f"{NAME}:{port}",
        process_lines="watch = false", **config,
    )  # fmt: skip
    argv = _with_hosts(hosts, *PYTHON_M_PROXY, "run", "--config", str(path))
    async with spawn(nursery, argv, env=env_for(tmp_path / "state"), cwd=tmp_path) as daemon:
        port_, admin_port = await daemon.started()
        yield daemon, port_, admin_port


async def _serve_at(
    nursery: trio.Nursery, host: str, port: int, handler: Any = echo_handler
) -> None:
    await nursery.start(partial(trio.serve_tcp, handler, port, host=host))


@contextmanager
def _black_hole(host: str) -> Iterator[int]:
    """A port on `host` that never answers a connect, and its number.

    listen(0) leaves the accept queue one connection deep; one connect that
    is never accepted fills it, and from then on the kernel drops every SYN
    (no RST, no SYN-ACK): the connect hangs, as to a firewalled address.
    """
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind((host, 0))
        listener.listen(0)
        filler.settimeout(STEP)
        filler.connect(listener.getsockname())
        yield int(listener.getsockname()[1])


async def _assert_hangs(host: str, port: int) -> None:
    """A connect to (host, port) gets no answer in a second."""
    sock = trio.socket.socket()
    with sock:
        with trio.move_on_after(1.0) as waited:
            await sock.connect((host, port))
        assert waited.cancelled_caught, f"{host}:{port} answered: not black-holed"


@needs_hosts_file
async def test_backend_by_name_tries_the_next_address_when_the_first_refuses(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    port = free_port(WORKING)  # nothing listens on BLACK_HOLED at it: refused
    await _serve_at(nursery, WORKING, port)
    hosts = tmp_path / "hosts"
    _write_hosts(hosts, BLACK_HOLED, WORKING)
    assert await _resolved(hosts, port) == [BLACK_HOLED, WORKING]
    async with _daemon_with_hosts(nursery, tmp_path, certs, hosts, port) as (daemon, proxy, _):
        await _echo_once(proxy, certs)
        event = await daemon.wait_for("connection")
    assert event["backend"] == f"{NAME}:{port}"
    assert event["close_reason"] == "client_closed"


@needs_hosts_file
async def test_a_black_holed_first_address_does_not_use_up_connect_timeout(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    with _black_hole(BLACK_HOLED) as port:
        await _assert_hangs(BLACK_HOLED, port)
        await _serve_at(nursery, WORKING, port)
        hosts = tmp_path / "hosts"
        _write_hosts(hosts, BLACK_HOLED, WORKING)
        assert await _resolved(hosts, port) == [BLACK_HOLED, WORKING]
        config = {"listener_lines": f"connect_timeout = {CONNECT_TIMEOUT}"}
        async with _daemon_with_hosts(nursery, tmp_path, certs, hosts, port, **config) as (
            daemon,
            proxy,
            admin_port,
        ):
            with trio.fail_after(STEP):
                async with await tls_connect(proxy, certs.client_context()) as tls:
                    start = trio.current_time()
                    await echo_on(tls, b"ping")
                    elapsed = trio.current_time() - start
            event = await daemon.wait_for("connection")
            _, text = await scrape(admin_port)
    assert event["close_reason"] == "client_closed"
    assert not [
        line
        for line in text.splitlines()
        if line.startswith("tlsproxy_backend_connect_failures_total{") and not line.endswith(" 0.0")
    ]
    # The second address is tried only once the first has had its head start.
    assert CONNECTION_ATTEMPT_DELAY <= elapsed < CONNECT_TIMEOUT


@needs_hosts_file
async def test_a_resolved_name_is_reused_not_resolved_per_connection(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    port = free_port(WORKING)
    for host in (WORKING, OTHER):
        await _serve_at(nursery, host, port, partial(_tagged, host.encode()))
    hosts = tmp_path / "hosts"
    _write_hosts(hosts, WORKING)
    async with _daemon_with_hosts(nursery, tmp_path, certs, hosts, port) as (_, proxy, _):
        assert await _tag_through(proxy, certs) == WORKING.encode()
        _write_hosts(hosts, OTHER)
        assert await _tag_through(proxy, certs) == WORKING.encode()  # the daemon's cached answer
    assert await _resolved(hosts, port) == [OTHER]  # where a fresh lookup would have gone


async def _tagged(tag: bytes, stream: trio.SocketStream) -> None:
    """Say which address was connected to, then echo."""
    await stream.send_all(tag)
    await echo_handler(stream)


async def _tag_through(port: int, certs: Certs) -> bytes:
    with trio.fail_after(STEP):
        async with await tls_connect(port, certs.client_context()) as tls:
            return bytes(await tls.receive_some(100))


# ---------------------------------------------------------------- in process: the race, the cache
#
# Here the names come from a resolver installed in Trio (its documented hook
# for that), which answers from a table the test changes and counts the
# lookups; the connects are real, to real listening sockets, and time is
# Trio's MockClock: it moves only when the test says so.


class _Names(trio.abc.HostnameResolver):
    """NAME -> the IPv4 addresses in `answers`, in order; lookups counted and,
    while `gate` is unset, held."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.lookups = 0
        self.gate = trio.Event()
        self.gate.set()

    async def getaddrinfo(  # noqa: PLR0917 - the signature being implemented
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        self.lookups += 1
        await self.gate.wait()
        addresses = self.answers.get((host or b"").decode())
        if addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        assert port is not None
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port)))
            for ip in addresses
        ]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


@pytest.fixture
async def names() -> _Names:
    found = _Names()
    trio.socket.set_custom_hostname_resolver(found)  # for this test's Trio run only
    return found


@contextmanager
def _listening(host: str, port: int = 0) -> Iterator[int]:
    """A socket listening on (host, port), never accepting: the kernel
    completes the connects by itself. Its port."""
    with socket.socket() as sock:
        sock.bind((host, port))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_refused_address_starts_the_next_attempt_at_once(
    mock_clock: trio.testing.MockClock, names: _Names
) -> None:
    with _listening(WORKING) as port:
        names.answers[NAME] = [BLACK_HOLED, WORKING]  # nothing listens on BLACK_HOLED at port
        # The clock never moves: the delay never passes, the failure alone starts attempt two.
        with trio.fail_after(STEP):
            sock = await connect(Address(NAME, port), STEP)
        with sock:
            assert sock.getpeername() == (WORKING, port)


async def test_a_silent_address_gets_its_head_start_then_the_next_one_wins(
    mock_clock: trio.testing.MockClock, names: _Names
) -> None:
    with _black_hole(BLACK_HOLED) as port, _listening(WORKING, port):
        names.answers[NAME] = [BLACK_HOLED, WORKING]
        fds = _open_fds()
        won: list[socket.socket] = []

        async def connecting() -> None:
            won.append(await connect(Address(NAME, port), CONNECT_TIMEOUT))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connecting)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(CONNECTION_ATTEMPT_DELAY / 2)
            await trio.testing.wait_all_tasks_blocked()
            assert not won, "the second attempt started before the first had its delay"
            mock_clock.jump(CONNECTION_ATTEMPT_DELAY / 2)
            # From here, a second of real time with nothing to do (a loopback
            # connect is long done by then) jumps to the next deadline: the
            # connect_timeout if the second attempt never started.
            mock_clock.autojump_threshold = 1.0
        (sock,) = won
        with sock:
            assert sock.getpeername() == (WORKING, port)
            assert _open_fds() == fds + 1, "the losing attempt's socket was left open"


async def test_when_no_address_answers_the_connect_times_out_in_connect_timeout(
    autojump_clock: trio.testing.MockClock, names: _Names
) -> None:
    with _black_hole(BLACK_HOLED) as port:
        names.answers[NAME] = [BLACK_HOLED, BLACK_HOLED, BLACK_HOLED]
        fds, start = _open_fds(), trio.current_time()
        with pytest.raises(BackendConnectError) as caught:
            await connect(Address(NAME, port), CONNECT_TIMEOUT)
        assert trio.current_time() - start == pytest.approx(CONNECT_TIMEOUT)
        assert caught.value.reason == "timeout"
        assert _open_fds() == fds


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        pytest.param("4", "4", id="one"),
        pytest.param("6644", "6464", id="v6-first"),
        pytest.param("4466", "4646", id="v4-first"),
        pytest.param("64444", "64444", id="one-v6-then-v4"),
        pytest.param("466", "466", id="already-alternating"),
    ],
)
def test_families_are_interleaved_starting_with_the_first(order: str, expected: str) -> None:
    family = {"4": socket.AF_INET, "6": socket.AF_INET6}
    targets = [(family[f], (f"{f}.{i}", 1)) for i, f in enumerate(order)]
    out = interleave(targets)
    assert "".join("4" if t[0] == socket.AF_INET else "6" for t in out) == expected
    assert sorted(out, key=targets.index) == targets  # the same addresses, each family in order


async def test_an_answer_is_reused_until_it_ages_out(
    mock_clock: trio.testing.MockClock, names: _Names
) -> None:
    with _listening(WORKING) as port, _listening(OTHER, port):
        address = Address(NAME, port)
        names.answers[NAME] = [WORKING]
        for _ in range(3):
            with closing(await connect(address, STEP)) as sock:
                assert sock.getpeername()[0] == WORKING
        names.answers[NAME] = [OTHER]
        mock_clock.jump(RESOLVE_TTL * 0.9)
        with closing(await connect(address, STEP)) as sock:
            assert sock.getpeername()[0] == WORKING
        assert names.lookups == 1
        mock_clock.jump(RESOLVE_TTL * 0.2)
        with closing(await connect(address, STEP)) as sock:
            assert sock.getpeername()[0] == OTHER
        assert names.lookups == 2


async def test_a_failed_lookup_is_reused_briefly(
    mock_clock: trio.testing.MockClock, names: _Names
) -> None:
    address = Address(NAME, 80)
    for expected_lookups in (1, 1, 2):
        with pytest.raises(BackendConnectError) as caught:
            await connect(address, STEP)
        assert caught.value.reason == "resolve"
        assert names.lookups == expected_lookups
        mock_clock.jump(NEGATIVE_TTL * 0.6)


async def test_concurrent_connects_to_one_name_share_one_lookup(names: _Names) -> None:
    with _listening(WORKING) as port:
        names.answers[NAME] = [WORKING]
        names.gate = trio.Event()
        socks: list[socket.socket] = []

        async def connecting() -> None:
            socks.append(await connect(Address(NAME, port), STEP))

        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(connecting)
                await trio.testing.wait_all_tasks_blocked()
                names.gate.set()
        for sock in socks:
            sock.close()
        assert len(socks) == 5
        assert names.lookups == 1


async def test_a_waiter_takes_over_the_lookup_when_its_first_caller_is_cancelled(
    names: _Names,
) -> None:
    with _listening(WORKING) as port:
        names.answers[NAME] = [WORKING]
        names.gate = trio.Event()
        socks: list[socket.socket] = []
        first = trio.CancelScope()

        async def connecting(scope: trio.CancelScope) -> None:
            with scope:
                socks.append(await connect(Address(NAME, port), STEP))

        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connecting, first)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(connecting, trio.CancelScope())
                await trio.testing.wait_all_tasks_blocked()
                assert names.lookups == 1
                first.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert names.lookups == 2
                names.gate.set()
        (sock,) = socks
        sock.close()


async def test_the_cache_keeps_at_most_max_cached_names(
    names: _Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolver, "MAX_CACHED_NAMES", 2)
    with _listening(WORKING) as port:
        for name in ("a.test", "b.test", "c.test"):
            names.answers[name] = [WORKING]
        for name, lookups in [("a.test", 1), ("b.test", 2), ("c.test", 3), ("c.test", 3),
                              ("b.test", 3), ("a.test", 4)]:  # fmt: skip
            with closing(await connect(Address(name, port), STEP)):
                assert names.lookups == lookups


# ---------------------------------------------------------------- out of file descriptors

# The daemon's descriptor limit: its start-up needs about 20, and every
# connection held open in the test takes one more.
DAEMON_NOFILE = 64


def _daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_no_descriptor_for_the_backend_socket_is_fd_exhausted_not_unreachable(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path, echo_port: int
) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (DAEMON_NOFILE, DAEMON_NOFILE))

    path = write_config(
        tmp_path / "tlsproxy.toml", certs, backend_port=echo_port,
        process_lines="watch = false", listener_lines="handshake_timeout = 60.0",
    )  # fmt: skip
    argv = [*PYTHON_M_PROXY, "run", "--config", str(path)]
    env = env_for(tmp_path / "state")
    held: list[trio.SocketStream] = []
    # The accept loop logs its own error once the last descriptor is taken
    # (accept() finds none for the next client either): checked below.
    async with spawn(
        nursery, argv, env=env, cwd=tmp_path, preexec_fn=limit, errors_expected=True
    ) as daemon:
        port, admin_port = await daemon.started()
        pid = daemon.process.pid
        try:
            # Clients that never start a handshake, each holding one of the
            # daemon's descriptors, until it has exactly one left: the next
            # accept takes it, and the backend socket() finds none.
            with daemon.deadline(STEP, "the daemon to hold all but one descriptor"):
                while (fds := _daemon_fds(pid)) < DAEMON_NOFILE - 1:
                    held.append(await raw_connect(port))
                    await until(partial(_holds_more_than, pid, fds))  # accepted it
            with trio.fail_after(STEP):
                client = await BioClient.connect(port, certs.client_context())
                assert await client.recv() == b""  # the handshake worked; the backend did not
                await client.stream.aclose()
            event = await daemon.wait_for("connection")
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)
        assert event["close_reason"] == "backend_fd_exhausted"
        (warning,) = [e for e in daemon.events if e.get("reason") == "fd_exhausted"]
        assert warning["level"] == "warning"
        assert "descriptor limit" in warning["event"]
        assert "max_connections" in warning["event"]
        assert "is the application listening" not in warning["event"]
        # Nobody was refused at accept: the accept after the last descriptor
        # was taken says EMFILE, but the queue was empty, so no error line.
        assert [e for e in daemon.events if e.get("level") == "error"] == []
        await until(partial(_holds_fewer_than, pid, DAEMON_NOFILE - len(held)))
        _, text = await scrape(admin_port)
    failures = "tlsproxy_backend_connect_failures_total"
    assert sample(text, failures, reason="fd_exhausted") == 1
    assert sample(text, "tlsproxy_connections_rejected_total", reason="fd_exhausted") == 0
    assert sample(text, failures, reason="unreachable") == 0


async def _holds_more_than(pid: int, count: int) -> bool:
    return _daemon_fds(pid) > count


async def _holds_fewer_than(pid: int, count: int) -> bool:
    return _daemon_fds(pid) < count
