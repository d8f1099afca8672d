"""The HTTP front: gunicorn serving the app (`stepd serve` starts it as `python -m stepd http`).

gunicorn runs as a library here (its documented custom application), so no settings file and
no `module:callable` string is looked up on a path: the app is stepd.app's, wherever the
command was started from.

It has one worker, on gevent: it parses the requests, checks their input, reads the database on
connections of its own and renders the answers, and hands every write to the node (handoff.py),
the process that writes the database and feeds the runners (node_process.py). gunicorn's master
stays for what it does well: it parses nothing, holds the listening socket, and on SIGHUP starts
a new worker (on the new delegates) before the old one finishes its requests.
"""

import json
import logging
import signal
import time
import uuid

from gunicorn import util
from gunicorn.app.base import BaseApplication

from stepd.errors import STATUSES, error_document, unparsed_status
from stepd.httplogs import GunicornLogger
from stepd.liveness import freeze_startup_objects
from stepd.runner import STOP_GRACE_SECONDS


def options(settings):
    """gunicorn's settings for these STEPD_* settings (the benchmark's baseline uses them too)."""
    return {
        "bind": f"{settings['STEPD_HOST']}:{settings['STEPD_PORT']}",
        "workers": 1,  # STEPD_WORKERS no longer applies (service.py says so): see the README's Architecture
        # gevent: each connection is a greenlet, so idle keep-alive connections and clients that
        # stall halfway through a request cost a little memory, not a request's place (gthread's 4
        # threads a worker were taken by 8 stalled clients). No delegate runs here, and a write
        # waits for the node cooperatively, so one greenlet's request never blocks the others for
        # longer than its own reads.
        "worker_class": "gevent",
        "worker_connections": 1000,
        "post_request": _let_other_connections_run,
        # Requests in flight, then the runners' delegates (STOP_GRACE_SECONDS) get this long at a stop.
        "graceful_timeout": int(STOP_GRACE_SECONDS) + 5,
        "control_socket_disable": True,  # gunicorn 27 would share one socket path among all instances
        "loglevel": settings["STEPD_LOG_LEVEL"].lower(),
        "accesslog": "-",  # standard output; GunicornLogger writes it with a timestamp (text) or as JSON
        "access_log_format": '%(h)s "%(r)s" %(s)s %(B)s %(M)sms rid=%({x-request-id}o)s',
        # The master's lines, and gunicorn's error and access logs, in STEPD_LOG_FORMAT; the
        # workers inherit the handler (create_app sets it up again, the same).
        "logger_class": GunicornLogger,
    }


def _let_other_connections_run(worker, req, environ, resp):
    """One turn of gevent's loop after each request. A keep-alive client that sends its next
    request at once would otherwise be read again without a switch (the data is there), and be
    served back to back while other connections wait: with one HTTP process, 16 busy connections
    measured a p99 of 0.8 s on a bare Flask app."""
    time.sleep(0)


def _mark_the_worker(worker):
    """A SIGHUP to the service's whole process group (a closing terminal) would kill the worker
    mid-request (gunicorn's workers keep its default action); the master's HUP replaces it
    gracefully instead."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker.wsgi.extensions["stepd"].engine.window.connect()  # at a stop, the node waits for every worker connected
    freeze_startup_objects()


def _let_go_of_the_node(arbiter, worker):
    """The worker's connection to the node closed as it exits: the node, at a stop, waits for it."""
    worker.wsgi.extensions["stepd"].engine.window.close()


class Front(BaseApplication):
    """gunicorn with `options(settings)`, serving `load_app()` in each worker."""

    def __init__(self, settings, load_app):
        self.settings = settings
        self.load_app = load_app
        super().__init__()

    def load_config(self):
        for key, value in options(self.settings).items():
            self.cfg.set(key, value)
        # Not in `options`: the baseline serves a bare app.
        self.cfg.set("post_worker_init", _mark_the_worker)
        self.cfg.set("worker_exit", _let_go_of_the_node)

    def load(self):
        return self.load_app()


def serve(settings, node_address):
    """Serve the API until gunicorn stops (SIGTERM); the app is built in each worker, and hands its
    writes to the node at `node_address`."""
    from stepd.app import create_app

    envelope_gunicorn_errors()
    Front(settings, lambda: create_app(node_address=node_address)).run()


def envelope_gunicorn_errors():
    """gunicorn answers a request it cannot parse (a request line over 4094 bytes, a bad header)
    with an HTML page of its own, before Flask sees it. Answer in the envelope instead, as the
    app answers any other bad request: a client error is a 412, a server error a 500 with an id."""

    def write_error(sock, status_int, reason, mesg):
        status = unparsed_status(status_int)  # 501 (an unknown Transfer-Encoding) and the like are the client's
        if status == 500:
            error_id = uuid.uuid4().hex  # gunicorn logged the traceback just before
            logging.getLogger("stepd").error("unexpected error %s in gunicorn: %s", error_id, reason)
            data = error_id
        elif status == 403:
            data = reason
        else:
            data = {"_schema": [f"{reason}: {mesg}"[:300]]}
        body = json.dumps(error_document(status, data)).encode()
        head = (
            f"HTTP/1.1 {status} {STATUSES[status].message}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Request-Id: {uuid.uuid4().hex}\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n\r\n"
        )
        util.write_nonblock(sock, head.encode("latin-1") + body)

    util.write_error = write_error
