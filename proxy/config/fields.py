"""Field types and validators shared by the schema: durations, files,
metric labels, and the cipher, group and TLS 1.3 suite names OpenSSL must know."""

import math
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    PlainValidator,
    ValidationInfo,
)

from proxy import openssl
from proxy.config.errors import _show


def _seconds(value: object) -> float:
    seconds = _number_of_seconds(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"must be > 0 (a finite number of seconds), got {_show(value)}")
    return seconds


def _seconds_or_zero(value: object) -> float:
    seconds = _number_of_seconds(value)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"must be >= 0 (a finite number of seconds), got {_show(value)}")
    return seconds


def _number_of_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(  # noqa: TRY004 - pydantic collects ValueError, not TypeError
            f"expected a number of seconds, got {_show(value)}"
        )
    return float(value)


def _file(value: object, info: ValidationInfo) -> Path:
    if not isinstance(value, str | Path) or value == "":
        raise ValueError(f"expected a file path, got {_show(value)}")
    base_dir: Path = (info.context or {}).get("base_dir", Path.cwd())
    return base_dir.absolute() / value


def _optional_file(value: object, info: ValidationInfo) -> Path | None:
    """`client_ca = ""` is how the config reference spells "none", so "" means no file."""
    return None if value in ("", None) else _file(value, info)


def _require(ok: Callable[[Any], bool], message: str) -> AfterValidator:
    """Runs only once the value itself is valid, so it never adds noise to a type
    error."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _metric_label(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(
            f"must be letters, digits, '_' or '-' (it is a metric label), got {name!r}"
        )
    return name


def _cipher_string(ciphers: str) -> str:
    if ciphers:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
        except ssl.SSLError as exc:
            raise ValueError(
                f"OpenSSL accepts no cipher in {ciphers!r}; see `openssl ciphers -v` for names"
            ) from exc
    return ciphers


def _accepted_by(
    apply: Callable[[ssl.SSLContext, tuple[str, ...]], None], what: str, known: str
) -> Callable[[str], str]:
    """A validator: OpenSSL, through `apply` on a scratch context, knows the name."""

    def check(name: str) -> str:
        try:
            apply(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), (name,))
        except ValueError as exc:
            raise ValueError(f"unknown {what} {name!r}; OpenSSL knows e.g. {known}") from exc
        except openssl.PolicyUnavailable as exc:
            raise ValueError(str(exc)) from exc
        return name

    return check


_group = _accepted_by(
    openssl.set_groups, "key-exchange group", "X25519, P-256, P-384, P-521, X448, ffdhe2048"
)
_ciphersuite = _accepted_by(
    openssl.set_ciphersuites,
    "TLS 1.3 cipher suite",
    "TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, "
    "TLS_AES_128_CCM_SHA256",
)


# Mozilla's "intermediate" profile (version 5.7): its key-exchange groups and
# TLS 1.3 suites, in its order.
DEFAULT_GROUPS = ("X25519", "P-256", "P-384")
DEFAULT_CIPHERSUITES = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)


def _nonempty(what: str) -> AfterValidator:
    return _require(lambda items: len(items) > 0, f"at least one {what} is required")


Seconds = Annotated[float, PlainValidator(_seconds)]
SecondsOrZero = Annotated[float, PlainValidator(_seconds_or_zero)]
FilePath = Annotated[Path, PlainValidator(_file)]
PositiveInt = Annotated[int, Field(strict=True, gt=0)]
