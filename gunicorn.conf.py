"""gunicorn settings of the HTTP front, read from the STEPD_* variables (config.py).

service.py starts gunicorn with these beside the runner processes (`make run`). The HTTP
workers only serve the API: they commit new attempts as queued and never call a delegate.
Started alone (`gunicorn -c gunicorn.conf.py`), it serves the API without runners.
"""

import logging
import sys

from config import ConfigError, log_format
from config import from_env as _stepd_settings
from logs import GunicornLogger, configure_logging, say

try:
    settings = _stepd_settings()
except ConfigError as _bad_setting:  # one clear line, not gunicorn's traceback of this file
    configure_logging("INFO", log_format())
    say(f"cannot start: {_bad_setting}", logging.ERROR)
    sys.exit(1)
# The master's lines, and through GunicornLogger gunicorn's error and access logs, in
# STEPD_LOG_FORMAT; the workers inherit the handler (create_app sets it up again, the same).
configure_logging(settings["STEPD_LOG_LEVEL"], settings["STEPD_LOG_FORMAT"])
logger_class = GunicornLogger

wsgi_app = "app:create_app()"
bind = f"{settings['STEPD_HOST']}:{settings['STEPD_PORT']}"
workers = settings["STEPD_WORKERS"]
# gevent: each connection is a greenlet, so idle keep-alive connections and clients that
# stall halfway through a request cost a little memory, not a request's place (gthread's 4
# threads a worker were taken by 8 stalled clients). No delegate runs here, and SQLite's
# waits for the write lock are cooperative (db.Database._writer_turn), so one greenlet's
# request never blocks the others for longer than its own statement.
worker_class = "gevent"
worker_connections = 1000
threads = 4  # unused by gevent; read by the benchmark's baseline, which shares these settings
graceful_timeout = 5  # requests in flight get this long at a stop; no delegate runs here
control_socket_disable = True  # gunicorn 27 would share one socket path among all instances
loglevel = settings["STEPD_LOG_LEVEL"].lower()
accesslog = "-"  # standard output; GunicornLogger writes it with a timestamp (text) or as JSON
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms rid=%({x-request-id}o)s'


def envelope_gunicorn_errors():
    """gunicorn answers a request it cannot parse (a request line over 4094 bytes, a bad header)
    with an HTML page of its own, before Flask sees it. Answer in the envelope instead, as the
    app answers any other bad request: a client error is a 412, a server error a 500 with an id."""
    import json
    import logging
    import uuid

    from gunicorn import util

    from envelope import ERROR_MESSAGES, error_document

    def write_error(sock, status_int, reason, mesg):
        if status_int == 500:  # 501 (an unknown Transfer-Encoding) and the like are the client's
            error_id = uuid.uuid4().hex  # gunicorn logged the traceback just before
            logging.getLogger("stepd").error("unexpected error %s in gunicorn: %s", error_id, reason)
            status, data = 500, error_id
        elif status_int == 403:
            status, data = 403, reason
        else:
            status, data = 412, {"_schema": [f"{reason}: {mesg}"[:300]]}
        body = json.dumps(error_document(status, data)).encode()
        head = (
            f"HTTP/1.1 {status} {ERROR_MESSAGES[status]}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Request-Id: {uuid.uuid4().hex}\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n\r\n"
        )
        util.write_nonblock(sock, head.encode("latin-1") + body)

    util.write_error = write_error


envelope_gunicorn_errors()


def on_starting(server):
    """Fail fast, once, in the master: a bad delegate, an unusable database. Skipped when
    service.py started this gunicorn: it has just made the same checks (and said what they found)."""
    import os

    from service import CHECKED, CannotStart, preflight

    if os.environ.get(CHECKED):
        return
    try:
        preflight(settings)
    except CannotStart as exc:
        say(f"cannot start: {exc}", logging.ERROR)
        sys.exit(1)
