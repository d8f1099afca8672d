"""The runner: calls delegates on a pool of threads, records outcomes, and keeps a heartbeat.

Every worker process has one runner with its own id. A step being executed carries
that id in the database; the heartbeat thread refreshes the runner's row every second
and fails the steps of runners whose heartbeat stopped (a killed worker or service)
with error type `Interrupted`, so they can be restarted. Nothing is re-run by itself:
a delegate is called at most once per attempt.
"""

import logging
import math
import os
import queue
import sqlite3
import threading
import time

from delegates import DEFERRED, Context
from store import COMPLETED, FAILED, is_busy, new_id

log = logging.getLogger("stepd.runner")

HEARTBEAT_SECONDS = 1.0
STALE_AFTER_SECONDS = 5.0  # a runner silent this long is gone; well inside the 10 s promise
STOP_GRACE_SECONDS = 5.0  # how long a clean stop waits for running delegates
RECORD_RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)


class Runner:
    """A pool of daemon threads running step delegates for one worker process."""

    def __init__(self, store, registry, threads):
        self.store = store
        self.registry = registry
        self.threads = threads
        self.id = new_id()
        self._jobs = queue.Queue()
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0
        self._closed = False
        self._started = False

    # -- lifecycle -------------------------------------------------------------------
    def start(self):
        """Register, then start the delegate threads and the heartbeat."""
        if self._started:
            return
        self._started = True
        self.store.heartbeat(self.id, os.getpid())
        # Daemon threads: a delegate that never returns must not keep a stopping worker
        # alive; the database, not the thread, is the record of what ran.
        for n in range(self.threads):
            threading.Thread(target=self._work, name=f"stepd-delegate-{n}", daemon=True).start()
        threading.Thread(target=self._watch, name="stepd-heartbeat", daemon=True).start()
        log.info("runner %s started with %d delegate threads", self.id, self.threads)

    def stop(self, grace=STOP_GRACE_SECONDS):
        """Wait up to `grace` seconds for running delegates, then fail what is left as Interrupted."""
        deadline = time.monotonic() + grace
        with self._idle:
            while (self._busy or not self._jobs.empty()) and time.monotonic() < deadline:
                self._idle.wait(timeout=0.1)
            self._closed = True  # from here on no delegate is called; queued jobs are interrupted below
        self._stopping.set()  # the heartbeat ran through the grace period, so no one reaped us early
        interrupted = self.store.interrupt_orphans(
            0, only_runner=self.id, reason="The service stopped before this step's delegate finished."
        )
        if interrupted:
            log.warning("runner %s stopped; %d running step(s) marked Interrupted", self.id, len(interrupted))

    def submit(self, job):
        """Queue a job whose attempt is already committed as STARTED by this runner."""
        if job is not None:
            self._jobs.put(job)

    # -- delegate threads --------------------------------------------------------------
    def _work(self):
        while True:
            job = self._jobs.get()
            with self._idle:
                self._busy += 1
            try:
                while job is not None:
                    job = self._run(job)  # a completed step hands back the next one
            except Exception:
                log.exception("runner %s could not record the outcome of a step", self.id)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _run(self, job):
        """Call the delegate once for this attempt and record the outcome; returns the next job."""
        with self._idle:
            if self._closed:  # stopping: stop() marks this attempt Interrupted instead
                return None
        delegate = self.registry.get(job.type)
        ctx = Context(
            params={name: value for name, (_kind, value) in job.params.items()},
            process_id=job.process_id,
            step_id=job.step_id,
            attempt=job.attempt,
            log=logging.LoggerAdapter(
                logging.getLogger(f"stepd.delegate.{job.type}"), {"request_id": f"step:{job.step_id}"}
            ),
        )
        try:
            if delegate is None:
                raise LookupError(f"no delegate is registered for step type {job.type!r}")
            outcome = delegate.fn(ctx)
            if outcome is DEFERRED:
                return self._record(self.store.defer_attempt, job)
            result = typed_result(outcome)
        except Exception as exc:
            log.info("step %s attempt %d failed: %s", job.step_id, job.attempt, type(exc).__name__)
            error = {"type": type(exc).__name__, "message": str(exc)}
            return self._record(self.store.finish_attempt, job, FAILED, error=error, runner_id=self.id)
        return self._record(self.store.finish_attempt, job, COMPLETED, result=result, runner_id=self.id)

    def _record(self, write, *args, **kwargs):
        """Run a store write, retrying while the database is busy: an outcome must not be dropped."""
        for delay in RECORD_RETRY_DELAYS:
            try:
                return write(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                log.warning("database busy while recording a step outcome; retrying in %.1fs", delay)
                time.sleep(delay)
        return write(*args, **kwargs)

    # -- heartbeat ---------------------------------------------------------------------
    def _watch(self):
        while not self._stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.store.heartbeat(self.id, os.getpid())
                orphans = self.store.interrupt_orphans(STALE_AFTER_SECONDS)
                if orphans:
                    log.warning("marked %d step(s) of vanished runners Interrupted", len(orphans))
            except Exception:  # a busy database now and then must not end the heartbeat
                log.exception("runner %s heartbeat failed; retrying", self.id)


INT64 = (-(2**63), 2**63 - 1)


def typed_result(outcome):
    """Turn a delegate's return value into typed params: str -> STRING, int -> LONG, float -> DOUBLE."""
    if outcome is None:
        return None
    if not isinstance(outcome, dict):
        raise TypeError(f"a delegate must return None, a dict or ctx.defer(), not {type(outcome).__name__}")
    typed = {}
    for name, value in outcome.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"result names must be non-empty strings, not {name!r}")
        if isinstance(value, str):
            typed[name] = ("STRING", value)
        elif isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]:
            typed[name] = ("LONG", value)
        elif isinstance(value, float) and math.isfinite(value):
            typed[name] = ("DOUBLE", value)
        else:
            raise TypeError(f"result {name!r} must be a str, a 64-bit int or a finite float, not {value!r}")
    return typed
