"""The hand-off: the HTTP front gives every write to the node, which runs it and answers.

Under `stepd serve` the HTTP front (gunicorn: it parses requests, checks their input, reads the
database on connections of its own and renders the answers) and the node (the one writer and the
dispatcher, no HTTP) are processes of their own, so reading and rendering requests takes no time
from the one process that writes and feeds the runners. A view's write is an engine verb
(`VERBS`): the front sends its name, its arguments and the request's id over a Unix socket, the
node runs the same `Engine` method (admission, the writer's groups and all), and sends back its
result or the exception it raised, which the front raises as its own.

Two kinds of request hold a write transaction across their whole view: a POST with an
Idempotency-Key (its answer is stored in the transaction of its change, idempotency.py) and a form
of the operator page (the same, ui/actions.py). The front sends those whole (`forwards`: method,
path, query, headers, body) and the node runs the app on them; their answers come back as they are.

One connection an HTTP process, opened at its first write; calls multiplexed by id, each run on a
greenlet of its own in the node. The socket is an abstract Unix socket with a random name (service.py
gives it), and the node takes connections from processes of its own user only, as its write verbs
take the caller's principal on trust.

What travels (channel.py's messages):
    front -> node   ("call", (id, request id, verb, args))   an Engine write
                    ("request", (id, environ, body))          a whole request
    node -> front   ("answer", (id, ok, value))               the result, or the exception raised
"""

import contextlib
import io
import itertools
import logging
import os
import pickle
import socket
import sys
import threading
import time

from stepd.channel import Channel, peer_uid
from stepd.engine import Engine
from stepd.errors import answer_for
from stepd.model import Unavailable, current_request_id

log = logging.getLogger("stepd.node")

# The engine's writes. Everything else it does is a read, which the front makes itself.
VERBS = ("start_process", "cancel", "restart", "restart_many", "complete", "skip", "fail")
FORWARDED = "stepd.forwarded"  # in the environ of a request the node runs for a front
# What of a request's environ the node needs to run it again: CGI's strings (and every HTTP_ header).
ENVIRON_KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "wsgi.url_scheme",
)
# The request's framing, which the node gets anew: the body goes as the bytes the front read.
FRAMING = ("HTTP_TRANSFER_ENCODING", "HTTP_CONTENT_LENGTH")
ACCEPT_AGAIN_SECONDS = 0.1
NODE_GONE = "the node (the service's writer) does not answer; the change may or may not have been made"


def spawn(fn, *args):
    """`fn(*args)` on a greenlet of its own under gevent (the node), on a thread otherwise (the tests)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        import gevent  # noqa: PLC0415 - only a process on gevent gets here

        gevent.spawn(fn, *args)
    else:
        threading.Thread(target=fn, args=args, daemon=True).start()


# -- the node's side --------------------------------------------------------------------------------
class Counter:
    """The node's end: accepts fronts on `listener` and answers their calls with `engine` and
    their whole requests with `app`."""

    def __init__(self, listener, engine, app):
        self.listener = listener
        self.engine = engine
        self.app = app
        self.fronts = set()  # the channels of the fronts connected now
        self.stopped = False

    def start(self):
        spawn(self._accept)
        return self

    def _accept(self):
        while not self.stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError as exc:
                if not self.stopped:  # out of descriptors, say: the next front may connect a moment later
                    log.warning("the node's socket could not take a front (%s); trying again", exc)
                    time.sleep(ACCEPT_AGAIN_SECONDS)
                continue
            if peer_uid(sock) != os.getuid():  # the verbs take the caller's principal on trust
                log.warning("refused a connection to the node's socket from another user's process")
                sock.close()
                continue
            spawn(self._serve, Channel(sock))

    def _serve(self, channel):
        self.fronts.add(channel)
        try:
            while (message := channel.receive()) is not None:
                kind, payload = message
                spawn(self._answer, channel, kind, payload)
        finally:
            self.fronts.discard(channel)
            channel.close()

    def _answer(self, channel, kind, payload):
        call_id, *rest = payload
        try:
            value, ok = (self._call(*rest) if kind == "call" else self._request(*rest)), True
        except Exception as exc:  # the front raises it, as if the verb had run there
            value, ok = exc, False
        try:
            channel.send("answer", (call_id, ok, _picklable(value)))
        except Exception as exc:  # a result pickle cannot carry: the caller must still get an answer
            log.exception("the answer to a front's %s could not be sent", kind)
            channel.send("answer", (call_id, False, RuntimeError(f"the node's answer could not be sent: {exc}")))

    def _call(self, request_id, verb, args):
        if verb not in VERBS:
            raise ValueError(f"{verb!r} is not a write the node runs")
        current_request_id.set(request_id)  # kept with the attempts it begins, as in the front's own request
        try:
            return getattr(self.engine, verb)(*args)
        finally:
            current_request_id.set(None)

    def _request(self, environ, body):
        from werkzeug.wrappers import Response  # noqa: PLC0415 - the forwarded requests only

        environ = {
            **environ,
            "wsgi.version": (1, 0),
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "CONTENT_LENGTH": str(len(body)),
            FORWARDED: True,
        }
        response = Response.from_app(self.app, environ, buffered=True)
        return response.status_code, list(response.headers.items()), response.get_data()

    def stop(self):
        """Take no more fronts (a shutdown wakes the accept, which a close alone would not)."""
        self.stopped = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def _picklable(value):
    """`value`, or for an exception that pickle cannot carry, a RuntimeError that says what it was."""
    if not isinstance(value, BaseException):
        return value
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:  # noqa: BLE001 - any exception of any class may come here
        log.exception("an exception the front cannot be sent as it is")
        return RuntimeError(f"{type(value).__name__}: {value}")
    if answer_for(value).traceback:  # a bug: its traceback here, in the process where it was raised
        log.error("unexpected error in a write the front handed over", exc_info=value)
    return value


# -- the front's side -------------------------------------------------------------------------------
class _Pending:
    """One call waiting for its answer."""

    def __init__(self):
        self.done = threading.Event()  # a gevent Event in the front's worker (patched)
        self.answer = None

    def set(self, ok, value):
        self.answer = (ok, value)
        self.done.set()


class Window:
    """The front's end: one connection to the node at `address`, opened at the first call and again
    after a break; calls from any greenlet or thread, each waiting for its own answer."""

    def __init__(self, address):
        self.address = address
        self._channel = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._pending = {}  # call id -> (the channel it was sent on, its _Pending)

    def call(self, verb, *args):
        """Engine.`verb`(*args), run by the node; its result, or the exception it raised."""
        return self._ask("call", (current_request_id.get(), verb, args))

    def forward(self, environ, body):
        """The whole request, run by the node: (status, [(header, value)], body bytes). The body goes
        as the bytes the front read (a chunked one decoded), with its length."""
        kept = {key: environ[key] for key in ENVIRON_KEYS if key in environ}
        kept |= {key: value for key, value in environ.items() if key.startswith("HTTP_") and key not in FRAMING}
        return self._ask("request", (kept, body))

    def connect(self):
        """Open the connection now (a worker that starts: the node, at a stop, waits for every front
        connected); a node not there yet is no error: the first write tries again."""
        with contextlib.suppress(Unavailable):
            self._connected()

    def _ask(self, kind, payload):
        pending, call_id = _Pending(), next(self._ids)
        channel = self._connected()
        self._pending[call_id] = (channel, pending)
        if not channel.send(kind, (call_id, *payload)):
            self._pending.pop(call_id, None)
            raise Unavailable(NODE_GONE)
        pending.done.wait()
        ok, value = pending.answer
        if not ok:
            raise value
        return value

    def _connected(self):
        with self._lock:
            if self._channel is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(self.address)
                except OSError as exc:
                    sock.close()
                    raise Unavailable(f"{NODE_GONE} ({exc.strerror})") from None
                self._channel = Channel(sock)
                spawn(self._read, self._channel)
            return self._channel

    def _read(self, channel):
        try:
            while (message := channel.receive()) is not None:
                _kind, (call_id, ok, value) = message
                _sent_on, pending = self._pending.pop(call_id, (None, None))
                if pending is not None:
                    pending.set(ok, value)
        finally:  # the node is gone (or stopping), or its answer could not be read: connect again
            with self._lock:
                if self._channel is channel:
                    self._channel = None
            channel.close()
            for call_id, (sent_on, _pending) in list(self._pending.items()):
                if sent_on is channel:  # this connection's calls only: a new one's go on
                    self._pending.pop(call_id)[1].set(False, Unavailable(NODE_GONE))

    def close(self):
        with self._lock:
            if self._channel is not None:
                self._channel.close()


class HandingEngine(Engine):
    """The front's engine: its reads as Engine's, on the front's own connections; its writes run by
    the node (`window`), the one process that writes."""

    def __init__(self, store, registry, window):
        super().__init__(store, registry)
        self.window = window


def _handed(verb):
    def method(self, *args):
        return self.window.call(verb, *args)

    method.__name__ = verb
    method.__doc__ = f"Engine.{verb}, run by the node."
    return method


for _verb in VERBS:
    setattr(HandingEngine, _verb, _handed(_verb))


def forwards(request, app):
    """Whether the front sends `request` whole to the node: a POST that holds a write transaction
    across its view (an Idempotency-Key on a view that keeps its answer, or the operator page's form)."""
    if request.method != "POST":
        return False
    if request.blueprint == "ui":
        return True
    view = app.view_functions.get(request.endpoint)
    return getattr(view, "idempotent", False) and "Idempotency-Key" in request.headers
