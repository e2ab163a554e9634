"""`[listeners.upstream_tls]`: what check-config says, each at its TOML path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.__main__ import main
from proxy.config import UpstreamTLSConfig, parse_address, parse_config
from proxy.tls_upstream import upstream_name
from tests.test_config import DELETE, document, errors_of, make_pair


@pytest.fixture(autouse=True)
def files(tmp_path: Path) -> None:
    """tls.crt/tls.key (served) and me.crt/me.key (our client certificate),
    and a CA bundle, in the base directory."""
    make_pair(tmp_path / "tls.crt", tmp_path / "tls.key")
    make_pair(tmp_path / "me.crt", tmp_path / "me.key", name="me")
    (tmp_path / "ca.pem").write_bytes((tmp_path / "tls.crt").read_bytes())


def egress(**upstream: Any) -> dict[str, Any]:
    """A listener with plaintext in and TLS out, `upstream` its table."""
    table = {"ca": "ca.pem", "certificates": [{"cert": "me.crt", "key": "me.key"}], **upstream}
    return document(**{"listeners.0.tls": DELETE, "listeners.0.upstream_tls": table})


def test_an_egress_listener_is_accepted_with_the_defaults_filled_in(tmp_path: Path) -> None:
    (listener,) = parse_config(egress(), tmp_path).listeners
    upstream = listener.upstream_tls
    assert listener.tls is None and upstream is not None
    assert upstream.server_name == "" and upstream.session_resumption
    assert upstream.ca_pem == (tmp_path / "ca.pem").read_bytes()
    assert [table for table, _ in listener.certificate_pairs()] == ["upstream_tls"]


def test_both_tables_bridge(tmp_path: Path) -> None:
    data = document(**{"listeners.0.upstream_tls": {"server_name": "api.internal"}})
    (listener,) = parse_config(data, tmp_path).listeners
    assert listener.tls is not None and listener.upstream_tls is not None


def test_a_listener_with_neither_table_is_an_error(tmp_path: Path) -> None:
    (error,) = errors_of(document(**{"listeners.0.tls": DELETE}), tmp_path)
    assert error.startswith("listeners[0]: has neither [listeners.tls]")


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("server_name", "*.example.com", "not a wildcard"),
        ("server_name", "bad name", "must be a DNS name"),
        ("server_name", "a" * 300, "1 to 255 characters"),
        ("min_version", "TLSv1.0", "must be 'TLSv1.2' or 'TLSv1.3'"),
        ("groups", ["X9"], "X9"),
        ("ciphersuites", [], "at least one"),
        ("session_resumption", "yes", "expected true or false"),
        ("allow.uri", ["spiffe://a.example:8443/x"], "no port"),
        ("allow", {}, "lists no one"),
        ("ca", "missing.pem", "file not found"),
        ("certificates.0.key", "tls.key", "key does not match certificate"),
        ("certificates", [{"cert": "me.crt", "key": "me.key"}] * 2, "at most one"),
        ("sni", "x", "unknown key 'sni'"),
    ],
)
def test_a_bad_upstream_value_is_reported_at_its_path(
    tmp_path: Path, dotted: str, value: Any, message: str
) -> None:
    data = egress()
    table = data["listeners"][0]["upstream_tls"]
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for part in parents:
        table = table.setdefault(part, {}) if isinstance(part, str) else table[part]
    table[last] = value
    errors = errors_of(data, tmp_path)
    path = "listeners[0].upstream_tls." + dotted.replace(".0", "[0]")
    assert any(e.startswith(path) and message in e for e in errors), errors


def test_an_ip_literal_server_name_is_accepted(tmp_path: Path) -> None:
    (listener,) = parse_config(egress(server_name="10.0.0.7"), tmp_path).listeners
    assert listener.upstream_tls is not None
    assert listener.upstream_tls.server_name == "10.0.0.7"


def test_a_unix_backend_needs_a_name_to_check(tmp_path: Path) -> None:
    data = egress()
    data["listeners"][0]["backend"] = "unix:/run/upstream.sock"
    (error,) = errors_of(data, tmp_path)
    assert error.startswith("listeners[0].upstream_tls.server_name: the backend unix:")
    data["listeners"][0]["upstream_tls"]["server_name"] = "upstream.internal"
    parse_config(data, tmp_path)


def test_routes_need_tls_from_the_client(tmp_path: Path) -> None:
    data = egress()
    data["listeners"][0]["routes"] = [{"sni": "a.example", "backend": "127.0.0.1:1"}]
    (error,) = errors_of(data, tmp_path)
    assert error.startswith("listeners[0].routes: routes pick a backend by the client's SNI")


def test_an_unreadable_ca_is_reported_by_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    config = tmp_path / "egress.toml"
    config.write_text(
        """
        [[listeners]]
        name = "payments"
        listen = "127.0.0.1:15001"
        backend = "payments.internal:8443"
        [listeners.upstream_tls]
        ca = "ca.pem"
        """
    )
    assert main(["check-config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "listeners[0].upstream_tls.ca: " in err, err


@pytest.mark.parametrize(
    ("server_name", "backend", "client_sni", "expected"),
    [
        ("", "payments.internal:8443", None, "payments.internal"),
        ("", "10.0.0.7:8443", None, "10.0.0.7"),
        ("", "[::1]:8443", None, "::1"),
        ("api.internal", "10.0.0.7:8443", None, "api.internal"),
        ("", "10.0.0.7:8443", "shop.example", "shop.example"),  # re-encrypting: passed on
        ("api.internal", "10.0.0.7:8443", "shop.example", "api.internal"),  # set wins
        ("", "unix:/run/upstream.sock", None, None),
    ],
)
def test_the_name_we_dial(
    server_name: str, backend: str, client_sni: str | None, expected: str | None
) -> None:
    upstream = UpstreamTLSConfig.model_validate(
        {"server_name": server_name, "allow": {"uri": ["spiffe://a.example/x"]}},
        context={"check_files": False},
    )
    assert upstream_name(upstream, parse_address(backend), client_sni) == expected
