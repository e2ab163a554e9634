"""Revocation: `client_crl` loads PEM CRLs into the verify store, read once,
checked against `client_ca`, watched and reloaded like it. CRLs are built
here with cryptography's CertificateRevocationListBuilder."""

from __future__ import annotations

import contextlib
import ssl
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.config import ConfigError, load_config, parse_config
from proxy.watch import watched_paths
from tests.daemon import config_text, toml_str
from tests.helpers import STEP, Running, sample, scrape, start_backend, start_server
from tests.pki import CA, Leaf, client_context, handshake
from tests.test_allow import RecordingBackend


class PKI:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers = CA(directory, "server CA")
        self.clients = CA(directory, "client CA")
        self.server = self.servers.issue("server", "localhost")
        self.good = self.clients.issue("good", "good.test", client=True)
        self.other = self.clients.issue("other", "other.test", client=True)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path)


def _write(path: Path, pki: PKI, backend: int, crls: list[Path], ca: Path | None = None) -> Path:
    crl_list = ", ".join(toml_str(crl) for crl in crls)
    tls = f"""client_auth = "require"
client_ca = {toml_str(ca or pki.clients.ca_file)}
client_crl = [{crl_list}]"""
    path.write_text(
        config_text(
            pki.server.cert,
            pki.server.key,
            backend_port=backend,
            process_lines="watch = false",
            tls_lines=tls,
        ),
        encoding="utf-8",
    )
    return path


async def _one(proxy: Running, pki: PKI, leaf: Leaf, nth: int) -> dict[str, Any]:
    context = client_context(pki.servers, leaf)
    with trio.fail_after(STEP):
        with contextlib.suppress(ssl.SSLError, OSError):
            await trio.to_thread.run_sync(partial(handshake, proxy.port, context))
        return (await proxy.access_log(nth))[nth - 1]


async def test_a_reload_that_adds_the_serial_refuses_the_client_as_revoked(
    nursery: trio.Nursery, pki: PKI
) -> None:
    backend = RecordingBackend()
    port = await start_backend(nursery, backend.handler)
    crl = pki.clients.crl(pki.directory / "clients.crl", pki.other.serial)
    config = _write(pki.directory / "tlsproxy.toml", pki, port, [crl])
    assert crl in list(watched_paths(load_config(config)))  # the file watch sees it
    proxy = await start_server(nursery, load_config(config))

    assert (await _one(proxy, pki, pki.good, 1))["outcome"] == "success"
    line = await _one(proxy, pki, pki.other, 2)
    assert (line["outcome"], line["client_cert_error"]) == ("client_cert_invalid", "revoked")

    pki.clients.crl(crl, pki.other.serial, pki.good.serial)
    assert await proxy.server.reload(lambda: load_config(config), trigger="test")
    line = await _one(proxy, pki, pki.good, 3)
    assert (line["outcome"], line["client_cert_error"]) == ("client_cert_invalid", "revoked")
    assert backend.connections == 1  # the one admitted before the reload


async def test_an_expired_crl_is_warned_at_every_load_exported_and_refuses_all(
    nursery: trio.Nursery, pki: PKI
) -> None:
    port = await start_backend(nursery, RecordingBackend().handler)
    now = datetime.now(UTC)
    crl = pki.clients.crl(pki.directory / "clients.crl", next_update=now + timedelta(days=3))
    config = _write(pki.directory / "tlsproxy.toml", pki, port, [crl])
    proxy = await start_server(nursery, load_config(config))
    _, text = await scrape(proxy.admin_port)
    subject = "crl:CN=client CA"
    expiry = sample(text, "tlsproxy_certificate_expiry_timestamp_seconds", subject=subject)
    assert expiry == pytest.approx((now + timedelta(days=3)).replace(microsecond=0).timestamp())

    stale = now - timedelta(hours=2)
    pki.clients.crl(crl, last_update=stale - timedelta(days=1), next_update=stale)
    assert await proxy.server.reload(lambda: load_config(config), trigger="test")
    assert await proxy.server.reload(lambda: load_config(config), trigger="test")
    warnings = [line["detail"] for line in proxy.log_events("config warning")]
    assert len(warnings) == 2  # one per reload
    assert warnings[0].startswith("listeners[0].tls.client_crl[0]: CRL of 'CN=client CA' expired")
    assert str(crl) in warnings[0]
    assert f"{stale:%Y-%m-%d %H:%M}Z" in warnings[0]
    _, text = await scrape(proxy.admin_port)
    expiry = sample(text, "tlsproxy_certificate_expiry_timestamp_seconds", subject=subject)
    assert expiry == pytest.approx(stale.replace(microsecond=0).timestamp())
    line = await _one(proxy, pki, pki.good, 1)
    assert (line["outcome"], line["client_cert_error"]) == ("client_cert_invalid", "crl_expired")


def _tls(pki: PKI, ca: Path, crls: list[Path]) -> dict[str, Any]:
    return {
        "certificates": [pki.server.pair()],
        "client_auth": "require",
        "client_ca": str(ca),
        "client_crl": [str(crl) for crl in crls],
    }


def _errors(tls: dict[str, Any]) -> tuple[str, ...]:
    listener = {"name": "web", "listen": "127.0.0.1:0", "backend": "127.0.0.1:1", "tls": tls}
    with pytest.raises(ConfigError) as caught:
        parse_config({"listeners": [listener]}, Path())
    return caught.value.errors


def test_a_crl_not_signed_by_client_ca_is_an_error(pki: PKI, tmp_path_factory: Any) -> None:
    forger = CA(tmp_path_factory.mktemp("forger"), "client CA")  # the same name, another key
    crl = forger.crl(pki.directory / "forged.crl")
    forged, missing = _errors(_tls(pki, pki.clients.ca_file, [crl]))
    assert forged.startswith(
        "listeners[0].tls.client_crl[0]: CRL of 'CN=client CA' is not signed by any CA in client_ca"
    )
    assert missing.startswith("listeners[0].tls.client_crl: no CRL for 'CN=client CA'")


def test_a_ca_without_its_crl_is_an_error(pki: PKI) -> None:
    second = CA(pki.directory, "second client CA")
    bundle = pki.directory / "bundle.pem"
    bundle.write_bytes(pki.clients.ca_file.read_bytes() + second.ca_file.read_bytes())
    crl = pki.clients.crl(pki.directory / "clients.crl")
    (error,) = _errors(_tls(pki, bundle, [crl]))
    assert error.startswith(
        "listeners[0].tls.client_crl: no CRL for 'CN=second client CA' of client_ca"
    )
    assert 'client_cert_error = "crl_missing"' in error


def test_two_crls_of_one_ca_and_a_file_that_is_no_crl_are_errors(pki: PKI) -> None:
    first = pki.clients.crl(pki.directory / "a.crl")
    second = pki.clients.crl(pki.directory / "b.crl")
    errors = _errors(_tls(pki, pki.clients.ca_file, [first, second, pki.good.cert]))
    assert errors[0].startswith("listeners[0].tls.client_crl[1]: a second CRL of 'CN=client CA'")
    assert errors[1].startswith("listeners[0].tls.client_crl[2]: not a PEM CRL file")


async def test_check_config_reports_an_expired_crl_as_a_warning(pki: PKI) -> None:
    from tests.daemon import PYTHON_M_PROXY  # noqa: PLC0415 - only this test runs the CLI

    stale = datetime.now(UTC) - timedelta(days=1)
    crl = pki.clients.crl(
        pki.directory / "clients.crl", last_update=stale - timedelta(days=7), next_update=stale
    )
    config = _write(pki.directory / "tlsproxy.toml", pki, 1, [crl])
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [*PYTHON_M_PROXY, "check-config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert b"warning: listeners[0].tls.client_crl[0]: CRL of 'CN=client CA' expired" in (
        result.stderr
    )


def test_client_ca_problems_are_reported_with_the_certificates(pki: PKI) -> None:
    tls = _tls(pki, pki.directory / "missing-ca.pem", [])
    tls["certificates"] = [{"cert": str(pki.directory / "nope.pem"), "key": str(pki.server.key)}]
    errors = _errors(tls)
    assert errors[0].startswith("listeners[0].tls.certificates[0].cert: file not found")
    assert errors[1].startswith("listeners[0].tls.client_ca: file not found")


async def test_a_crl_not_yet_valid_is_warned_and_refuses_as_crl_not_yet_valid(
    nursery: trio.Nursery, pki: PKI
) -> None:
    port = await start_backend(nursery, RecordingBackend().handler)
    ahead = datetime.now(UTC) + timedelta(hours=3)
    crl = pki.clients.crl(
        pki.directory / "clients.crl", last_update=ahead, next_update=ahead + timedelta(days=7)
    )
    config = load_config(_write(pki.directory / "tlsproxy.toml", pki, port, [crl]))
    (warning,) = config.warnings
    assert warning.startswith(
        f"listeners[0].tls.client_crl[0]: CRL of 'CN=client CA' is not valid until "
        f"{ahead:%Y-%m-%d %H:%M}Z"
    )
    proxy = await start_server(nursery, config)
    line = await _one(proxy, pki, pki.good, 1)
    assert (line["outcome"], line["client_cert_error"]) == (
        "client_cert_invalid",
        "crl_not_yet_valid",
    )
