"""The runner: claims queued attempts from the database and calls their delegates.

HTTP workers only commit an attempt as STARTED and queued (no runner yet) and poke the
runners (wake.py). A runner claims queued attempts by compare-and-set, as many as it has
free places (STEPD_THREADS), and calls each delegate once on a thread; it records the
outcome and carries on with the next step itself. It also begins due automatic retries,
keeps its row in `runners` alive, and fails with error type `Interrupted` every running
step whose runner is gone, so it can be restarted. A crashed attempt is never re-run by
itself: a delegate is called at most once per attempt.

An attempt that runs past its timeout, or is ended from outside (fail-step, a cancel of its
process), has its `ctx.cancelled` set and gives its place back at once: a delegate that never returns holds
its own thread, not one of the runner's places.

`stepd runner` runs one runner process (`stepd serve` starts STEPD_RUNNERS of them);
`wiring.make_runner(...).start()` runs one inside any process (the tests do).
"""

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from stepd.delegates import DEFERRED, Abort, Context
from stepd.liveness import HOST, process_start_time
from stepd.logs import step_fields
from stepd.model import COMPLETED, FAILED, Busy, Unwritable, iso, new_id, plain_values, typed_result
from stepd.wake import Listener

log = logging.getLogger("stepd.runner")

HEARTBEAT_SECONDS = 1.0
STOP_GRACE_SECONDS = 5.0  # how long a clean stop waits for running delegates
RECORD_RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
POLL_SECONDS = 0.25  # the backstop when a wake-up is lost: queued work waits at most this long
WATCH_SECONDS = 0.2  # how often timeouts and attempts ended from outside are looked for
UNWRITABLE_RETRY_SECONDS = 1.0
CHORE_TICK_SECONDS = 0.25  # how often the chores loop looks for a chore that is due


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
class Chore:
    """Work a runner does every `period` seconds beside its delegates (wiring.chores): each in its
    own try, so one that fails never skips another; they run on a thread of their own, so none
    delays the heartbeat (a long one, retention, starts a thread of its own)."""

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
            log.exception("runner chore %s failed; trying again in %g s", self.name, self.period)


@dataclass
class Running:
    """One attempt in a place of this runner."""

    job: object
    deadline: float | None  # time.monotonic() past which it times out, or None
    cancelled: threading.Event = field(default_factory=threading.Event)
    recording: bool = False  # its delegate's outcome is being written: it wins over a timeout
    abandoned: bool = False  # ended without its delegate: the place is free, the thread ends when it returns


class Runner:
    """Claims queued attempts and runs their delegates on `threads` places."""

    def __init__(self, store, registry, threads, db_path, step_timeout=None, chores=()):
        self.store = store
        self.registry = registry
        self.threads = threads
        self.db_path = db_path
        self.step_timeout = step_timeout  # STEPD_STEP_TIMEOUT: for delegates that set no timeout
        self.chores = list(chores)  # Chore: each run on its own period (wiring.chores)
        self.id = None  # given at start(), in the process that runs it
        self._jobs = queue.Queue()  # claimed, waiting for a thread (never more than the free places)
        self._running = {}  # (step id, attempt) -> Running
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._closed = False  # no delegate is called any more
        self._listener = None
        self._may_be_more = True  # the last claim filled every free place: more may be queued

    @property
    def _busy(self):
        """Places taken: attempts claimed and not yet ended."""
        with self._lock:
            running = sum(1 for entry in self._running.values() if not entry.abandoned)
        return running + self._jobs.qsize()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self):
        """Register, then start the delegate threads, the claimer, the watch and the heartbeat."""
        if self.id is not None:
            return
        self.id = new_id()  # after any fork, so no two processes share a runner id
        self._listener = Listener(self.db_path, self.id)
        self._register()
        # Daemon threads: a delegate that never returns must not keep a stopping runner alive;
        # the database, not the thread, is the record of what ran.
        for _ in range(self.threads):
            self._add_thread()
        loops = ((self._claim_loop, "claim"), (self._watch, "watch"), (self._heartbeat_loop, "beat"))
        for target, name in (*loops, (self._chores_loop, "chores")):
            threading.Thread(target=target, name=f"stepd-{name}", daemon=True).start()
        log.info("runner %s started with %d delegate threads", self.id, self.threads)

    def _add_thread(self):
        threading.Thread(target=self._work, name="stepd-delegate", daemon=True).start()

    def _register(self):
        """The first heartbeat, which registers this runner; it waits out a full disk or a busy database."""
        while True:
            try:
                return self.store.heartbeat(self._identity())
            except (Busy, Unwritable) as exc:
                log.warning("runner %s cannot register yet (%s); retrying", self.id, exc)
                time.sleep(UNWRITABLE_RETRY_SECONDS)

    def _identity(self):
        pid = os.getpid()
        return {"id": self.id, "host": HOST, "pid": pid, "pid_started": process_start_time(pid)}

    def stop(self, grace=STOP_GRACE_SECONDS):
        """Claim nothing more; wait up to `grace` seconds for running delegates; give back what
        was claimed but never called; fail what is still running as Interrupted."""
        deadline = time.monotonic() + grace
        self._stopping.set()
        if self.id is None:
            return
        self._listener.poke()
        with self._lock:
            while self._delegates_running() and time.monotonic() < deadline:
                self._lock.wait(timeout=0.05)
            self._closed = True  # from here on no delegate is called
        self._give_back_unstarted()
        for _ in range(self.threads):
            self._jobs.put(None)  # ends the idle delegate threads
        reason = "The service stopped before this step's delegate finished."
        interrupted = self.store.interrupt_runner(self.id, reason)
        if interrupted:
            log.warning("runner %s stopped; %d running step(s) marked Interrupted", self.id, len(interrupted))
        self._listener.close()

    def _delegates_running(self):
        return any(not entry.abandoned for entry in self._running.values())

    def _give_back_unstarted(self):
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                continue
            try:
                self.store.unclaim(job, self.id)
            except Exception:  # then the stop below interrupts it instead
                log.exception("runner %s could not give back step %s", self.id, job.step_id, extra=step_fields(job))

    # -- claiming --------------------------------------------------------------------------
    def _claim_loop(self):
        while not self._stopping.is_set():
            try:
                claimed = self._claim()
            except Exception:  # a busy database now and then must not end the loop
                log.exception("runner %s could not claim work; retrying", self.id)
                claimed = 0
            if not claimed:
                self._listener.wait(POLL_SECONDS)

    def _claim(self):
        """Claim as many attempts as there are free places (due retries first); returns how many.
        (Each claim looks before it takes the write lock; outcomes written meanwhile by this
        runner's threads share its transaction: db.py's group commit.)"""
        self._may_be_more = True  # a place freed while this claims pokes the loop (see _leave)
        free = self.threads - self._busy
        if free <= 0:
            return 0
        jobs = self.store.claim_due_retries(self.id, free)
        if len(jobs) < free:
            jobs += self.store.claim_queued(self.id, free - len(jobs))
        for job in jobs:
            self._jobs.put(job)
        # Fewer than the free places: nothing more was queued then, and what is queued later
        # comes with its own poke. As many: more may wait for the next free place.
        self._may_be_more = len(jobs) >= free
        return len(jobs)

    # -- delegate threads ------------------------------------------------------------------
    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                if self._closed:  # stopping: stop() gives the job back to the database's queue
                    self._jobs.put(job)
                    return
            while job is not None:
                entry = self._enter(job)
                job = self._run(entry)  # a completed step hands back the next one
                if self._leave(entry):
                    return  # the place was given away while the delegate ran: this thread ends

    def _enter(self, job):
        entry = Running(job, self._deadline_of(job))
        with self._lock:
            self._running[(job.step_id, job.attempt)] = entry
        return entry

    def _leave(self, entry):
        """Free the attempt's place; returns whether this thread had been abandoned."""
        with self._lock:
            self._running.pop((entry.job.step_id, entry.job.attempt), None)
            self._lock.notify_all()
        if not entry.abandoned and self._may_be_more:
            self._listener.poke()  # a place is free and work may be waiting for one: claim again
        return entry.abandoned

    def _timeout_of(self, job):
        delegate = self.registry.get(job.type)
        return delegate.timeout if delegate is not None and delegate.timeout is not None else self.step_timeout

    def _deadline_of(self, job):
        seconds = self._timeout_of(job)
        return None if seconds is None else time.monotonic() + seconds

    def _run(self, entry):
        """Call the delegate once for this attempt and record the outcome; returns the next job."""
        job = entry.job
        try:
            try:
                outcome = self._call(job, entry.cancelled)
                if outcome is DEFERRED:
                    return self._record(entry, self.store.defer_attempt, job)
                result = typed_result(outcome)
            except BaseException as exc:  # even SystemExit: it fails the step, not the thread
                return self._failed(entry, job, exc)
            return self._record(entry, self.store.finish_attempt, job, COMPLETED, result=result, runner_id=self.id)
        except Exception as exc:
            log.exception(
                "runner %s could not record the outcome of step %s", self.id, job.step_id, extra=step_fields(job)
            )
            self._fail_unrecorded(job, exc)
            return None

    def _failed(self, entry, job, exc):
        """Record a failed attempt: retried by itself if its policy says so, else FAILED.
        `entry` None: the runner ends it (a timeout), not its delegate."""
        error = {"type": type(exc).__name__, "message": describe(exc)}
        # The error is in the database; the traceback (costly to format) only at DEBUG.
        fields = {**step_fields(job), "error_type": error["type"]}
        log.info(
            "step %s attempt %d failed: %s: %s", job.step_id, job.attempt, error["type"], error["message"], extra=fields
        )
        log.debug("traceback of step %s attempt %d", job.step_id, job.attempt, exc_info=exc, extra=fields)
        retry_at = self._retry_time(job, exc)
        if retry_at is not None:
            self._record(entry, self.store.schedule_retry, job, error, retry_at)
            return None
        return self._record(entry, self.store.finish_attempt, job, FAILED, error=error, runner_id=self.id)

    def _fail_unrecorded(self, job, exc):
        """Last resort, so the step is not left STARTED under a live runner for ever."""
        error = {"type": "InternalError", "message": f"stepd could not record this attempt's outcome: {describe(exc)}"}
        try:
            self.store.finish_attempt(job, FAILED, error=error, runner_id=self.id)
        except Exception:
            log.exception("runner %s could not fail step %s either", self.id, job.step_id, extra=step_fields(job))

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
        return delegate.fn(
            Context(
                params=plain_values(job.params),
                process_id=job.process_id,
                step_id=job.step_id,
                attempt=job.attempt,
                log=logging.LoggerAdapter(logging.getLogger(f"stepd.delegate.{job.type}"), step_fields(job)),
                cancelled=cancelled,
                load_results=lambda: self._earlier_results(job),
            )
        )

    def _earlier_results(self, job):
        """ctx.results: the earlier steps' results as plain values, read when the delegate asks."""
        typed = self.store.earlier_results(job.step_id)
        return {position: plain_values(result) for position, result in typed.items()}

    def _record(self, entry, write, *args, **kwargs):
        """Run a store write, retrying while the database is busy: an outcome must not be dropped.

        A full disk is retried until it clears (or the runner stops): the outcome exists only
        in this thread, and giving up would leave the step STARTED under a live runner for ever.
        """
        if entry is not None:  # the delegate's own outcome
            with self._lock:
                if entry.abandoned:  # ended without it already (a timeout, fail-step): it is stale
                    return None
                entry.recording = True
        busy_delays = iter(RECORD_RETRY_DELAYS)
        while True:
            try:
                return write(*args, **kwargs)
            except (Busy, Unwritable) as exc:
                if isinstance(exc, Unwritable) and not self._stopping.is_set():
                    delay = UNWRITABLE_RETRY_SECONDS
                elif isinstance(exc, Unwritable) or (delay := next(busy_delays, None)) is None:
                    raise
                log.warning("could not record a step outcome (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)

    # -- the watch: timeouts, and attempts ended from outside -------------------------------
    def _watch(self):
        while not self._stopping.wait(WATCH_SECONDS):
            try:
                self._time_out_overdue()
                self._let_go_of_ended()
            except Exception:  # a busy database now and then must not end the watch
                log.exception("runner %s could not check its running attempts; retrying", self.id)

    def _time_out_overdue(self):
        now = time.monotonic()
        with self._lock:
            overdue = [e for e in self._running.values() if e.deadline is not None and e.deadline <= now]
        for entry in overdue:
            if self._abandon(entry):  # from here on the delegate's own outcome is ignored
                message = f"The delegate ran past its timeout of {self._timeout_of(entry.job):g} s."
                self._failed(None, entry.job, Timeout(message))

    def _let_go_of_ended(self):
        """Attempts the database no longer has as running here (fail-step, an interrupt): tell
        their delegates, and free their places."""
        with self._lock:
            watched = [e for e in self._running.values() if not (e.recording or e.abandoned)]
        if not watched:
            return
        current = self.store.running_attempts(self.id)
        for entry in watched:
            if (entry.job.step_id, entry.job.attempt) not in current:
                self._abandon(entry)

    def _abandon(self, entry):
        """The attempt ends without its delegate: set ctx.cancelled, and give its place to a new
        thread. Returns False if its delegate's own outcome is being recorded (that wins)."""
        with self._lock:
            if entry.abandoned or entry.recording:
                return False
            entry.abandoned = True
            self._lock.notify_all()
        entry.cancelled.set()
        log.info(
            "step %s attempt %d ended while its delegate ran; ctx.cancelled is set",
            *self._key(entry),
            extra=step_fields(entry.job),
        )
        if not self._stopping.is_set():
            self._add_thread()
            self._listener.poke()
        return True

    @staticmethod
    def _key(entry):
        return entry.job.step_id, entry.job.attempt

    # -- heartbeat and chores ------------------------------------------------------------------
    def _heartbeat_loop(self):
        """Only the heartbeat: a slow chore must never make this runner look dead."""
        while not self._stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.store.heartbeat(self._identity())
            except Exception:  # a busy database now and then must not end the loop
                log.exception("runner %s heartbeat failed; retrying", self.id)

    def _chores_loop(self):
        while not self._stopping.wait(CHORE_TICK_SECONDS):
            now = time.monotonic()
            for chore in self.chores:
                chore.run_if_due(now)


# -- a runner process -----------------------------------------------------------------------------
def run_until_stopped(runner):
    """Run `runner` in this process until SIGTERM or SIGINT, then stop it (`stepd runner`)."""
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a SIGHUP to the service's group is its main process's to answer
    runner.start()
    stopping.wait()
    runner.stop()
