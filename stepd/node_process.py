"""The node's process (`stepd node`, which `stepd serve` starts): the node (node.py) over the app's
store and engine, the socket where the HTTP front hands it its writes (handoff.py), and its signals.

    SIGTERM, SIGINT   stop: the runners finish what they run (STOP_GRACE_SECONDS), while the writes the
                      front still hands over are made; the node exits once the front is gone too
    SIGHUP            reload: the delegates loaded again, the runners replaced (Node.replace_runners)
"""

import logging
import signal
import socket
import time

from stepd.app import create_app, start_node, stop_background
from stepd.delegates import DelegateLoadError, load_registry
from stepd.handoff import Counter
from stepd.liveness import freeze_startup_objects

log = logging.getLogger("stepd.node")

LOOK_SECONDS = 0.1  # how often the main greenlet looks whether it was asked to stop or reload
FRONT_GONE_SECONDS = 20.0  # at a stop, how long the node waits for the front to close its connection
NODE_READ_CONNECTIONS = 4  # PostgreSQL: the node's reads at most (the front makes the requests'); wiring.open_store


def run_node(settings, address):
    asked = []  # the signals received, in order: the main loop acts on them (a HUP while it starts, too)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: asked.append(number))
    # Listening first: a front that writes while this node starts (a node started again after a
    # crash) waits in the socket's backlog for its answer, rather than being refused (a 503).
    listener = _listen(address)
    app = create_app({"READ_CONNECTIONS": NODE_READ_CONNECTIONS})
    stepd = app.extensions["stepd"]
    node = start_node(app, settings["STEPD_RUNNERS"])
    counter = Counter(listener, stepd.engine, app).start()
    freeze_startup_objects()
    while True:
        while not asked:
            time.sleep(LOOK_SECONDS)
        if asked.pop(0) == signal.SIGHUP:
            reload(app, node, settings)
            continue
        break
    stop_background(app)  # the runners' grace; the front's writes go on meanwhile
    _wait_for_the_front_to_go(counter)
    counter.stop()
    return 0


def _listen(address):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)  # abstract: a node of this service that died left nothing behind
    listener.listen(64)
    return listener


def reload(app, node, settings):
    """The delegates loaded again (the front's worker, replaced by gunicorn, loads its own), and the
    runners replaced; a module that does not load keeps the old ones."""
    try:
        registry = load_registry(settings["STEPD_DELEGATES_PATH"] or None)
    except DelegateLoadError as exc:
        log.error("reload refused by the node; the delegates loaded before stay in use: %s", exc)
        return
    stepd = app.extensions["stepd"]
    stepd.registry = stepd.engine.registry = node.registry = registry
    node.replace_runners()


def _wait_for_the_front_to_go(counter):
    deadline = time.monotonic() + FRONT_GONE_SECONDS
    while counter.fronts and time.monotonic() < deadline:
        time.sleep(LOOK_SECONDS)
