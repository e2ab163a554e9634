"""Key-exchange groups, TLS 1.3 suites, RSA and ECDSA side by side, the key log.

Real clients throughout: `openssl s_client` with `-groups`, `-ciphersuites`
and `-sigalgs` (it says what it negotiated with `-brief`), and Python's ssl.
"""

from __future__ import annotations

import ctypes
import os
import re
import ssl
import stat
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from proxy import openssl
from proxy.clienthello import ClientHello
from proxy.config import ConfigError, parse_config
from proxy.log import make_logger
from proxy.metrics import Metrics
from proxy.server import Server
from proxy.tls import build_context
from tests.helpers import (
    STEP,
    Certs,
    Running,
    build_config,
    outcome_delta,
    outcomes,
    sample,
    scrape,
    served,
    start_server,
)
from tests.pki import CA, Leaf

MOZILLA_GROUPS = ("X25519", "P-256", "P-384")
# What `s_client -brief` prints as "Server Temp Key" for each group.
TEMP_KEY = {
    "X25519": "X25519, 253 bits",
    "P-256": "ECDH, prime256v1, 256 bits",
    "P-384": "ECDH, secp384r1, 384 bits",
}
VERSIONS = ("-tls1_2", "-tls1_3")


async def s_client(port: int, ca_file: Path, *args: str, servername: str = "localhost") -> str:
    """One handshake by `openssl s_client -brief`, closed at once; its report."""
    command = ["openssl", "s_client", "-brief", "-verify_return_error", "-CAfile", str(ca_file)]
    command += ["-servername", servername, "-connect", f"127.0.0.1:{port}", *args]
    with trio.fail_after(STEP):
        result = await trio.run_process(
            command, stdin=b"", capture_stdout=True, capture_stderr=True, check=False
        )
    return (result.stdout + result.stderr).decode(errors="replace")


def established(report: str) -> bool:
    return "CONNECTION ESTABLISHED" in report


def field(report: str, name: str) -> str:
    found = re.search(rf"^{re.escape(name)}: (.*)$", report, re.MULTILINE)
    assert found, report
    return found.group(1).strip()


# ------------------------------------------------------------------ groups


@pytest.fixture
async def rsa_proxy(nursery: trio.Nursery, tmp_path: Path, echo_port: int) -> tuple[Running, CA]:
    """The default policy with an RSA certificate: in TLS 1.2 an ECDSA one
    would also need the client to offer its curve (RFC 8422, 5.1), which
    would blur what the groups alone decide."""
    ca = CA(tmp_path)
    tls: dict[str, object] = {"certificates": [ca.issue("rsa", "localhost", key_type="rsa").pair()]}
    config = parse_config(_config_with(echo_port, tls), tmp_path)
    return await start_server(nursery, config), ca


def _config_with(port: int, tls: dict[str, object]) -> dict[str, object]:
    listener = {"name": "web", "listen": "127.0.0.1:0", "backend": f"127.0.0.1:{port}", "tls": tls}
    return {"admin": {"listen": "127.0.0.1:0"}, "listeners": [listener]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("group", MOZILLA_GROUPS)
async def test_default_listener_accepts_each_mozilla_group(
    rsa_proxy: tuple[Running, CA], group: str, version: str
) -> None:
    proxy, ca = rsa_proxy
    before = await outcomes(proxy.admin_port)
    report = await s_client(proxy.port, ca.ca_file, "-groups", group, version)
    assert established(report), report
    assert field(report, "Server Temp Key") == TEMP_KEY[group]
    assert await outcome_delta(proxy.admin_port, before) == {"success": 1.0}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("group", ["X448", "P-521", "ffdhe2048"])
async def test_default_listener_refuses_other_groups_as_no_shared_cipher(
    rsa_proxy: tuple[Running, CA], group: str, version: str
) -> None:
    """Each refusal is counted once, and the access line says it was the group."""
    proxy, ca = rsa_proxy
    before = await outcomes(proxy.admin_port)
    report = await s_client(proxy.port, ca.ca_file, "-groups", group, version)
    assert not established(report), report
    assert await outcome_delta(proxy.admin_port, before) == {"no_shared_cipher": 1.0}
    (line,) = await proxy.access_log()
    assert line["outcome"] == "no_shared_cipher"
    assert line["no_shared"] == "group", line
    # OpenSSL's own words: TLS 1.2 only finds the ECDHE suites unusable
    reason = "no shared cipher" if version == "-tls1_2" else "no suitable key share"
    assert reason in line["error"], line


def _policy_config(certs: Certs, port: int, **tls: object) -> dict[str, object]:
    pair = {"cert": str(certs.cert), "key": str(certs.key)}
    return _config_with(port, {"certificates": [pair], **tls})


async def test_configured_groups_and_suites_apply_and_a_reload_changes_both(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    narrow = {"groups": ["P-384"], "ciphersuites": ["TLS_CHACHA20_POLY1305_SHA256"]}
    config = parse_config(_policy_config(certs, echo_port, **narrow), certs.cert.parent)
    proxy = await start_server(nursery, config)
    port, ca = proxy.port, certs.ca_file

    assert not established(await s_client(port, ca, "-tls1_3", "-groups", "X25519"))
    report = await s_client(port, ca, "-tls1_3", "-groups", "P-384:X25519")
    assert established(report), report
    assert field(report, "Server Temp Key") == TEMP_KEY["P-384"]
    assert field(report, "Ciphersuite") == "TLS_CHACHA20_POLY1305_SHA256"
    aes = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"
    assert not established(await s_client(port, ca, "-tls1_3", "-ciphersuites", aes))

    wide = {"groups": ["X25519"], "ciphersuites": ["TLS_AES_256_GCM_SHA384"]}
    reloaded = parse_config(_policy_config(certs, echo_port, **wide), certs.cert.parent)
    assert await proxy.server.reload(lambda: reloaded, trigger="test")
    report = await s_client(port, ca, "-tls1_3", "-groups", "X25519")
    assert established(report), report
    assert field(report, "Ciphersuite") == "TLS_AES_256_GCM_SHA384"
    assert not established(await s_client(port, ca, "-tls1_3", "-groups", "P-384"))
    chacha = "TLS_CHACHA20_POLY1305_SHA256"
    assert not established(await s_client(port, ca, "-tls1_3", "-ciphersuites", chacha))


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("groups", ["X25519", "X9999"], "listeners[0].tls.groups[1]: unknown key-exchange group"),
        ("groups", [], "listeners[0].tls.groups: at least one group is required"),
        (
            "ciphersuites",
            ["TLS_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256"],
            "listeners[0].tls.ciphersuites[1]: unknown TLS 1.3 cipher suite",
        ),
    ],
)
def test_an_unknown_group_or_suite_is_a_config_error_with_its_path(
    certs: Certs, key: str, value: list[str], error: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_policy_config(certs, 1, **{key: value}), certs.cert.parent)
    assert any(line.startswith(error) for line in caught.value.errors), caught.value.errors


def test_the_default_context_offers_exactly_the_mozilla_suites(certs: Certs) -> None:
    context = build_context(served(build_config(certs, 1).listeners[0]))
    assert openssl.tls13_suites(context) == (
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    )


def test_the_pointer_guard_refuses_a_pointer_that_is_not_the_contexts(
    monkeypatch: pytest.MonkeyPatch, certs: Certs
) -> None:
    """Read one field too far (CPython's next field is the ALPN buffer, NULL
    here): the guard must refuse, and neither the config nor a start proceed."""
    config = build_config(certs, 1)
    monkeypatch.setattr(
        openssl, "SSL_CTX_OFFSET", openssl.SSL_CTX_OFFSET + ctypes.sizeof(ctypes.c_void_p)
    )
    with pytest.raises(openssl.PolicyUnavailable, match="not laid out as tlsproxy expects"):
        openssl.set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), MOZILLA_GROUPS)
    explicit = _policy_config(certs, 1, groups=list(MOZILLA_GROUPS))
    with pytest.raises(ConfigError, match="not laid out as tlsproxy expects"):
        parse_config(explicit, certs.cert.parent)
    with pytest.raises(openssl.PolicyUnavailable):
        Server(config, Metrics(CollectorRegistry()), make_logger())


def test_without_libssl_in_the_memory_map_nothing_is_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f0000000000-7f0000001000 r--p 00000000 00:00 0 /usr/lib/libc.so.6\n")
    monkeypatch.setattr(openssl, "_MAPS", maps)
    openssl._libssl.cache_clear()
    try:
        with pytest.raises(openssl.PolicyUnavailable, match="found none"):
            openssl.set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), MOZILLA_GROUPS)
    finally:
        openssl._libssl.cache_clear()


# ------------------------------------------------------------------ RSA and ECDSA


def _dual(ca: CA, stem: str, *names: str) -> tuple[Leaf, Leaf]:
    return ca.issue(f"{stem}-rsa", *names, key_type="rsa"), ca.issue(f"{stem}-ec", *names)


@pytest.fixture
async def dual(nursery: trio.Nursery, tmp_path: Path, echo_port: int) -> tuple[Running, CA]:
    """Names a.example (and localhost) and b.example, each with an RSA and an
    ECDSA certificate, listed in different orders."""
    ca = CA(tmp_path)
    rsa_a, ec_a = _dual(ca, "a", "a.example", "localhost")
    rsa_b, ec_b = _dual(ca, "b", "b.example")
    pairs = [rsa_a.pair(), ec_a.pair(), ec_b.pair(), rsa_b.pair()]
    data = {
        "admin": {"listen": "127.0.0.1:0"},
        "listeners": [
            {
                "name": "web",
                "listen": "127.0.0.1:0",
                "backend": f"127.0.0.1:{echo_port}",
                "tls": {"certificates": pairs},
            }
        ],
    }
    return await start_server(nursery, parse_config(data, tmp_path)), ca


# What a client that can verify only one key type offers, and what
# `s_client -brief` then reports as the "Signature type".
ONLY = {"rsa": ("RSA-PSS+SHA256", "RSA-PSS"), "ecdsa": ("ECDSA+SHA256", "ECDSA")}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("key_type", ONLY)
@pytest.mark.parametrize("name", ["a.example", "b.example", "localhost"])
async def test_each_key_type_is_served_to_the_client_that_can_only_verify_it(
    dual: tuple[Running, CA], version: str, key_type: str, name: str
) -> None:
    """Two names with both key types each: SNI picks the name, the client's
    signature algorithms the key type; the chain verifies for the name."""
    sigalgs, signature = ONLY[key_type]
    proxy, ca = dual
    report = await s_client(
        proxy.port,
        ca.ca_file,
        version,
        "-sigalgs",
        sigalgs,
        "-verify_hostname",
        name,
        servername=name,
    )
    assert established(report), report
    assert field(report, "Signature type") == signature
    assert field(report, "Verification") == "OK"
    assert f"CN = {name if name != 'localhost' else 'a.example'}" in field(
        report, "Peer certificate"
    )
    (line,) = await proxy.access_log()
    assert line["outcome"] == "success"
    assert line["sni_match"] == name


async def test_a_client_accepting_both_key_types_gets_the_ecdsa_certificate(
    dual: tuple[Running, CA],
) -> None:
    proxy, ca = dual
    for version in VERSIONS:
        report = await s_client(proxy.port, ca.ca_file, version, servername="b.example")
        assert field(report, "Signature type") == "ECDSA", report


async def test_expiry_has_one_series_per_subject_and_key_type(dual: tuple[Running, CA]) -> None:
    proxy, _ = dual
    _, text = await scrape(proxy.admin_port)
    series = re.findall(r"^tlsproxy_certificate_expiry_timestamp_seconds\{(.*)\}", text, re.M)
    assert len(series) == 4, text
    for subject in ("a.example", "b.example"):
        for key_type in ("rsa", "ecdsa"):
            value = sample(
                text,
                "tlsproxy_certificate_expiry_timestamp_seconds",
                listener="web",
                subject=f"CN={subject},O=tlsproxy tests",
                key_type=key_type,
            )
            assert value > 0


def test_two_pairs_of_one_key_type_for_the_same_names_are_a_config_error(
    tmp_path: Path,
) -> None:
    ca = CA(tmp_path)
    one, two = ca.issue("one", "x.example", "y.example"), ca.issue("two", "y.example", "x.example")
    rsa = ca.issue("rsa", "x.example", "y.example", key_type="rsa")
    data = {
        "listeners": [
            {
                "name": "web",
                "listen": "127.0.0.1:0",
                "backend": "127.0.0.1:1",
                "tls": {"certificates": [one.pair(), rsa.pair(), two.pair()]},
            }
        ]
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path)
    assert caught.value.errors == (
        "listeners[0].tls.certificates[2]: certificates[0] is also an ECDSA certificate for "
        "exactly these names (x.example, y.example), so only one of them could be served; "
        "remove one",
    )


# ------------------------------------------------------------------ key log


async def test_keylog_file_holds_the_tls13_secrets_the_client_logged(
    nursery: trio.Nursery, certs: Certs, echo_port: int, tmp_path: Path
) -> None:
    keylog = tmp_path / "keys.log"
    config = parse_config(
        _policy_config(certs, echo_port, keylog_file=str(keylog)), certs.cert.parent
    )
    proxy = await start_server(nursery, config)
    assert stat.S_IMODE(os.stat(keylog).st_mode) == 0o600
    (warning,) = [e for e in proxy.log_events() if e["event"].startswith("keylog_file is set")]
    assert warning["level"] == "warning" and warning["keylog_file"] == str(keylog)

    client_log = tmp_path / "client.log"
    report = await s_client(proxy.port, certs.ca_file, "-tls1_3", "-keylogfile", str(client_log))
    assert established(report), report
    await proxy.access_log()

    def secrets(path: Path) -> set[str]:
        lines = path.read_text().splitlines()
        return {line for line in lines if line and not line.startswith("#")}

    ours, theirs = secrets(keylog), secrets(client_log)
    labels = {line.split()[0] for line in ours}
    assert {
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        "SERVER_HANDSHAKE_TRAFFIC_SECRET",
        "CLIENT_TRAFFIC_SECRET_0",
        "SERVER_TRAFFIC_SECRET_0",
        "EXPORTER_SECRET",
    } <= labels
    assert ours == theirs

    assert await proxy.server.reload(lambda: config, trigger="test")
    warnings = [e for e in proxy.log_events() if e["event"].startswith("keylog_file is set")]
    assert len(warnings) == 2


async def test_keylog_is_off_by_default(proxy: Running) -> None:
    assert not [e for e in proxy.log_events() if "keylog" in e["event"]]
    assert served(proxy.server.config.listeners[0]).keylog_file is None


# ------------------------------------------------------------------ connections_max


async def test_connections_max_is_the_configured_limit_and_follows_a_reload(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    proxy = await start_server(nursery, build_config(certs, echo_port, max_connections=1234))
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_connections_max", listener="web") == 1234
    smaller = build_config(certs, echo_port, max_connections=99)
    assert await proxy.server.reload(lambda: smaller, trigger="test")
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_connections_max", listener="web") == 99


def _hello(groups: tuple[int, ...]) -> ClientHello:
    body = b"".join(group.to_bytes(2, "big") for group in groups)
    extension = len(body).to_bytes(2, "big") + body
    return ClientHello(0x0303, (0x1301,), (0x000A,), (), (0x0304,), (), extension)


def _reason(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, reason.lower())
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("hello", "groups", "error", "expected"),
    [
        (None, MOZILLA_GROUPS, _reason("NO_SUITABLE_KEY_SHARE"), True),
        (_hello((0x001E,)), MOZILLA_GROUPS, _reason("NO_SHARED_CIPHER"), True),  # X448 only
        (_hello((0x0A0A, 0x0019)), MOZILLA_GROUPS, _reason("NO_SHARED_CIPHER"), True),
        (_hello((0x0017,)), MOZILLA_GROUPS, _reason("NO_SHARED_CIPHER"), False),  # P-256
        (_hello((0x0017,)), ("prime256v1",), _reason("NO_SHARED_CIPHER"), False),
        (_hello((0x001E,)), ("brainpoolP256r1",), _reason("NO_SHARED_CIPHER"), False),
        (None, MOZILLA_GROUPS, _reason("NO_SHARED_CIPHER"), False),
    ],
    ids=["tls13", "x448", "grease-p521", "shared", "alias", "unknown-name", "no-hello"],
)
def test_shares_no_group_is_said_only_when_known(
    hello: ClientHello | None, groups: tuple[str, ...], error: ssl.SSLError, expected: bool
) -> None:
    assert openssl.shares_no_group(hello, groups, error) is expected
