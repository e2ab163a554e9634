"""TOML -> typed, validated, immutable config.

Theory of operation: one pydantic pass checks structure, types, values and the
certificate files together, so that `check-config` and a SIGHUP reload report
every problem at once, each with its TOML path
(`listeners[0].tls.certificates[0].key: file not found: ...`). Nothing is
silently ignored: unknown keys are errors. Validation needs two facts from outside the data (the
config file's directory, for relative paths, and the current time, for expiry);
they travel in pydantic's validation context.
"""

import difflib
import ipaddress
import math
import re
import ssl
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainValidator,
    PrivateAttr,
    StrictBool,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError, core_schema

from proxy import certs, identity, openssl, sni


class ConfigError(Exception):
    """Every problem found in one config, so the user can fix them in one go."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        super().__init__(self.errors)  # args stay (errors,) so the error pickles intact

    def __str__(self) -> str:
        return "\n".join(self.errors)


# ---------------------------------------------------------------------------
# Addresses

# Letters, digits, dots and hyphens, not starting or ending with a dot or hyphen;
# this covers IPv4 and DNS names and rejects typos such as "localhost 8080".
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return format_hostport(self.host, self.port)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _coerce_address, serialization=core_schema.to_string_ser_schema()
        )


def format_hostport(host: object, port: object) -> str:
    """`host:port`, with an IPv6 host in brackets: the one spelling of an
    address in logs and messages."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def format_sockaddr(sockaddr: object) -> str:
    """A socket address as the logs spell it: (host, port, ...) or a Unix path."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return format_hostport(sockaddr[0], sockaddr[1])
    if isinstance(sockaddr, str):
        return f"unix:{sockaddr}" if sockaddr else "unix"
    return str(sockaddr)


def parse_address(text: str) -> Address:
    """`host:port`, `[v6]:port` or `unix:/abs/path`; port 0 lets tests bind ephemeral ports."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(
                f"unix socket path must be absolute, e.g. 'unix:/run/app.sock'; got {text!r}"
            )
        return Address(host="", port=0, unix_path=path)
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"missing port in {text!r}; expected host:port, e.g. '127.0.0.1:8443'")
    return Address(host=_parse_host(host, text), port=_parse_port(port, text))


def _parse_host(host: str, text: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise ValueError(f"invalid IPv6 address {host!r} in {text!r}") from exc
        return host[1:-1]
    if ":" in host:
        raise ValueError(f"IPv6 addresses need brackets, e.g. '[::1]:8443'; got {text!r}")
    if not host:
        raise ValueError(f"missing host in {text!r}; use '0.0.0.0{text}' for all interfaces")
    looks_numeric = host.replace(".", "").isdigit()
    if not _HOSTNAME.fullmatch(host) or (looks_numeric and not _is_ipv4(host)):
        raise ValueError(f"invalid host {host!r} in {text!r}; expected an IP address or DNS name")
    return host


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _parse_port(port: str, text: str) -> int:
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"port {port!r} in {text!r} is not a number")
    if int(port) > 65535:
        raise ValueError(f"port {port} in {text!r} is out of range 0-65535")
    return int(port)


def _coerce_address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - pydantic collects ValueError, not TypeError
            f"expected an address like '127.0.0.1:8443', got {_show(value)}"
        )
    return parse_address(value)


def addresses_overlap(a: Address, b: Address) -> bool:
    """Whether listening on both at once fails (EADDRINUSE): the same port on
    the same host, or on a wildcard host that covers the other.

    Port 0 never overlaps (each bind picks a port of its own). Names are
    compared as written, never resolved: `localhost:P` and `127.0.0.1:P` are
    not known to collide until bound.
    """
    if a.port != b.port or a.port == 0:
        return False
    ip_a, ip_b = _ip(a.host), _ip(b.host)
    if ip_a is None or ip_b is None:
        return a.host == b.host
    return ip_a == ip_b or _covers(ip_a, ip_b) or _covers(ip_b, ip_a)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _covers(
    wildcard: ipaddress.IPv4Address | ipaddress.IPv6Address,
    other: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    # [::] takes IPv4 too: Linux binds IPv6 sockets dual-stack unless
    # IPV6_V6ONLY is set (bindv6only=0), and the proxy never sets it.
    return wildcard.is_unspecified and (wildcard.version == 6 or other.version == 4)


def _not_unix(address: Address) -> Address:
    if address.unix_path is not None:
        raise ValueError("unix sockets can only be a backend; expected host:port")
    return address


# sockaddr_un.sun_path on Linux: 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


def _backend(address: Address) -> Address:
    if address.unix_path is not None and len(address.unix_path.encode()) > UNIX_PATH_MAX:
        raise ValueError(
            f"unix socket path is longer than {UNIX_PATH_MAX} bytes, the most the kernel "
            f"accepts; use a shorter path: {address.unix_path!r}"
        )
    return address


ListenAddress = Annotated[Address, AfterValidator(_not_unix)]
BackendAddress = Annotated[Address, AfterValidator(_backend)]


# ---------------------------------------------------------------------------
# Field types


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


# ---------------------------------------------------------------------------
# The schema


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# pydantic error type whose ctx carries certs.Finding values, rendered one per line
_FILE_ERRORS = "certificate_files"
# pydantic error type whose ctx carries (TOML location, message) pairs
_LOCATED_ERRORS = "located"
# the same, raised by a field but located relative to its table
_SIBLING_ERRORS = "located_in_table"
# validation context key: the verify stores read, by (client_ca, client_crl)
_VERIFY_READ = "verify_stores"


class CertificatePair(_Model):
    cert: FilePath
    key: FilePath
    _warnings: tuple[certs.Finding, ...] = PrivateAttr(default=())
    _material: certs.PairMaterial | None = PrivateAttr(default=None)

    @property
    def material(self) -> certs.PairMaterial:
        """The files' bytes as validation read and checked them: a reload
        serves exactly these, never a later state of the files."""
        if self._material is None:
            raise ValueError(f"{self.cert}: certificate files not read (check-config --no-files)")
        return self._material

    @model_validator(mode="after")
    def check_files(self, info: ValidationInfo) -> Self:
        if not _checking_files(info):
            return self
        now: datetime = (info.context or {}).get("now") or datetime.now(UTC)
        check = certs.check_pair(self.cert, self.key, now)
        if check.errors:
            raise PydanticCustomError(
                _FILE_ERRORS, "unusable certificate files", {"findings": check.errors}
            )
        self._warnings = tuple(check.warnings)
        self._material = check.material
        return self


def _checking_files(info: ValidationInfo) -> bool:
    """False for `check-config --no-files`: the schema and values only."""
    return bool((info.context or {}).get("check_files", True))


def _server_name(pattern: str) -> str:
    if problem := sni.check_pattern(pattern):
        raise ValueError(f"{problem}; got {pattern!r}")
    return pattern


def _entry(check: Callable[[str], str | None]) -> AfterValidator:
    """An `allow` list entry, checked by the identity matcher's own rules."""

    def validate(value: str) -> str:
        if problem := check(value):
            raise ValueError(f"{problem}; got {value!r}")
        return value

    return AfterValidator(validate)


class AllowConfig(_Model):
    """Who may connect: a verified certificate matching any entry of any list
    (proxy.identity says how each list matches)."""

    uri: tuple[Annotated[StrictStr, _entry(identity.check_uri_pattern)], ...] = ()
    dns: tuple[Annotated[StrictStr, _entry(identity.check_dns_pattern)], ...] = ()
    cn: tuple[Annotated[StrictStr, _entry(identity.check_name)], ...] = ()
    ou: tuple[Annotated[StrictStr, _entry(identity.check_name)], ...] = ()

    @model_validator(mode="after")
    def lists_someone(self) -> Self:
        if not (self.uri or self.dns or self.cn or self.ou):
            raise ValueError(
                "lists no one (uri, dns, cn and ou are all empty), so it would admit no one; "
                "list who may connect"
            )
        return self

    def compile(self) -> identity.AllowList:
        """The matcher, built once per listener or route when the runtime is."""
        return identity.AllowList(uri=self.uri, dns=self.dns, cn=self.cn, ou=self.ou)


def _needs_require(client_auth: str) -> str:
    return (
        f'an allow table needs client_auth = "require" (it is "{client_auth}"): '
        "only a verified certificate has an identity to match"
    )


class TLSConfig(_Model):
    certificates: Annotated[
        tuple[CertificatePair, ...],
        _require(lambda pairs: len(pairs) > 0, "at least one certificate is required"),
    ]
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    ciphers: Annotated[StrictStr, AfterValidator(_cipher_string)] = ""
    alpn: tuple[Annotated[StrictStr, Field(min_length=1, max_length=255)], ...] = ()
    client_auth: Literal["none", "optional", "require"] = "none"
    client_ca: Annotated[Path | None, PlainValidator(_optional_file)] = None
    # validated even when absent: its validator reads the CA bundle too
    client_crl: tuple[FilePath, ...] = Field(default=(), validate_default=True)
    session_tickets: StrictBool = True
    groups: Annotated[
        tuple[Annotated[StrictStr, AfterValidator(_group)], ...], _nonempty("group")
    ] = DEFAULT_GROUPS
    ciphersuites: Annotated[
        tuple[Annotated[StrictStr, AfterValidator(_ciphersuite)], ...],
        _nonempty("cipher suite"),
    ] = DEFAULT_CIPHERSUITES
    keylog_file: Annotated[Path | None, PlainValidator(_optional_file)] = None
    allow: AllowConfig | None = None
    _verify: certs.VerifyMaterial | None = PrivateAttr(default=None)
    _verify_warnings: tuple[tuple[certs.Where, str], ...] = PrivateAttr(default=())

    @property
    def verify_material(self) -> certs.VerifyMaterial | None:
        """The client CA bundle and CRLs as validation read and checked them
        (None without client_ca): what the verify store is given."""
        if self.client_ca is None:
            return None
        if self._verify is None:
            raise ValueError(f"{self.client_ca}: CA file not read (check-config --no-files)")
        return self._verify

    @model_validator(mode="after")
    def one_pair_per_key_type_and_names(self) -> Self:
        """An RSA and an ECDSA pair for the same names are both served; two
        of one key type are not: OpenSSL would keep only the last loaded."""
        first: dict[tuple[frozenset[str], str], int] = {}
        errors: list[tuple[tuple[int | str, ...], str]] = []
        for index, pair in enumerate(self.certificates):
            if pair._material is None:  # check-config --no-files
                continue
            names = frozenset(sni.normalize(name) for name in pair.material.dns_names)
            key = (names, pair.material.key_type)
            if key in first:
                errors.append(
                    (
                        ("certificates", index),
                        f"certificates[{first[key]}] is also an {key[1].upper()} certificate "
                        f"for exactly these names ({', '.join(sorted(names)) or 'none'}), so "
                        "only one of them could be served; remove one",
                    )
                )
            else:
                first[key] = index
        if errors:
            raise PydanticCustomError(_LOCATED_ERRORS, "duplicate certificates", {"errors": errors})
        return self

    @model_validator(mode="after")
    def client_auth_needs_a_ca(self) -> Self:
        if self.client_auth != "none" and self.client_ca is None:
            raise ValueError(
                f'client_auth = "{self.client_auth}" needs client_ca, the PEM bundle of '
                "the CAs that sign client certificates"
            )
        if self.client_auth == "none" and self.client_ca is not None:
            raise ValueError(
                'client_ca is set but client_auth = "none", so no client certificate would '
                'be asked for; set client_auth = "optional" or "require", or remove client_ca'
            )
        return self

    @field_validator("client_crl")
    @classmethod
    def check_verify_store(cls, crls: tuple[Path, ...], info: ValidationInfo) -> tuple[Path, ...]:
        """Read the CA bundle and the CRL files, once, as a field, so that
        their problems are reported with the certificates' (a model check
        would not run once a certificate failed). What was read waits in the
        validation context for the model, keyed by the files."""
        ca = info.data.get("client_ca")
        if ca is None or not _checking_files(info):
            return crls
        context = info.context if info.context is not None else {}
        now: datetime = context.get("now") or datetime.now(UTC)
        check = certs.check_verify_store(ca, crls, now)
        if check.errors:
            raise PydanticCustomError(
                _SIBLING_ERRORS, "client CA or CRL files", {"errors": check.errors}
            )
        context.setdefault(_VERIFY_READ, {})[(ca, crls)] = check
        return crls

    @model_validator(mode="after")
    def check_client_verification(self, info: ValidationInfo) -> Self:
        """`allow` against `client_auth`; the verify store read above."""
        if self.allow is not None and self.client_auth != "require":
            errors = [(("allow",), _needs_require(self.client_auth))]
            raise PydanticCustomError(_LOCATED_ERRORS, "client verification", {"errors": errors})
        check = (info.context or {}).get(_VERIFY_READ, {}).get((self.client_ca, self.client_crl))
        if check is not None:
            self._verify = check.material
            self._verify_warnings = tuple(check.warnings)
        return self


class RouteConfig(_Model):
    sni: Annotated[StrictStr, AfterValidator(_server_name)]
    backend: BackendAddress
    allow: AllowConfig | None = None  # replaces the listener's for this SNI


class ListenerConfig(_Model):
    name: Annotated[StrictStr, AfterValidator(_metric_label)]
    listen: ListenAddress
    backend: BackendAddress
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    accept_proxy_protocol: Literal["off", "v1", "v2", "any"] = "off"
    handshake_timeout: Seconds = 10.0
    idle_timeout: Seconds = 300.0
    connect_timeout: Seconds = 5.0
    max_connections: PositiveInt = 10000
    tls: TLSConfig
    routes: tuple[RouteConfig, ...] = ()

    @field_validator("routes")
    @classmethod
    def unique_routes(cls, routes: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
        first: dict[str, int] = {}
        for index, route in enumerate(routes):
            name = sni.normalize(route.sni)
            if name in first:
                raise ValueError(
                    f"routes[{first[name]}] and routes[{index}] both match {route.sni!r}; "
                    "each SNI may be routed once"
                )
            first[name] = index
        return routes

    @model_validator(mode="after")
    def route_allow_needs_require(self) -> Self:
        errors: list[tuple[tuple[int | str, ...], str]] = [
            (("routes", index, "allow"), _needs_require(self.tls.client_auth))
            for index, route in enumerate(self.routes)
            if route.allow is not None and self.tls.client_auth != "require"
        ]
        if errors:
            raise PydanticCustomError(_LOCATED_ERRORS, "route allow", {"errors": errors})
        return self


class AdminConfig(_Model):
    listen: ListenAddress = Address("127.0.0.1", 9090)


class ProcessConfig(_Model):
    # Processes sharing the listeners with SO_REUSEPORT (proxy/workers.py);
    # read at start only.
    workers: PositiveInt = 1
    # Between /readyz turning 503 and the listeners closing: time for a load
    # balancer (a Kubernetes Service's endpoints) to stop sending new clients,
    # which are served normally meanwhile.
    drain_delay: SecondsOrZero = 0.0
    drain_timeout: Seconds = 30.0
    watch: StrictBool = True


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: StrictBool = True


class ConfigFile(_Model):
    """What a TOML file may contain."""

    admin: AdminConfig = AdminConfig()
    process: ProcessConfig = ProcessConfig()
    log: LogConfig = LogConfig()
    listeners: Annotated[
        tuple[ListenerConfig, ...],
        _require(lambda listeners: len(listeners) > 0, "at least one [[listeners]] is required"),
    ]

    @field_validator("listeners")
    @classmethod
    def unique_names(cls, listeners: tuple[ListenerConfig, ...]) -> tuple[ListenerConfig, ...]:
        first: dict[str, int] = {}
        for index, listener in enumerate(listeners):
            if listener.name in first:
                raise ValueError(
                    f"listeners[{first[listener.name]}] and listeners[{index}] are both named "
                    f"{listener.name!r}; names must be unique (they label metrics)"
                )
            first[listener.name] = index
        return listeners

    @model_validator(mode="after")
    def distinct_addresses(self) -> Self:
        """Two sockets on one address cannot both listen: found here, with both
        TOML paths, rather than as "port in use" when the daemon starts."""
        sockets: list[tuple[tuple[int | str, ...], Address]] = [
            (("admin", "listen"), self.admin.listen)
        ]
        sockets += [(("listeners", i, "listen"), lc.listen) for i, lc in enumerate(self.listeners)]
        errors: list[tuple[tuple[int | str, ...], str]] = []
        for j, (loc, address) in enumerate(sockets):
            for earlier, other in sockets[:j]:
                if addresses_overlap(other, address):
                    errors.append((loc, _overlap_message(address, earlier, other)))
                    break
        if errors:
            raise PydanticCustomError(_LOCATED_ERRORS, "addresses overlap", {"errors": errors})
        return self


def _overlap_message(address: Address, loc: tuple[int | str, ...], other: Address) -> str:
    if address == other:
        return f"{address} is also {_toml_path(loc)}; each listener needs its own address"
    return (
        f"{address} overlaps {_toml_path(loc)} ({other}): a socket on a wildcard "
        "address (0.0.0.0, [::]) holds the port on every address it covers; use another port"
    )


class Config(ConfigFile):
    """A validated config plus where it came from and what deserves attention."""

    source: Path | None = None
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# Loading


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
        f"{_toml_path(('listeners', i, 'tls', 'certificates', j, finding.file))}: {finding.message}"
        for i, listener in enumerate(parsed.listeners)
        for j, pair in enumerate(listener.tls.certificates)
        for finding in pair._warnings
    ]
    warnings += [
        f"{_toml_path(('listeners', i, 'tls', *where))}: {message}"
        for i, listener in enumerate(parsed.listeners)
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
    pair = first["tls"]["certificates"][0]
    flags = [
        (data["admin"], "listen", admin),
        (first, "listen", listen),
        (first, "backend", backend),
        (pair, "cert", cert),
        (pair, "key", key),
    ]
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


def _toml_path(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path or "(top level)"


def _show(value: object) -> str:
    """A value as it looks in TOML, since that is what the user wrote."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return str(value)
