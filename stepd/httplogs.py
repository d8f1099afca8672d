"""Logging on the HTTP side: the request's fields on every line made inside a request, and
gunicorn's error and access logs through stepd's handler and formats (logs.py).

Kept apart from logs.py so that a runner process, which logs but serves no HTTP, never imports
Flask or gunicorn.
"""

import logging
import sys

from flask import g, has_request_context
from gunicorn import glogging

from stepd.errors import unparsed_status
from stepd.logs import ACCESS_LINE_FORMAT, install_handler, log_format_in_use, make_handler


class ContextFilter(logging.Filter):
    """Puts the current request's id and principal on every record made inside a request."""

    def filter(self, record):
        if has_request_context():
            if not hasattr(record, "request_id") and "request_id" in g:
                record.request_id = g.request_id
            if not hasattr(record, "principal") and "principal" in g:
                record.principal = g.principal
        return True


class GunicornLogger(glogging.Logger):
    """gunicorn's loggers through stepd's formatters: `gunicorn.error` goes to the root handler
    (standard error), `gunicorn.access` to standard output, as fields in JSON."""

    def setup(self, cfg):
        super().setup(cfg)  # levels, and its own handlers, which are replaced here
        log_format = log_format_in_use()
        for log in (self.error_log, self.access_log):
            for handler in [h for h in log.handlers if getattr(h, "_gunicorn", False)]:
                log.removeHandler(handler)
        self.error_log.propagate = True  # to the root logger's handler
        if cfg.accesslog is not None:
            install_handler(self.access_log, make_handler(sys.stdout, log_format, ACCESS_LINE_FORMAT))

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        status = _status_code(resp)
        headers = {name.lower(): value for name, value in resp.headers}
        atoms = self.atoms_wrapper_class(_atoms(resp, environ, request_time, status, headers))
        fields = {
            "request_id": headers.get("x-request-id"),
            "principal": environ.get("stepd.principal"),
            "method": environ.get("REQUEST_METHOD"),
            "route": environ.get("stepd.route"),
            "path": environ.get("PATH_INFO"),
            "status": status,
            "duration_ms": round(request_time.total_seconds() * 1000, 1),
        }
        fields = {key: value for key, value in fields.items() if value is not None or key == "route"}
        try:
            self.access_log.info(self.cfg.access_log_format, atoms, extra=fields)
        except Exception:
            self.exception("could not write an access log line")


def _atoms(resp, environ, request_time, status, headers):
    """The atoms front.py's access_log_format uses, and only those: gunicorn's own `atoms` also
    formats the time and copies every request and response header (3-5% of a request's CPU), for
    atoms this format never names. An atom missing here is printed "-" (the wrapper's default)."""
    atoms = {
        "h": environ.get("REMOTE_ADDR", "-"),
        "r": f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {environ['SERVER_PROTOCOL']}",
        "s": str(status),  # the status the client got (see _status_code)
        "B": getattr(resp, "sent", None),
        "M": request_time.seconds * 1000 + request_time.microseconds // 1000,
    }
    atoms.update({f"{{{name}}}o": value for name, value in headers.items()})
    return atoms


def _status_code(resp):
    """The answer's status. gunicorn's answer to a request it could not parse (Worker.handle_error)
    is a bare Response whose status_code was never set, only its status line (reading status_code
    there raised inside gunicorn's error handler, which turned the client's 400 into a 500); what
    the client gets is front.py's answer in the envelope, whose status this is."""
    code = getattr(resp, "status_code", None)
    return code if code is not None else unparsed_status(int(str(resp.status).split()[0]))
