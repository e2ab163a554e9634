"""SNI: the certificate and the backend chosen by the name the client asks for.

The matcher as a table (RFC 6125: exact before wildcard, one label), then a
real listener with two ECDSA certificates and one RSA certificate, where the
client checks the serial of the certificate it was served, and routes that
send two names to two backends."""

from __future__ import annotations

import ssl
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.config import parse_config
from proxy.sni import NameTable, check_pattern
from tests.helpers import STEP, Running, echo_handler, sample, scrape, start_backend, start_server
from tests.pki import CA, Leaf, client_context, handshake

TABLE = NameTable(
    [
        ("api.example.com", "api"),
        ("*.example.com", "wild"),
        ("Exact.Wild.Example.COM", "exact"),
        ("*.example.com", "second wildcard loses"),
        ("api.example.com", "second exact loses"),
    ]
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("api.example.com", ("api.example.com", "api")),
        ("API.example.com.", ("api.example.com", "api")),
        ("x.example.com", ("*.example.com", "wild")),
        ("exact.wild.example.com", ("Exact.Wild.Example.COM", "exact")),
        ("a.b.example.com", None),  # a wildcard is one label
        ("example.com", None),  # and never the bare parent
        ("other.org", None),
        ("", None),
        (None, None),
    ],
)
def test_lookup_exact_before_wildcard(name: str | None, expected: Any) -> None:
    assert TABLE.lookup(name) == expected


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        ("api.example.com", True),
        ("*.example.com", True),
        ("localhost", True),
        ("f*.example.com", False),
        ("*.*.example.com", False),
        ("*.com", False),
        ("exa mple.com", False),
        ("", False),
    ],
)
def test_configured_names_are_checked(pattern: str, ok: bool) -> None:
    assert (check_pattern(pattern) is None) is ok


# ------------------------------------------------------------------ live


async def _start(nursery: trio.Nursery, leaves: list[Leaf], **listener: Any) -> Running:
    backend = await start_backend(nursery, echo_handler)
    table: dict[str, Any] = {
        "name": "web",
        "listen": "127.0.0.1:0",
        "backend": f"127.0.0.1:{backend}",
        "tls": {"certificates": [leaf.pair() for leaf in leaves]},
    }
    table.update(listener)
    config = parse_config({"admin": {"listen": "127.0.0.1:0"}, "listeners": [table]}, Path("."))
    return await start_server(nursery, config)


async def test_each_name_gets_its_certificate(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = CA(tmp_path)
    default = ca.issue("default", "default.test", "localhost")
    api = ca.issue("api", "api.test", "*.wild.test")
    rsa = ca.issue("rsa", "rsa.test", "exact.wild.test", key_type="rsa")
    proxy = await _start(nursery, [default, api, rsa])
    context = client_context()  # no verification: the serial is what we check
    cases = [
        ("default.test", default, "default.test"),
        ("api.test", api, "api.test"),
        ("x.wild.test", api, "*.wild.test"),
        ("exact.wild.test", rsa, "exact.wild.test"),  # exact beats an earlier wildcard
        ("RSA.Test", rsa, "rsa.test"),
        ("a.b.wild.test", default, "other"),
        ("unknown.test", default, "other"),
        (None, default, "other"),
    ]
    with trio.fail_after(STEP):
        for name, leaf, _ in cases:
            seen = await trio.to_thread.run_sync(partial(handshake, proxy.port, context, name))
            assert (name, seen.serial) == (name, leaf.serial)
            assert seen.reply == b"ping"
        lines = await proxy.access_log(len(cases))
    logged = [(line["sni"], line["sni_match"], line["outcome"]) for line in lines]
    assert sorted(logged, key=str) == sorted(
        [(name, match, "success") for name, _, match in cases], key=str
    )
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_handshakes_total", outcome="success") == len(cases)
    assert 'sni="' not in text  # the SNI is never a metric label (the README's metrics section)


async def test_rsa_certificate_serves_rsa_suites_and_ecdsa_ecdsa(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = CA(tmp_path)
    ecdsa = ca.issue("ecdsa", "ecdsa.test")
    rsa = ca.issue("rsa", "rsa.test", key_type="rsa")
    proxy = await _start(nursery, [ecdsa, rsa], tls={"certificates": [ecdsa.pair(), rsa.pair()]})
    context = client_context(ca)
    context.maximum_version = context.minimum_version = ssl.TLSVersion.TLSv1_2
    with trio.fail_after(STEP):
        for name in ("ecdsa.test", "rsa.test"):
            await trio.to_thread.run_sync(partial(handshake, proxy.port, context, name))
        lines = await proxy.access_log(2)
    ciphers = {line["sni"]: line["cipher"] for line in lines}
    assert ciphers["ecdsa.test"].startswith("ECDHE-ECDSA-")
    assert ciphers["rsa.test"].startswith("ECDHE-RSA-")


async def _named_backend(name: bytes, stream: trio.SocketStream) -> None:
    try:
        await stream.receive_some(100)
        await stream.send_all(name)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def test_routes_send_two_names_to_two_backends(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = CA(tmp_path)
    leaf = ca.issue("server", "localhost", "api.test", "x.apps.test")
    one = await start_backend(nursery, partial(_named_backend, b"api backend"))
    two = await start_backend(nursery, partial(_named_backend, b"apps backend"))
    routes = [
        {"sni": "api.test", "backend": f"127.0.0.1:{one}"},
        {"sni": "*.apps.test", "backend": f"127.0.0.1:{two}"},
    ]
    proxy = await _start(nursery, [leaf], routes=routes)
    context = client_context(ca)
    with trio.fail_after(STEP):
        for name, reply in [
            ("api.test", b"api backend"),
            ("x.apps.test", b"apps backend"),
            ("localhost", b"ping"),  # no route: the listener's backend (echo)
        ]:
            seen = await trio.to_thread.run_sync(partial(handshake, proxy.port, context, name))
            assert seen.reply == reply
        lines = await proxy.access_log(3)
    backends = {line["sni"]: line["backend"] for line in lines}
    assert backends["api.test"] == f"127.0.0.1:{one}"
    assert backends["x.apps.test"] == f"127.0.0.1:{two}"
