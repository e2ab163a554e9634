"""The schema: one pydantic model per TOML table, frozen, unknown keys refused.

Cross-field checks (certificates against their keys, listeners whose
addresses overlap) are model validators, reported with the TOML paths of
every field involved.
"""

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    StrictBool,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from proxy import certs, identity, sni
from proxy.config.addresses import (
    Address,
    AdminAddress,
    BackendAddress,
    ListenAddress,
    addresses_overlap,
    is_ip_literal,
)
from proxy.config.errors import _FILE_ERRORS, _LOCATED_ERRORS, _SIBLING_ERRORS, _toml_path
from proxy.config.fields import (
    DEFAULT_CIPHERSUITES,
    DEFAULT_GROUPS,
    FilePath,
    PositiveInt,
    Seconds,
    SecondsOrZero,
    _cipher_string,
    _ciphersuite,
    _group,
    _metric_label,
    _nonempty,
    _optional_file,
    _require,
)
from proxy.config.socketfile import DEFAULT_LISTEN_MODE, ListenMode, SocketOwner, parse_mode


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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


def _upstream_name(name: str) -> str:
    """The name sent as SNI and checked against the upstream's certificate:
    a DNS name, or an IP literal (checked against the IP SANs; no SNI)."""
    if name == "" or is_ip_literal(name):
        return name
    if "*" in name:
        raise ValueError(f"must be the upstream's own name, not a wildcard; got {name!r}")
    if problem := sni.check_pattern(name):
        raise ValueError(f"{problem}; got {name!r}")
    return name


class UpstreamTLSConfig(_Model):
    """TLS that tlsproxy originates to the backend (the upstream)."""

    server_name: Annotated[StrictStr, AfterValidator(_upstream_name)] = ""
    ca: Annotated[Path | None, PlainValidator(_optional_file)] = None
    certificates: Annotated[
        tuple[CertificatePair, ...],
        _require(
            lambda pairs: len(pairs) <= 1,
            "at most one client certificate: the upstream asks for one, and OpenSSL "
            "sends the one it has",
        ),
    ] = ()
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    alpn: tuple[Annotated[StrictStr, Field(min_length=1, max_length=255)], ...] = ()
    session_resumption: StrictBool = True
    groups: Annotated[
        tuple[Annotated[StrictStr, AfterValidator(_group)], ...], _nonempty("group")
    ] = DEFAULT_GROUPS
    ciphersuites: Annotated[
        tuple[Annotated[StrictStr, AfterValidator(_ciphersuite)], ...],
        _nonempty("cipher suite"),
    ] = DEFAULT_CIPHERSUITES
    allow: AllowConfig | None = None
    _ca_pem: bytes | None = PrivateAttr(default=None)

    @property
    def ca_pem(self) -> bytes | None:
        """The trust anchors as validation read them (None: the system store)."""
        if self.ca is not None and self._ca_pem is None:
            raise ValueError(f"{self.ca}: CA file not read (check-config --no-files)")
        return self._ca_pem

    @model_validator(mode="after")
    def read_ca(self, info: ValidationInfo) -> Self:
        if self.ca is None or not _checking_files(info):
            return self
        read = certs.read_ca_bundle(self.ca)
        if isinstance(read, str):
            raise PydanticCustomError(_LOCATED_ERRORS, "upstream CA", {"errors": [(("ca",), read)]})
        self._ca_pem = read[0]
        return self


class RouteConfig(_Model):
    sni: Annotated[StrictStr, AfterValidator(_server_name)]
    backend: BackendAddress
    allow: AllowConfig | None = None  # replaces the listener's for this SNI


class ListenerConfig(_Model):
    name: Annotated[StrictStr, AfterValidator(_metric_label)]
    listen: ListenAddress
    # A unix listen's socket file (None: DEFAULT_LISTEN_MODE, the owner bind gives it).
    listen_mode: ListenMode | None = None
    listen_owner: SocketOwner | None = None
    backend: BackendAddress
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    accept_proxy_protocol: Literal["off", "v1", "v2", "any"] = "off"
    handshake_timeout: Seconds = 10.0
    idle_timeout: Seconds = 300.0
    connect_timeout: Seconds = 5.0
    max_connections: PositiveInt = 10000
    tls: TLSConfig | None = None  # terminate TLS from the client
    upstream_tls: UpstreamTLSConfig | None = None  # originate TLS to the backend
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

    def certificate_pairs(self) -> Iterator[tuple[str, CertificatePair]]:
        """Every pair the listener loads, by table: served to clients
        (`tls`), presented to the upstream (`upstream_tls`)."""
        if self.tls is not None:
            yield from (("tls", pair) for pair in self.tls.certificates)
        if self.upstream_tls is not None:
            yield from (("upstream_tls", pair) for pair in self.upstream_tls.certificates)

    @model_validator(mode="after")
    def some_tls(self) -> Self:
        if self.tls is None and self.upstream_tls is None:
            raise ValueError(
                "has neither [listeners.tls] (terminate TLS from clients) nor "
                "[listeners.upstream_tls] (originate TLS to the backend); a listener "
                "needs one of them, or both to re-encrypt"
            )
        return self

    @model_validator(mode="after")
    def upstream_needs_a_name(self) -> Self:
        upstream = self.upstream_tls
        if (
            upstream is not None
            and self.backend.unix_path is not None
            and not upstream.server_name
            and upstream.allow is None
        ):
            errors = [
                (
                    ("upstream_tls", "server_name"),
                    f"the backend {self.backend} has no host name to check the upstream's "
                    "certificate against; set server_name, or an allow table",
                )
            ]
            raise PydanticCustomError(_LOCATED_ERRORS, "upstream name", {"errors": errors})
        return self

    @property
    def socket_mode(self) -> int:
        """The mode a unix listen's socket file is given."""
        return parse_mode(self.listen_mode or DEFAULT_LISTEN_MODE)

    @model_validator(mode="after")
    def socket_file_keys_need_a_unix_listen(self) -> Self:
        errors: list[tuple[tuple[int | str, ...], str]] = [
            (
                (key,),
                f"applies to a unix socket's file only, and listen is '{self.listen}'; "
                "remove it, or listen on 'unix:/path'",
            )
            for key, value in (
                ("listen_mode", self.listen_mode),
                ("listen_owner", self.listen_owner),
            )
            if value is not None and self.listen.unix_path is None
        ]
        if errors:
            raise PydanticCustomError(_LOCATED_ERRORS, "socket file keys", {"errors": errors})
        return self

    @model_validator(mode="after")
    def route_allow_needs_require(self) -> Self:
        errors: list[tuple[tuple[int | str, ...], str]]
        if self.routes and self.tls is None:
            errors = [
                (
                    ("routes",),
                    "routes pick a backend by the client's SNI, so they need [listeners.tls]",
                )
            ]
            raise PydanticCustomError(_LOCATED_ERRORS, "routes", {"errors": errors})
        client_auth = "none" if self.tls is None else self.tls.client_auth
        errors = [
            (("routes", index, "allow"), _needs_require(client_auth))
            for index, route in enumerate(self.routes)
            if route.allow is not None and client_auth != "require"
        ]
        if errors:
            raise PydanticCustomError(_LOCATED_ERRORS, "route allow", {"errors": errors})
        return self


class AdminConfig(_Model):
    listen: AdminAddress = Address("127.0.0.1", 9090)


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
