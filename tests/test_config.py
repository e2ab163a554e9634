import copy
import dataclasses
import re
import shutil
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from proxy.config import (
    Address,
    Config,
    ConfigError,
    addresses_overlap,
    default_config,
    load_config,
    parse_address,
    parse_config,
    with_overrides,
)
from tests.helpers import served

EXAMPLES = sorted((Path(__file__).parent.parent / "config").glob("*.toml"))
DELETE = object()


def make_pair(
    cert: Path,
    key: Path,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    name: str = "localhost",
) -> tuple[Path, Path]:
    """Writes a leaf certificate for `name` and its key as PEM files."""
    leaf = trustme.CA().issue_cert(name, not_before=not_before, not_after=not_after)
    for path, pem in ((cert, leaf.cert_chain_pems[0]), (key, leaf.private_key_pem)):
        path.parent.mkdir(parents=True, exist_ok=True)
        pem.write_to_path(str(path))
    return cert, key


def document(**changes: Any) -> dict[str, Any]:
    """A valid config (with tls.crt/tls.key in the base dir), with values replaced at
    dotted paths where a number is a list index: document(**{"listeners.0.name": "x"})."""
    data: dict[str, Any] = {
        "listeners": [
            {
                "name": "web",
                "listen": "127.0.0.1:8443",
                "backend": "127.0.0.1:8080",
                "tls": {"certificates": [{"cert": "tls.crt", "key": "tls.key"}]},
            }
        ]
    }
    for dotted, value in changes.items():
        *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        node: Any = data
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
    return data


def errors_of(data: dict[str, Any], base_dir: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir)
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


def toml_path(dotted: str) -> str:
    return re.sub(r"\.(\d+)", r"[\1]", dotted)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return make_pair(tmp_path / "tls.crt", tmp_path / "tls.key")


# (dotted path to change, new value, expected part of the message); the error must be
# reported at the TOML spelling of that path.
BAD_VALUES = [
    ("listn", "x", "unknown key 'listn' (did you mean 'listeners'?)"),
    ("listeners.0.listn", "x", "unknown key 'listn' (did you mean 'listen'?)"),
    ("log.colour", True, "unknown key 'colour' (expected one of: level, format"),
    ("listeners.0.tls.certificates.0.chain", "x", "unknown key"),
    ("listeners.0.backend", DELETE, "required key is missing"),
    ("listeners", DELETE, "required key is missing"),
    ("listeners", [], "at least one [[listeners]] is required"),
    ("listeners.0.tls", "tls.crt", "expected a table, got 'tls.crt'"),
    ("admin", [], "expected a table, got an array"),
    ("listeners.0.tls.certificates", [], "at least one certificate"),
    ("process.workers", "1", "expected an integer, got '1'"),
    ("process.workers", 0, "must be > 0, got 0"),
    ("listeners.0.max_connections", 1.5, "expected an integer"),
    ("log.access_log", "yes", "expected true or false, got 'yes'"),
    ("log.level", "INFO", "must be 'debug', 'info', 'warning' or 'error', got 'INFO'"),
    ("listeners.0.name", 7, "expected a string, got 7"),
    ("listeners.0.name", "web server", "metric label"),
    ("listeners.0.handshake_timeout", "ten", "expected a number of seconds, got 'ten'"),
    ("listeners.0.handshake_timeout", True, "expected a number of seconds, got true"),
    ("listeners.0.idle_timeout", -1, "must be > 0"),
    ("listeners.0.connect_timeout", 0, "must be > 0"),
    ("process.drain_timeout", float("inf"), "must be > 0 (a finite number"),
    ("process.drain_delay", -1, "must be >= 0 (a finite number of seconds), got -1"),
    ("process.drain_delay", float("nan"), "must be >= 0 (a finite number"),
    ("process.drain_delay", "5s", "expected a number of seconds, got '5s'"),
    ("listeners.0.listen", "127.0.0.1", "missing port in '127.0.0.1'"),
    ("listeners.0.listen", "127.0.0.1:70000", "port 70000 in '127.0.0.1:70000' is out of range"),
    ("listeners.0.listen", "localhost:https", "port 'https' in 'localhost:https' is not a number"),
    ("listeners.0.listen", "local host:80", "invalid host 'local host'"),
    ("listeners.0.listen", "300.1.1.1:80", "invalid host '300.1.1.1'"),
    ("listeners.0.listen", ":8443", "use '0.0.0.0:8443' for all interfaces"),
    ("listeners.0.listen", "::1:8443", "IPv6 addresses need brackets"),
    ("listeners.0.listen", "[::g]:8443", "invalid IPv6 address"),
    ("listeners.0.listen", 8443, "expected an address like '127.0.0.1:8443', got 8443"),
    ("admin.listen", "unix:/run/admin.sock", "the admin endpoint listens on TCP only"),
    ("listeners.0.backend", "unix:app.sock", "unix socket path must be absolute"),
    ("listeners.0.tls.min_version", "TLSv1.1", "must be 'TLSv1.2' or 'TLSv1.3'"),
    ("listeners.0.tls.ciphers", "NO-SUCH-CIPHER", "OpenSSL accepts no cipher"),
    ("listeners.0.tls.alpn", "h2", "expected an array, got 'h2'"),
    ("listeners.0.tls.certificates.0.cert", "", "expected a file path, got ''"),
]


@pytest.mark.parametrize(("dotted", "value", "message"), BAD_VALUES)
@pytest.mark.usefixtures("pair")
def test_bad_value_is_reported_at_its_path(
    tmp_path: Path, dotted: str, value: Any, message: str
) -> None:
    (error,) = errors_of(document(**{dotted: value}), tmp_path)
    assert error.startswith(f"{toml_path(dotted)}: ")
    assert message in error


@pytest.mark.usefixtures("pair")
def test_bad_array_item_is_reported_at_its_index(tmp_path: Path) -> None:
    errors = errors_of(document(**{"listeners.0.tls.alpn": ["http/1.1", "", 2]}), tmp_path)
    assert errors == (
        "listeners[0].tls.alpn[1]: must not be empty",
        "listeners[0].tls.alpn[2]: expected a string, got 2",
    )


@pytest.mark.usefixtures("pair")
def test_several_workers_are_accepted(tmp_path: Path) -> None:
    data = document(**{"process": {"workers": 4}})
    assert parse_config(data, tmp_path).process.workers == 4


@pytest.mark.usefixtures("pair")
def test_design_defaults_written_out_are_accepted(tmp_path: Path) -> None:
    data = document(
        **{
            "process": {"workers": 1, "watch": False},
            "listeners.0.proxy_protocol": "off",
            "listeners.0.routes": [],
            "listeners.0.tls.client_auth": "none",
            "listeners.0.tls.client_ca": "",
        }
    )
    tls = served(parse_config(data, tmp_path).listeners[0])
    assert tls.client_auth == "none"
    assert tls.client_ca is None


@pytest.mark.usefixtures("pair")
def test_duplicate_listener_names(tmp_path: Path) -> None:
    data = document()
    second = {**data["listeners"][0], "listen": "127.0.0.1:9443"}
    data["listeners"] += [{**second, "name": "api"}, second]
    (error,) = errors_of(data, tmp_path)
    assert error.startswith("listeners: listeners[0] and listeners[2] are both named 'web'")


@pytest.mark.usefixtures("pair")
def test_two_listeners_on_one_address_are_reported_at_both_paths(tmp_path: Path) -> None:
    data = document()
    data["listeners"].append({**data["listeners"][0], "name": "api"})
    assert errors_of(data, tmp_path) == (
        "listeners[1].listen: 127.0.0.1:8443 is also listeners[0].listen; "
        "each listener needs its own address",
    )


@pytest.mark.usefixtures("pair")
def test_a_listener_on_the_admin_address_is_reported_at_both_paths(tmp_path: Path) -> None:
    data = document(**{"admin.listen": "0.0.0.0:8443"})
    assert errors_of(data, tmp_path) == (
        "listeners[0].listen: 127.0.0.1:8443 overlaps admin.listen (0.0.0.0:8443): a socket "
        "on a wildcard address (0.0.0.0, [::]) holds the port on every address it covers; "
        "use another port",
    )


# (one address, another, whether both can listen at once)
OVERLAPS = [
    ("127.0.0.1:8443", "127.0.0.1:8443", True),
    ("0.0.0.0:8443", "127.0.0.1:8443", True),
    ("127.0.0.1:8443", "0.0.0.0:8443", True),
    ("[::]:8443", "127.0.0.1:8443", True),  # Linux binds [::] dual-stack by default
    ("[::]:8443", "0.0.0.0:8443", True),
    ("[::]:8443", "[::1]:8443", True),
    ("[::0]:8443", "[::]:8443", True),
    ("localhost:8443", "localhost:8443", True),
    ("127.0.0.1:8443", "127.0.0.2:8443", False),
    ("127.0.0.1:8443", "127.0.0.1:8444", False),
    ("0.0.0.0:8443", "[::1]:8443", False),
    ("127.0.0.1:0", "127.0.0.1:0", False),  # each gets an ephemeral port of its own
    ("localhost:8443", "127.0.0.1:8443", False),  # names are not resolved here
]


@pytest.mark.parametrize(("one", "other", "overlap"), OVERLAPS)
def test_addresses_overlap(one: str, other: str, overlap: bool) -> None:
    a, b = parse_address(one), parse_address(other)
    assert addresses_overlap(a, b) is overlap
    assert addresses_overlap(b, a) is overlap


def test_missing_file(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    (error,) = errors_of(document(**{"listeners.0.tls.certificates.0.key": "gone.key"}), tmp_path)
    assert error.startswith(
        f"listeners[0].tls.certificates[0].key: file not found: {tmp_path / 'gone.key'} ("
    )


def test_unreadable_file(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    # A directory cannot be read even by root, unlike a chmod 000 file.
    (tmp_path / "dir.crt").mkdir()
    (error,) = errors_of(document(**{"listeners.0.tls.certificates.0.cert": "dir.crt"}), tmp_path)
    assert error == (
        f"listeners[0].tls.certificates[0].cert: is a directory, not a file: {tmp_path / 'dir.crt'}"
    )


@pytest.mark.parametrize(
    ("which", "content", "message"),
    [
        ("cert", b"hello\n", "not a PEM cert file"),
        ("key", b"hello\n", "not a PEM key file"),
        ("cert", "tls.key", "not a PEM cert file"),
        ("key", "tls.crt", "not a PEM key file"),
    ],
)
def test_file_that_is_not_pem(
    tmp_path: Path, pair: tuple[Path, Path], which: str, content: bytes | str, message: str
) -> None:
    target = tmp_path / f"bad.{which}"
    target.write_bytes(content if isinstance(content, bytes) else (tmp_path / content).read_bytes())
    data = document(**{f"listeners.0.tls.certificates.0.{which}": target.name})
    (error,) = errors_of(data, tmp_path)
    assert error.startswith(f"listeners[0].tls.certificates[0].{which}: {message}: {target}")


def test_key_not_matching_certificate(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    make_pair(tmp_path / "other.crt", tmp_path / "other.key")
    (error,) = errors_of(document(**{"listeners.0.tls.certificates.0.key": "other.key"}), tmp_path)
    assert error == (
        f"listeners[0].tls.certificates[0].key: key does not match certificate {pair[0]}"
    )


def test_encrypted_key(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    key = serialization.load_pem_private_key(pair[1].read_bytes(), password=None)
    pair[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    (error,) = errors_of(document(), tmp_path)
    assert error.startswith(
        f"listeners[0].tls.certificates[0].key: encrypted keys are not supported: {pair[1]}"
    )


def test_expired_certificate(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    now = datetime.now(UTC)
    make_pair(
        pair[0], pair[1], not_before=now - timedelta(days=90), not_after=now - timedelta(days=1)
    )
    (error,) = errors_of(document(), tmp_path)
    assert error.startswith("listeners[0].tls.certificates[0].cert: certificate expired on ")


def test_certificate_expiring_soon_is_a_warning(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    now = datetime.now(UTC)
    make_pair(*pair, not_before=now - timedelta(days=80), not_after=now + timedelta(days=5))
    config = parse_config(document(), tmp_path)
    (warning,) = config.warnings
    assert warning.startswith(
        "listeners[0].tls.certificates[0].cert: certificate expires in 4 days"
    )


def test_every_error_is_reported_at_once(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    make_pair(tmp_path / "other.crt", tmp_path / "other.key")
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text(
        """
        colour = "blue"

        [process]
        drain_timeout = "long"

        [[listeners]]
        name = "web"
        listen = "127.0.0.1:8443"
        backend = "127.0.0.1:8080"
        idle_timeout = -5
        [listeners.tls]
        certificates = [{ cert = "missing.crt", key = "tls.key" }]

        [[listeners]]
        name = "api"
        listen = "127.0.0.1"
        backend = "127.0.0.1:9000"
        [listeners.tls]
        certificates = [{ cert = "tls.crt", key = "other.key" }]
        """
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert [error.split(":")[0] for error in caught.value.errors] == [
        "process.drain_timeout",
        "listeners[0].idle_timeout",
        "listeners[0].tls.certificates[0].cert",
        "listeners[1].listen",
        "listeners[1].tls.certificates[0].key",
        "colour",
    ]


def test_toml_syntax_error(tmp_path: Path) -> None:
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text('[admin]\nlisten = "127.0.0.1:9090\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    (error,) = caught.value.errors
    assert error.startswith(f"{config_file}: invalid TOML: ")
    assert "line 2" in error
    assert "Traceback" not in str(caught.value)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda path: None, "config file not found"),
        (lambda path: path.mkdir(), "cannot read config file: Is a directory"),
        (lambda path: path.write_bytes(b"name = '\xff'\n"), "not UTF-8 text"),
    ],
)
def test_unreadable_config_file(tmp_path: Path, setup: Any, message: str) -> None:
    config_file = tmp_path / "tlsproxy.toml"
    setup(config_file)
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    (error,) = caught.value.errors
    assert error.startswith(f"{config_file}: {message}")


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_pair(tmp_path / "etc" / "certs" / "tls.crt", tmp_path / "etc" / "certs" / "tls.key")
    (tmp_path / "etc" / "tlsproxy.toml").write_text(
        """
        [[listeners]]
        name = "web"
        listen = "127.0.0.1:8443"
        backend = "127.0.0.1:8080"
        [listeners.tls]
        certificates = [{ cert = "certs/tls.crt", key = "certs/tls.key" }]
        """
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/tlsproxy.toml"))
    assert config.source == tmp_path / "etc" / "tlsproxy.toml"
    (pair,) = served(config.listeners[0]).certificates
    assert pair.cert == tmp_path / "etc" / "certs" / "tls.crt"
    assert pair.key == tmp_path / "etc" / "certs" / "tls.key"


@pytest.mark.usefixtures("pair")
def test_defaults_are_filled_in(tmp_path: Path) -> None:
    config = parse_config(document(), tmp_path)
    assert config.source is None
    assert config.warnings == ()
    assert str(config.admin.listen) == "127.0.0.1:9090"
    assert (config.process.workers, config.process.drain_timeout) == (1, 30.0)
    assert config.process.drain_delay == 0.0
    assert config.process.watch is True
    assert (config.log.level, config.log.format, config.log.access_log) == ("info", "json", True)
    listener = config.listeners[0]
    assert listener.proxy_protocol == "off"
    assert (listener.handshake_timeout, listener.idle_timeout) == (10.0, 300.0)
    assert (listener.connect_timeout, listener.max_connections) == (5.0, 10000)
    assert listener.routes == ()
    tls = served(listener)
    assert (tls.min_version, tls.ciphers, tls.alpn) == ("TLSv1.2", "", ())
    assert (tls.client_auth, tls.client_ca, tls.session_tickets) == ("none", None, True)


@pytest.mark.usefixtures("pair")
def test_a_drain_delay_of_zero_is_accepted(tmp_path: Path) -> None:
    assert parse_config(document(**{"process.drain_delay": 0}), tmp_path).process.drain_delay == 0
    assert parse_config(document(**{"process.drain_delay": 5}), tmp_path).process.drain_delay == 5


@pytest.mark.usefixtures("pair")
def test_integer_durations_become_floats(tmp_path: Path) -> None:
    listener = parse_config(document(**{"listeners.0.idle_timeout": 60}), tmp_path).listeners[0]
    assert listener.idle_timeout == 60.0
    assert isinstance(listener.idle_timeout, float)


@pytest.mark.usefixtures("pair")
def test_config_is_immutable(tmp_path: Path) -> None:
    config = parse_config(document(**{"listeners.0.tls.alpn": ["http/1.1"]}), tmp_path)
    listener = config.listeners[0]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.log = config.log  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        listener.idle_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        listener.listen.port = 1  # type: ignore[misc]
    assert isinstance(config.listeners, tuple)
    assert isinstance(served(listener).alpn, tuple)
    assert isinstance(hash(config), int)


def test_default_config(pair: tuple[Path, Path]) -> None:
    config = default_config(*pair)
    assert isinstance(config, Config)
    assert str(config.admin.listen) == "127.0.0.1:9090"
    (listener,) = config.listeners
    assert listener.name == "default"
    assert str(listener.listen) == "127.0.0.1:8443"
    assert str(listener.backend) == "127.0.0.1:8080"
    assert served(listener).certificates[0].cert == pair[0]
    assert served(listener).certificates[0].key == pair[1]


def test_overrides_replace_the_first_listener(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_pair(tmp_path / "flags" / "new.crt", tmp_path / "flags" / "new.key")
    monkeypatch.chdir(tmp_path / "flags")
    config = parse_config(document(), tmp_path, source=tmp_path / "tlsproxy.toml")
    changed = with_overrides(
        config,
        listen="[::1]:0",
        backend="app:80",
        admin="0.0.0.0:9100",
        cert="new.crt",
        key="new.key",
    )
    listener = changed.listeners[0]
    assert (str(listener.listen), str(listener.backend)) == ("[::1]:0", "app:80")
    assert str(changed.admin.listen) == "0.0.0.0:9100"
    assert served(listener).certificates[0].cert == tmp_path / "flags" / "new.crt"
    assert changed.source == config.source
    assert with_overrides(config) is config


def test_bad_override_is_a_config_error(pair: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match=r"^listeners\[0\]\.listen: missing port"):
        with_overrides(default_config(*pair), listen="localhost")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8443", Address("127.0.0.1", 8443)),
        ("0.0.0.0:0", Address("0.0.0.0", 0)),
        ("[::1]:8443", Address("::1", 8443)),
        ("[::]:65535", Address("::", 65535)),
        ("app.internal:8080", Address("app.internal", 8080)),
        ("unix:/run/app.sock", Address("", 0, "/run/app.sock")),
    ],
)
def test_parse_address(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert str(address) == text
    assert hash(parse_address(text)) == hash(address)


@pytest.mark.parametrize("text", ["", "localhost", "host:", "[::1]", "a b:1", "host:-1", "unix:x"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_address(text)
    assert repr(text) in str(caught.value)


def test_examples_are_listed() -> None:
    assert {"minimal.toml", "full.toml", "egress.toml"} <= {example.name for example in EXAMPLES}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_config_is_valid(tmp_path: Path, example: Path) -> None:
    config_file = tmp_path / example.name
    shutil.copy(example, config_file)
    listeners = tomllib.loads(example.read_text())["listeners"]
    for listener in listeners:
        # terminating ([listeners.tls]), originating ([listeners.upstream_tls]) or both
        tables = [listener[key] for key in ("tls", "upstream_tls") if key in listener]
        assert tables, f"listener {listener['name']} has neither tls nor upstream_tls"
        for table in tables:
            for files in table.get("certificates", []):
                assert not Path(files["cert"]).is_absolute(), "examples use relative paths"
                # one name per file, as the examples mean them (one of a key type per name)
                name = f"{Path(files['cert']).stem}.example"
                make_pair(tmp_path / files["cert"], tmp_path / files["key"], name=name)
            for ca in (table.get("client_ca"), table.get("ca")):
                if ca:
                    (tmp_path / ca).parent.mkdir(parents=True, exist_ok=True)
                    trustme.CA().cert_pem.write_to_path(str(tmp_path / ca))
    config = load_config(config_file)
    assert config.warnings == ()
    assert len(config.listeners) == len(listeners)
