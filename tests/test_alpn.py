"""ALPN: the listener's protocols in its order; the negotiated one (or "none")
on `tls_negotiated_total` and in the log; a client offering only protocols we
do not speak is refused with `no_application_protocol` (RFC 7301), counted as
`alpn_mismatch`."""

from __future__ import annotations

import ssl
import subprocess
from functools import partial

import pytest
import trio

from tests.helpers import (
    STEP,
    Certs,
    Running,
    build_config,
    http_handler,
    outcomes,
    sample,
    scrape,
    start_backend,
    start_server,
)
from tests.pki import handshake


@pytest.fixture
async def h2_proxy(nursery: trio.Nursery, certs: Certs, echo_port: int) -> Running:
    tls = {
        "certificates": [{"cert": str(certs.cert), "key": str(certs.key)}],
        "alpn": ["h2", "http/1.1"],
    }
    return await start_server(nursery, build_config(certs, echo_port, tls=tls))


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (["h2", "http/1.1"], "h2"),
        (["http/1.1", "h2"], "h2"),  # the server's preference order wins
        (["http/1.1"], "http/1.1"),
        (["spdy/3", "http/1.1"], "http/1.1"),
        (None, "none"),  # no ALPN from the client: no ALPN, no refusal
    ],
)
async def test_negotiated_protocol_is_labelled(
    h2_proxy: Running, certs: Certs, offered: list[str] | None, expected: str
) -> None:
    context = certs.client_context()
    if offered is not None:
        context.set_alpn_protocols(offered)
    with trio.fail_after(STEP):
        seen = await trio.to_thread.run_sync(partial(handshake, h2_proxy.port, context))
        (line,) = await h2_proxy.access_log(1)
    assert seen.alpn == (None if expected == "none" else expected)
    assert line["alpn"] == expected
    _, text = await scrape(h2_proxy.admin_port)
    assert sample(text, "tlsproxy_tls_negotiated_total", listener="web", alpn=expected) == 1.0


async def test_only_unknown_protocols_count_alpn_mismatch(h2_proxy: Running, certs: Certs) -> None:
    context = certs.client_context()
    context.set_alpn_protocols(["grpc-exp", "acme-tls/1"])
    before = await outcomes(h2_proxy.admin_port)
    with trio.fail_after(STEP), pytest.raises(ssl.SSLError, match=r"(?i)no.application.protocol"):
        await trio.to_thread.run_sync(partial(handshake, h2_proxy.port, context))
    (line,) = await h2_proxy.access_log(1)
    after = await outcomes(h2_proxy.admin_port)
    assert after["alpn_mismatch"] - before["alpn_mismatch"] == 1.0
    assert sum(after.values()) - sum(before.values()) == 1.0
    assert line["outcome"] == "alpn_mismatch"


async def test_listener_without_alpn_ignores_the_clients_list(proxy: Running, certs: Certs) -> None:
    context = certs.client_context()
    context.set_alpn_protocols(["grpc-exp"])
    with trio.fail_after(STEP):
        seen = await trio.to_thread.run_sync(partial(handshake, proxy.port, context))
    assert seen.alpn is None


async def test_curl_negotiates_http11(nursery: trio.Nursery, certs: Certs) -> None:
    backend = await start_backend(nursery, http_handler)
    tls = {
        "certificates": [{"cert": str(certs.cert), "key": str(certs.key)}],
        "alpn": ["http/1.1"],
    }
    proxy = await start_server(nursery, build_config(certs, backend, tls=tls))
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [
                *("curl", "--silent", "--show-error", "--max-time", "10"),
                *("--cacert", str(certs.ca_file), f"https://localhost:{proxy.port}/"),
            ],
            capture_stdout=True,
            stderr=subprocess.STDOUT,
        )
        (line,) = await proxy.access_log(1)
    assert result.stdout == b"hello from the backend\n"
    assert line["alpn"] == "http/1.1"
    assert line["ja4"].startswith("t13d") and line["ja4"][8:10] == "h2"  # curl offers h2 first
