"""Version and cipher policy: the default is Mozilla "intermediate" (sslyze says
so), TLS 1.2 ciphers are ECDHE + AEAD, and the clients we refuse are told apart
on /metrics (`unsupported_version`, `no_shared_cipher`). Also `check-config` on
the certificate mistakes operators make."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.helpers import (
    STEP,
    Certs,
    Running,
    build_config,
    outcome_delta,
    outcomes,
    sample,
    scrape,
    start_server,
    tls_connect,
)
from tests.pki import CA

# sslyze pins an older cryptography than tlsproxy, so `make test` installs it
# in its own virtualenv (see the Makefile); this is where it lands.
SSLYZE = Path(
    os.environ.get("TLSPROXY_SSLYZE", Path(sys.prefix) / "tools" / "sslyze" / "bin" / "sslyze")
)

# sslyze's full Mozilla check (every version's cipher list, curves, ROBOT,
# Heartbleed, CCS, renegotiation, compression, certificate) takes ~10 s here;
# the deadline only catches a hang.
SSLYZE_DEADLINE = 120.0


async def _handshake_fails(port: int, context: ssl.SSLContext) -> None:
    with trio.fail_after(STEP), pytest.raises((ssl.SSLError, trio.BrokenResourceError)):
        tls = await tls_connect(port, context)
        await tls.receive_some(1)


async def test_tls12_client_with_only_cbc_ciphers_counts_no_shared_cipher(
    proxy: Running, certs: Certs
) -> None:
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA")
    before = await outcomes(proxy.admin_port)
    await _handshake_fails(proxy.port, context)
    assert await outcome_delta(proxy.admin_port, before) == {"no_shared_cipher": 1.0}


async def test_tls12_client_on_a_tls13_listener_counts_unsupported_version(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    proxy = await start_server(
        nursery, build_config(certs, echo_port, tls={**_tls(certs), "min_version": "TLSv1.3"})
    )
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    before = await outcomes(proxy.admin_port)
    await _handshake_fails(proxy.port, context)
    assert await outcome_delta(proxy.admin_port, before) == {"unsupported_version": 1.0}
    tls = await tls_connect(proxy.port, certs.client_context())
    assert tls.version() == "TLSv1.3"
    await tls.aclose()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_default_policy_negotiates_forward_secret_aead(
    proxy: Running, certs: Certs, version: ssl.TLSVersion
) -> None:
    context = certs.client_context()
    context.minimum_version = context.maximum_version = version
    with trio.fail_after(STEP):
        tls = await tls_connect(proxy.port, context)
        name, protocol, _ = tls.cipher()
        compression = tls.compression()
        await tls.aclose()
    assert protocol == version.name.replace("v1_", "v1.")
    if version is ssl.TLSVersion.TLSv1_2:
        assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
    assert compression is None
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_tls_negotiated_total", cipher=name, resumed="false") == 1.0


def _tls(certs: Certs) -> dict[str, object]:
    return {"certificates": [{"cert": str(certs.cert), "key": str(certs.key)}]}


def _sslyze() -> Path:
    if not SSLYZE.exists():
        if os.environ.get("TLSPROXY_REQUIRE_SSLYZE"):
            pytest.fail(f"sslyze not found at {SSLYZE}; `make test` installs it")
        pytest.skip(f"sslyze not installed at {SSLYZE} (`make test` installs it)")
    return SSLYZE


async def _scan(port: int, ca: CA) -> str:
    """sslyze's Mozilla-intermediate verdict and findings for a listener."""
    with trio.fail_after(SSLYZE_DEADLINE):
        result = await trio.run_process(
            [
                str(_sslyze()),
                "--mozilla_config=intermediate",
                f"--certinfo_ca_file={ca.ca_file}",
                f"localhost:{port}{{127.0.0.1}}",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = result.stdout.decode(errors="replace")
    verdict = output[output.index("COMPLIANCE AGAINST TLS CONFIGURATION") :]
    assert ("OK - Compliant." in verdict) == (result.returncode == 0), output
    return verdict


async def test_sslyze_plain_tlsproxy_run_is_mozilla_intermediate(
    tmp_path: Path, echo_port: int
) -> None:
    """The real daemon with nothing but flags and no OPENSSL_CONF: its
    groups and TLS 1.3 suites are set by the daemon itself (README, Limits)."""
    _sslyze()
    ca = CA(tmp_path)
    # Mozilla intermediate: ECDSA P-256 or RSA 2048, SHA-256, at most 366 days.
    leaf = ca.issue("server", "localhost")
    env = {key: value for key, value in os.environ.items() if key != "OPENSSL_CONF"}
    command = [sys.executable, "-m", "proxy", "run", "--listen", "127.0.0.1:0"]
    command += ["--admin", "127.0.0.1:0", "--backend", f"127.0.0.1:{echo_port}"]
    command += ["--cert", str(leaf.cert), "--key", str(leaf.key)]
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(
            partial(trio.run_process, command, env=env, stderr=subprocess.PIPE, check=False)
        )
        try:
            port = await _listening_port(daemon)
            # WARNING: keep reading its log, or the daemon blocks writing the
            # access lines of sslyze's few hundred connections to a full pipe.
            nursery.start_soon(_drain, daemon)
            verdict = await _scan(port, ca)
        finally:
            daemon.terminate()
    assert "OK - Compliant." in verdict, verdict


async def _listening_port(daemon: trio.Process) -> int:
    assert daemon.stderr is not None
    seen = b""
    with trio.fail_after(STEP):
        while True:
            chunk = await daemon.stderr.receive_some(65536)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
            for line in seen.splitlines():
                if line.startswith(b"{") and b'"listening"' in line:
                    return int(json.loads(line)["address"].rsplit(":", 1)[1])


async def _drain(daemon: trio.Process) -> None:
    assert daemon.stderr is not None
    while await daemon.stderr.receive_some(65536):
        pass


# ------------------------------------------------------------------ check-config


async def _check_config(tmp_path: Path, cert: Path, key: Path) -> tuple[int, str]:
    config = tmp_path / "tlsproxy.toml"
    config.write_text(
        f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:0"
backend = "127.0.0.1:8080"
[listeners.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
"""
    )
    result = await trio.run_process(
        [sys.executable, "-m", "proxy", "check-config", str(config)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).decode()


async def test_check_config_rejects_an_expired_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    leaf = CA(tmp_path).issue(
        "old", "localhost", not_before=now - timedelta(days=100), not_after=now - timedelta(days=1)
    )
    code, output = await _check_config(tmp_path, leaf.cert, leaf.key)
    assert code == 1
    assert "listeners[0].tls.certificates[0].cert: certificate expired on" in output


async def test_check_config_warns_about_a_certificate_expiring_soon(tmp_path: Path) -> None:
    leaf = CA(tmp_path).issue("soon", "localhost", not_after=datetime.now(UTC) + timedelta(days=5))
    code, output = await _check_config(tmp_path, leaf.cert, leaf.key)
    assert code == 0
    assert "listeners[0].tls.certificates[0].cert: certificate expires in 4 days" in output


async def test_check_config_rejects_a_key_that_does_not_match(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    one, other = ca.issue("one", "localhost"), ca.issue("other", "localhost")
    code, output = await _check_config(tmp_path, one.cert, other.key)
    assert code == 1
    assert f"listeners[0].tls.certificates[0].key: key does not match certificate {one.cert}" in (
        output
    )


async def test_check_config_rejects_a_chain_in_the_wrong_order(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    leaf = ca.issue("leaf", "localhost")
    bundle = tmp_path / "wrong-order.pem"
    bundle.write_bytes(ca.ca_file.read_bytes() + leaf.cert.read_bytes())
    code, output = await _check_config(tmp_path, bundle, leaf.key)
    assert code == 1
    assert "the chain must be in order, leaf first" in output


async def test_check_config_warns_about_a_certificate_without_san(tmp_path: Path) -> None:
    leaf = CA(tmp_path).issue("bare")  # no DNS names: no SAN extension at all
    code, output = await _check_config(tmp_path, leaf.cert, leaf.key)
    assert code == 0
    assert "certificate has no subjectAltName" in output
