"""Session resumption: a second connection with the first one's session is
counted `resumed="true"`; with `session_tickets = false` nothing resumes."""

from __future__ import annotations

import ssl
from functools import partial

import pytest
import trio

from tests.helpers import STEP, Certs, build_config, sample, scrape, start_server
from tests.pki import handshake


@pytest.mark.parametrize("close_notify", [False, True], ids=["FIN", "close_notify"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("tickets", [True, False])
async def test_second_connection_resumes_only_with_tickets(
    nursery: trio.Nursery,
    certs: Certs,
    echo_port: int,
    *,
    version: ssl.TLSVersion,
    tickets: bool,
    close_notify: bool,
) -> None:
    tls = {
        "certificates": [{"cert": str(certs.cert), "key": str(certs.key)}],
        "session_tickets": tickets,
    }
    proxy = await start_server(nursery, build_config(certs, echo_port, tls=tls))
    context = certs.client_context()
    context.minimum_version = context.maximum_version = version
    connect = partial(handshake, proxy.port, context, close_notify=close_notify)
    with trio.fail_after(STEP):
        first = await trio.to_thread.run_sync(connect)
        second = await trio.to_thread.run_sync(partial(connect, session=first.session))
        lines = await proxy.access_log(2)
    assert not first.reused
    assert second.reused is tickets
    assert [line["resumed"] for line in lines] == [False, tickets]
    _, text = await scrape(proxy.admin_port)
    resumed = sample(text, "tlsproxy_tls_negotiated_total", listener="web", resumed="true")
    assert resumed == (1.0 if tickets else 0.0)
