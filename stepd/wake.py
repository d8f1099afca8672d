"""A cheap wake-up from whoever queues an attempt to the runners that claim it.

Each runner binds a Linux abstract Unix datagram socket named after the database file and its
own id (no file, so nothing to clean up after a crash). After a commit that queued an attempt,
`Notifier.notify` sends one byte to every registered runner; each wakes and claims by
compare-and-set. A datagram that is lost (a runner that just started, a full buffer) costs at
most the runners' poll interval, the backstop.
"""

import atexit
import contextlib
import hashlib
import os
import socket
import sys
import threading
import time

REFRESH_SECONDS = 1.0  # how long a notifier trusts its list of runners


def address(db_path, runner_id):
    digest = hashlib.sha256(os.path.realpath(db_path).encode()).hexdigest()[:20]
    return f"\0stepd-{digest}-{runner_id}"


class Listener:
    """A runner's end: wait until poked (or a timeout passes)."""

    def __init__(self, db_path, runner_id):
        self.address = address(db_path, runner_id)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)

    def wait(self, timeout):
        """Block until a poke arrives or `timeout` seconds pass; returns whether poked. Drains
        every poke waiting, so a burst of commits is one wake-up."""
        try:
            self._sock.settimeout(timeout)
            self._sock.recv(16)
        except TimeoutError:
            return False
        except OSError:  # closed by a stop meanwhile
            return False
        try:
            self._sock.setblocking(False)
            while True:
                self._sock.recv(16)
        except OSError:  # BlockingIOError: drained
            pass
        return True

    def poke(self):
        """Wake this listener from within its own process (a place became free)."""
        _send(self.address)

    def close(self):
        self._sock.close()


def _plain_socket_class():
    """The socket class as the standard library made it. In a gevent worker socket.socket is
    gevent's, whose sendto goes through the event loop (6% of a restart's CPU when measured);
    a non-blocking datagram send never waits, so the plain one is as cooperative and far cheaper."""
    monkey = sys.modules.get("gevent.monkey")  # only a process that patched has it (not a runner)
    return socket.socket if monkey is None else monkey.get_original("socket", "socket")


_sender = _plain_socket_class()(socket.AF_UNIX, socket.SOCK_DGRAM)
_sender.setblocking(False)
atexit.register(_sender.close)  # closed, not collected open: no ResourceWarning at a process's exit


def _send(target):
    # No such runner (any more), or its buffer is full: it polls anyway.
    with contextlib.suppress(OSError):
        _sender.sendto(b"!", target)


class Notifier:
    """The queuing end: poke every runner registered for this database."""

    def __init__(self, db_path, runner_ids):
        self.db_path = db_path
        self._runner_ids = runner_ids  # a callable: the ids registered now (store.runner_ids)
        self._targets = []
        self._fetched_at = -REFRESH_SECONDS
        self._lock = threading.Lock()

    def notify(self):
        for target in self._current_targets():
            _send(target)

    def _current_targets(self):
        now = time.monotonic()
        if now - self._fetched_at >= REFRESH_SECONDS:
            with self._lock:
                if now - self._fetched_at >= REFRESH_SECONDS:
                    with contextlib.suppress(Exception):  # a busy database: keep the last list; runners poll
                        self._targets = [address(self.db_path, rid) for rid in self._runner_ids()]
                    self._fetched_at = now
        return self._targets
