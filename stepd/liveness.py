"""Whether a runner is alive, from the row it keeps in the `runners` table.

On this host a runner lives exactly as long as its process (pid and start time, so a reused
pid does not count): a delegate holding the GIL for minutes cannot make it look dead. A
runner on another host is judged by its heartbeat.

Also what a long-lived process of the service does once it has started (`die_with_parent`,
`freeze_startup_objects`).
"""

import atexit
import ctypes
import gc
import signal
import socket
import time
from pathlib import Path

HOST = socket.gethostname()
PR_SET_PDEATHSIG = 1
STALE_AFTER_SECONDS = 5.0  # only for a runner on another host, whose process we cannot see


def process_start_time(pid):
    """The kernel's start time of a live process (None if it is gone, a zombie, or there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    state, start_time = fields[0], fields[19]  # fields 3 and 22 of proc(5)
    return None if state in ("Z", "X") else start_time


def runner_is_alive(row):
    """Judge a `runners` row (host, pid, pid_started, heartbeat_at)."""
    if row["host"] == HOST and row["pid_started"]:
        return process_start_time(row["pid"]) == row["pid_started"]
    return row["heartbeat_at"] >= time.time() - STALE_AFTER_SECONDS


def die_with_parent():
    """In a child (before exec, or at once): SIGTERM when its parent dies, even by SIGKILL (Linux's
    prctl): the supervisor's HTTP front, `stepd serve` under make, a node's runners."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def freeze_startup_objects():
    """Keep what start-up made (modules, the app, its routes and schemas, the delegates: ~50,000
    objects in the node) out of the garbage collector's full passes, which otherwise walk all of
    it every few seconds under load: 30 ms of CPU each in the node, inside whichever request or
    group was running (measured at 500 restarts/s: the fixed-rate row's p99), ~1 ms once frozen.
    What start-up left as garbage is collected first. At exit they are given back to the
    collector: its last pass then finalises them while their modules still stand (frozen, a logging
    handler's weak reference was called back during the modules' teardown, and gevent printed
    "Exception ignored in _removeHandlerRef")."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)
