"""The log line (one JSON object per line, whatever the fields hold; text
that cannot drive a terminal) and the sink that never blocks its caller."""

from __future__ import annotations

import errno
import io
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from proxy import unraisable
from proxy.log import GATHER_S, WRITE_BYTES, AccessLog, Logger, LogSink, make_logger
from tests.helpers import STEP

# Lines logged against a stalled or broken sink: far more than its buffer holds.
LINES = 2000


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


class _StalledWriter:
    """A log reader that stops reading: every write blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.written = bytearray()

    def __call__(self, data: memoryview) -> int:
        self.entered.set()
        assert self.release.wait(STEP), "never released"
        self.written += data
        return len(data)


def _log_in_a_thread(log: Logger, count: int) -> threading.Thread:
    def run() -> None:
        for n in range(count):
            log.info("connection", n=n)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_blocked_sink_never_blocks_the_caller_and_counts_what_it_drops() -> None:
    writer = _StalledWriter()
    sink = LogSink(writer, limit=50 * 1024)
    drops: list[int] = []
    sink.count_drops(drops.append)
    log = make_logger(stream=sink)
    log.info("first")
    assert writer.entered.wait(STEP)  # the writer thread is now stuck in write()
    caller = _log_in_a_thread(log, LINES)
    caller.join(STEP)
    assert not caller.is_alive(), "the caller blocked on a stalled sink"
    assert 0 < sink.dropped < LINES
    assert sum(drops) == sink.dropped

    writer.release.set()
    assert sink.close()
    lines = [json.loads(line) for line in writer.written.decode().splitlines()]
    assert lines[0]["event"] == "first"
    assert len(lines) + sink.dropped == LINES + 1
    numbers = [line["n"] for line in lines[1:]]
    assert numbers == sorted(numbers)  # in order, the dropped ones simply missing


def test_a_broken_sink_drops_and_counts_and_never_raises() -> None:
    def broken(data: memoryview) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    sink = LogSink(broken)
    log = make_logger(stream=sink)
    for n in range(LINES):
        log.info("connection", n=n)
    assert sink.close()  # nothing left to write: all of it was dropped
    assert sink.dropped == LINES
    log.info("after close")  # dropped too, and still no exception
    assert sink.dropped == LINES + 1


def test_close_gives_up_on_a_stalled_sink_and_drops_the_rest() -> None:
    writer = _StalledWriter()
    sink = LogSink(writer)
    sink.msg("stuck in write()")
    assert writer.entered.wait(STEP)
    sink.msg("still buffered")
    assert not sink.close(timeout=0.1)
    assert sink.dropped == 1
    writer.release.set()


def test_each_write_holds_whole_lines_within_pipe_buf() -> None:
    writes: list[bytes] = []

    def record(data: memoryview) -> int:
        writes.append(bytes(data))
        return len(data)

    sink = LogSink(record)
    long_line = "x" * (WRITE_BYTES * 2)
    for n in range(LINES):
        sink.msg(f"line {n:04d} " + "y" * 100)
    sink.msg(long_line)
    assert sink.close()
    assert all(write.endswith(b"\n") for write in writes)
    assert all(len(write) <= WRITE_BYTES for write in writes[:-1])
    assert writes[-1] == long_line.encode() + b"\n"  # alone, not split
    assert b"".join(writes).count(b"\n") == LINES + 1


def test_lines_that_come_while_the_writer_gathers_share_its_writes() -> None:
    """A line per connection must not wake the writer once per line: lines
    logged a few milliseconds apart go out together, a write per gathering
    at most (one each, 40 writes, if every line woke the writer)."""
    writes: list[bytes] = []

    def record(data: memoryview) -> int:
        writes.append(bytes(data))
        return len(data)

    sink = LogSink(record)
    start = time.monotonic()
    for n in range(40):
        sink.msg(f"line {n}")
        time.sleep(0.002)
    elapsed = time.monotonic() - start
    assert sink.close()
    assert b"".join(writes).count(b"\n") == 40
    assert len(writes) <= elapsed / GATHER_S + 2


def test_a_lone_line_waits_the_gathering_and_a_close_does_not() -> None:
    written = threading.Event()

    def record(data: memoryview) -> int:
        written.set()
        return len(data)

    sink = LogSink(record)
    start = time.monotonic()
    sink.msg("alone")
    assert written.wait(STEP)
    assert GATHER_S * 0.9 <= time.monotonic() - start < STEP
    assert sink.close()

    lines: list[bytes] = []

    def keep(data: memoryview) -> int:
        lines.append(bytes(data))
        return len(data)

    patient = LogSink(keep, gather=10 * STEP)
    patient.msg("last words")
    start = time.monotonic()
    assert patient.close()  # not after the 200 s gathering
    assert 0 <= time.monotonic() - start < STEP
    assert lines == [b"last words\n"]


def test_text_format_escapes_control_characters_a_client_could_send() -> None:
    stream = io.StringIO()
    log = make_logger(fmt="text", stream=stream)
    hostile = "\x1b[31mred\x07\u202eevil\r"
    log.info("connection", sni=hostile, alpn=[hostile], error=f"bad {hostile}")
    try:
        int(hostile)
    except ValueError:
        log.exception("failed")
    text = stream.getvalue()
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\u202e" not in text
    assert "\r" not in text
    assert "\\x1b[31mred" in text
    assert "Traceback (most recent call last):\n" in text  # tracebacks keep their lines


class _RaisesInFinaliser:
    def __del__(self) -> None:
        raise RuntimeError("raised in a finaliser")


def test_an_unraisable_exception_is_one_json_line_not_a_traceback() -> None:
    stream = io.StringIO()
    previous = sys.unraisablehook
    unraisable.install(make_logger(stream=stream))
    try:
        _RaisesInFinaliser()  # dropped at once: __del__ runs, CPython cannot raise
    finally:
        sys.unraisablehook = previous
    (line,) = (json.loads(raw) for raw in stream.getvalue().splitlines())
    assert line["event"] == "unraisable exception; please report this"
    assert line["level"] == "error"
    assert line["error_type"] == "RuntimeError"
    assert line["error"] == "raised in a finaliser"
    assert "_RaisesInFinaliser.__del__" in line["object"]
    assert "Traceback" in line["exception"]


ACCESS_FIELDS: dict[str, Any] = {
    "listener": "web",
    "client": "127.0.0.1:50000",
    "outcome": "success",
    "handshake_ms": 1.25,
    "resumed": False,
    "client_san_uri": ["spiffe://a.example/x"],
    "client_subject": None,
}


def test_the_access_line_has_the_fields_order_and_stamps_of_the_pipeline() -> None:
    fast, slow = io.StringIO(), io.StringIO()
    AccessLog(make_logger("info", "json", fast).bind(pid=7), "info", "json")(ACCESS_FIELDS)
    make_logger("info", "json", slow).bind(pid=7).info("connection", **ACCESS_FIELDS)
    ours, theirs = json.loads(fast.getvalue()), json.loads(slow.getvalue())
    assert list(ours) == list(theirs) == ["pid", *ACCESS_FIELDS, "event", "level", "timestamp"]
    assert {k: v for k, v in ours.items() if k != "timestamp"} == {
        k: v for k, v in theirs.items() if k != "timestamp"
    }
    assert ours["timestamp"].endswith("Z") and len(ours["timestamp"]) == len(theirs["timestamp"])


def test_an_access_line_that_is_not_ascii_is_escaped_like_every_json_line() -> None:
    out = io.StringIO()
    fields = {**ACCESS_FIELDS, "client_subject": "CN=\u202eevil\u2028"}
    AccessLog(make_logger("info", "json", out).bind(pid=7), "info", "json")(fields)
    line = out.getvalue()
    assert line.isascii() and "\\u202e" in line and "\\u2028" in line
    assert json.loads(line)["client_subject"] == "CN=\u202eevil\u2028"


def test_the_access_line_follows_the_level_and_the_text_format() -> None:
    quiet = io.StringIO()
    AccessLog(make_logger("warning", "json", quiet), "warning", "json")(ACCESS_FIELDS)
    assert quiet.getvalue() == ""
    text = io.StringIO()
    AccessLog(make_logger("info", "text", text), "info", "text")(ACCESS_FIELDS)
    assert "connection" in text.getvalue() and "listener=web" in text.getvalue()
