"""Loading: TOML text to a validated `Config`, and pydantic's errors
rendered as `ConfigError` lines with TOML paths."""

import difflib
import tomllib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from pydantic import (
    BaseModel,
    ValidationError,
)
from pydantic_core import ErrorDetails

from proxy.config.errors import (
    _FILE_ERRORS,
    _LOCATED_ERRORS,
    _SIBLING_ERRORS,
    ConfigError,
    _show,
    _toml_path,
)
from proxy.config.schema import Config, ConfigFile


def load_config(path: Path, *, check_files: bool = True) -> Config:
    """The validated config in `path`; `check_files=False` leaves the
    certificate, key and CA files unread (such a config cannot be served)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: config file not found"]) from exc
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from exc
    return parse_config(
        data, base_dir=path.absolute().parent, source=path.absolute(), check_files=check_files
    )


def parse_config(
    data: Mapping[str, Any],
    base_dir: Path,
    source: Path | None = None,
    *,
    check_files: bool = True,
) -> Config:
    context = {"base_dir": base_dir, "now": datetime.now(UTC), "check_files": check_files}
    try:
        parsed = ConfigFile.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise ConfigError(line for error in exc.errors() for line in _render(error)) from exc
    warnings = [
        f"{_toml_path(('listeners', i, table, 'certificates', j, finding.file))}: {finding.message}"
        for i, listener in enumerate(parsed.listeners)
        for table in ("tls", "upstream_tls")
        for j, pair in enumerate(p for t, p in listener.certificate_pairs() if t == table)
        for finding in pair._warnings
    ]
    warnings += [
        f"{_toml_path(('listeners', i, 'tls', *where))}: {message}"
        for i, listener in enumerate(parsed.listeners)
        if listener.tls is not None
        for where, message in listener.tls._verify_warnings
    ]
    return Config(**dict(parsed), source=source, warnings=tuple(warnings))


def default_config(cert: Path, key: Path) -> Config:
    """What `tlsproxy run` serves without --config: a newcomer's first success."""
    listener = {
        "name": "default",
        "listen": "127.0.0.1:8443",
        "backend": "127.0.0.1:8080",
        "tls": {"certificates": [{"cert": cert, "key": key}]},
    }
    return parse_config({"listeners": [listener]}, base_dir=Path.cwd())


def with_overrides(
    config: Config,
    *,
    listen: str | None = None,
    backend: str | None = None,
    admin: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> Config:
    """Command-line flags win over the file for the admin address and the first
    listener, so one flag adapts the embedded default or a shared config. The
    result is validated like a file (relative flag paths are relative to the
    working directory), so a bad flag is a ConfigError, never a crash."""
    data = config.model_dump(exclude={"source", "warnings"})
    first = data["listeners"][0]
    flags = [
        (data["admin"], "listen", admin),
        (first, "listen", listen),
        (first, "backend", backend),
    ]
    if cert is not None or key is not None:
        if first["tls"] is None:  # plaintext in: it serves no certificate
            raise ConfigError(
                (f"--cert and --key: listener {first['name']!r} has no [listeners.tls]",)
            )
        pair = first["tls"]["certificates"][0]
        flags += [(pair, "cert", cert), (pair, "key", key)]
    if all(value is None for _, _, value in flags):
        return config
    for table, name, value in flags:
        if value is not None:
            table[name] = value
    return parse_config(data, base_dir=Path.cwd(), source=config.source)


# ---------------------------------------------------------------------------
# Error messages: pydantic's wording is for Python programmers; ours is for
# someone editing a TOML file.

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "tuple_type": "an array",
    "model_type": "a table",
}


def _render(error: ErrorDetails) -> Iterator[str]:
    loc, ctx = error["loc"], error.get("ctx", {})
    if error["type"] == _FILE_ERRORS:
        for finding in ctx["findings"]:
            yield f"{_toml_path((*loc, finding.file))}: {finding.message}"
    elif error["type"] == _LOCATED_ERRORS:
        for where, message in ctx["errors"]:
            yield f"{_toml_path((*loc, *where))}: {message}"
    elif error["type"] == _SIBLING_ERRORS:
        for where, message in ctx["errors"]:
            yield f"{_toml_path((*loc[:-1], *where))}: {message}"
    else:
        yield f"{_toml_path(loc)}: {_describe(error['type'], loc, ctx, error['input'])}"


def _describe(kind: str, loc: tuple[int | str, ...], ctx: dict[str, Any], value: Any) -> str:
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return str(ctx["error"])
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_show(value)}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {_show(value)}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}, got {_show(value)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    return f"invalid value {_show(value)}"


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    key, known = str(loc[-1]), _keys_at(loc[:-1])
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(known)}"
    return f"unknown key '{key}' ({hint})"


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] = ConfigFile
    for part in loc:
        if isinstance(part, str):
            annotation = model.model_fields[part].annotation
            model = next(
                candidate
                for candidate in (annotation, *get_args(annotation))
                if isinstance(candidate, type) and issubclass(candidate, BaseModel)
            )
    return list(model.model_fields)
