"""Log lines: readable text by default, one JSON object per line with LOG_FORMAT=json.

Every line logged while a job is served carries its ids: `Jobs.start` binds the task and prompt
ids to the current context (`bind_job`), which the job's own tasks inherit and the request that
started it keeps; `JobFields`, a handler filter, copies them onto each record. The JSON line then
has `task_id` and `prompt_id` fields, whatever the message says.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from typing import Any

_job: ContextVar[tuple[str, str] | None] = ContextVar("serverless_job", default=None)

# uvicorn's loggers, which `uvicorn handler:app` configures with handlers of their own before the
# app is imported; they are sent through ours instead, so that every line has one format.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def configure_logging(level: str, log_format: str, access_log: bool = True) -> None:
    """Every log line, uvicorn's included, at `level` in `log_format` ("text" or "json"); without
    `access_log`, no line per websocket connection either."""
    handler = logging.StreamHandler()
    handler.addFilter(JobFields())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
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
