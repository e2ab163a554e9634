"""The metric names a PromQL expression reads, and the names a scrape exports.

Not a PromQL parser: it removes what cannot be a metric name (strings, label
matchers, ranges, grouping clauses, Grafana variables, numbers and durations)
and keeps the identifiers that are not functions or keywords. That is enough
for the expressions we write, and a test proves it finds each kind of name.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan"}
)

_STRINGS = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLES = re.compile(r"\$\{?\w+\}?")
# An identifier not glued to a preceding digit, dot or name character, so
# the "m" of "15m" and the "e" of "1e3" are not taken for metric names.
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")

# Series a family of each type exports besides the samples seen (the parser
# strips _total from counter family names).
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def metric_names(expr: str) -> set[str]:
    text = _STRINGS.sub(" ", expr)
    for pattern in (_MATCHERS, _RANGES, _GROUPING, _VARIABLES):
        text = pattern.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group().lower() not in KEYWORDS:
            names.add(match.group())
    return names


def exported_names(exposition: str) -> set[str]:
    """Every series name a scrape can hold, including declared-but-empty families.

    An empty family still prints its HELP and TYPE lines, so the parser
    returns it with no samples; its possible series names come from its type.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        suffixes = SERIES_SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names
