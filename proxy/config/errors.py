"""Config errors as the user sees them: every problem, each at its TOML path.

The validators raise pydantic errors of the types named here, with the
locations they found; loading (proxy/config/load.py) renders them, one line
per problem, in the words of someone editing a TOML file.
"""

from collections.abc import Iterable, Mapping


class ConfigError(Exception):
    """Every problem found in one config, so the user can fix them in one go."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        super().__init__(self.errors)  # args stay (errors,) so the error pickles intact

    def __str__(self) -> str:
        return "\n".join(self.errors)


# pydantic error type whose ctx carries certs.Finding values, rendered one per line
_FILE_ERRORS = "certificate_files"
# pydantic error type whose ctx carries (TOML location, message) pairs
_LOCATED_ERRORS = "located"
# the same, raised by a field but located relative to its table
_SIBLING_ERRORS = "located_in_table"


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
