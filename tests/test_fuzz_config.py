"""Property-based tests of the config loader, fed what an operator might write:
TOML documents generated from the schema (every key, then values replaced by
any TOML value or a near-miss of a valid one, keys deleted, renamed or
added, listeners repeated), and the bytes of a valid file mutated.

`load_config` may only return a `Config` or raise `ConfigError`; every
message of a schema-shaped document starts with the TOML path it is about
(a file that is not TOML at all is reported against the file's path).
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from proxy.config import Config, ConfigError, ConfigFile, load_config
from tests.helpers import Certs

# ---------------------------------------------------------------- TOML text


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def toml_value(value: object) -> str:
    """Any value as TOML, tables inline: enough to write every document."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, date | time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(value)


def toml_document(document: dict[str, Any]) -> str:
    return "".join(f"{_toml_key(k)} = {toml_value(v)}\n" for k, v in document.items())


# ---------------------------------------------------------------- documents


def full_document(certs: Certs) -> dict[str, Any]:
    """A valid config that sets every key of the schema."""
    return {
        "admin": {"listen": "127.0.0.1:9090"},
        "process": {"workers": 1, "drain_timeout": 30.0, "watch": True},
        "log": {"level": "info", "format": "json", "access_log": True},
        "listeners": [
            {
                "name": "web",
                "listen": "0.0.0.0:8443",
                "backend": "127.0.0.1:8080",
                "proxy_protocol": "v2",
                "handshake_timeout": 10.0,
                "idle_timeout": 300,
                "connect_timeout": 5.0,
                "max_connections": 10000,
                "tls": {
                    "certificates": [{"cert": str(certs.cert), "key": str(certs.key)}],
                    "min_version": "TLSv1.2",
                    "ciphers": "ECDHE+AESGCM",
                    "alpn": ["h2", "http/1.1"],
                    "client_auth": "optional",
                    "client_ca": str(certs.ca_file),
                    "session_tickets": True,
                },
                "routes": [
                    {"sni": "a.example.com", "backend": "unix:/run/app.sock"},
                    {"sni": "*.example.com", "backend": "[::1]:8080"},
                ],
            },
            {
                "name": "sock",
                "listen": "unix:/run/tlsproxy/web.sock",
                "listen_mode": "0660",
                "listen_owner": "root:root",
                "backend": "127.0.0.1:8080",
                "tls": {"certificates": [{"cert": str(certs.cert), "key": str(certs.key)}]},
            },
        ],
    }


def _schema_keys(model: type[BaseModel]) -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                keys |= _schema_keys(candidate)
    return keys


SCHEMA_KEYS = _schema_keys(ConfigFile)

Path_ = tuple[str | int, ...]


def _nodes(value: object, path: Path_ = ()) -> list[Path_]:
    """Every path into the document: tables, arrays and leaves."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _nodes(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _nodes(item, (*path, index))
    return found


def spell(path: Path_) -> str:
    """A path as the config errors spell it: listeners[0].tls.certificates[0].key."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def _near_misses(certs: Certs) -> list[object]:
    """Values close to valid ones, for every kind of key in the schema."""
    return [
        *("", " ", "0.0.0.0:0", "127.0.0.1:65536", "127.0.0.1:-1", "[::1]:80", "[zz]:1", "::1:80"),
        *("unix:", "unix:/x", "unix:relative", "unix:/" + "x" * 200, "localhost 8080", ":80"),
        *("host:", "999.1.1.1:80", "example.com:443", "*.", "*.com", "f*.example.com", "*.a.b"),
        *("TLSv1.3", "TLSv1.1", "require", "none", "v1", "v3", "ALL", "NULL", "DEBUG", "text"),
        *(str(certs.cert), str(certs.key), str(certs.ca_file), "missing.pem", "/", "/dev/null"),
        *("a" * 300, "é.example", "xn--", "web web", "h2", "\x00"),
        *("0660", "0o660", "1777", "root", ":root", "root:", "no-such-user-x"),
        *(0, -1, 1, 2, 65536, 2**63 - 1, -(2**63), 0.0, -0.5, 1e-9, 1e308, math.nan, math.inf),
        *(True, False, [], {}, [""], ["h2", "h2"], [{}], date(2000, 1, 1)),
    ]


def _values(certs: Certs) -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.sampled_from(_near_misses(certs)),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.text(max_size=40),
        st.dates(),
        st.datetimes(),
        st.times(),
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(_keys(), children, max_size=3)
        ),
        max_leaves=6,
    )


def _keys() -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(SCHEMA_KEYS)) | st.text(min_size=1, max_size=12)


def _at(document: dict[str, Any], path: Path_) -> Any:
    node: Any = document
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated_documents(draw: st.DrawFn, certs: Certs) -> dict[str, Any]:
    document = full_document(certs)
    if draw(st.booleans()):  # a second listener, its name the same or not
        second = copy.deepcopy(document["listeners"][0])
        second["name"] = draw(st.sampled_from(["web", "api"]))
        document["listeners"].append(second)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_nodes(document)))
        action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        node = _at(document, path[:-1])
        if action == "add" or not path:
            target = _at(document, path)
            if isinstance(target, dict):
                target[draw(_keys())] = draw(_values(certs))
        elif action == "replace":
            node[path[-1]] = draw(_values(certs))
        elif action == "delete":
            del node[path[-1]]
        elif isinstance(node, dict):
            key = path[-1]
            assert isinstance(key, str)
            spelling = draw(st.sampled_from([key.upper(), key[:-1], key + "s", key + " "]))
            node[spelling] = node.pop(key)
    return document


# ---------------------------------------------------------------- the properties


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


def test_the_full_document_is_valid(certs: Certs, config_dir: Path) -> None:
    """Where the mutations start from: every key set, and loadable."""
    path = config_dir / "full.toml"
    path.write_text(toml_document(full_document(certs)), encoding="utf-8")
    config = load_config(path)
    assert config.listeners[0].routes[1].sni == "*.example.com"
    assert set(full_document(certs)) | {"listeners"} == set(ConfigFile.model_fields)


def _load(path: Path) -> tuple[Config | None, tuple[str, ...]]:
    """What load_config gives: a Config or ConfigError's messages, nothing else."""
    try:
        return load_config(path), ()
    except ConfigError as exc:
        assert exc.errors, "a ConfigError without a message"
        assert str(exc) == "\n".join(exc.errors)
        return None, exc.errors


def assert_toml_paths(document: dict[str, Any], errors: tuple[str, ...]) -> None:
    """Each message starts with a path into the document, or with a schema
    key under one of its tables (where a missing key is reported)."""
    nodes = _nodes(document)
    known = {spell(node) for node in nodes}
    for table in (node for node in nodes if isinstance(_at(document, node), dict)):
        known |= {spell((*table, key)) for key in SCHEMA_KEYS}
    for message in errors:
        assert any(message.startswith(f"{prefix}: ") for prefix in known), message


@given(data=st.data())
def test_a_schema_shaped_document_loads_or_every_error_has_its_toml_path(
    certs: Certs, config_dir: Path, data: st.DataObject
) -> None:
    document = data.draw(mutated_documents(certs), "document")
    path = config_dir / "schema.toml"
    path.write_text(toml_document(document), encoding="utf-8")
    config, errors = _load(path)
    assert (config is None) != (not errors)
    assert_toml_paths(document, errors)


@given(data=st.data())
def test_a_mutated_file_loads_or_fails_with_a_config_error(
    certs: Certs, config_dir: Path, data: st.DataObject
) -> None:
    """The bytes of a valid file with random edits: byte flips, deletions,
    insertions, truncation. Not TOML at all is reported against the file."""
    text = bytearray(toml_document(full_document(certs)).encode())
    for _ in range(data.draw(st.integers(1, 4), "edits")):
        at = data.draw(st.integers(0, len(text)), "at")
        edit = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]), "edit")
        if edit == "flip" and at < len(text):
            text[at] ^= 1 << data.draw(st.integers(0, 7), "bit")
        elif edit == "delete":
            del text[at : at + data.draw(st.integers(1, 20), "size")]
        elif edit == "insert":
            text[at:at] = data.draw(st.binary(min_size=1, max_size=8), "bytes")
        elif edit == "truncate":
            del text[at:]
    path = config_dir / "mutated.toml"
    path.write_bytes(bytes(text))
    config, errors = _load(path)
    assert (config is None) != (not errors)
    try:
        document = tomllib.loads(text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        (message,) = errors
        assert message.startswith(f"{path}: "), message
    else:
        assert_toml_paths(document, errors)


def test_the_toml_writer_round_trips(certs: Certs) -> None:
    """The generated documents mean what they say: tomllib reads back the
    values written (nan aside, which equals nothing)."""
    value = {
        "s": 'a"b\\c\x00\x7f\n é',
        "weird key": [1, -2.5, True, date(2000, 1, 2), datetime(2000, 1, 2, 3, 4, 5)],
        "t": {"inner": time(1, 2, 3, 4), "empty": {}},
        "big": 1e308,
        "inf": -math.inf,
    }
    assert tomllib.loads(toml_document(value)) == value
