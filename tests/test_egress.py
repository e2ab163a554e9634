"""Egress: plaintext from the app, TLS (mutual, with a client certificate)
originated to a real TLS server, the upstream outcome counted once."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.config import Config, parse_address, parse_config
from tests.helpers import STEP, echo_handler, raw_connect, sample, scrape, start_backend
from tests.helpers import start_server as start
from tests.pki import CA, Leaf, client_context
from tests.upstream_peers import (
    APP_ID,
    egress_config,
    ingress_config,
    server_context,
    thread_server,
    tls_behaviour,
)

Handler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


async def start_tls_server(nursery: trio.Nursery, context: ssl.SSLContext, handler: Handler) -> int:
    """A Python ssl server on loopback; its handler gets each stream after the handshake."""

    async def serve(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        try:
            await tls.do_handshake()
            await handler(tls)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    (listener,) = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return int(listener.socket.getsockname()[1])


async def echo_peer(tls: trio.SSLStream[trio.SocketStream]) -> None:
    while data := await tls.receive_some():
        await tls.send_all(data)


@pytest.mark.parametrize("tls13", [True, False], ids=["TLSv1.3", "TLSv1.2"])
async def test_an_app_reaches_an_mtls_upstream_through_the_egress_listener(
    tmp_path: Path, nursery: trio.Nursery, tls13: bool
) -> None:
    ca = CA(tmp_path)
    server = ca.issue("upstream", "localhost")
    me = ca.issue("me", uris=("spiffe://test.example/ns/a/sa/app",), client=True)
    seen: list[Any] = []

    async def peer(tls: trio.SSLStream[trio.SocketStream]) -> None:
        seen.append(tls.getpeercert())
        await echo_peer(tls)

    port = await start_tls_server(
        nursery, server_context(ca, server, client_ca=ca, tls13=tls13), peer
    )
    proxy = await start(nursery, egress_config(tmp_path, port, ca, me))
    with trio.fail_after(STEP):
        app = await raw_connect(proxy.port)
        await app.send_all(b"hello")
        assert await app.receive_some() == b"hello"
        await app.aclose()
        (line,) = await proxy.access_log()
    assert seen[0]["subjectAltName"] == (("URI", "spiffe://test.example/ns/a/sa/app"),)
    assert line["upstream_outcome"] == "success"
    _, text = await scrape(proxy.admin_port)
    assert (
        sample(text, "tlsproxy_upstream_handshakes_total", listener="web", outcome="success") == 1
    )
    assert "tlsproxy_handshakes_total{" not in text


@pytest.mark.parametrize("tls13", [True, False], ids=["TLSv1.3", "TLSv1.2"])
async def test_an_upstream_refusing_our_missing_certificate_is_counted_and_the_app_reset(
    tmp_path: Path, nursery: trio.Nursery, tls13: bool
) -> None:
    ca = CA(tmp_path)
    server = ca.issue("upstream", "localhost")
    with thread_server(
        tls_behaviour(server_context(ca, server, client_ca=ca, tls13=tls13))
    ) as peer:
        await refused_by(peer.port, tmp_path, nursery, ca)


async def refused_by(port: int, tmp_path: Path, nursery: trio.Nursery, ca: CA) -> None:
    proxy = await start(nursery, egress_config(tmp_path, port, ca, None))
    with trio.fail_after(STEP):
        app = await raw_connect(proxy.port)
        await app.send_all(b"hello")
        got: bytes | trio.BrokenResourceError
        try:
            got = await app.receive_some()
        except trio.BrokenResourceError as exc:
            got = exc
        await app.aclose()
        (line,) = await proxy.access_log()
    assert line["upstream_outcome"] == "client_cert_rejected_by_server", (line, got)
    assert isinstance(got, trio.BrokenResourceError), (line, got)
    _, text = await scrape(proxy.admin_port)
    assert (
        sample(
            text,
            "tlsproxy_upstream_handshakes_total",
            listener="web",
            outcome="client_cert_rejected_by_server",
        )
        == 1
    )
    assert (
        sample(text, "tlsproxy_upstream_handshakes_total", listener="web", outcome="success") == 0
    )


@pytest.mark.parametrize("admitted", [True, False], ids=["allowed", "denied"])
async def test_the_tunnel_app_to_egress_to_ingress_to_backend(
    tmp_path: Path, nursery: trio.Nursery, admitted: bool
) -> None:
    """The ghostunnel-style deployment, both halves tlsproxy: the app's
    plaintext crosses mTLS between two sidecars and reaches the backend, and
    each side counts its own handshake."""
    ca = CA(tmp_path)
    uri = APP_ID if admitted else "spiffe://test.example/ns/b/sa/x"
    me = ca.issue("me", uris=(uri,), client=True)
    backend_port = await start_backend(nursery, echo_handler)
    ingress = await start(
        nursery, ingress_config(tmp_path, backend_port, ca, ca.issue("in", "localhost"), APP_ID)
    )
    egress = await start(nursery, egress_config(tmp_path, ingress.port, ca, me))
    payload = b"through the tunnel" * 1000
    with trio.fail_after(STEP):
        app = await raw_connect(egress.port)
        await app.send_all(payload)
        if admitted:  # else the ingress side closes first, unasked
            await app.send_eof()
        received = b""
        while data := await app.receive_some():
            received += data
        await app.aclose()
        (ingress_line,) = await ingress.access_log()
        (egress_line,) = await egress.access_log()
    _, ingress_text = await scrape(ingress.admin_port)
    _, egress_text = await scrape(egress.admin_port)
    outcome = "success" if admitted else "client_cert_denied"
    assert ingress_line["outcome"] == outcome
    assert sample(ingress_text, "tlsproxy_handshakes_total", listener="web", outcome=outcome) == 1
    assert ingress_line["client_san_uri"] == [uri]
    # A denial is close_notify after a completed handshake (the README's
    # "Who may connect"): to the egress side the upstream handshake succeeded
    # and the upstream then closed.
    assert egress_line["upstream_outcome"] == "success"
    assert (
        sample(egress_text, "tlsproxy_upstream_handshakes_total", listener="web", outcome="success")
        == 1
    )
    if admitted:
        assert received == payload
        assert egress_line["bytes_to_backend"] == egress_line["bytes_to_client"] == len(payload)
        assert ingress_line["bytes_to_backend"] == len(payload)
    else:
        assert received == b""
        # the ingress side closed with the app's bytes unread: its kernel
        # may follow the close_notify with a reset
        assert egress_line["close_reason"] in ("backend_closed", "backend_reset")


def bridge_config(directory: Path, port: int, front: Leaf, upstream: dict[str, Any]) -> Config:
    """A listener that re-encrypts: `front` served, TLS again to `port`."""
    return parse_config(
        {
            "admin": {"listen": "127.0.0.1:0"},
            "listeners": [
                {
                    "name": "web",
                    "listen": "127.0.0.1:0",
                    "backend": f"127.0.0.1:{port}",
                    "tls": {"certificates": [front.pair()]},
                    "upstream_tls": upstream,
                }
            ],
        },
        directory,
    )


@pytest.mark.parametrize("server_name", ["", "api.internal"], ids=["sni passed", "server_name"])
async def test_bridging_re_encrypts_with_the_sni_passed_on_or_set(
    tmp_path: Path, nursery: trio.Nursery, server_name: str
) -> None:
    ca = CA(tmp_path)
    upstream_cert = ca.issue("upstream", "shop.example", "api.internal")
    seen: list[str | None] = []
    context = server_context(ca, upstream_cert, client_ca=None)

    def record_sni(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    context.sni_callback = record_sni
    port = await start_tls_server(nursery, context, echo_peer)
    front = ca.issue("front", "shop.example")
    upstream: dict[str, Any] = {"ca": str(ca.ca_file)}
    if server_name:
        upstream["server_name"] = server_name
    proxy = await start(nursery, bridge_config(tmp_path, port, front, upstream))
    client = client_context(ca)
    with trio.fail_after(STEP):
        stream = trio.SSLStream(
            await raw_connect(proxy.port), client, server_hostname="shop.example"
        )
        await stream.send_all(b"bridged")
        assert await stream.receive_some() == b"bridged"
        await stream.aclose()
        (line,) = await proxy.access_log()
    assert seen == [server_name or "shop.example"]
    assert line["outcome"] == "success" and line["upstream_outcome"] == "success"
    assert line["sni"] == "shop.example"
    assert line["upstream_name"] == (server_name or "shop.example")
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_handshakes_total", listener="web", outcome="success") == 1
    assert (
        sample(text, "tlsproxy_upstream_handshakes_total", listener="web", outcome="success") == 1
    )


async def test_a_session_is_resumed_only_with_the_name_it_was_made_with(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Re-encrypting with the client's SNI passed on: a session made with
    one name is offered again to that name only."""
    ca = CA(tmp_path)
    context = server_context(ca, ca.issue("upstream", "a.example", "b.example"), client_ca=None)
    port = await start_tls_server(nursery, context, echo_peer)
    front = ca.issue("front", "a.example", "b.example")
    config = bridge_config(tmp_path, port, front, {"ca": str(ca.ca_file)})
    proxy = await start(nursery, config)
    client = client_context(ca)
    names = ["a.example", "a.example", "b.example", "b.example", "a.example"]
    with trio.fail_after(STEP):
        for name in names:
            stream = trio.SSLStream(await raw_connect(proxy.port), client, server_hostname=name)
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            await stream.aclose()
        lines = await proxy.access_log(len(names))
    assert [(line["upstream_name"], line["upstream_resumed"]) for line in lines] == [
        ("a.example", False),
        ("a.example", True),
        ("b.example", False),
        ("b.example", True),
        ("a.example", True),
    ]
    _, text = await scrape(proxy.admin_port)
    resumed = {
        flag: sample(
            text,
            "tlsproxy_upstream_tls_negotiated_total",
            listener="web",
            version="TLSv1.3",
            cipher=lines[0]["upstream_cipher"],  # the server's choice
            alpn="none",
            resumed=flag,
        )
        for flag in ("true", "false")
    }
    assert resumed == {"true": 3, "false": 2}, [
        line for line in text.splitlines() if line.startswith("tlsproxy_upstream_tls_neg")
    ]


async def test_bytes_after_a_balancers_proxy_header_reach_the_upstream(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """accept_proxy_protocol on a plaintext-in listener: the app's first
    bytes, read with the header, are not lost, and the header's source is
    the connection's client."""
    ca = CA(tmp_path)
    port = await start_tls_server(
        nursery, server_context(ca, ca.issue("upstream", "localhost"), client_ca=None), echo_peer
    )
    config = egress_config(tmp_path, port, ca, None)
    listener = config.listeners[0].model_copy(update={"accept_proxy_protocol": "v1"})
    proxy = await start(nursery, config.model_copy(update={"listeners": (listener,)}))
    with trio.fail_after(STEP):
        app = await raw_connect(proxy.port)
        await app.send_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 15001\r\nhello")
        assert await app.receive_some() == b"hello"
        await app.aclose()
        (line,) = await proxy.access_log()
    assert line["client"] == "192.0.2.7:40000"
    assert line["bytes_to_backend"] == len(b"hello")


async def test_an_idle_timeout_ends_the_upstream_session_with_close_notify(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ca = CA(tmp_path)
    ended: list[object] = []
    done = trio.Event()

    async def peer(tls: trio.SSLStream[trio.SocketStream]) -> None:
        await tls.send_all(await tls.receive_some())
        try:
            ended.append(await tls.receive_some())  # b"": close_notify
        except trio.BrokenResourceError as exc:  # a bare FIN or a reset
            ended.append(exc)
        done.set()

    context = server_context(ca, ca.issue("upstream", "localhost"), client_ca=None)
    port = await start_tls_server(nursery, context, peer)
    config = egress_config(tmp_path, port, ca, None)
    listener = config.listeners[0].model_copy(update={"idle_timeout": 0.2})
    proxy = await start(nursery, config.model_copy(update={"listeners": (listener,)}))
    with trio.fail_after(STEP):
        app = await raw_connect(proxy.port)
        await app.send_all(b"ping")
        assert await app.receive_some() == b"ping"
        await done.wait()
        (line,) = await proxy.access_log()
        await app.aclose()
    assert line["close_reason"] == "idle_timeout"
    assert ended == [b""]


async def test_an_app_reaches_the_upstream_through_a_unix_socket(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The egress listener on a socket file, as apps in one pod often prefer."""
    ca = CA(tmp_path)
    port = await start_tls_server(
        nursery, server_context(ca, ca.issue("upstream", "localhost"), client_ca=None), echo_peer
    )
    path = tmp_path / "payments.sock"
    config = egress_config(tmp_path, port, ca, None)
    listener = config.listeners[0].model_copy(update={"listen": parse_address(f"unix:{path}")})
    proxy = await start(nursery, config.model_copy(update={"listeners": (listener,)}))
    with trio.fail_after(STEP):
        app = await trio.open_unix_socket(str(path))
        await app.send_all(b"over a socket file")
        assert await app.receive_some() == b"over a socket file"
        await app.aclose()
        (line,) = await proxy.access_log()
    assert (line["client"], line["upstream_outcome"]) == ("unix", "success")


async def test_a_reload_starts_the_upstream_session_cache_empty(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A session belongs to the TLS context that made it, and a reload makes
    new contexts: the first connection after it is a full handshake again."""
    ca = CA(tmp_path)
    context = server_context(ca, ca.issue("upstream", "localhost"), client_ca=None)
    port = await start_tls_server(nursery, context, echo_peer)
    config = egress_config(tmp_path, port, ca, None)
    proxy = await start(nursery, config)

    async def exchange() -> None:
        app = await raw_connect(proxy.port)
        await app.send_all(b"ping")
        assert await app.receive_some() == b"ping"
        await app.aclose()

    with trio.fail_after(STEP):
        await exchange()
        await exchange()
        assert await proxy.server.reload(lambda: config, trigger="test")
        await exchange()
        await exchange()
        lines = await proxy.access_log(4)
    assert [line["upstream_resumed"] for line in lines] == [False, True, False, True]
