"""Mutual TLS: `client_auth = "require" | "optional"` with `client_ca`; the
outcomes `client_cert_missing` and `client_cert_invalid` (with the reason in
the log), and the verified client's subject and SANs in the access log."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.config import load_config, parse_config
from tests.daemon import config_text, toml_str
from tests.helpers import STEP, Running, echo_handler, outcomes, start_backend, start_server
from tests.pki import CA, Leaf, client_context, handshake

SPIFFE = "spiffe://example.test/ns/prod/sa/billing"


class PKI:
    def __init__(self, directory: Path) -> None:
        self.servers = CA(directory, "server CA")
        self.clients = CA(directory, "client CA")
        self.server = self.servers.issue("server", "localhost")
        self.good = self.clients.issue("good", "billing.test", uris=(SPIFFE,), client=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("mtls"))


async def _start(nursery: trio.Nursery, pki: PKI, client_auth: str) -> Running:
    backend = await start_backend(nursery, echo_handler)
    listener: dict[str, Any] = {
        "name": "web",
        "listen": "127.0.0.1:0",
        "backend": f"127.0.0.1:{backend}",
        "handshake_timeout": 5.0,
        "tls": {
            "certificates": [pki.server.pair()],
            "client_auth": client_auth,
            "client_ca": str(pki.clients.ca_file),
        },
    }
    config = parse_config({"admin": {"listen": "127.0.0.1:0"}, "listeners": [listener]}, Path())
    return await start_server(nursery, config)


async def _one(proxy: Running, client: Leaf | None, pki: PKI) -> tuple[str, dict[str, Any]]:
    """Connect with `client` (or no certificate); the outcome and the log line."""
    before = await outcomes(proxy.admin_port)
    context = client_context(pki.servers, client)
    with trio.fail_after(STEP):
        # TLS 1.3: a refused client learns of it only on its first read
        with contextlib.suppress(ssl.SSLError, OSError):
            await trio.to_thread.run_sync(partial(handshake, proxy.port, context))
        (line,) = await proxy.access_log(1)
    after = await outcomes(proxy.admin_port)
    delta = {k: v - before[k] for k, v in after.items() if v != before[k]}
    assert delta == {line["outcome"]: 1.0}
    return line["outcome"], line


async def test_require_and_a_good_certificate(nursery: trio.Nursery, pki: PKI) -> None:
    proxy = await _start(nursery, pki, "require")
    outcome, line = await _one(proxy, pki.good, pki)
    assert outcome == "success"
    assert line["client_subject"] == "CN=billing.test,O=tlsproxy tests"
    assert line["client_san_dns"] == ["billing.test"]
    assert line["client_san_uri"] == [SPIFFE]


async def test_require_and_no_certificate(nursery: trio.Nursery, pki: PKI) -> None:
    proxy = await _start(nursery, pki, "require")
    outcome, _ = await _one(proxy, None, pki)
    assert outcome == "client_cert_missing"


async def test_require_and_a_certificate_from_another_ca(
    nursery: trio.Nursery, pki: PKI, tmp_path: Path
) -> None:
    stranger = CA(tmp_path, "stranger CA").issue("x", "billing.test", client=True)
    proxy = await _start(nursery, pki, "require")
    outcome, line = await _one(proxy, stranger, pki)
    assert (outcome, line["client_cert_error"]) == ("client_cert_invalid", "unknown_ca")


@pytest.mark.parametrize(("days", "reason"), [((-30, -1), "expired"), ((1, 30), "not_yet_valid")])
async def test_require_and_a_certificate_out_of_its_validity(
    nursery: trio.Nursery, pki: PKI, days: tuple[int, int], reason: str
) -> None:
    now = datetime.now(UTC)
    leaf = pki.clients.issue(
        f"client-{reason}",
        "billing.test",
        client=True,
        not_before=now + timedelta(days=days[0]),
        not_after=now + timedelta(days=days[1]),
    )
    proxy = await _start(nursery, pki, "require")
    outcome, line = await _one(proxy, leaf, pki)
    assert (outcome, line["client_cert_error"]) == ("client_cert_invalid", reason)


async def test_optional_and_no_certificate(nursery: trio.Nursery, pki: PKI) -> None:
    proxy = await _start(nursery, pki, "optional")
    outcome, line = await _one(proxy, None, pki)
    assert outcome == "success"
    assert line["client_subject"] is None


async def test_openssl_s_client_with_a_good_certificate(nursery: trio.Nursery, pki: PKI) -> None:
    proxy = await _start(nursery, pki, "require")
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [
                *("openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}"),
                *("-servername", "localhost", "-CAfile", str(pki.servers.ca_file)),
                *("-cert", str(pki.good.cert), "-key", str(pki.good.key)),
                "-no_ign_eof",  # exit once stdin ends, after the handshake
            ],
            stdin=b"",
            capture_stdout=True,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        (line,) = await proxy.access_log(1)
    assert b"Verify return code: 0 (ok)" in result.stdout
    assert line["outcome"] == "success"
    assert line["client_subject"] == "CN=billing.test,O=tlsproxy tests"


async def test_reload_picks_up_a_new_client_ca_bundle(
    nursery: trio.Nursery, pki: PKI, tmp_path: Path
) -> None:
    """Rotating the client CA is a reload, not a restart: clients of the new
    CA are let in, clients of the old one are refused from then on."""
    successor = CA(tmp_path, "next client CA")
    newcomer = successor.issue("newcomer", "newcomer.test", client=True)
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(pki.clients.ca_file.read_bytes())
    backend = await start_backend(nursery, echo_handler)
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text(
        config_text(
            pki.server.cert,
            pki.server.key,
            backend_port=backend,
            process_lines="watch = false",
            tls_lines=f'client_auth = "require"\nclient_ca = {toml_str(bundle)}',
        )
    )
    proxy = await start_server(nursery, load_config(config_file))
    assert (await _one(proxy, newcomer, pki))[0] == "client_cert_invalid"

    bundle.write_bytes(successor.ca_file.read_bytes())
    assert await proxy.server.reload(lambda: load_config(config_file), trigger="test")

    assert (await _one_more(proxy, newcomer, pki, 2))[0] == "success"
    assert (await _one_more(proxy, pki.good, pki, 3))[0] == "client_cert_invalid"


async def _one_more(proxy: Running, client: Leaf, pki: PKI, nth: int) -> tuple[str, dict[str, Any]]:
    context = client_context(pki.servers, client)
    with trio.fail_after(STEP):
        with contextlib.suppress(ssl.SSLError, OSError):
            await trio.to_thread.run_sync(partial(handshake, proxy.port, context))
        line = (await proxy.access_log(nth))[nth - 1]
    return line["outcome"], line
