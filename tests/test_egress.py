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
from cryptography import x509

from proxy.config import parse_config
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
    me = ca.issue(
        "me", uris=(APP_ID if admitted else "spiffe://test.example/ns/b/sa/x",), client=True
    )
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
    assert ingress_line["client_san_uri"] == list(me_uris(me))
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


def me_uris(leaf: Leaf) -> tuple[str, ...]:
    cert = x509.load_pem_x509_certificate(leaf.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return tuple(san.get_values_for_type(x509.UniformResourceIdentifier))


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
    config = parse_config(
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
        tmp_path,
    )
    proxy = await start(nursery, config)
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
