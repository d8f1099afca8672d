"""The runner: calls delegates on a pool of threads, records their outcomes, begins due
retries, and finds orphaned steps.

Every worker process has one runner with its own id. A step being executed carries that
id in the database. Once a second the runner's watch thread refreshes its row and fails,
with error type `Interrupted`, every step whose runner is gone (a killed worker or
service), so it can be restarted. A crashed attempt is never re-run by itself: a
delegate is called at most once per attempt.

A delegate that raises, under a retry policy with retries left, leaves its step STARTED
with a `next_retry_at` time in the database. The retry thread of every worker looks for
due retries a few times a second; a compare-and-set lets exactly one of them begin the
next attempt (trigger `retry`), so the schedule survives restarts of the service.
"""

import logging
import os
import queue
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from delegates import DEFERRED, Abort, Context
from model import COMPLETED, FAILED, Busy, Unwritable, iso, new_id, plain_values, typed_result

log = logging.getLogger("stepd.runner")

HEARTBEAT_SECONDS = 1.0
STALE_AFTER_SECONDS = 5.0  # only for a runner on another host, whose process we cannot see
STOP_GRACE_SECONDS = 5.0  # how long a clean stop waits for running delegates
RECORD_RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
RETRY_POLL_SECONDS = 0.2  # how often each worker looks for due automatic retries
UNWRITABLE_RETRY_SECONDS = 1.0
HOST = socket.gethostname()


def process_start_time(pid):
    """The kernel's start time of a live process (None if it is gone, a zombie, or there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    state, start_time = fields[0], fields[19]  # fields 3 and 22 of proc(5)
    return None if state in ("Z", "X") else start_time


def runner_is_alive(row):
    """On this host, a runner lives exactly as long as its process (pid and start time, so a
    reused pid does not count); a busy delegate holding the GIL cannot make it look dead.
    A runner elsewhere is judged by its heartbeat."""
    if row["host"] == HOST and row["pid_started"]:
        return process_start_time(row["pid"]) == row["pid_started"]
    return row["heartbeat_at"] >= time.time() - STALE_AFTER_SECONDS


def describe(exc):
    """An exception's message as storable text, whatever its __str__ does."""
    try:
        text = str(exc)
    except Exception:
        text = f"<unprintable {type(exc).__name__}>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Runner:
    """A pool of daemon threads running step delegates for one worker process."""

    def __init__(self, store, registry, threads):
        self.store = store
        self.registry = registry
        self.threads = threads
        self.id = None  # given at start(), in the worker process itself
        self._jobs = queue.Queue()
        self._stopping = threading.Event()
        self._claiming = threading.Event()  # cleared when a stop begins: no new retry is taken on
        self._idle = threading.Condition()
        self._busy = 0
        self._claim_lock = threading.Lock()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------
    def start(self):
        """Register, then start the delegate threads and the watch thread."""
        if self.id is not None:
            return
        self.id = new_id()  # after any fork, so no two processes share a runner id
        self._register()
        # Daemon threads: a delegate that never returns must not keep a stopping worker
        # alive; the database, not the thread, is the record of what ran.
        for n in range(self.threads):
            threading.Thread(target=self._work, name=f"stepd-delegate-{n}", daemon=True).start()
        threading.Thread(target=self._watch, name="stepd-watch", daemon=True).start()
        self._claiming.set()
        threading.Thread(target=self._begin_due_retries, name="stepd-retries", daemon=True).start()
        log.info("runner %s started with %d delegate threads", self.id, self.threads)

    def _register(self):
        """The first heartbeat, which registers this runner. It waits out a full disk or a busy
        database: raising here fails the worker's boot, and gunicorn then stops the whole service."""
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
        """Wait up to `grace` seconds for running delegates, then fail what is left as Interrupted."""
        deadline = time.monotonic() + grace
        self._claiming.clear()  # a retry claimed now would only be interrupted below; leave it due
        with self._claim_lock:  # and wait for a claim in progress to be queued, so it is awaited too
            pass
        with self._idle:
            while (self._busy or not self._jobs.empty()) and time.monotonic() < deadline:
                self._idle.wait(timeout=0.1)
            self._closed = True  # from here on no delegate is called; queued jobs are interrupted below
        self._stopping.set()
        if self.id is None:
            return
        interrupted = self.store.interrupt_runner(self.id, "The service stopped before this step's delegate finished.")
        if interrupted:
            log.warning("runner %s stopped; %d running step(s) marked Interrupted", self.id, len(interrupted))

    def submit(self, job):
        """Queue a job whose STARTED attempt, stamped with this runner's id, is committed."""
        with self._idle:
            self._busy += 1  # counted from the queue on, so stop() never sees a job in between
        self._jobs.put(job)

    # -- delegate threads --------------------------------------------------------------
    def _work(self):
        while True:
            job = self._jobs.get()
            try:
                while job is not None:
                    job = self._run(job)  # a completed step hands back the next one
            except Exception as exc:
                log.exception("runner %s could not record the outcome of step %s", self.id, job.step_id)
                self._fail_unrecorded(job, exc)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _fail_unrecorded(self, job, exc):
        """Last resort, so the step is not left STARTED under a live runner for ever."""
        error = {"type": "InternalError", "message": f"stepd could not record this attempt's outcome: {describe(exc)}"}
        try:
            self.store.finish_attempt(job, FAILED, error=error, runner_id=self.id)
        except Exception:
            log.exception("runner %s could not fail step %s either", self.id, job.step_id)

    def _run(self, job):
        """Call the delegate once for this attempt and record the outcome; returns the next job."""
        with self._idle:
            if self._closed:  # stopping: stop() marks this attempt Interrupted instead
                return None
        if not self.store.attempt_is_current(job):  # failed from outside while it waited in the queue
            return None
        try:
            outcome = self._call(job)
            if outcome is DEFERRED:
                return self._record(self.store.defer_attempt, job)
            result = typed_result(outcome)
        except BaseException as exc:  # even SystemExit: it fails the step, not the thread
            error = {"type": type(exc).__name__, "message": describe(exc)}
            # The error is in the database; the traceback (costly to format) only at DEBUG.
            log.info("step %s attempt %d failed: %s: %s", job.step_id, job.attempt, error["type"], error["message"])
            log.debug("traceback of step %s attempt %d", job.step_id, job.attempt, exc_info=True)
            retry_at = self._retry_time(job, exc)
            if retry_at is not None:
                self._record(self.store.schedule_retry, job, error, retry_at)
                return None
            return self._record(self.store.finish_attempt, job, FAILED, error=error, runner_id=self.id)
        return self._record(self.store.finish_attempt, job, COMPLETED, result=result, runner_id=self.id)

    def _retry_time(self, job, exc):
        """When to retry this failed attempt by itself (ISO time), or None if it is not retried."""
        delegate = self.registry.get(job.type)
        if delegate is None or isinstance(exc, Abort) or job.retries_used >= delegate.retry.retries:
            return None
        wait = timedelta(seconds=delegate.retry.seconds_before(job.retries_used))
        return iso(datetime.now(UTC) + wait)

    def _call(self, job):
        delegate = self.registry.get(job.type)
        if delegate is None:
            raise LookupError(f"no delegate is registered for step type {job.type!r}")
        return delegate.fn(
            Context(
                params=plain_values(job.params),
                process_id=job.process_id,
                step_id=job.step_id,
                attempt=job.attempt,
                log=logging.LoggerAdapter(
                    logging.getLogger(f"stepd.delegate.{job.type}"), {"request_id": f"step:{job.step_id}"}
                ),
            )
        )

    def _record(self, write, *args, **kwargs):
        """Run a store write, retrying while the database is busy: an outcome must not be dropped.

        A full disk is retried until it clears (or the runner stops): the outcome exists only
        in this thread, and giving up would leave the step STARTED under a live runner for ever.
        """
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

    # -- watch: heartbeat, orphans ---------------------------------------------------------
    def _watch(self):
        while not self._stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.store.heartbeat(self._identity())
                orphans = self.store.interrupt_orphans(runner_is_alive)
                if orphans:
                    log.warning("marked %d step(s) of vanished runners Interrupted", len(orphans))
            except Exception:  # a busy database now and then must not end the watch
                log.exception("runner %s heartbeat failed; retrying", self.id)

    # -- automatic retries -----------------------------------------------------------------
    def _begin_due_retries(self):
        while not self._stopping.wait(RETRY_POLL_SECONDS):
            try:
                with self._claim_lock:
                    if not self._claiming.is_set():
                        return
                    # Only as many as there are idle threads: a retry claimed but still queued when
                    # the service stops would be Interrupted instead of staying due.
                    with self._idle:
                        idle = self.threads - self._busy
                    if idle > 0:
                        for job in self.store.claim_due_retries(self.id, limit=idle):
                            self.submit(job)
            except Exception:  # a busy database now and then must not end the loop
                log.exception("runner %s could not begin due retries; retrying", self.id)
