"""Logging: one handler on the root logger, in text or JSON (STEPD_LOG_FORMAT), whose lines
carry where they come from: the request id and principal of a request, the step of a runner.

Every process of the service (the supervisor, gunicorn's master and workers, the runners) calls
`configure_logging` once; gunicorn's own error and access logs come through
`httplogs.GunicornLogger`, so they are formatted the same way. This module imports neither Flask
nor gunicorn: a runner imports it.

Text (the default), one line each:

    2026-05-01 12:00:00,123 INFO [<request id>|step:<step id>|-] stepd.runner: the message

The access log, on standard output: gunicorn's line after a timestamp (it has no level, so
`STEPD_LOG_LEVEL=WARNING` still writes it, as before).

JSON: one object a line, `ts` (ISO 8601, UTC, milliseconds), `level`, `logger`, `msg`, then
what applies of `request_id`, `principal`, `process_id`, `step_id`, `attempt`, `type` (and
whatever a caller passed in `extra=`); a traceback is the one field `exc_info`. An access
line adds `method`, `route` (the URL rule, null when none matched), `path`, `status`,
`duration_ms`.
"""

import logging
import sys
from datetime import UTC, datetime

from pythonjsonlogger.json import JsonFormatter

LINE_FORMAT = "%(asctime)s %(levelname)s [%(where)s] %(name)s: %(message)s"
ACCESS_LINE_FORMAT = "%(asctime)s %(message)s"

# The fields of the records' own attributes a JSON line keeps, and their names there.
JSON_NAMES = {"levelname": "level", "name": "logger", "message": "msg"}


def step_fields(job):
    """What a log line about one attempt of a step carries (pass as `extra=`)."""
    fields = {"process_id": job.process_id, "step_id": job.step_id, "attempt": job.attempt, "type": job.type}
    if job.request_id:
        fields["request_id"] = job.request_id
    return fields


class TextFormatter(logging.Formatter):
    """The text line: in brackets the request id, else the step (`step:<id>`), else '-'."""

    def formatMessage(self, record):  # noqa: N802 - logging's name
        step_id = getattr(record, "step_id", None)
        record.where = getattr(record, "request_id", None) or (f"step:{step_id}" if step_id else "-")
        return super().formatMessage(record)


class JsonLineFormatter(JsonFormatter):
    """One JSON object a line: ts, level, logger, msg first, then the record's extra fields."""

    def __init__(self):
        super().__init__(list(JSON_NAMES), rename_fields=JSON_NAMES, json_ensure_ascii=False)

    def add_fields(self, log_data, record, message_dict):
        log_data["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)
        log_data.pop("where", None)  # set by TextFormatter if both ever format one record


def make_handler(stream, log_format, text_format):
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else TextFormatter(text_format))
    handler.stepd = True
    return handler


def install_handler(logger, handler):
    """Replace stepd's handler on `logger` (the app may be built several times in one process)."""
    for old in [h for h in logger.handlers if getattr(h, "stepd", False)]:
        logger.removeHandler(old)
    logger.addHandler(handler)


def configure_logging(level, log_format="text"):
    """Install stepd's handler on the root logger (standard error) at `level`, in `log_format`."""
    root = logging.getLogger()
    current = _root_handler()
    if current is None or current.log_format != log_format:
        handler = make_handler(sys.stderr, log_format, LINE_FORMAT)
        handler.log_format = log_format
        install_handler(root, handler)
    root.setLevel(level)


def add_filter(log_filter):
    """Add `log_filter` to stepd's handler on the root logger (once per class: the app may be
    built several times in one process). The HTTP side adds its request fields this way."""
    handler = _root_handler()
    if handler is not None and not any(type(f) is type(log_filter) for f in handler.filters):
        handler.addFilter(log_filter)


def _root_handler():
    return next((h for h in logging.getLogger().handlers if getattr(h, "stepd", False)), None)


def log_format_in_use():
    """The format configure_logging installed ('text' when it has not run)."""
    handler = _root_handler()
    return handler.log_format if handler is not None else "text"


def say(text, level=logging.INFO, logger="stepd", **fields):
    """A line the operator must see whatever STEPD_LOG_LEVEL is (the start-up line, why a start
    is refused, the supervisor's news): `stepd: <text>` in text, a JSON line with `fields` in JSON."""
    handler = _root_handler()
    if handler is None or handler.log_format == "text":
        print(f"stepd: {text}", file=sys.stderr, flush=True)
        return
    record = logging.getLogger(logger).makeRecord(logger, level, "(stepd)", 0, text, (), None, extra=fields)
    handler.handle(record)  # straight to the handler: no logger's level applies
