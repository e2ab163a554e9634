"""Structured logs to stderr: JSON for machines by default, text for people.

The logger is built here and passed in, never configured globally, so tests
and several servers in one process do not fight over structlog's defaults.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import structlog

Logger = structlog.typing.FilteringBoundLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# One encoder for every line: json.dumps with a `default` builds a new
# JSONEncoder per call, measurable at one access-log line per connection.
_ENCODER = json.JSONEncoder(default=repr)


def _encode(event: dict[str, Any], **_: Any) -> str:
    return _ENCODER.encode(event)


def make_logger(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> Logger:
    """A bound logger that writes one line per event to `stream` (stderr)."""
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_encode)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    logger: Logger = structlog.wrap_logger(
        structlog.WriteLogger(stream or sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        cache_logger_on_first_use=True,
    )
    return logger
