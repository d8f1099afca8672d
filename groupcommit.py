"""Group commit: the writes of concurrent threads of one process, committed together.

Every write transaction costs the same fixed part whatever it holds: the turn at the file's
one write lock, BEGIN IMMEDIATE (which re-reads the log's index, and drops this connection's
page cache when another process wrote since), and the commit of every page it touched (the
same b-tree pages, again and again). A runner's delegate threads finish attempts at the same
moments, so `GroupCommit.run(write)` lets one of them, the leader, run every write waiting
at that moment in one transaction, each in its own savepoint, and commit once.

Each write keeps its own outcome: one that raises has its savepoint rolled back and its
caller gets its exception; the others are not touched. A caller returns only after the
transaction that holds its write has committed (or gets the error that stopped the commit),
so nothing is reported before it is durable, exactly as with its own transaction.

Leadership passes on after one batch: a leader does not stay leading (and its caller
waiting) under a steady stream of writes.
"""

import threading

from model import Unwritable

MAX_BATCH = 64  # writes in one transaction at most: the lock is held for one batch only


class _Write:
    """One caller's write, waiting in the queue."""

    __slots__ = ("fn", "done", "lead", "result", "error")

    def __init__(self, fn):
        self.fn = fn
        self.done = False
        self.lead = False  # this caller's thread is to lead the next batch
        self.result = None
        self.error = None


class GroupCommit:
    """Runs `fn()` inside one shared write transaction of `db` (a db.Database) per batch."""

    def __init__(self, db, max_batch=MAX_BATCH):
        self.db = db
        self.max_batch = max_batch
        self._waiting = []  # writes not yet taken by a leader
        self._leading = False
        self._changed = threading.Condition()
        self.batches = 0  # transactions committed, for the tests and the benchmark
        self.writes = 0

    def run(self, fn):
        """Run `fn()` (which writes through `db`) in a group transaction; returns its result
        once that transaction committed, or raises what `fn` raised, or what stopped the commit."""
        write = _Write(fn)
        with self._changed:
            self._waiting.append(write)
            while self._leading and not (write.done or write.lead):
                self._changed.wait()
            leads = not write.done
            self._leading = self._leading or leads  # a write handed the lead finds it set already
        if leads:
            self._lead()
        if write.error is not None:
            raise write.error
        return write.result

    def _lead(self):
        """Commit one batch (this caller's write is in it), then hand the lead on, if anyone waits."""
        with self._changed:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
        try:
            self._commit(batch)
        finally:
            with self._changed:
                for write in batch:
                    write.done = True
                if self._waiting:
                    self._waiting[0].lead = True
                else:
                    self._leading = False
                self._changed.notify_all()

    def _commit(self, batch):
        outcomes = []
        try:
            with self.db.transaction():
                for write in batch:
                    outcomes.append(self._in_savepoint(write.fn))
                    if not self.db.in_transaction():  # SQLite rolled it all back (a full disk)
                        raise Unwritable("database or disk is full: the transaction was rolled back")
        except BaseException as exc:  # the batch did not commit: no write's result stands
            for write in batch:
                write.error = exc
            return
        for write, (result, error) in zip(batch, outcomes, strict=True):
            write.result, write.error = result, error
        self.batches += 1
        self.writes += len(batch)

    def _in_savepoint(self, fn):
        """(fn's result, None) or (None, its exception); its changes are undone when it raised."""
        try:
            with self.db.transaction():  # inside the batch's transaction: a savepoint
                return fn(), None
        except Exception as exc:
            return None, exc
