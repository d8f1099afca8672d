"""The runner: calls delegates, and nothing else. It never opens the database.

A runner is connected to its node (channel.py). The node sends it attempts whose claim is
committed: as many as it has places (STEPD_THREADS), and on SQLite more of quick types
(dispatch.QUICK_DEPTH); the runner calls each delegate once, on a thread, never more at once than
its places, and sends the outcome back (saying whether it was quick). The node records it, and
sends the process's next step to the same runner in the same transaction's wake. An attempt is
in a runner only once its claim is in the file, so a crash anywhere never makes a delegate run
twice.

An attempt that runs past its timeout, or is ended from outside (fail-step, a cancel of its
process: the node says so), has its `ctx.cancelled` set and gives its place back at once: a
delegate that never returns holds its own thread, not one of the runner's places.

The runner has a thread a place and one more; one of them at a time reads what the node sends.
Attempts of a quick type (its delegate returned within QUICK_SECONDS last time) run on the thread
that read them, with no hand-over between threads, which on a busy machine is two wake-ups and
most of a quick step's time here; any other goes to a thread that waits. If a quick delegate
holds the reading thread up (HELD_UP_SECONDS), the watch gives the reading to another thread (a
new one takes the held-up thread's part), and what waited behind it to the others. Jobs wait,
never begun, while every place runs a delegate; a stop gives them back.

`stepd runner` runs one runner process (a node starts STEPD_RUNNERS of them);
`node.Node.start_runners_here` runs them on threads inside a process (the tests do).
"""

import collections
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from stepd.delegates import DEFERRED, Abort, Context
from stepd.logs import step_fields
from stepd.model import COMPLETED, FAILED, Outcome, iso, plain_values, typed_result

log = logging.getLogger("stepd.runner")

STOP_GRACE_SECONDS = 5.0  # how long a clean stop waits for running delegates
WATCH_SECONDS = 0.2  # how often timeouts, and a reading thread held up by a delegate, are looked for
# A delegate that returned within this, the last time its type ran, is quick: the next attempts of
# its type run on the thread that read them, with no hand-over to another thread (`_read`).
QUICK_SECONDS = 0.002
# A quick delegate that runs this long on the reading thread (it became slow, or hangs) gives up
# the reading to another thread at the watch's next look, and the jobs behind it go to the others.
HELD_UP_SECONDS = 0.05


class Timeout(Exception):  # noqa: N818 - its name is the error type a timed-out step shows
    """An attempt ran past its delegate's timeout."""


def describe(exc):
    """An exception's message as storable text, whatever its __str__ does."""
    try:
        text = str(exc)
    except Exception:
        text = f"<unprintable {type(exc).__name__}>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Running:
    """One attempt in a place of this runner."""

    job: object
    deadline: float | None  # time.monotonic() past which it times out, or None
    cancelled: threading.Event = field(default_factory=threading.Event)
    reported: bool = False  # its delegate's outcome was sent: it wins over a timeout
    abandoned: bool = False  # ended without its delegate: the place is free, the thread ends when it returns
    inline_since: float | None = None  # time.monotonic() the reading thread began it (None: another thread)
    held_up: bool = False  # it held the reading thread up: another thread reads since


class Runner:
    """Runs the attempts its node sends on `threads` places, and sends back their outcomes."""

    def __init__(self, registry, threads, step_timeout=None):
        self.registry = registry
        self.threads = threads
        self.step_timeout = step_timeout  # STEPD_STEP_TIMEOUT: for delegates that set no timeout
        self.channel = None
        # Sent by the node, waiting for a free place (quick types may be more than the places). A thread takes one
        # and enters it in _running under the same lock, so a stop sees every job in one place or
        # the other, never between (and gives back exactly those no delegate was called for).
        self._waiting = collections.deque()
        self._running = {}  # (step id, attempt) -> Running
        self._lock = threading.Condition()
        self._stopping = threading.Event()  # no delegate is called any more (a stop, or the node is gone)
        self.node_gone = threading.Event()  # the node closed the connection
        # One of the threads reads the node's messages at a time (`_work`); it runs the jobs of a
        # quick type itself (`_quick`: step type -> whether its delegate returned within
        # QUICK_SECONDS last time), and hands the others to the threads that wait.
        self._reading = False  # a thread has the reading now
        self._quick = {}
        self._inline = None  # the Running that the reading thread runs now
        self._inline_turn = False  # the reading thread runs the quick jobs it read: they are its own
        # Outcomes not yet sent. The thread that finds no send under way sends them all in one
        # message, and so do its next turns while others queue more: the node records each
        # message in one change, so outcomes that end together cost one write between them.
        self._outbox = []
        self._outbox_lock = threading.Lock()
        self._sending = False

    @property
    def _busy(self):
        """Attempts sent and not yet ended."""
        with self._lock:
            return self._delegates_running() + len(self._waiting)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, channel):
        """Say hello on `channel`, then start the threads (a place each, and one more: whichever
        has none reads) and the watch."""
        self.channel = channel
        channel.send("hello", {"pid": os.getpid(), "places": self.threads})
        # Daemon threads: a delegate that never returns must not keep a stopping runner alive;
        # the database, not the thread, is the record of what ran.
        for _ in range(self.threads + 1):
            self._add_thread()
        threading.Thread(target=self._watch, name="stepd-watch", daemon=True).start()
        log.info("runner %d started with %d delegate threads", os.getpid(), self.threads)

    def _add_thread(self):
        threading.Thread(target=self._work, name="stepd-delegate", daemon=True).start()

    def stop(self, grace=STOP_GRACE_SECONDS):
        """Take nothing more; wait up to `grace` seconds for running delegates; give back what was
        sent but never called, and close the connection (the node then fails what still runs as
        Interrupted)."""
        deadline = time.monotonic() + grace
        with self._lock:
            self._stopping.set()  # from here on no delegate is called for a job still waiting
            self._lock.notify_all()  # the idle delegate threads end
            if self.channel is None:
                return
            while self._delegates_running() and time.monotonic() < deadline and not self.node_gone.is_set():
                self._lock.wait(timeout=0.05)
            unstarted = [job.key for job in self._waiting]
            self._waiting.clear()
        self.channel.send("unstarted", unstarted)
        self.channel.close()

    def _delegates_running(self):
        """Under the lock: how many delegates run that hold a place (not abandoned)."""
        return sum(1 for entry in self._running.values() if not entry.abandoned)

    # -- what the node sends ---------------------------------------------------------------
    def _read(self):
        """Read the node's messages, as the thread that has the reading (`_work`), until another
        takes it (this one was held up in a quick delegate, and a new thread took its part) or the
        node is gone; then this thread ends. Jobs of quick types run here, one after the other; any
        other goes to a waiting thread."""
        while (message := self.channel.receive()) is not None:
            kind, payload = message
            if kind == "cancel":
                self._cancel(set(payload))
            elif kind == "run" and not self._take(payload):
                return  # another thread reads from here on
        # The node is gone: nothing more can be recorded. Call no more delegates; the next node
        # fails what ran here as Interrupted.
        with self._lock:
            self._stopping.set()
            self._reading = False
            self._lock.notify_all()
        self.node_gone.set()

    def _take(self, jobs):
        """Jobs the node sent: those of quick types run here, one after the other; the others go
        to the threads that wait. Whether this thread still reads (else it lost the reading
        meanwhile, `_hand_over_reading`, and ends)."""
        with self._lock:
            self._waiting.extend(jobs)
            self._inline_turn = True
            others = sum(1 for job in jobs if not self._quick.get(job.type))
            if others:
                self._lock.notify(others)
        still_reads = True
        while still_reads and (entry := self._next_job(inline=True)) is not None:
            self._run(entry)
            with self._lock:
                if self._inline is entry:
                    self._inline = None
                self._ended(entry)
            still_reads = not entry.held_up  # else another thread reads now, and this one ends
        with self._lock:
            self._inline_turn = False
            if self._may_take():  # a type no longer quick, or what waited behind a held-up delegate
                self._lock.notify(len(self._waiting))
        return still_reads

    def _next_job(self, inline=False):
        """The next job waiting, entered in _running (None: none, or stopping); under the lock. The
        reading thread takes the first of a quick type; a thread with a place the first of another
        type, else the first."""
        with self._lock:
            if self._stopping.is_set() or (job := self._pick(inline)) is None:
                return None
            self._waiting.remove(job)
            entry = Running(job, self._deadline_of(job))
            self._running[job.key] = entry
            if inline:
                entry.inline_since = time.monotonic()
                self._inline = entry
            return entry

    def _pick(self, inline):
        """Under the lock: the job `_next_job` takes, or None. Every delegate running takes a place,
        the reading thread's too: never more run at once than STEPD_THREADS."""
        if not self._waiting or not self._place_free():
            return None
        if inline:
            return next((job for job in self._waiting if self._quick.get(job.type)), None)
        first_quick = None if self._inline_turn else self._waiting[0]  # the reading thread's, while it runs them
        return next((job for job in self._waiting if not self._quick.get(job.type)), first_quick)

    def _place_free(self):
        """Under the lock: whether fewer delegates run than there are places."""
        return self._delegates_running() < self.threads

    def _cancel(self, keys):
        """Attempts ended from outside: those running are abandoned, those still waiting never begin."""
        with self._lock:
            entries = [entry for key, entry in self._running.items() if key in keys]
            for job in [job for job in self._waiting if job.key in keys]:
                self._waiting.remove(job)
        for entry in entries:
            self._abandon(entry)

    # -- delegate threads ------------------------------------------------------------------
    def _work(self):
        """A thread: it runs a job waiting if a place is free, or reads the node's messages if no
        thread does, or waits. The node may send more jobs than places (those of quick types,
        dispatch.QUICK_DEPTH), but no thread takes one without a free place, and there is a
        thread more than places, so some thread is always free to read (a cancel, the node's
        end) however many delegates run."""
        while True:
            with self._lock:
                while self._reading and not self._stopping.is_set() and not self._may_take():
                    self._lock.wait()
                if self._stopping.is_set():
                    return  # what still waits is given back by stop()
                reads = not self._may_take()
                if reads:
                    self._reading = True
            if reads:
                self._read()
                return
            entry = self._next_job()
            if entry is None:
                continue
            self._run(entry)
            with self._lock:
                self._ended(entry)
            if entry.abandoned:
                return  # the place was given away while the delegate ran: this thread ends

    def _may_take(self):
        """Under the lock: a job waits that a thread with a free place may take."""
        return self._pick(inline=False) is not None

    def _ended(self, entry):
        """Under the lock: `entry`'s delegate returned. A stop waiting for the delegates is told;
        no other thread is woken (each end would wake every idle one for nothing)."""
        self._running.pop(entry.job.key, None)
        if self._stopping.is_set():
            self._lock.notify_all()

    def _timeout_of(self, job):
        delegate = self.registry.get(job.type)
        return delegate.timeout if delegate is not None and delegate.timeout is not None else self.step_timeout

    def _deadline_of(self, job):
        seconds = self._timeout_of(job)
        return None if seconds is None else time.monotonic() + seconds

    def _run(self, entry):
        """Call the delegate once for this attempt and report the outcome."""
        job = entry.job
        began = time.monotonic()
        try:
            outcome = self._call(job, entry.cancelled)
            if outcome is DEFERRED:
                self._report(entry, Outcome(job, "DEFERRED"), began)
                return
            result = typed_result(outcome)
        except BaseException as exc:  # even SystemExit: it fails the step, not the thread
            self._report(entry, self._failure(job, exc), began)
            return
        self._report(entry, Outcome(job, COMPLETED, result=result), began)

    def _failure(self, job, exc):
        """The outcome of a failed attempt: retried by itself if its policy says so, else FAILED."""
        error = {"type": type(exc).__name__, "message": describe(exc)}
        # The error is in the database; the traceback (costly to format) only at DEBUG.
        fields = {**step_fields(job), "error_type": error["type"]}
        log.info(
            "step %s attempt %d failed: %s: %s", job.step_id, job.attempt, error["type"], error["message"], extra=fields
        )
        log.debug("traceback of step %s attempt %d", job.step_id, job.attempt, exc_info=exc, extra=fields)
        return Outcome(job, FAILED, error=error, retry_at=self._retry_time(job, exc))

    def _retry_time(self, job, exc):
        """When to retry this failed attempt by itself (ISO time), or None if it is not retried."""
        delegate = self.registry.get(job.type)
        if delegate is None or isinstance(exc, Abort) or job.retries_used >= delegate.retry.retries:
            return None
        wait = timedelta(seconds=delegate.retry.seconds_before(job.retries_used))
        return iso(datetime.now(UTC) + wait)

    def _call(self, job, cancelled):
        delegate = self.registry.get(job.type)
        if delegate is None:
            raise LookupError(f"no delegate is registered for step type {job.type!r}")
        results = job.results or {}
        return delegate.fn(
            Context(
                params=plain_values(job.params),
                process_id=job.process_id,
                step_id=job.step_id,
                attempt=job.attempt,
                log=logging.LoggerAdapter(logging.getLogger(f"stepd.delegate.{job.type}"), step_fields(job)),
                cancelled=cancelled,
                load_results=lambda: {position: plain_values(result) for position, result in results.items()},
            )
        )

    def _report(self, entry, outcome, began):
        """Send the delegate's outcome, unless its attempt already ended without it."""
        with self._lock:
            self._quick[entry.job.type] = outcome.quick = time.monotonic() - began < QUICK_SECONDS
            if entry.abandoned:  # ended already (a timeout, fail-step): the outcome is stale
                return
            entry.reported = True
        self._send_outcome(outcome)

    def _send_outcome(self, outcome):
        with self._outbox_lock:
            self._outbox.append(outcome)
            if self._sending:
                return  # the thread sending now sends this one too, in its next turn
            self._sending = True
        while True:
            with self._outbox_lock:
                batch, self._outbox = self._outbox, []
                if not batch:
                    self._sending = False
                    return
            self.channel.send("outcomes", batch)

    # -- the watch: timeouts -------------------------------------------------------------
    def _watch(self):
        while not self._stopping.wait(WATCH_SECONDS):
            now = time.monotonic()
            self._hand_over_reading(now)
            with self._lock:
                overdue = [e for e in self._running.values() if e.deadline is not None and e.deadline <= now]
            for entry in overdue:
                if self._abandon(entry):  # from here on the delegate's own outcome is ignored
                    message = f"The delegate ran past its timeout of {self._timeout_of(entry.job):g} s."
                    self._send_outcome(self._failure(entry.job, Timeout(message)))

    def _hand_over_reading(self, now):
        """The reading thread has run one delegate for HELD_UP_SECONDS or more: a new thread takes
        its part, another reads from now on, and the jobs waiting behind it go to the others. Its
        delegate holds a place from here on, and its thread ends when that returns (a delegate that
        hangs holds its own thread, as on any other)."""
        with self._lock:
            entry = self._inline
            if entry is None or now - entry.inline_since < HELD_UP_SECONDS:
                return
            self._let_go_of_reading(entry)  # not abandoned: that would have let go of it already
        if not self._stopping.is_set():
            self._add_thread()

    def _let_go_of_reading(self, entry):
        """Under the lock: the reading thread is held up in `entry`'s delegate; a waiting one reads now."""
        if self._inline is entry:
            self._inline = None
            self._inline_turn = False
            entry.held_up = True
            self._reading = False
            self._lock.notify_all()

    def _abandon(self, entry):
        """The attempt ends without its delegate: set ctx.cancelled, and give its place to a new
        thread. Returns False if its delegate's own outcome was sent already (that wins)."""
        with self._lock:
            if entry.abandoned or entry.reported:
                return False
            replaced = entry.held_up  # a hand-over gave its thread's part to a new thread already
            entry.abandoned = True
            self._let_go_of_reading(entry)
            self._lock.notify_all()
        entry.cancelled.set()
        log.info(
            "step %s attempt %d ended while its delegate ran; ctx.cancelled is set",
            entry.job.step_id,
            entry.job.attempt,
            extra=step_fields(entry.job),
        )
        if not self._stopping.is_set() and not replaced:
            self._add_thread()
        return True


# -- a runner process -----------------------------------------------------------------------------
def run_until_stopped(runner, channel):
    """Run `runner` on `channel` in this process until SIGTERM or SIGINT, or until its node is
    gone, then stop it (`stepd runner`). Returns whether the node went away first."""
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a SIGHUP to the service's group is its main process's to answer
    runner.start(channel)
    threading.Thread(target=lambda: (runner.node_gone.wait(), stopping.set()), daemon=True).start()
    stopping.wait()
    node_went_first = runner.node_gone.is_set()
    runner.stop()
    return node_went_first
