"""Logging: one handler on the root logger whose lines carry the request id (or '-')."""

import logging

from flask import g, has_request_context

LINE_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or '-') on every log record."""

    def filter(self, record):
        if not hasattr(record, "request_id"):
            record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        return True


def configure_logging(level):
    """Install the handler once per process (the app may be built several times), at `level`."""
    root = logging.getLogger()
    if not any(isinstance(f, RequestIdFilter) for h in root.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter(LINE_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
