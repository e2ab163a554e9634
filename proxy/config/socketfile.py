"""A unix listener's socket file: its mode and owner, parsed and resolved.

`parse_mode` and `parse_owner` are pure. `SocketOwner` is resolved against
the user and group databases when the config is loaded, so an unknown name
is a config error with its TOML path (check-config says so), never a
failure when the socket is bound.
"""

import grp
import pwd
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, PlainValidator
from pydantic_core import core_schema

from proxy.config.errors import _show

# Read and write for the file's owner and group, nothing for others: connecting
# to a unix socket needs write permission on its file, so the app's group may
# connect and nobody else may (systemd's SocketMode defaults to 0666; a
# sidecar's socket is for its pod's app, not for every local user).
DEFAULT_LISTEN_MODE = "0660"

_OCTAL_MODE = re.compile(r"[0-7]{3,4}")
# The permission bits only: setuid, setgid and sticky mean nothing on a socket.
_MAX_MODE = 0o777

# os.chown's "leave it as it is".
UNCHANGED = -1


def parse_mode(text: object) -> int:
    """`"0660"` (3 or 4 octal digits, as chmod takes them) to its bits."""
    if not isinstance(text, str):
        raise ValueError(  # noqa: TRY004 - pydantic collects ValueError, not TypeError
            f'expected a string of octal digits such as "0660", got {_show(text)} '
            "(a TOML number would be read as decimal)"
        )
    if not _OCTAL_MODE.fullmatch(text):
        raise ValueError(f'expected 3 or 4 octal digits such as "0660"; got {text!r}')
    mode = int(text, 8)
    if mode > _MAX_MODE:
        raise ValueError(
            f"only the permission bits (at most 0777) apply to a socket file; got {text!r}"
        )
    return mode


def parse_owner(text: str) -> tuple[str | None, str | None]:
    """`"user"`, `"user:group"` or `":group"`: the user and group as written
    (names or numeric ids), None where not given."""
    user, colon, group = text.partition(":")
    if (not user and not group) or (colon and not group) or ":" in group:
        raise ValueError(f'expected "user", "user:group" or ":group"; got {text!r}')
    return user or None, group or None


@dataclass(frozen=True)
class SocketOwner:
    """Whom the socket file is given to (`os.chown` ids; UNCHANGED where the
    config names no user or no group), and the text it was resolved from."""

    uid: int
    gid: int
    text: str

    @classmethod
    def resolve(cls, text: str) -> "SocketOwner":
        """Look the names up; a numeric id is taken as it is, listed or not
        (chown accepts any id, as `chown 1000:1000` does)."""
        user, group = parse_owner(text)
        return cls(_uid(user, text), _gid(group, text), text)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _coerce_owner, serialization=core_schema.to_string_ser_schema()
        )


def _uid(user: str | None, text: str) -> int:
    if user is None:
        return UNCHANGED
    if user.isascii() and user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"no user named {user!r} on this system (in {text!r})") from None


def _gid(group: str | None, text: str) -> int:
    if group is None:
        return UNCHANGED
    if group.isascii() and group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no group named {group!r} on this system (in {text!r})") from None


def _coerce_owner(value: object) -> SocketOwner:
    if isinstance(value, SocketOwner):
        return value
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - pydantic collects ValueError, not TypeError
            f'expected "user", "user:group" or ":group", got {_show(value)}'
        )
    return SocketOwner.resolve(value)


def _mode_text(value: object) -> str:
    parse_mode(value)
    assert isinstance(value, str)
    return value


# Kept as written (a string, as TOML has it), checked by parse_mode.
ListenMode = Annotated[str, PlainValidator(_mode_text)]
