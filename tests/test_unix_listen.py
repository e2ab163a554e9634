"""Listening on a unix socket: the config keys, the socket file's life
(stale, live, not a socket, removed on exit, a successor's kept), reload,
workers, the access log and the PROXY header, over real unix sockets
against the real daemon (in-process `Server` and the subprocess)."""

from __future__ import annotations

import errno
import io
import os
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from proxy import proxy_protocol
from proxy.accept import STALE_REMOVED_EVENT, StartupError
from proxy.config import (
    UNIX_PATH_MAX,
    ConfigError,
    SocketOwner,
    addresses_overlap,
    parse_address,
    parse_config,
    parse_mode,
    parse_owner,
    with_overrides,
)
from proxy.log import make_logger
from proxy.metrics import Metrics
from proxy.server import Server
from tests.daemon import PYTHON_M_PROXY, config_text, env_for, run_daemon, spawn
from tests.helpers import (
    STEP,
    Certs,
    build_config,
    echo_on,
    http_handler,
    listener_table,
    start_backend,
    start_server,
    until,
)

MESSAGE = b"hello over a unix socket"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory of its own: pytest's tmp_path can exceed sun_path."""
    path = Path(tempfile.mkdtemp(prefix="tlsproxy-unix-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def unix_tls_connect(
    path: Path, context: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    """A Python ssl client over the unix socket at `path`, handshake done."""
    stream = await trio.open_unix_socket(str(path))
    tls = trio.SSLStream(stream, context, server_hostname="localhost")
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls


async def echo_over(path: Path, context: ssl.SSLContext, message: bytes = MESSAGE) -> None:
    with trio.fail_after(STEP):
        tls = await unix_tls_connect(path, context)
        await echo_on(tls, message)
        await tls.aclose()


def identity(path: Path) -> tuple[int, int]:
    found = os.lstat(path)
    assert stat.S_ISSOCK(found.st_mode)
    return (found.st_dev, found.st_ino)


def present(path: Path) -> bool:
    """Whether anything (a dangling name included) is at `path`."""
    return os.path.lexists(path)


def stale_socket(path: Path) -> None:
    """What a killed daemon leaves: a socket file nobody listens on."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def unix_config(certs: Certs, backend_port: int, path: Path, **listener: Any) -> Any:
    return build_config(certs, backend_port, listen=f"unix:{path}", **listener)


def unstarted(config: Any) -> Server:
    return Server(config, Metrics(CollectorRegistry()), make_logger(stream=io.StringIO()))


# ---------------------------------------------------------------- pure parsing


@pytest.mark.parametrize(
    ("text", "mode"),
    [("0660", 0o660), ("660", 0o660), ("0600", 0o600), ("0777", 0o777), ("0000", 0)],
)
def test_parse_mode(text: str, mode: int) -> None:
    assert parse_mode(text) == mode


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0o660", "3 or 4 octal digits"),
        ("66", "3 or 4 octal digits"),
        ("0680", "3 or 4 octal digits"),
        ("rw-rw----", "3 or 4 octal digits"),
        ("", "3 or 4 octal digits"),
        ("1777", "only the permission bits"),
        ("4755", "only the permission bits"),
        (660, "a TOML number would be read as decimal"),
        (0o660, "a TOML number would be read as decimal"),
    ],
)
def test_parse_mode_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_mode(value)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("app", ("app", None)),
        ("app:web", ("app", "web")),
        (":web", (None, "web")),
        ("1000", ("1000", None)),
        ("1000:2000", ("1000", "2000")),
    ],
)
def test_parse_owner(text: str, parsed: tuple[str | None, str | None]) -> None:
    assert parse_owner(text) == parsed


@pytest.mark.parametrize("text", ["", ":", "app:", "app:web:x", "::web"])
def test_parse_owner_rejects(text: str) -> None:
    with pytest.raises(ValueError, match='expected "user", "user:group" or ":group"'):
        parse_owner(text)


@pytest.mark.parametrize(
    ("text", "uid", "gid"),
    [
        ("root", 0, -1),
        ("root:root", 0, 0),
        (":root", -1, 0),
        ("54321:54322", 54321, 54322),  # ids need no entry in /etc/passwd
        ("0:54322", 0, 54322),
    ],
)
def test_owner_is_resolved_to_ids(text: str, uid: int, gid: int) -> None:
    assert SocketOwner.resolve(text) == SocketOwner(uid, gid, text)


@pytest.mark.parametrize(
    ("one", "other", "overlap"),
    [
        ("unix:/run/a.sock", "unix:/run/a.sock", True),
        ("unix:/run/a.sock", "unix:/run/b.sock", False),
        ("unix:/run/a.sock", "127.0.0.1:0", False),
        ("unix:/run/a.sock", "0.0.0.0:8443", False),
    ],
)
def test_unix_addresses_overlap(one: str, other: str, overlap: bool) -> None:
    a, b = parse_address(one), parse_address(other)
    assert addresses_overlap(a, b) is overlap
    assert addresses_overlap(b, a) is overlap


@pytest.mark.parametrize(
    ("source", "dest"),
    [(None, None), (None, ("127.0.0.1", 8443)), (("127.0.0.1", 5000), None)],
)
def test_a_header_without_ip_endpoints_is_unknown_or_local(
    source: tuple[str, int] | None, dest: tuple[str, int] | None
) -> None:
    assert proxy_protocol.encode("v1", source, dest) == b"PROXY UNKNOWN\r\n"
    v1 = proxy_protocol.parse_header(proxy_protocol.encode("v1", source, dest), "v1")
    assert v1 == proxy_protocol.Received("v1", 15, None, None)
    facts = proxy_protocol.TLSFacts(version="TLSv1.3", sni="api.example.com")
    header = proxy_protocol.encode("v2", source, dest, facts)
    tlvs = proxy_protocol.tlvs(facts)
    assert header == proxy_protocol.V2_SIGNATURE + bytes([0x20, 0x00, 0, len(tlvs)]) + tlvs
    v2 = proxy_protocol.parse_header(header, "v2")
    assert v2 == proxy_protocol.Received("v2", len(header), None, None)


# ---------------------------------------------------------------- config errors


def _errors(certs: Certs, **document: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, certs.cert.parent)
    return caught.value.errors


LONG_PATH = "/run/" + "x" * (UNIX_PATH_MAX - len("/run/") + 1)


@pytest.mark.parametrize(
    ("listener", "admin", "expected"),
    [
        (
            {"listen": "unix:/run/tlsproxy/web.sock", "listen_mode": "0o660"},
            None,
            "listeners[0].listen_mode: expected 3 or 4 octal digits such as \"0660\"; got '0o660'",
        ),
        (
            {"listen": "unix:/run/tlsproxy/web.sock", "listen_mode": 660},
            None,
            'listeners[0].listen_mode: expected a string of octal digits such as "0660", '
            "got 660 (a TOML number would be read as decimal)",
        ),
        (
            {"listen_mode": "0600"},
            None,
            "listeners[0].listen_mode: applies to a unix socket's file only, and listen is "
            "'127.0.0.1:0'; remove it, or listen on 'unix:/path'",
        ),
        (
            {"listen_owner": "root"},
            None,
            "listeners[0].listen_owner: applies to a unix socket's file only, and listen is "
            "'127.0.0.1:0'; remove it, or listen on 'unix:/path'",
        ),
        (
            {"listen": "unix:/run/tlsproxy/web.sock", "listen_owner": "tlsproxy-no-such-user"},
            None,
            "listeners[0].listen_owner: no user named 'tlsproxy-no-such-user' on this system "
            "(in 'tlsproxy-no-such-user')",
        ),
        (
            {"listen": "unix:/run/tlsproxy/web.sock", "listen_owner": "root:tlsproxy-no-group"},
            None,
            "listeners[0].listen_owner: no group named 'tlsproxy-no-group' on this system "
            "(in 'root:tlsproxy-no-group')",
        ),
        (
            {"listen": "unix:/run/tlsproxy/web.sock", "listen_owner": "root:"},
            None,
            'listeners[0].listen_owner: expected "user", "user:group" or ":group"; got \'root:\'',
        ),
        (
            {"listen": f"unix:{LONG_PATH}"},
            None,
            f"listeners[0].listen: unix socket path is longer than {UNIX_PATH_MAX} bytes, the "
            f"most the kernel accepts; use a shorter path: {LONG_PATH!r}",
        ),
        (
            {"listen": "unix:run/web.sock"},
            None,
            "listeners[0].listen: unix socket path must be absolute, e.g. 'unix:/run/app.sock'; "
            "got 'unix:run/web.sock'",
        ),
        (
            {},
            "unix:/run/tlsproxy/admin.sock",
            "admin.listen: the admin endpoint listens on TCP only (Prometheus scrapes it over "
            "TCP); expected host:port, e.g. '127.0.0.1:9090'; got 'unix:/run/tlsproxy/admin.sock'",
        ),
    ],
)
def test_config_errors_name_their_toml_path(
    certs: Certs, listener: dict[str, Any], admin: str | None, expected: str
) -> None:
    document: dict[str, Any] = {"listeners": [listener_table(certs, 1, **listener)]}
    if admin is not None:
        document["admin"] = {"listen": admin}
    assert _errors(certs, **document) == (expected,)


def test_two_listeners_on_one_path_are_an_overlap(certs: Certs) -> None:
    path = "unix:/run/tlsproxy/web.sock"
    document = {
        "listeners": [
            listener_table(certs, 1, listen=path),
            listener_table(certs, 1, name="api", listen=path),
        ]
    }
    assert _errors(certs, **document) == (
        f"listeners[1].listen: {path} is also listeners[0].listen; "
        "each listener needs its own address",
    )


def test_a_unix_listener_with_mode_and_owner_is_accepted_and_survives_overrides(
    certs: Certs,
) -> None:
    config = parse_config(
        {
            "listeners": [
                listener_table(
                    certs,
                    1,
                    listen="unix:/run/tlsproxy/web.sock",
                    listen_mode="0640",
                    listen_owner="54321:root",
                )
            ]
        },
        certs.cert.parent,
    )
    (listener,) = config.listeners
    assert listener.listen.unix_path == "/run/tlsproxy/web.sock"
    assert listener.socket_mode == 0o640
    assert listener.listen_owner == SocketOwner(54321, 0, "54321:root")
    overridden = with_overrides(config, backend="127.0.0.1:2")  # a round trip through TOML data
    assert overridden.listeners[0].socket_mode == 0o640
    assert overridden.listeners[0].listen_owner == listener.listen_owner
    default = parse_config(
        {"listeners": [listener_table(certs, 1, listen="unix:/run/a.sock")]}, certs.cert.parent
    )
    assert default.listeners[0].socket_mode == 0o660
    assert default.listeners[0].listen_owner is None


def test_check_config_names_an_unknown_owner_with_its_toml_path(
    tmp_path: Path, certs: Certs
) -> None:
    config = tmp_path / "unix.toml"
    config.write_text(
        config_text(
            certs.cert,
            certs.key,
            listen="unix:/run/tlsproxy/web.sock",
            listener_lines='listen_owner = "tlsproxy-no-such-user:root"',
        )
    )
    result = subprocess.run(
        [*PYTHON_M_PROXY, "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=STEP,
        check=False,
    )
    assert result.returncode == 1
    assert (
        "error: listeners[0].listen_owner: no user named 'tlsproxy-no-such-user' on this system"
        in result.stderr
    )


# ---------------------------------------------------------------- served


async def test_the_tls_listener_is_served_over_a_unix_socket(
    nursery: trio.Nursery, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    proxy = await start_server(nursery, unix_config(certs, echo_port, path))
    assert proxy.bound.listeners["web"] == (str(path), 0)
    (listening,) = proxy.log_events("listening")
    assert listening["address"] == f"unix:{path}"
    found = os.lstat(path)
    assert stat.S_IMODE(found.st_mode) == 0o660  # the default listen_mode
    assert (found.st_uid, found.st_gid) == (os.geteuid(), os.getegid())  # no listen_owner
    await echo_over(path, certs.client_context())
    (line,) = await proxy.access_log()
    assert line["client"] == "unix"  # format_sockaddr's spelling of an unnamed peer
    assert line["outcome"] == "success"
    assert line["bytes_to_backend"] == len(MESSAGE)


async def test_curl_gets_the_backend_through_the_unix_socket(
    nursery: trio.Nursery, certs: Certs, sock_dir: Path
) -> None:
    backend_port = await start_backend(nursery, http_handler)
    path = sock_dir / "web.sock"
    await start_server(nursery, unix_config(certs, backend_port, path))
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [
                "curl",
                "-sS",
                "--max-time",
                str(int(STEP)),
                "--unix-socket",
                str(path),
                "--cacert",
                str(certs.ca_file),
                "https://localhost/",
            ],
            capture_stdout=True,
            capture_stderr=True,
        )
    assert result.stdout == b"hello from the backend\n", result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
async def test_listen_mode_and_owner_are_applied_to_the_file(
    nursery: trio.Nursery, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    config = unix_config(certs, echo_port, path, listen_mode="0640", listen_owner="54321:54322")
    await start_server(nursery, config)
    found = os.lstat(path)
    assert (stat.S_IMODE(found.st_mode), found.st_uid, found.st_gid) == (0o640, 54321, 54322)
    await echo_over(path, certs.client_context())


async def test_a_stale_socket_file_is_removed_at_start_and_logged(
    nursery: trio.Nursery, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    stale_socket(path)
    with socket.socket(socket.AF_UNIX) as client, pytest.raises(ConnectionRefusedError):
        client.connect(str(path))
    proxy = await start_server(nursery, unix_config(certs, echo_port, path))
    (removed,) = proxy.log_events(STALE_REMOVED_EVENT)
    assert removed["address"] == f"unix:{path}"
    assert removed["level"] == "warning"
    await echo_over(path, certs.client_context())


def fill_backlog(path: Path, queued: list[socket.socket]) -> None:
    """Connect without accepting until the listener's backlog is full (EAGAIN)."""
    for _ in range(16):  # a backlog of 0 queues one or two connects on Linux
        client = socket.socket(socket.AF_UNIX)
        client.setblocking(False)
        queued.append(client)
        try:
            client.connect(str(path))
        except BlockingIOError:
            return
    raise AssertionError("the backlog never filled")


@pytest.mark.parametrize("backlog_full", [False, True])
async def test_a_live_socket_at_the_path_is_refused_at_start(
    certs: Certs, echo_port: int, sock_dir: Path, backlog_full: bool
) -> None:
    path = sock_dir / "web.sock"
    queued: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen(0)
        if backlog_full:
            fill_backlog(path, queued)
        before = identity(path)
        with pytest.raises(StartupError) as caught:
            unstarted(unix_config(certs, echo_port, path)).bind()
        assert str(caught.value) == (
            f"cannot listen on unix:{path} (listener 'web'): another process is listening "
            "on it (another tlsproxy?)"
        )
        assert identity(path) == before  # left alone
        for client in queued:
            client.close()


async def test_a_path_that_is_not_a_socket_is_refused_and_left_alone(
    certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    path.write_text("someone's file")
    with pytest.raises(StartupError) as caught:
        unstarted(unix_config(certs, echo_port, path)).bind()
    assert str(caught.value) == (
        f"cannot listen on unix:{path} (listener 'web'): the path exists and is not a "
        "socket; it is left as it is: remove it or choose another path"
    )
    assert path.read_text() == "someone's file"


async def test_a_path_in_a_missing_directory_is_refused_at_start(
    certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "missing" / "web.sock"
    with pytest.raises(StartupError) as caught:
        unstarted(unix_config(certs, echo_port, path)).bind()
    assert str(caught.value) == (
        f"cannot listen on unix:{path} (listener 'web'): No such file or directory"
    )


async def test_the_file_is_removed_when_the_server_stops(
    certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    async with trio.open_nursery() as nursery:
        proxy = await start_server(nursery, unix_config(certs, echo_port, path))
        await echo_over(path, certs.client_context())
        proxy.server.request_drain()
    assert proxy.server.state.value == "stopped"
    assert not present(path)


async def test_a_successors_socket_on_the_path_is_not_removed(
    certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    with socket.socket(socket.AF_UNIX) as successor:
        async with trio.open_nursery() as nursery:
            proxy = await start_server(nursery, unix_config(certs, echo_port, path))
            path.unlink()  # as a successor does once it finds the path stale or free
            successor.bind(str(path))
            successor.listen()
            theirs = identity(path)
            proxy.server.request_drain()
        assert identity(path) == theirs
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))


# An interpreter another user may run (the virtualenv's may sit in root's home).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another user needs root")
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no system python3 for the other user")
async def test_the_mode_and_owner_decide_which_users_may_connect(
    nursery: trio.Nursery, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    os.chmod(sock_dir, 0o755)  # the directory lets anyone reach the file; the file decides
    path = sock_dir / "web.sock"
    await start_server(nursery, unix_config(certs, echo_port, path, listen_owner=":54322"))

    async def connect_as(uid: int, gid: int) -> str:
        script = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(e.errno)\n"
            "else:\n    print('connected')\n"
        )
        with trio.fail_after(STEP):
            result = await trio.run_process(
                [str(SYSTEM_PYTHON), "-c", script, str(path)],
                capture_stdout=True,
                user=uid,
                group=gid,
                extra_groups=[],
            )
        return result.stdout.decode().strip()

    assert await connect_as(54321, 54322) == "connected"  # in the socket's group: 0660
    assert await connect_as(54321, 54323) == str(errno.EACCES)  # neither owner nor group


async def test_a_reload_onto_a_file_or_a_live_socket_is_rejected_and_the_old_one_serves(
    nursery: trio.Nursery, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    old, taken = sock_dir / "web.sock", sock_dir / "taken"
    taken.write_text("someone's file")
    proxy = await start_server(nursery, unix_config(certs, echo_port, old))
    moved = unix_config(certs, echo_port, taken)
    assert not await proxy.server.reload(lambda: moved, trigger="test")
    (rejected,) = proxy.log_events("reload rejected; the previous config keeps serving")
    assert "the path exists and is not a socket" in rejected["error"]
    assert taken.read_text() == "someone's file"
    await echo_over(old, certs.client_context())

    live = sock_dir / "live.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(live))
        other.listen()
        onto_live = unix_config(certs, echo_port, live)
        assert not await proxy.server.reload(lambda: onto_live, trigger="test")
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(live))  # and still the other process's
    errors = [
        e["error"] for e in proxy.log_events("reload rejected; the previous config keeps serving")
    ]
    assert "another process is listening on it" in errors[1]
    await echo_over(old, certs.client_context())


# ---------------------------------------------------------------- reload


async def test_reload_keeps_the_socket_of_an_unchanged_path_and_applies_its_new_mode_and_owner(
    nursery: trio.Nursery, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    proxy = await start_server(nursery, unix_config(certs, echo_port, path))
    context = certs.client_context()
    with trio.fail_after(STEP):
        before_reload = await unix_tls_connect(path, context)
    bound = identity(path)
    root = os.geteuid() == 0  # chown to another user needs root
    owner = {"listen_owner": "54321:54322"} if root else {}
    reloaded = unix_config(certs, echo_port, path, listen_mode="0600", **owner)
    assert await proxy.server.reload(lambda: reloaded, trigger="test")
    assert identity(path) == bound  # the same socket file: never unbound
    found = os.lstat(path)
    assert stat.S_IMODE(found.st_mode) == 0o600
    if root:
        assert (found.st_uid, found.st_gid) == (54321, 54322)
    with trio.fail_after(STEP):
        await echo_on(before_reload, b"still here after the reload")
        await before_reload.aclose()
    await echo_over(path, context)
    assert [line["outcome"] for line in await proxy.access_log(2)] == ["success", "success"]


async def test_reload_moves_a_listener_to_a_new_path_and_removes_the_old_file(
    nursery: trio.Nursery, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    old, new = sock_dir / "old.sock", sock_dir / "new.sock"
    proxy = await start_server(nursery, unix_config(certs, echo_port, old))
    context = certs.client_context()
    with trio.fail_after(STEP):
        on_old = await unix_tls_connect(old, context)
    moved = unix_config(certs, echo_port, new)
    assert await proxy.server.reload(lambda: moved, trigger="test")
    await echo_over(new, context)

    async def old_file_gone() -> bool:
        return not present(old)

    await until(old_file_gone)
    with trio.fail_after(STEP):
        await echo_on(on_old, b"the old socket's connection finishes")
        await on_old.aclose()


# ---------------------------------------------------------------- PROXY header


class HeaderThenEcho:
    """A backend that takes the PROXY header off the stream, then echoes."""

    def __init__(self) -> None:
        self.headers: list[bytes] = []

    async def handler(self, stream: trio.SocketStream) -> None:
        data = b""
        while not isinstance(
            received := proxy_protocol.parse_header(data, "any"), proxy_protocol.Received
        ):
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += bytes(chunk)
        self.headers.append(data[: received.length])
        rest = data[received.length :]
        try:
            if rest:
                await stream.send_all(rest)
            async for more in stream:
                await stream.send_all(more)
        except trio.BrokenResourceError:
            pass


async def test_proxy_protocol_v1_from_a_unix_client_says_unknown(
    nursery: trio.Nursery, certs: Certs, sock_dir: Path
) -> None:
    backend = HeaderThenEcho()
    port = await start_backend(nursery, backend.handler)
    path = sock_dir / "web.sock"
    proxy = await start_server(nursery, unix_config(certs, port, path, proxy_protocol="v1"))
    await echo_over(path, certs.client_context())
    assert backend.headers == [b"PROXY UNKNOWN\r\n"]
    (line,) = await proxy.access_log()
    assert line["outcome"] == "success"


async def test_proxy_protocol_v2_from_a_unix_client_is_local_with_its_tlvs(
    nursery: trio.Nursery, certs: Certs, sock_dir: Path
) -> None:
    backend = HeaderThenEcho()
    port = await start_backend(nursery, backend.handler)
    path = sock_dir / "web.sock"
    await start_server(nursery, unix_config(certs, port, path, proxy_protocol="v2"))
    await echo_over(path, certs.client_context())
    (header,) = backend.headers
    assert header[:12] == proxy_protocol.V2_SIGNATURE
    assert (header[12], header[13]) == (0x20, 0x00)  # LOCAL, AF_UNSPEC: no addresses
    parsed = proxy_protocol.parse_header(header, "v2")
    assert isinstance(parsed, proxy_protocol.Received) and parsed.source is None
    sni = b"localhost"
    # The TLVs follow at once: the authority (SNI) first, then the SSL TLV.
    assert (
        header[16 : 19 + len(sni)] == bytes([proxy_protocol.PP2_TYPE_AUTHORITY, 0, len(sni)]) + sni
    )
    assert header[19 + len(sni)] == proxy_protocol.PP2_TYPE_SSL


# ---------------------------------------------------------------- the daemon


def _daemon_config(
    tmp_path: Path, certs: Certs, path: Path, backend_port: int, process_lines: str = ""
) -> Path:
    config = tmp_path / "unix.toml"
    config.write_text(
        config_text(
            certs.cert,
            certs.key,
            backend_port=backend_port,
            listen=f"unix:{path}",
            process_lines=f"watch = false\n{process_lines}",
        )
    )
    return config


async def test_sigterm_removes_the_file_as_the_listener_closes_and_live_connections_finish(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    config = _daemon_config(tmp_path, certs, path, echo_port)
    context = certs.client_context()
    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        await daemon.wait_for("listening", address=f"unix:{path}")
        with trio.fail_after(STEP):
            live = await unix_tls_connect(path, context)
        daemon.signal(signal.SIGTERM)
        await daemon.wait_for("draining", connections=1)

        async def file_gone() -> bool:
            return not present(path)

        await until(file_gone)
        with trio.fail_after(STEP):
            await echo_on(live, b"draining, with the file already gone")
            await live.aclose()
        assert await daemon.exit_code() == 0
    assert not present(path)


async def test_a_live_socket_at_the_path_stops_the_daemon_with_exit_2(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    config = _daemon_config(tmp_path, certs, path, echo_port)
    argv = [*PYTHON_M_PROXY, "run", "--config", str(config)]
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen()
        async with spawn(
            nursery, argv, env=env_for(tmp_path / "state"), errors_expected=True
        ) as daemon:
            assert await daemon.exit_code() == 2
        assert daemon.find(
            "cannot listen on unix:" + str(path) + " (listener 'web'): another process is "
            "listening on it (another tlsproxy?)"
        ), daemon.output()
        assert present(path)


# ---------------------------------------------------------------- workers

# Connections tried, one after another, until both workers have served one:
# the kernel hands each to whichever worker accepts first, so a handful
# suffice; the bound only stops a broken daemon from looping for ever.
MAX_CONNECTIONS_FOR_BOTH = 200


async def _served_by(daemon: Any, count: int) -> set[int]:
    await daemon.wait_until(
        lambda: len([e for e in daemon.events if e.get("event") == "connection"]) >= count,
        f"{count} access lines",
    )
    return {e["pid"] for e in daemon.events if e.get("event") == "connection"}


async def test_two_workers_serve_connections_on_the_one_socket_file(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    config = _daemon_config(tmp_path, certs, path, echo_port, "workers = 2")
    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        ready = await daemon.wait_for("workers ready")
        workers = set(ready["worker_pids"])
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        context = certs.client_context()
        served: set[int] = set()
        for count in range(1, MAX_CONNECTIONS_FOR_BOTH + 1):
            await echo_over(path, context)
            served = await _served_by(daemon, count)
            if served == workers:
                break
        assert served == workers, f"only {served} of {workers} served in {count} connections"
        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0
    assert not present(path)


async def test_with_workers_a_reload_applies_the_mode_and_refuses_a_moved_path(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path, moved = sock_dir / "web.sock", sock_dir / "moved.sock"
    config = _daemon_config(tmp_path, certs, path, echo_port, "workers = 2")
    async with spawn(
        nursery,
        [*PYTHON_M_PROXY, "run", "--config", str(config)],
        env=env_for(tmp_path / "state"),
        errors_expected=True,  # the refused reload is logged at error level
    ) as daemon:
        await daemon.wait_for("workers ready")
        bound = identity(path)
        config.write_text(
            config.read_text().replace('listen = "unix:', 'listen_mode = "0600"\nlisten = "unix:')
        )
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for("reload counted", result="success")
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert identity(path) == bound

        config.write_text(config.read_text().replace(str(path), str(moved)))
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for("reload counted", result="failure")
        refused = daemon.find("reload rejected; the previous config keeps serving")
        assert refused is not None
        assert refused["error"].startswith(
            "with workers > 1 the unix listeners are bound by the supervisor at start"
        )
        assert not present(moved)
        await echo_over(path, certs.client_context())
        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0
    assert not present(path)


async def test_a_killed_worker_is_restarted_on_the_same_socket(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    path = sock_dir / "web.sock"
    config = _daemon_config(tmp_path, certs, path, echo_port, "workers = 2")
    async with spawn(
        nursery,
        [*PYTHON_M_PROXY, "run", "--config", str(config)],
        env=env_for(tmp_path / "state"),
        errors_expected=True,  # the unexpected exit is logged at error level
    ) as daemon:
        ready = await daemon.wait_for("workers ready")
        bound = identity(path)
        os.kill(ready["worker_pids"][0], signal.SIGKILL)
        restarted = await daemon.wait_for("worker ready", restarts=1)
        assert identity(path) == bound  # the supervisor's socket, never closed
        context = certs.client_context()
        served: set[int] = set()
        for count in range(1, MAX_CONNECTIONS_FOR_BOTH + 1):
            await echo_over(path, context)
            served = await _served_by(daemon, count)
            if restarted["worker_pid"] in served:
                break
        assert restarted["worker_pid"] in served
        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0


async def test_the_embedded_default_on_a_unix_socket_logs_a_curl_line_that_works(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, sock_dir: Path
) -> None:
    backend_port = await start_backend(nursery, http_handler)
    path = sock_dir / "web.sock"
    args = ["--listen", f"unix:{path}", "--backend", f"127.0.0.1:{backend_port}"]
    async with run_daemon(nursery, tmp_path, *args, "--admin", "127.0.0.1:0") as daemon:
        running = await daemon.wait_for("running the embedded default config")
        assert running["try_it"].startswith(f"curl --unix-socket {path} --cacert ")
        with trio.fail_after(STEP):
            result = await trio.run_process(
                [*shlex.split(running["try_it"]), "-sS"], capture_stdout=True, capture_stderr=True
            )
        assert result.stdout == b"hello from the backend\n", result.stderr


async def test_with_workers_connects_are_refused_once_the_workers_stop_accepting(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, echo_port: int, sock_dir: Path
) -> None:
    """The supervisor closes its copy of the socket when draining: else the
    socket would stay listening after the workers closed theirs, and connects
    would wait in its backlog for nobody until the supervisor exits."""
    path = sock_dir / "web.sock"
    config = _daemon_config(tmp_path, certs, path, echo_port, "workers = 2")
    context = certs.client_context()
    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        ready = await daemon.wait_for("workers ready")
        with trio.fail_after(STEP):
            live = await unix_tls_connect(path, context)  # keeps one worker draining
        daemon.signal(signal.SIGTERM)
        for pid in ready["worker_pids"]:
            await daemon.wait_for("draining", pid=pid)
        assert present(path)  # the supervisor removes it at exit
        # The supervisor closes its copy on SIGTERM as the workers close
        # theirs, in no fixed order with their log lines: refused soon, while
        # the live connection still holds the daemon (without the close, a
        # connect waits in the backlog until the daemon exits).
        with trio.fail_after(STEP):
            while True:
                client = trio.socket.socket(socket.AF_UNIX)
                with client:
                    try:
                        await client.connect(str(path))
                    except ConnectionRefusedError:
                        break
                await trio.sleep(0.05)
        with trio.fail_after(STEP):
            await echo_on(live, b"still draining")
            await live.aclose()
        assert await daemon.exit_code() == 0
    assert not present(path)
