"""Structured logs to stderr: JSON for machines by default, text for people.

The logger is built here and passed in, never configured globally, so tests
and several servers in one process do not fight over structlog's defaults.

Theory of operation
-------------------

Logging must never cost a connection. A write to stderr blocks when the
reader (a terminal, a pipe to a log shipper, journald) stalls, and fails with
EPIPE once it is gone; done on the event loop, the first stalls the whole
daemon and the second raises into whatever logged. So the event loop only
renders a line and appends it to a bounded in-memory buffer (`LogSink`); one
dedicated thread writes the buffer to the file descriptor and is the only
thing that ever blocks on it. It carries no connection's data, only log
lines. When the buffer is full the line is dropped; when a write fails the
lines it held are dropped; both are counted (`dropped`, and the
`tlsproxy_log_lines_dropped_total` counter once attached) and neither
raises. At exit `close` gives the thread a bounded time to write what is
buffered.

The descriptor itself is left as it is: setting O_NONBLOCK on stderr would
change the open file description shared with the terminal or the parent
process, which then see EAGAIN on their own writes. If someone else has set
it, the writer waits for writability in its thread.

Text mode escapes control characters (`escape_controls`): a client chooses
its SNI, ALPN, certificate subjects and part of some error strings, and an
ESC byte in those would otherwise reach the terminal of whoever reads the
log. JSON escapes them by itself.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import select
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, TextIO

import orjson
import structlog

Logger = structlog.typing.FilteringBoundLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Characters of rendered lines held while the writer cannot keep up (JSON
# lines are ASCII, so bytes). An access line is ~500 characters: 4 MiB holds
# ~8 000 lines, several seconds of a busy listener's connections, which rides
# out a log shipper's restart or a paused terminal without a loss, for memory
# that is small beside the connections themselves (~27 KiB each when idle).
LOG_BUFFER_CHARS = 4 * 1024 * 1024

# Seconds a clean exit waits for the buffered lines to be written: long
# enough for a reader that is merely slow, short enough that a reader that
# is gone does not hold up a restart (Kubernetes' grace period is 30 s, and
# the drain has used most of it).
LOG_FLUSH_TIMEOUT = 2.0

# Bytes per write(2): POSIX makes pipe writes of up to PIPE_BUF atomic, so
# lines of several processes sharing one stderr pipe (the supervisor and its
# workers) never interleave within a line. A single longer line is written
# alone.
WRITE_BYTES = select.PIPE_BUF

# Seconds the writer, woken by a line, waits for more before it writes: a
# line per connection would otherwise wake it, and hand it the interpreter's
# lock, once per connection (about 45 000 instructions each, BENCHMARKS.md).
# So it wakes at most 20 times a second, and a line is written at most this
# late; a close ends the wait at once.
GATHER_S = 0.05

# Seconds the writer waits for a non-blocking stderr to become writable before
# trying again (then it checks whether it is asked to stop).
_WRITABLE_POLL = 1.0

STDERR_FD = 2

Write = Callable[[memoryview], int]


def write_fd(fd: int, data: memoryview) -> int:
    """os.write that also copes with a descriptor someone else made non-blocking."""
    while True:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [], _WRITABLE_POLL)


class LogSink:
    """Rendered lines from any thread, written to a descriptor by one thread.

    Appending never blocks and never raises: a full buffer or a failed write
    drops lines and counts them.
    """

    def __init__(
        self, write: Write, limit: int = LOG_BUFFER_CHARS, gather: float = GATHER_S
    ) -> None:
        self._write = write
        self._limit = limit
        self._gather = gather
        self._lines: collections.deque[str] = collections.deque()
        self._held = 0  # characters queued or being written, against `limit`
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._busy = False  # the writer was woken for what is queued: no need to again
        self.dropped = 0
        self._on_drop: Callable[[int], None] | None = None
        self._thread = threading.Thread(target=self._run, name="tlsproxy-log-writer", daemon=True)
        self._thread.start()

    @classmethod
    def stderr(cls) -> LogSink:
        """On descriptor 2 itself: `sys.stderr` is None when it was closed at
        start, and then every write fails (EBADF) and is counted."""
        return cls(partial(write_fd, STDERR_FD))

    def count_drops(self, on_drop: Callable[[int], None]) -> None:
        """Report drops to `on_drop` (a counter's `inc`), those so far included."""
        with self._cond:
            self._on_drop = on_drop
            earlier = self.dropped
        if earlier:
            on_drop(earlier)

    def msg(self, line: str) -> None:
        """Queue one line (without its newline); drop it if the buffer is full."""
        size = len(line) + 1
        with self._cond:
            if self._closing or self._held + size > self._limit:
                self._drop(1)
                return
            self._lines.append(line)
            self._held += size
            if not self._busy:
                self._busy = True
                self._cond.notify()

    # structlog calls the method named after the level
    debug = info = warning = warn = error = critical = exception = fatal = log = msg

    def close(self, timeout: float = LOG_FLUSH_TIMEOUT) -> bool:
        """Write what is buffered, for at most `timeout` seconds; then drop the rest.

        Returns whether everything was written. Lines logged afterwards are dropped.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            flushed = self._cond.wait_for(lambda: self._held == 0, timeout)
            if not flushed:
                self._drop(len(self._lines))
                self._lines.clear()
        return flushed

    def _drop(self, count: int) -> None:
        """Count `count` lost lines; the caller holds the lock."""
        if count:
            self.dropped += count
            if self._on_drop is not None:
                self._on_drop(count)

    def _run(self) -> None:
        gather = True  # woken by a first line: wait for more before writing
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._lines or self._closing)
                if gather and not self._closing:
                    self._cond.wait_for(lambda: self._closing, self._gather)
                if not self._lines:
                    return
                batch = self._take()
            written = self._write_batch(batch)
            with self._cond:
                self._drop(len(batch) - written)
                self._held -= sum(len(line) + 1 for line in batch)
                gather = not self._lines  # else the rest goes at once
                self._busy = not gather
                self._cond.notify_all()

    def _take(self) -> list[str]:
        """The next lines for one write: at least one, within WRITE_BYTES."""
        lines = self._lines
        batch = [lines.popleft()]
        size = len(batch[0]) + 1
        while lines and size + len(lines[0]) + 1 <= WRITE_BYTES:
            line = lines.popleft()
            batch.append(line)
            size += len(line) + 1
        return batch

    def _write_batch(self, batch: list[str]) -> int:
        """Write the lines; returns how many were written whole (an error ends it)."""
        encoded = [f"{line}\n".encode(errors="backslashreplace") for line in batch]
        data = memoryview(b"".join(encoded))
        sent = 0
        try:
            while sent < len(data):
                sent += self._write(data[sent:])
        except Exception:  # EPIPE, EBADF, EIO, ENOSPC...: this batch is lost, not the daemon
            whole = 0
            for line in encoded:
                sent -= len(line)
                if sent < 0:
                    break
                whole += 1
            return whole
        return len(batch)


# One encoder for every line: json.dumps with a `default` builds a new
# JSONEncoder per call, measurable at one access-log line per connection.
_ENCODER = json.JSONEncoder(default=repr)


def _encode(event: dict[str, Any], **_: Any) -> str:
    return _ENCODER.encode(event)


class AccessLog:
    """The access line, one per connection: the hottest log call by far.

    In JSON format it is rendered by orjson straight into the logger's sink,
    with exactly the fields, order, level and timestamp the structlog
    pipeline gives every other line (its bound context, the fields, then
    `event`, `level`, `timestamp`), at a fraction of the pipeline's cost
    (BENCHMARKS.md). orjson writes non-ASCII as UTF-8 where `json` escapes
    it, and our JSON lines escape the characters that reorder a terminal's
    text: a line that is not ASCII takes the `json` encoder instead. The
    text format, for people, keeps the pipeline.
    """

    __slots__ = ("_context", "_log", "_write")

    def __init__(self, log: Logger, level: str, fmt: str) -> None:
        self._log = log
        # structlog's bound logger keeps its context (the pid) and its output
        # (our LogSink, or a WriteLogger in tests) in these attributes
        self._context: dict[str, Any] = dict(log._context)
        sink: Any = getattr(log, "_logger")  # noqa: B009 - not in the logger's Protocol
        fast = fmt == "json" and _LEVELS[level] <= logging.INFO
        self._write: Callable[[str], None] | None = sink.msg if fast else None

    def __call__(self, fields: dict[str, Any]) -> None:
        write = self._write
        if write is None:
            self._log.info(ACCESS_EVENT, **fields)
            return
        line = {
            **self._context,
            **fields,
            "event": ACCESS_EVENT,
            "level": "info",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        text = orjson.dumps(line, default=repr).decode()
        write(text if text.isascii() else _ENCODER.encode(line))


# The access line's `event`.
ACCESS_EVENT = "connection"


# C0 and C1 controls and DEL, and the Unicode characters that reorder or break
# lines on a terminal (bidirectional overrides and isolates, line and
# paragraph separators).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# A traceback keeps its line breaks: it is ours, laid out for people.
_MULTILINE_KEYS = frozenset({"exception"})


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escape(text: str) -> str:
    return _CONTROLS.sub(_escape_char, text)


def escape_controls(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """The text renderer's guard: no field can move the cursor or change colours.

    Only strings need it: the renderer shows other values by their repr,
    which escapes what is not printable.
    """
    for key, value in event.items():
        if isinstance(value, str):
            if key in _MULTILINE_KEYS:
                event[key] = "\n".join(_escape(line) for line in value.split("\n"))
            else:
                event[key] = _escape(value)
    return event


def make_logger(
    level: str = "info", fmt: str = "json", stream: LogSink | TextIO | None = None
) -> Logger:
    """A bound logger writing one line per event: to a `LogSink` (the daemon's
    stderr), or straight into a `TextIO` that cannot block (tests' StringIO).
    Without either, a new `LogSink` on stderr."""
    if fmt == "json":
        renderers: list[Any] = [structlog.processors.JSONRenderer(serializer=_encode)]
    else:
        renderers = [escape_controls, structlog.dev.ConsoleRenderer(colors=False)]
    sink: LogSink | structlog.WriteLogger
    if isinstance(stream, LogSink):
        sink = stream
    elif stream is not None:
        sink = structlog.WriteLogger(stream)
    else:
        sink = LogSink.stderr()
    logger: Logger = structlog.wrap_logger(
        sink,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *renderers,
        ],
        cache_logger_on_first_use=True,
    )
    return logger
