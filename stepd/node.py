"""The node: the one process of a service that writes the database, and feeds its runners.

It holds the writer (writer.py: every write of the node, in groups), the dispatcher
(dispatch.py: attempts out to the runners, outcomes back), the runners' processes (started,
watched, started again when one dies), the chores, and the socket where `stepd runner`
processes started by hand attach. The HTTP front serves the API from the same process (front.py:
no hand-off between a request and its write).

    node                       HTTP (gevent), the writer, the dispatcher, admission, the chores
    └── STEPD_RUNNERS × python -m stepd runner     delegates run here, and only here

The tests run a node inside their own process, with its runners on threads (`start_background`).

On PostgreSQL several nodes share the database (SPEC 12), and a node learns of work another queued
from a LISTEN connection of its own, on a native thread (`_listen_for_work`): a group that queued
work tells the others with a NOTIFY in its transaction (dispatch.py). A notification can be lost (the
LISTEN connection broken, a pooler that drops LISTEN), so the poll stays, as the backstop.
"""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from stepd.admission import MEASURE_SECONDS, Admission
from stepd.channel import Channel, node_address, peer_uid
from stepd.dispatch import Dispatcher
from stepd.liveness import HOST, die_with_parent
from stepd.model import new_id
from stepd.runner import STOP_GRACE_SECONDS, Runner

log = logging.getLogger("stepd.node")


def start_native_thread(fn, name):
    """`fn()` on an OS thread of its own, also under gevent (the node), where threading's threads
    are greenlets of the one loop: gevent's saved start_new_thread makes a real one."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        monkey.get_original("_thread", "start_new_thread")(fn, ())
    else:
        threading.Thread(target=fn, name=name, daemon=True).start()


def from_any_thread(fn):
    """`fn` as a callable that any OS thread may call, made on the thread whose loop runs `fn`. Under
    gevent a native thread must not touch the loop's greenlets or locks (the writer's, the
    dispatcher's): it sends an async watcher, gevent's thread-safe wake-up of a loop, whose callback
    (on the loop) runs `fn` in a greenlet of its own; sends that come before the loop does run `fn`
    once. Among OS threads (the tests) `fn` is safe as it is."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return fn
    import gevent  # noqa: PLC0415 - only a node that runs on gevent gets here

    watcher = gevent.get_hub().loop.async_()
    watcher.ref = False  # it alone keeps no loop running
    watcher.start(gevent.spawn, fn)
    return watcher.send


def native_sleep(seconds):
    """time.sleep itself, not gevent's (on a native thread there is no loop to wait in)."""
    monkey = sys.modules.get("gevent.monkey")
    sleep = monkey.get_original("time", "sleep") if monkey is not None and monkey.is_module_patched("time") else None
    (sleep or time.sleep)(seconds)


WATCH_SECONDS = 0.2  # how often attempts ended from outside are looked for (ctx.cancelled within 1 s)
POLL_SECONDS = 0.25  # queued work from elsewhere (another node on the file, a due retry) waits at most this
# PostgreSQL: other nodes' work comes with a NOTIFY (LISTEN, at once), and this node's own retries
# wake it when due (dispatch.py), so the poll only catches what was missed: a lost notification, a
# LISTEN connection broken (until it is back), a pooler that drops LISTEN, another node's retry. Such
# work waits at most this: SPEC 12 allows 2 s, and a look a second per node costs the server nothing.
POLL_SECONDS_LISTENING = 1.0
LISTEN_WAIT_SECONDS = 1.0  # the LISTEN thread looks whether the node stops at least this often
LISTEN_AGAIN_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)  # before listening again, after each failure in a row
HEARTBEAT_SECONDS = 1.0
LISTEN_AGAIN_SECONDS = 1.0  # how often a node without the socket for `stepd runner` tries to take it
CHORE_TICK_SECONDS = 0.1
RESTART_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)  # before starting a runner again, if it keeps dying at once
STEADY_SECONDS = 10.0  # a runner that lived this long starts again after the shortest delay
RUNNER_FD = "STEPD_RUNNER_FD"  # the environment variable giving a started runner its end of the socketpair


@dataclass
class Chore:
    """Work the node does every `period` seconds: each in its own try, so one that fails never
    skips another (a long one, retention, starts a thread of its own)."""

    name: str
    period: float
    run: object  # () -> anything
    due: float = 0.0  # time.monotonic() at which it runs next

    def run_if_due(self, now):
        if now < self.due:
            return
        self.due = now + self.period
        try:
            self.run()
        except Exception:  # a busy database now and then: the next period tries again
            log.exception("chore %s failed; trying again in %g s", self.name, self.period)


class Node:
    """A node over `store`: its dispatcher, runners and chores."""

    def __init__(self, store, registry, settings, chores=(), node_id=None):
        self.id = node_id or new_id()
        # PostgreSQL: the node keeps a row of its own, beaten on a thread of its own (_beat_forever).
        self.has_row = store.db.dialect == "postgresql"
        self.store = store
        self.registry = registry
        self.settings = settings
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        node_id = self.id if self.has_row else None  # SQLite's runners have no node column
        self.dispatcher = Dispatcher(store, self._stopping_reason, node_id)
        self.admission = Admission(store, self.dispatcher.turnover)  # whether new processes wait: the engine asks it
        # The dispatcher's own work, on a thread of its own: no housekeeping chore may delay it.
        self.ticks = [
            Chore("watch", WATCH_SECONDS, self.dispatcher.let_go_of_ended),
            Chore("poll", POLL_SECONDS_LISTENING if self.has_row else POLL_SECONDS, self._poll),
            Chore("due retries", CHORE_TICK_SECONDS, self.dispatcher.wake_for_due_retries),
            Chore("heartbeat", HEARTBEAT_SECONDS, self.dispatcher.beat),
            Chore("admission", MEASURE_SECONDS, self.admission.measure),
        ]
        self.chores = list(chores)  # housekeeping (wiring.chores): checkpoint, orphan sweep, answers, retention
        self.processes = {}  # slot -> Popen of a runner process, or None while it waits to start again
        self.restart_at = {}  # slot -> when a dead runner starts again
        self.deaths = {}  # slot -> how many times in a row it died soon after starting
        self.retiring = []  # (Popen, when it is killed) of runner processes a reload replaced
        self.runners_here = []  # Runner objects on this process's threads (the tests)
        self._listener = None
        self._listen_again_at = 0.0

    def _beat(self):
        self.store.beat_node({"id": self.id, "host": HOST, "pid": os.getpid()})

    def _beat_forever(self):
        """The node's heartbeat, every HEARTBEAT_SECONDS, on a native thread with a connection of its
        own: under gevent a greenlet would beat only when the loop comes round to it, and a node
        whose loop is busy for seconds is busy, not dead. A failed beat is tried at the next one."""
        while not self.stopping.is_set():
            try:
                self._beat()  # the first at once: the node's row soon exists for its runners' to name
            except Exception:
                log.exception("the node's heartbeat failed; trying again in %g s", HEARTBEAT_SECONDS)
            native_sleep(HEARTBEAT_SECONDS)

    def _listen_for_work(self, announced):
        """Wake the dispatcher (`announced()`, safe from this thread) when another node queued work,
        until the node stops: on a native thread, with a connection of its own, so a loop busy for
        a while delays no notification's reading. A broken connection (pg_terminate_backend, a
        server restart) is opened again after LISTEN_AGAIN_DELAYS; meanwhile the poll finds the work."""
        failures = 0
        while not self.stopping.is_set():
            try:
                with self.store.listening_for_queued() as heard:
                    if failures:
                        log.info("listening for other nodes' work again")
                    announced()  # what was queued while nobody here listened
                    while not self.stopping.is_set():
                        self._hear(heard(LISTEN_WAIT_SECONDS), announced)
                        failures = 0  # it lasted a whole wait: one ended sooner counts as a failure in a row
            except Exception as exc:  # Unavailable: the server is away, or ended the connection
                if self.stopping.is_set():
                    return  # its database may be gone with it (a test's)
                delay = LISTEN_AGAIN_DELAYS[min(failures, len(LISTEN_AGAIN_DELAYS) - 1)]
                failures += 1
                log.warning("LISTEN for other nodes' work failed (%s); again in %g s, the poll meanwhile", exc, delay)
                native_sleep(delay)

    def _hear(self, payloads, announced):
        for payload in payloads:
            if payload != self.id:  # this node's own: it claimed at the end of that group already
                announced()

    def _stopping_reason(self):
        return "The service stopped before this step's delegate finished." if self.stopping.is_set() else None

    # -- start -------------------------------------------------------------------------------
    def start(self, runner_processes=0):
        """Start the chores, the socket for `stepd runner`, and `runner_processes` runners."""
        if self.has_row:
            start_native_thread(self._beat_forever, "stepd-node-heartbeat")
            announced = from_any_thread(self.dispatcher.announced)
            start_native_thread(lambda: self._listen_for_work(announced), "stepd-node-listen")
        for slot in range(runner_processes):
            self._start_process(slot)
        threading.Thread(target=self._loop, args=(self._tick,), name="stepd-ticks", daemon=True).start()
        threading.Thread(target=self._loop, args=(self._housekeeping,), name="stepd-chores", daemon=True).start()
        self._listen()

    def start_runners_here(self, count=1):
        """`count` runners on threads of this process, each over a socketpair (the tests)."""
        for _ in range(count):
            ours, theirs = socket.socketpair()
            runner = Runner(self.registry, self.settings["STEPD_THREADS"], self.settings["STEPD_STEP_TIMEOUT"])
            runner.start(Channel(theirs))
            self.dispatcher.attach(Channel(ours))  # registered when this returns (as /healthz counts it)
            self.runners_here.append(runner)
        return self.runners_here[-count:]

    def _start_process(self, slot):
        ours, theirs = socket.socketpair()
        env = {**os.environ, RUNNER_FD: str(theirs.fileno())}
        command = [sys.executable, "-m", "stepd", "runner"]
        proc = subprocess.Popen(command, env=env, pass_fds=(theirs.fileno(),), preexec_fn=die_with_parent)
        theirs.close()
        proc.started = time.monotonic()
        self.processes[slot] = proc
        threading.Thread(target=self.dispatcher.attach, args=(Channel(ours),), daemon=True).start()

    def _listen(self):
        """Accept `stepd runner` processes on the database's abstract socket. Another node on the
        same file (an overlapping restart, the node a reload replaces) may hold it: then runners
        started by hand go to that one until it lets go."""
        if self.stopping.is_set():
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(node_address(self.settings["STEPD_DB"]))
        except OSError:  # tried again every LISTEN_AGAIN_SECONDS: the other one may be a node a reload replaces
            sock.close()
            return
        sock.listen(16)
        self._listener = sock
        threading.Thread(target=self._accept, name="stepd-accept", daemon=True).start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            if peer_uid(conn) != os.getuid():
                log.warning("refused a runner of another user's process on the node's socket")
                conn.close()
                continue
            threading.Thread(target=self.dispatcher.attach, args=(Channel(conn),), daemon=True).start()

    def replace_runners(self):
        """A reload: new runner processes (on the delegate files as they are now) take the new work.
        The old ones take none; each finishes what it runs (STOP_GRACE_SECONDS, then it is
        Interrupted) and gives back what it never began, which the new ones then run."""
        old = [proc for proc in self.processes.values() if proc is not None and proc.poll() is None]
        self.dispatcher.retire({proc.pid for proc in old})
        slots, self.processes, self.restart_at, self.deaths = list(self.processes), {}, {}, {}
        for slot in slots:
            self._start_process(slot)
        deadline = time.monotonic() + STOP_GRACE_SECONDS + 2.0
        for proc in old:
            proc.send_signal(signal.SIGTERM)
            self.retiring.append((proc, deadline))

    def _let_retired_go(self, now):
        for entry in list(self.retiring):
            proc, deadline = entry
            if proc.poll() is not None:
                self.retiring.remove(entry)
            elif now > deadline:
                log.warning("runner %d did not stop in %g s; killing it", proc.pid, STOP_GRACE_SECONDS)
                proc.kill()

    # -- while it runs ----------------------------------------------------------------------
    def _loop(self, tick):
        while not self.stopping.wait(CHORE_TICK_SECONDS):
            tick(time.monotonic())
            self.store.db.release()  # PostgreSQL: its read connection back to the pool between ticks

    def _tick(self, now):
        for chore in self.ticks:
            chore.run_if_due(now)
        self._look_after_processes(now)
        self._let_retired_go(now)
        if self._listener is None and now >= self._listen_again_at:
            self._listen_again_at = now + LISTEN_AGAIN_SECONDS
            self._listen()

    def _housekeeping(self, now):
        for chore in self.chores:
            chore.run_if_due(now)

    def _poll(self):
        """The backstop for work no group of this node queued (a due retry, another node's
        attempt): a group now claims it."""
        self.dispatcher.poll(self.store.has_claimable)

    def _look_after_processes(self, now):
        for slot, proc in list(self.processes.items()):
            if proc is None:
                if now >= self.restart_at[slot] and not self.stopping.is_set():
                    self._start_process(slot)
                continue
            if proc.poll() is None:
                continue
            lived = now - proc.started
            self.deaths[slot] = 0 if lived >= STEADY_SECONDS else self.deaths.get(slot, 0) + 1
            delay = RESTART_DELAYS[min(self.deaths[slot], len(RESTART_DELAYS)) - 1] if self.deaths[slot] else 0.0
            log.warning("runner %d exited with code %s; starting another in %g s", proc.pid, proc.returncode, delay)
            self.processes[slot] = None
            self.restart_at[slot] = now + delay

    # -- stop --------------------------------------------------------------------------------
    def stop(self, grace=STOP_GRACE_SECONDS):
        """Stop the runners (their delegates get `grace` seconds; what still runs then is
        Interrupted, what was never begun is queued again), then the chores. A second call waits
        for the first to finish."""
        if self.stopping.is_set():
            self.stopped.wait()
            return
        self.stopping.set()
        try:
            self._stop(grace)
        finally:
            self.stopped.set()

    def _stop(self, grace):
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone would not)
            self._listener.close()
            self._listener = None
        procs = [proc for proc in self.processes.values() if proc is not None and proc.poll() is None]
        procs += [proc for proc, _deadline in self.retiring if proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for runner in self.runners_here:
            runner.stop(grace)
        deadline = time.monotonic() + grace + 2.0
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("runner %d did not stop in %g s; killing it", proc.pid, grace)
                proc.kill()
                proc.wait()
        self.dispatcher.stop(timeout=max(1.0, deadline - time.monotonic()))
        if self.has_row:
            with contextlib.suppress(Exception):  # a node that cannot say so is judged dead by its heartbeat
                self.store.forget_node(self.id)
