"""Who may connect: `[listeners.tls.allow]` and a route's `allow`, judged
after the chain verified and before the backend is connected, with real
clients (Python ssl, curl, openssl s_client) and certificates with URI SANs
made here. A denial is one `client_cert_denied` on /metrics and an access
line that names the identity; the backend never sees the client."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.config import ConfigError, load_config, parse_config
from tests.daemon import PYTHON_M_PROXY, Daemon, config_text, env_for, spawn, toml_str
from tests.helpers import (
    STEP,
    Running,
    outcome_delta,
    outcomes,
    sample,
    scrape,
    start_backend,
    start_server,
)
from tests.pki import CA, Leaf, client_context

WEB = "spiffe://prod.example/ns/web/sa/frontend"
OPS = "spiffe://prod.example/ns/ops/sa/deploy"
ROUTE_SNI = "api.test"

ALLOW: dict[str, list[str]] = {
    "uri": [WEB, "spiffe://prod.example/ns/batch/**", "spiffe://prod.example/ns/*/sa/api"],
    "dns": ["*.jobs.internal.example"],
    "cn": ["legacy-billing"],
    "ou": ["payments"],
}
ROUTE_ALLOW = {"uri": ["spiffe://prod.example/ns/ops/**"]}


class PKI:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers = CA(directory, "server CA")
        self.clients = CA(directory, "client CA")
        self.server = self.servers.issue("server", "localhost", ROUTE_SNI)

    def client(self, stem: str, *names: str, uris: tuple[str, ...] = (), **kw: Any) -> Leaf:
        return self.clients.issue(stem, *names, uris=uris, client=True, **kw)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("allow"))


@dataclass
class RecordingBackend:
    """An echo backend that records every connection it accepted and every byte."""

    connections: int = 0
    received: bytearray = field(default_factory=bytearray)

    async def handler(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            async for data in stream:
                self.received += data
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


def tls_table(pki: PKI, **keys: Any) -> dict[str, Any]:
    return {
        "certificates": [pki.server.pair()],
        "client_auth": "require",
        "client_ca": str(pki.clients.ca_file),
        **keys,
    }


async def start(
    nursery: trio.Nursery, pki: PKI, *, allow: Any = ALLOW, route_allow: Any = ROUTE_ALLOW
) -> tuple[Running, RecordingBackend, RecordingBackend]:
    """The proxy with the listener's and the route's tables; its two backends."""
    default, routed = RecordingBackend(), RecordingBackend()
    default_port = await start_backend(nursery, default.handler)
    routed_port = await start_backend(nursery, routed.handler)
    route: dict[str, Any] = {"sni": ROUTE_SNI, "backend": f"127.0.0.1:{routed_port}"}
    if route_allow is not None:
        route["allow"] = route_allow
    listener = {
        "name": "web",
        "listen": "127.0.0.1:0",
        "backend": f"127.0.0.1:{default_port}",
        "handshake_timeout": 5.0,
        "tls": tls_table(pki, allow=allow),
        "routes": [route],
    }
    config = parse_config({"admin": {"listen": "127.0.0.1:0"}, "listeners": [listener]}, Path())
    return await start_server(nursery, config), default, routed


def echo_once(
    port: int,
    context: ssl.SSLContext,
    sni: str = "localhost",
) -> bytes | BaseException:
    """A blocking Python ssl client: handshake, send, read. What it read, or
    what it raised (in TLS 1.3 a denied client learns only when it reads)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=STEP) as sock,
            context.wrap_socket(sock, server_hostname=sni) as tls,
        ):
            tls.sendall(b"ping")
            return tls.recv(1024)
    except (ssl.SSLError, OSError) as exc:
        return exc


async def attempt(
    proxy: Running, pki: PKI, leaf: Leaf | None, sni: str = "localhost", *, nth: int = 1
) -> tuple[str, dict[str, Any], bytes | BaseException]:
    """One connection: its outcome (exactly one +1 on /metrics), its access
    line, and what the client got back."""
    before = await outcomes(proxy.admin_port)
    context = client_context(pki.servers, leaf)
    with trio.fail_after(STEP):
        got = await trio.to_thread.run_sync(partial(echo_once, proxy.port, context, sni))
        line = (await proxy.access_log(nth))[nth - 1]
    delta = await outcome_delta(proxy.admin_port, before)
    assert delta == {line["outcome"]: 1.0}
    return line["outcome"], line, got


ADMITTED = [
    pytest.param("web", {"uris": (WEB,)}, id="exact-spiffe-id"),
    pytest.param("cron", {"uris": ("spiffe://prod.example/ns/batch/sa/cron",)}, id="**"),
    pytest.param("pay", {"uris": ("spiffe://prod.example/ns/pay/sa/api",)}, id="*"),
    pytest.param("cron.jobs.internal.example", {}, id="dns-wildcard"),
    pytest.param("legacy-billing", {}, id="cn"),
    pytest.param("teller", {"ou": "payments"}, id="ou"),
]


@pytest.mark.parametrize(("stem", "extra"), ADMITTED)
async def test_admitted(nursery: trio.Nursery, pki: PKI, stem: str, extra: dict[str, Any]) -> None:
    proxy, backend, _ = await start(nursery, pki)
    names = (stem,) if "." in stem else ()  # a DNS SAN (and the CN), else the CN alone
    outcome, line, got = await attempt(proxy, pki, pki.client(stem, *names, **extra))
    assert (outcome, got) == ("success", b"ping")
    assert line["allow_rules"] == "listener"
    assert "client_cert_error" not in line
    assert backend.connections == 1


DENIED = [
    pytest.param(("spiffe://staging.example/ns/web/sa/frontend",), id="other-trust-domain"),
    pytest.param(("spiffe://prod.example/ns/web/sa/unlisted",), id="unlisted-path"),
    pytest.param(("spiffe://prod.example/ns/a/b/sa/api",), id="*-is-one-segment"),
    pytest.param((WEB, "spiffe://prod.example/ns/batch/sa/cron"), id="two-spiffe-ids"),
]


@pytest.mark.parametrize("uris", DENIED)
async def test_denied_before_the_backend_is_connected(
    nursery: trio.Nursery, pki: PKI, uris: tuple[str, ...]
) -> None:
    proxy, backend, routed = await start(nursery, pki)
    leaf = pki.client("denied", "denied.test", uris=uris)
    outcome, line, got = await attempt(proxy, pki, leaf)
    assert outcome == "client_cert_denied"
    assert got != b"ping"
    assert line["client_cert_error"] == "not_allowed"
    assert line["allow_rules"] == "listener"
    assert line["client_subject"] == "CN=denied.test,O=tlsproxy tests"
    assert line["client_san_uri"] == list(uris)
    assert line["client_san_dns"] == ["denied.test"]
    assert "backend" not in line
    # the backend was never connected, so no byte of the client's reached it
    assert (backend.connections, bytes(backend.received)) == (0, b"")
    assert routed.connections == 0


async def test_the_right_cn_from_another_ca_is_invalid_not_denied(
    nursery: trio.Nursery, pki: PKI, tmp_path: Path
) -> None:
    proxy, backend, _ = await start(nursery, pki)
    stranger = CA(tmp_path, "stranger CA").issue("legacy-billing", client=True)
    outcome, line, _ = await attempt(proxy, pki, stranger)
    assert (outcome, line["client_cert_error"]) == ("client_cert_invalid", "unknown_ca")
    assert "allow_rules" not in line
    assert backend.connections == 0


async def test_a_route_allow_replaces_the_listeners(nursery: trio.Nursery, pki: PKI) -> None:
    proxy, default, routed = await start(nursery, pki)
    web, ops = pki.client("web", uris=(WEB,)), pki.client("ops", uris=(OPS,))
    # the listener's default name: web is listed, ops is not
    assert (await attempt(proxy, pki, web, nth=1))[0] == "success"
    outcome, line, _ = await attempt(proxy, pki, ops, nth=2)
    assert (outcome, line["allow_rules"]) == ("client_cert_denied", "listener")
    # the route's name: only the route's table applies
    outcome, line, _ = await attempt(proxy, pki, web, ROUTE_SNI, nth=3)
    assert (outcome, line["allow_rules"]) == ("client_cert_denied", f"route:{ROUTE_SNI}")
    outcome, line, got = await attempt(proxy, pki, ops, ROUTE_SNI, nth=4)
    assert (outcome, line["allow_rules"], got) == ("success", f"route:{ROUTE_SNI}", b"ping")
    assert (default.connections, routed.connections) == (1, 1)


async def test_a_route_without_allow_keeps_the_listeners(nursery: trio.Nursery, pki: PKI) -> None:
    proxy, _, routed = await start(nursery, pki, route_allow=None)
    ops = pki.client("ops", uris=(OPS,))
    outcome, line, _ = await attempt(proxy, pki, ops, ROUTE_SNI)
    assert (outcome, line["allow_rules"]) == ("client_cert_denied", "listener")
    assert routed.connections == 0


async def test_each_denial_is_one_count_and_exported_at_zero(
    nursery: trio.Nursery, pki: PKI
) -> None:
    proxy, _, _ = await start(nursery, pki)
    assert (await outcomes(proxy.admin_port))["client_cert_denied"] == 0.0
    stranger = pki.client("x", uris=("spiffe://prod.example/ns/x",))
    for nth in (1, 2, 3):
        assert (await attempt(proxy, pki, stranger, nth=nth))[0] == "client_cert_denied"
    assert (await outcomes(proxy.admin_port))["client_cert_denied"] == 3.0


# ---------------------------------------------------------------- reload


def _config_file(path: Path, pki: PKI, backend: int, uris: list[str], workers: int = 1) -> Path:
    uri_list = ", ".join(toml_str(uri) for uri in uris)
    tls = f"""client_auth = "require"
client_ca = {toml_str(pki.clients.ca_file)}
[listeners.tls.allow]
uri = [{uri_list}]"""
    path.write_text(
        config_text(
            pki.server.cert,
            pki.server.key,
            backend_port=backend,
            process_lines=f"watch = false\nworkers = {workers}",
            tls_lines=tls,
        ),
        encoding="utf-8",
    )
    return path


async def test_reload_replaces_the_lists_and_spares_established_connections(
    nursery: trio.Nursery, pki: PKI, tmp_path: Path
) -> None:
    backend = RecordingBackend()
    port = await start_backend(nursery, backend.handler)
    config = _config_file(tmp_path / "tlsproxy.toml", pki, port, [WEB])
    proxy = await start_server(nursery, load_config(config))
    web, ops = pki.client("web", uris=(WEB,)), pki.client("ops", uris=(OPS,))
    assert (await attempt(proxy, pki, ops, nth=1))[0] == "client_cert_denied"

    # an established connection of web's, across a reload that drops web
    context = client_context(pki.servers, web)
    with trio.fail_after(STEP):
        tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        stream = trio.SSLStream(tcp, context, server_hostname="localhost")
        await stream.send_all(b"before")
        assert await stream.receive_some(100) == b"before"

    _config_file(config, pki, port, [OPS])
    assert await proxy.server.reload(lambda: load_config(config), trigger="test")
    assert (await attempt(proxy, pki, ops, nth=2))[0] == "success"
    assert (await attempt(proxy, pki, web, nth=3))[0] == "client_cert_denied"
    with trio.fail_after(STEP):
        await stream.send_all(b"after")  # not judged again
        assert await stream.receive_some(100) == b"after"
        await stream.aclose()
        (*_, closed) = await proxy.access_log(4)
    assert (closed["outcome"], closed["client_san_uri"]) == ("success", [WEB])

    # an invalid pattern: the reload is refused and the lists in use stay
    _config_file(config, pki, port, [OPS, "spiffe://prod.example/ns/../admin"])
    assert not await proxy.server.reload(lambda: load_config(config), trigger="test")
    (rejected,) = proxy.log_events("reload rejected; the previous config keeps serving")
    assert rejected["error"].startswith("listeners[0].tls.allow.uri[1]: a SPIFFE ID has no '.'")
    assert (await attempt(proxy, pki, ops, nth=5))[0] == "success"


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("tls", "where", "message"),
    [
        (
            {"client_auth": "optional", "allow": {"cn": ["x"]}},
            "listeners[0].tls.allow",
            'needs client_auth = "require" (it is "optional")',
        ),
        (
            {"allow": {"uri": [WEB, "spiffe://Prod.example/ns/web"]}},
            "listeners[0].tls.allow.uri[1]",
            "trust domain 'Prod.example' must be lower-case",
        ),
        (
            {"allow": {"uri": ["spiffe://prod.example/ns/**/web"]}},
            "listeners[0].tls.allow.uri[0]",
            "'**' may only be the last path segment",
        ),
        (
            {"allow": {"dns": ["*.*.example"]}},
            "listeners[0].tls.allow.dns[0]",
            "'*' may only be the whole leftmost label",
        ),
        ({"allow": {"cn": [""]}}, "listeners[0].tls.allow.cn[0]", "must not be empty"),
        ({"allow": {}}, "listeners[0].tls.allow", "admit no one"),
        ({"allow": {"uri": [WEB], "spiffe": []}}, "listeners[0].tls.allow.spiffe", "unknown key"),
    ],
)
def test_config_errors_name_the_entry(
    pki: PKI, tls: dict[str, Any], where: str, message: str
) -> None:
    listener = {"name": "web", "listen": "127.0.0.1:0", "backend": "127.0.0.1:1"}
    listener["tls"] = tls_table(pki, **tls)  # type: ignore[assignment]
    with pytest.raises(ConfigError) as caught:
        parse_config({"listeners": [listener]}, Path())
    assert any(e.startswith(f"{where}: ") and message in e for e in caught.value.errors), (
        caught.value.errors
    )


def test_a_route_allow_needs_require_too(pki: PKI) -> None:
    listener = {
        "name": "web",
        "listen": "127.0.0.1:0",
        "backend": "127.0.0.1:1",
        "tls": tls_table(pki, client_auth="optional"),
        "routes": [{"sni": ROUTE_SNI, "backend": "127.0.0.1:2", "allow": ROUTE_ALLOW}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config({"listeners": [listener]}, Path())
    assert caught.value.errors == (
        'listeners[0].routes[0].allow: an allow table needs client_auth = "require" '
        '(it is "optional"): only a verified certificate has an identity to match',
    )


async def test_check_config_names_both_problems_with_their_paths(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        """
[[listeners]]
name = "web"
listen = "127.0.0.1:8443"
backend = "127.0.0.1:8080"
[listeners.tls]
certificates = [{ cert = "tls.crt", key = "tls.key" }]
client_auth = "optional"
client_ca = "clients.pem"
[listeners.tls.allow]
uri = ["spiffe://prod.example:8443/ns/web"]
[[listeners]]
name = "api"
listen = "127.0.0.1:8444"
backend = "127.0.0.1:8080"
[listeners.tls]
certificates = [{ cert = "tls.crt", key = "tls.key" }]
client_auth = "optional"
client_ca = "clients.pem"
[listeners.tls.allow]
cn = ["billing"]
""",
        encoding="utf-8",
    )
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [*PYTHON_M_PROXY, "check-config", "--no-files", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    errors = result.stderr.decode()
    assert result.returncode == 1, errors
    assert (
        "error: listeners[0].tls.allow.uri[0]: a SPIFFE ID has no port in its trust domain; "
        "got 'spiffe://prod.example:8443/ns/web'"
    ) in errors
    assert 'error: listeners[1].tls.allow: an allow table needs client_auth = "require"' in errors


# ---------------------------------------------------------------- what a denied client sees


VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, "1.2", id="TLSv1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, "1.3", id="TLSv1.3"),
]


@pytest.mark.parametrize(("version", "number"), VERSIONS)
async def test_what_python_ssl_sees_when_denied(
    nursery: trio.Nursery, pki: PKI, version: ssl.TLSVersion, number: str
) -> None:
    """The handshake completes on the client's side; then the proxy's
    close_notify: the first read returns b'' (end of stream), no alert."""
    proxy, _, _ = await start(nursery, pki)
    context = client_context(pki.servers, pki.client("x", uris=("spiffe://prod.example/x",)))
    context.minimum_version = context.maximum_version = version

    def client() -> tuple[str | None, bytes]:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=STEP) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            return tls.version(), tls.recv(1024)

    with trio.fail_after(STEP):
        negotiated, read = await trio.to_thread.run_sync(client)
        (line,) = await proxy.access_log(1)
    assert (negotiated, read) == (f"TLSv{number}", b"")
    assert line["outcome"] == "client_cert_denied"


@pytest.mark.parametrize(("version", "number"), VERSIONS)
async def test_what_curl_sees_when_denied(
    nursery: trio.Nursery, pki: PKI, version: ssl.TLSVersion, number: str
) -> None:
    """curl completes the handshake, sends its request, and reads the
    proxy's close_notify: exit 52, "Empty reply from server"."""
    proxy, _, _ = await start(nursery, pki)
    leaf = pki.client("x", uris=("spiffe://prod.example/x",))
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [
                *("curl", "--silent", "--show-error", "--verbose", f"--tlsv{number}"),
                *("--tls-max", number, "--max-time", str(STEP)),
                *("--cacert", str(pki.servers.ca_file)),
                *("--cert", str(leaf.cert), "--key", str(leaf.key)),
                f"https://localhost:{proxy.port}/",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        (line,) = await proxy.access_log(1)
    assert line["outcome"] == "client_cert_denied"
    stderr = result.stderr.decode()
    assert result.returncode == 52, stderr
    assert f"SSL connection using TLSv{number}" in stderr
    assert f"TLSv{number} (IN), TLS alert, close notify" in stderr
    assert "curl: (52) Empty reply from server" in stderr


async def test_openssl_s_client_completes_the_handshake_then_reads_the_end(
    nursery: trio.Nursery, pki: PKI
) -> None:
    proxy, _, _ = await start(nursery, pki)
    leaf = pki.client("x", uris=("spiffe://prod.example/x",))
    with trio.fail_after(STEP), contextlib.suppress(subprocess.CalledProcessError):
        result = await trio.run_process(
            [
                *("openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}"),
                *("-servername", "localhost", "-CAfile", str(pki.servers.ca_file)),
                *("-cert", str(leaf.cert), "-key", str(leaf.key)),
            ],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        (line,) = await proxy.access_log(1)
    assert line["outcome"] == "client_cert_denied"
    assert b"Verify return code: 0 (ok)" in result.stdout


async def test_with_two_workers_denials_are_counted_once_and_sighup_admits(
    nursery: trio.Nursery, pki: PKI, tmp_path: Path
) -> None:
    """workers = 2: every worker judges by the same table, the merged scrape
    counts each denial once, and a SIGHUP that extends the list reaches both."""
    backend = RecordingBackend()
    port = await start_backend(nursery, backend.handler)
    config = _config_file(tmp_path / "tlsproxy.toml", pki, port, [WEB], workers=2)
    ops = pki.client("ops", uris=(OPS,))
    context = client_context(pki.servers, ops)
    attempts = 6  # spread over both workers by the kernel's hash of the client port

    def served(daemon: Daemon, outcome: str) -> list[dict[str, Any]]:
        return [e for e in daemon.events if e.get("outcome") == outcome]

    argv = [*PYTHON_M_PROXY, "run", "--config", str(config)]
    async with spawn(nursery, argv, env=env_for(tmp_path / "state"), cwd=tmp_path) as daemon:
        await daemon.wait_for("workers ready")
        tls_port, admin_port = await daemon.started()
        with trio.fail_after(STEP):
            for _ in range(attempts):
                got = await trio.to_thread.run_sync(partial(echo_once, tls_port, context))
                assert got != b"ping"
        await daemon.wait_until(
            lambda: len(served(daemon, "client_cert_denied")) == attempts, "the denials logged"
        )
        _, text = await scrape(admin_port)
        denied = sample(text, "tlsproxy_handshakes_total", outcome="client_cert_denied")
        assert denied == attempts
        assert backend.connections == 0

        _config_file(config, pki, port, [WEB, OPS], workers=2)
        daemon.signal(signal.SIGHUP)
        await daemon.wait_until(
            lambda: len([e for e in daemon.events if e.get("event") == "config reloaded"]) == 2,
            "both workers reloaded",
        )
        with trio.fail_after(STEP):
            for _ in range(attempts):
                got = await trio.to_thread.run_sync(partial(echo_once, tls_port, context))
                assert got == b"ping"
        await daemon.wait_until(
            lambda: len(served(daemon, "success")) == attempts, "the admissions logged"
        )
        assert backend.connections == attempts
