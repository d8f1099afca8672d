"""Retention: deleting processes that finished (COMPLETED or CANCELLED) more than some days ago,
with their steps and attempts, in small batches (SPEC 10).

Each batch is one write transaction of BATCH processes (a few hundred rows for processes of a
few steps), and after each one the purge waits as long as the batch took (at least PAUSE_SECONDS),
so a request that wants the write lock waits behind one batch at most, never behind the purge.
FAILED and RUNNING processes are never deleted. Freed pages go to SQLite's freelist and are
reused by the rows written next: the file stops growing, it does not shrink (see the README).

`purge` does it once (`flask --app app purge`); `Retention` is the runners' housekeeping chore
for STEPD_RETENTION_DAYS.
"""

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from model import iso

log = logging.getLogger("stepd.retention")

BATCH = 100  # processes per transaction
PAUSE_SECONDS = 0.005  # the least wait between two batches, for the writers queued behind one


def cutoff(days, now=None):
    """The time (stepd's UTC text) before which a process that finished is old enough to delete."""
    return iso((now or datetime.now(UTC)) - timedelta(days=days))


def purge(store, days, dry_run=False, batch=BATCH):
    """Delete every process that finished more than `days` days ago; returns (processes, rows)
    deleted. A dry run deletes nothing and returns (how many it would delete, None)."""
    before = cutoff(days)
    if dry_run:
        return store.count_finished_before(before), None
    processes = rows = 0
    while ids := store.finished_before(before, batch):
        began = time.monotonic()
        deleted, deleted_rows = store.delete_finished(ids, before)
        processes, rows = processes + deleted, rows + deleted_rows
        time.sleep(max(PAUSE_SECONDS, time.monotonic() - began))  # the writers' turn
    return processes, rows


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
