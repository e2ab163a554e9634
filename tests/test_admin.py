"""The admin endpoints and the published metric names, over real HTTP."""

from __future__ import annotations

import trio
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    STEP,
    Certs,
    Running,
    build_config,
    sample,
    scrape,
    start_server,
    tls_connect,
)

# The README's metrics table: dashboards and alerts depend on these names.
PUBLISHED = {
    "tlsproxy_handshakes": "counter",
    "tlsproxy_handshake_duration_seconds": "histogram",
    "tlsproxy_handshake_wants": "counter",
    "tlsproxy_handshakes_in_progress": "gauge",
    "tlsproxy_tls_negotiated": "counter",
    "tlsproxy_connections_active": "gauge",
    "tlsproxy_connections": "counter",
    "tlsproxy_connections_rejected": "counter",
    "tlsproxy_bytes": "counter",
    "tlsproxy_backend_connect_failures": "counter",
    "tlsproxy_backend_connect_duration_seconds": "histogram",
    "tlsproxy_certificate_expiry_timestamp_seconds": "gauge",
    "tlsproxy_config_reloads": "counter",
    "tlsproxy_build_info": "gauge",
}


async def test_metrics_exports_every_published_name_with_its_type(proxy: Running) -> None:
    status, text = await scrape(proxy.admin_port)
    assert status == 200
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in PUBLISHED.items():
        assert families.get(name) == kind, name


async def test_certificate_expiry_is_exported_for_the_loaded_certificate(
    proxy: Running, certs: Certs
) -> None:
    _, text = await scrape(proxy.admin_port)
    (family,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "tlsproxy_certificate_expiry_timestamp_seconds"
    ]
    (series,) = family.samples
    assert series.labels["listener"] == "web"
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    assert series.value == cert.not_valid_after_utc.timestamp()


async def test_healthz_and_readyz_are_200_while_serving(proxy: Running) -> None:
    assert (await scrape(proxy.admin_port, "/healthz"))[0] == 200
    assert (await scrape(proxy.admin_port, "/readyz"))[0] == 200


async def test_unknown_admin_path_is_404_with_a_hint(proxy: Running) -> None:
    status, body = await scrape(proxy.admin_port, "/nope")
    assert status == 404
    assert "/metrics" in body


async def test_readyz_turns_503_on_drain(proxy: Running, certs: Certs) -> None:
    with trio.fail_after(STEP):
        tls = await tls_connect(proxy.port, certs.client_context())  # keeps the drain open
        proxy.server.request_drain()
        assert (await scrape(proxy.admin_port, "/readyz"))[0] == 503
        assert (await scrape(proxy.admin_port, "/healthz"))[0] == 200
        await tls.aclose()


async def test_connections_over_max_connections_are_closed_and_counted(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    proxy = await start_server(nursery, build_config(certs, echo_port, max_connections=2))
    with trio.fail_after(STEP):
        held = [await tls_connect(proxy.port, certs.client_context()) for _ in range(2)]
        extra = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        assert await extra.receive_some(1) == b""  # closed at once, before any handshake
        await extra.aclose()
        for tls in held:
            await tls.send_all(b"ok")
            assert await tls.receive_some(2) == b"ok"
            await tls.aclose()
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_connections_rejected_total", reason="max_connections") == 1
