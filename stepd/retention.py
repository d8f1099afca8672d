"""Retention: deleting processes that finished (COMPLETED or CANCELLED) more than some days ago,
with their steps and attempts, in small batches (STEPD_RETENTION_DAYS, `stepd purge`).

Each batch is one write transaction of at most BATCH_ROWS rows (whole processes: a process with
more rows than that is a batch of its own), and after each one the purge waits PAUSE_FACTOR times
as long as the batch took (at least PAUSE_SECONDS), so a request that wants the write lock waits
behind one batch at most, never behind the purge, and the purge takes at most a quarter of the
lock's time. Every row deleted dirties a page of each index on a random id, so a batch costs in
proportion to its rows: on the 2-core VM of BENCHMARKS.md, beside a service under load, a batch of
100 rows took 9 ms (median), one of 200 rows 19 ms (bench/purge.py).
FAILED and RUNNING processes are never deleted. Freed pages go to SQLite's freelist and are
reused by the rows written next: the file stops growing, it does not shrink (see the README).

`purge` does it once (`stepd purge`); `Retention` is the runners' housekeeping chore
for STEPD_RETENTION_DAYS.
"""

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from stepd.model import iso

log = logging.getLogger("stepd.retention")

BATCH_ROWS = 100  # rows (processes, steps, attempts) deleted per transaction, at most
LOOK_AHEAD = 100  # processes looked at to fill a batch
# The wait after a batch, in batch times. Beside a service under load (bench/purge.py), a probe
# writer's p99 wait for the lock was 9 ms without a purge, 21 ms during one with 3, 32 ms with 1.
PAUSE_FACTOR = 3
PAUSE_SECONDS = 0.005  # the least wait between two batches, for the writers queued behind one


def cutoff(days, now=None):
    """The time (stepd's UTC text) before which a process that finished is old enough to delete."""
    return iso((now or datetime.now(UTC)) - timedelta(days=days))


def purge(store, days, dry_run=False, batch_rows=None):
    """Delete every process that finished more than `days` days ago; returns (processes, rows)
    deleted. A dry run deletes nothing and returns (how many it would delete, None)."""
    before = cutoff(days)
    if dry_run:
        return store.count_finished_before(before), None
    processes = rows = 0
    while due := store.finished_before(before, LOOK_AHEAD):
        began = time.monotonic()
        deleted, deleted_rows = store.delete_finished(next_batch(due, batch_rows or BATCH_ROWS), before)
        processes, rows = processes + deleted, rows + deleted_rows
        # Copy the log back into the file now, outside the write lock: else a commit (the next
        # batch's, or a request's) finds the log long and checkpoints it while holding the lock.
        store.checkpoint()
        time.sleep(max(PAUSE_SECONDS, PAUSE_FACTOR * (time.monotonic() - began)))  # the writers' turn
    return processes, rows


def next_batch(due, batch_rows):
    """The ids of the oldest of `due` ((id, rows) pairs) whose rows add up to at most `batch_rows`;
    at least one, however large."""
    ids, total = [], 0
    for process_id, rows in due:
        if ids and total + rows > batch_rows:
            break
        ids.append(process_id)
        total += rows
    return ids


class Retention:
    """The runners' chore for STEPD_RETENTION_DAYS: each call starts a purge on a thread of its
    own, unless the last one is still going, so the runner's heartbeat never waits for it."""

    def __init__(self, store, days):
        self.store = store
        self.days = days
        self._thread = None

    def __call__(self):
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._purge, name="stepd-retention", daemon=True)
        self._thread.start()

    def _purge(self):
        try:
            processes, rows = purge(self.store, self.days)
        except Exception:  # a busy database now and then: the next call tries again
            log.exception("retention: could not delete finished processes; trying again later")
            return
        if processes:
            log.info(
                "retention: deleted %d process(es) finished over %g day(s) ago (%d rows)", processes, self.days, rows
            )
