"""Log lines: readable text by default, one JSON object per line with LOG_FORMAT=json.

Every line logged while a job is served carries its ids: `Jobs.start` binds the task and prompt
ids to the current context (`bind_job`), which the job's own tasks inherit and the request that
started it keeps; `JobFields`, a handler filter, copies them onto each record. The JSON line then
has `task_id` and `prompt_id` fields, whatever the message says.

A line costs the event loop a record and a queue put (`LineQueue`): a thread of its own formats
it and writes it to stderr, a pipe whose reader (a log collector) may be slow or stall, which
must not hold the loop. Lines keep their order, and the process writes what is queued before it
exits. While stderr is not read, at most LINES_HELD lines wait; the ones past that are dropped,
and the first line written after says how many.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import logging
import logging.handlers
import queue
import time
from contextvars import ContextVar
from typing import Any, cast

_job: ContextVar[tuple[str, str] | None] = ContextVar("serverless_job", default=None)

# uvicorn's loggers, which `uvicorn handler:app` configures with handlers of their own before the
# app is imported; they are sent through ours instead, so that every line has one format.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LINES_HELD = 10_000  # log lines waiting for a stderr that is not read (a few MB at most)
# Seconds the writer thread, woken by a line, lets more lines come before it writes them all at
# once: the lines logged meanwhile wake no thread (a sync job's one line woke it each time, which
# then took the GIL and a core just as the job's answer was being sent).
GATHER = 0.05


def bind_job(task_id: str, prompt_id: str) -> None:
    """From now on, in this context and the tasks it starts, log lines name this job."""
    _job.set((task_id, prompt_id))


class JobFields(logging.Filter):
    """Adds `task_id` and `prompt_id` (None outside a job) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = _job.get()
        record.task_id, record.prompt_id = job if job is not None else (None, None)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the job's `task_id` and
    `prompt_id` when the line was logged for a job, and the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        if task_id is not None:
            entry["task_id"] = task_id
            entry["prompt_id"] = getattr(record, "prompt_id", None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted where it was logged (`LineQueue`)
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class WebsocketAccessLines(logging.Filter):
    """Drops the lines uvicorn (and the websockets library through it) logs for every websocket
    connection, "[accepted]", "connection open" and "connection closed": access lines, logged
    only at LOG_LEVEL=debug, as an HTTP request's are."""

    LINES = frozenset(('%s - "WebSocket %s" [accepted]', "connection open", "connection closed"))

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.msg in self.LINES)


class LineQueue(logging.handlers.QueueHandler):
    """Hands each record to the writer thread (`configure_logging`), with what may change after
    the call made text at once (the message's arguments, a traceback); the rest of the formatting
    (time, level, JSON) is the writer's. A full queue drops the record and counts it."""

    def __init__(self, lines: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(lines)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        try:
            if self.dropped:
                self.queue.put_nowait(self._dropped_note())
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _dropped_note(self) -> logging.LogRecord:
        note = logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": f"{self.dropped} log line(s) were dropped: stderr was not read",
            }
        )
        note.task_id = note.prompt_id = None
        return note

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        message = record.getMessage()
        record = copy.copy(record)  # another handler (a test's) may still read the original
        record.msg, record.args = message, None
        if record.exc_info:
            record.exc_text = record.exc_text or _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record


END = None  # what `QueueListener.stop` queues after the last line


class LineWriter(logging.handlers.QueueListener):
    """The writer thread: woken by the first line after a quiet spell, it gathers lines for
    GATHER seconds, then writes them, to each handler in one write when it is a stream's."""

    def _monitor(self) -> None:
        lines = cast("queue.Queue[logging.LogRecord | None]", self.queue)  # `configure_logging`'s
        while True:
            first = lines.get()
            batch: list[logging.LogRecord | None] = [first]
            if first is not END and first.levelno < logging.WARNING:  # trouble is told at once
                time.sleep(GATHER)
                while True:
                    try:
                        batch.append(lines.get(block=False))
                    except queue.Empty:
                        break
            ended = END in batch
            records = [record for record in batch[: batch.index(END) if ended else None] if record is not None]
            if records:
                self._write(records)
            if ended:
                return

    def _write(self, records: list[logging.LogRecord]) -> None:
        """As `QueueListener.handle` does each record, a stream's lines in one write."""
        records = [self.prepare(record) for record in records]
        for handler in self.handlers:
            taken = [r for r in records if not self.respect_handler_level or r.levelno >= handler.level]
            if type(handler) is not logging.StreamHandler:
                for record in taken:
                    handler.handle(record)
                continue
            shown = [record for record in taken if handler.filter(record)]
            if not shown:
                continue
            with handler.lock or contextlib.nullcontext():
                try:
                    handler.stream.write("".join(handler.format(r) + handler.terminator for r in shown))
                    handler.flush()
                except Exception:  # as `StreamHandler.emit`: a broken stream is not the app's failure
                    handler.handleError(shown[-1])


_TRACEBACKS = logging.Formatter()
_writer: LineWriter | None = None


def configure_logging(level: str, log_format: str, access_log: bool = True) -> None:
    """Every log line, uvicorn's included, at `level` in `log_format` ("text" or "json"), written
    by a thread of its own (see the module docstring); without `access_log`, no line per websocket
    connection either."""
    global _writer
    if _writer is not None:  # configured again: the lines queued so far are written first
        _writer.stop()
    stderr = logging.StreamHandler()
    stderr.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    lines: queue.Queue[logging.LogRecord] = queue.Queue(LINES_HELD)
    handler = LineQueue(lines)
    handler.addFilter(JobFields())  # in the logging task's context, where its job is bound
    _writer = LineWriter(lines, stderr)
    _writer.start()
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # a Python warning is a log line too, not raw text on stderr
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    websocket_lines = logging.getLogger("uvicorn.error")
    for installed in [f for f in websocket_lines.filters if isinstance(f, WebsocketAccessLines)]:
        websocket_lines.removeFilter(installed)
    if not access_log:
        websocket_lines.addFilter(WebsocketAccessLines())


@atexit.register
def _write_the_rest() -> None:
    """At exit (after uvicorn's shutdown, or a start-up failure), the lines still queued; a line
    logged later still (a thread ending) is written at once."""
    global _writer
    if _writer is None:
        return
    _writer.stop()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, LineQueue)]:
        root.removeHandler(handler)
        for target in _writer.handlers:
            target.addFilter(JobFields())
            root.addHandler(target)
    _writer = None
