"""gunicorn settings for `make run`, read from the STEPD_* variables (config.py).

The master migrates the database, checks the delegates and makes the first token once;
each worker then builds the app and starts its own runner (delegate threads + heartbeat)
and housekeeping (app.start_background).
"""

import ctypes
import os
import signal
import sys
from pathlib import Path

from config import ConfigError
from config import from_env as _stepd_settings
from runner import STOP_GRACE_SECONDS

try:
    settings = _stepd_settings()
except ConfigError as _bad_setting:  # one clear line, not gunicorn's traceback of this file
    print(f"stepd: cannot start: {_bad_setting}", file=sys.stderr, flush=True)
    sys.exit(1)

wsgi_app = "app:create_app()"
bind = f"{settings['STEPD_HOST']}:{settings['STEPD_PORT']}"
workers = settings["STEPD_WORKERS"]
# gthread: keep-alive and a few requests at a time per worker; SQLite serialises writes anyway.
worker_class = "gthread"
threads = 4
graceful_timeout = 15
control_socket_disable = True  # gunicorn 27 would share one socket path among all instances
loglevel = settings["STEPD_LOG_LEVEL"].lower()
accesslog = "-"
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
    """Fail fast, once, in the master: bad settings, a bad delegate, an unusable database."""
    from auth import ensure_first_token
    from db import Database
    from delegates import DelegateLoadError, load_registry
    from model import Busy, Unusable, Unwritable
    from store import Store

    try:
        load_registry(settings["STEPD_DELEGATES_PATH"] or None)
        database = Database(settings["STEPD_DB"], settings["STEPD_SYNC"])
        database.prepare()
        ensure_first_token(Store(database), settings["STEPD_TOKEN"])
        database.close()  # no open SQLite connection may cross the fork into workers
    except (DelegateLoadError, OSError, Unusable, Busy, Unwritable) as exc:
        print(f"stepd: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    die_with_make()


def die_with_make():
    """Under `make run`, end when make ends, even by SIGKILL: a sidecar must not outlive the
    command that started it and keep holding its port. (make passes a SIGTERM on by itself.)"""
    parent = os.getppid()
    try:
        started_by_make = Path(f"/proc/{parent}/comm").read_text().strip() == "make"
    except OSError:
        return  # no /proc: not Linux, so no prctl either
    if started_by_make:
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # make died before the call took effect
            os.kill(os.getpid(), signal.SIGKILL)


def post_worker_init(worker):
    from app import start_background

    start_background(worker.wsgi)


def worker_exit(server, worker):
    from app import stop_background

    if getattr(worker, "wsgi", None) is not None and "stepd" in worker.wsgi.extensions:
        # With the master gone (killed), leave at once: a new service may want the port.
        master_gone = os.getppid() != worker.ppid
        stop_background(worker.wsgi, grace=0 if master_gone else STOP_GRACE_SECONDS)
