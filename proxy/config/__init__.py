"""TOML -> typed, validated, immutable config.

Theory of operation: one pydantic pass checks structure, types, values and the
certificate files together, so that `check-config` and a SIGHUP reload report
every problem at once, each with its TOML path
(`listeners[0].tls.certificates[0].key: file not found: ...`). Nothing is
silently ignored: unknown keys are errors. Validation needs two facts from outside the data (the
config file's directory, for relative paths, and the current time, for expiry);
they travel in pydantic's validation context.

The package, by concern: `addresses` (host:port and unix paths), `fields`
(field types and their validators), `schema` (the models), `load` (TOML in,
`Config` or `ConfigError` out), `errors` (the error and its TOML paths),
`socketfile` (a unix listener's file mode and owner). Its
public names are all importable from `proxy.config`.
"""

from proxy.config.addresses import (
    UNIX_PATH_MAX,
    Address,
    AdminAddress,
    BackendAddress,
    ListenAddress,
    addresses_overlap,
    format_hostport,
    format_sockaddr,
    parse_address,
)
from proxy.config.errors import ConfigError
from proxy.config.fields import (
    DEFAULT_CIPHERSUITES,
    DEFAULT_GROUPS,
    FilePath,
    PositiveInt,
    Seconds,
    SecondsOrZero,
)
from proxy.config.load import default_config, load_config, parse_config, with_overrides
from proxy.config.schema import (
    AdminConfig,
    AllowConfig,
    CertificatePair,
    Config,
    ConfigFile,
    ListenerConfig,
    LogConfig,
    ProcessConfig,
    RouteConfig,
    TLSConfig,
    UpstreamTLSConfig,
)
from proxy.config.socketfile import DEFAULT_LISTEN_MODE, SocketOwner, parse_mode, parse_owner

__all__ = [
    "DEFAULT_CIPHERSUITES",
    "DEFAULT_GROUPS",
    "DEFAULT_LISTEN_MODE",
    "UNIX_PATH_MAX",
    "Address",
    "AdminAddress",
    "AdminConfig",
    "AllowConfig",
    "BackendAddress",
    "CertificatePair",
    "Config",
    "ConfigError",
    "ConfigFile",
    "FilePath",
    "ListenAddress",
    "ListenerConfig",
    "LogConfig",
    "PositiveInt",
    "ProcessConfig",
    "RouteConfig",
    "Seconds",
    "SecondsOrZero",
    "SocketOwner",
    "TLSConfig",
    "UpstreamTLSConfig",
    "addresses_overlap",
    "default_config",
    "format_hostport",
    "format_sockaddr",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_mode",
    "parse_owner",
    "with_overrides",
]
