"""The JSON log line: one object per line, whatever the fields hold."""

from __future__ import annotations

import io
import json
from pathlib import Path

from proxy.log import make_logger


def test_json_line_has_level_time_and_a_repr_for_what_json_cannot_hold() -> None:
    stream = io.StringIO()
    log = make_logger(stream=stream)
    log.info("connection", path=Path("/x"), sans=["a", "é"], none=None)
    log.info("second")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "connection"
    assert first["level"] == "info"
    assert first["timestamp"].endswith("Z")
    assert first["path"] == repr(Path("/x"))
    assert first["sans"] == ["a", "é"]
    assert first["none"] is None
    assert second["event"] == "second"
