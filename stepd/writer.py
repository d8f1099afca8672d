"""The writer: one loop that owns a process's write connection and commits its writes in groups.

Every write of the process is a member of a group. The loop takes whatever members are waiting,
opens one `BEGIN IMMEDIATE`, serves them one after the other, each in a savepoint of its own (so
each keeps its own error; the first needs none: its failure rolls back a transaction that holds
nothing else), and commits once for all of them; a member returns only after that COMMIT. This
is datasette's writer thread (`datasette/database.py`, `_execute_writes`) with the
batching inside the loop.

A member is served in one of two ways:
- a job, `run(fn)`: `fn(conn)` runs on the loop itself (the cheapest: no switch of thread);
- a turn, `turn()`: a context manager in which the caller's own code uses the connection while
  the loop waits for it (a request whose view, and its Idempotency-Key answer, are one change).

Before each member the loop asks SQLite whether the transaction is still open. SQLite rolls it
back by itself on some errors (a full disk, an I/O error): then every member of the group gets
the error, and none of their writes is in the file (a SAVEPOINT on a rolled-back connection
would begin a transaction of its own, whose RELEASE would commit a write reported as failed).

A member's code may also add counts (`WritesInGroups.add_counts`: the store's tallies of what each change
moved). They follow its savepoints (undone with one that rolls back) and are written once for the
whole group, last in its transaction, by `write_counts(conn, counts)`: one statement a key a group
rather than a member (five a restart, measured: a third of its statements).

Under gevent (the service's node) the loop is a greenlet and members are greenlets; among OS
threads (the tests, the commands) it is a thread. The code is the same.
"""

import collections
import contextvars
import copy
import logging
import os
import threading
import time
from contextlib import contextmanager

from stepd.model import Unavailable, Unwritable

log = logging.getLogger("stepd.writer")

MAX_GROUP = 64  # members in one transaction at most: a group holds the lock for one group only
ROLLED_BACK = "database or disk is full: the transaction was rolled back"

# The member whose code holds a writer's connection now (in a turn or a job): a nested write is
# then a savepoint of that member, and a read inside it sees the member's own changes. A context
# variable is per thread and per greenlet, as a caller is.
holding = contextvars.ContextVar("stepd_writer_holding", default=None)


class _Member:
    """One caller's write in a group: a job (`fn`) or a turn (its caller's own code)."""

    def __init__(self, writer, fn=None, done=None, between=False):
        self.writer = writer
        self.fn = fn
        self.between = between  # run between two groups, outside any transaction (`between`)
        self.done = done  # (result, error) -> None, called on the loop once the group ended (`submit`)
        self.result = None
        self.error = None  # its own error, or the group's
        self.turn = threading.Event()  # the loop lends the connection (turns only)
        self.body_done = threading.Event()  # the caller gives it back
        self.finished = threading.Event()  # the group committed, or failed
        self.own_failure = False  # its body raised: the group commits without it
        self.count_levels = []  # the counts added in each savepoint open in its code, innermost last


class Writer:
    """The loop owning `connect()`'s connection; `take_lock()` / `drop_lock()` around each group
    keep other processes' writers out (the file lock, db.py). `begin`: the statement that opens a
    group (SQLite's BEGIN IMMEDIATE takes the write lock at once; PostgreSQL's is a plain BEGIN)."""

    def __init__(self, connect, take_lock, drop_lock, begin="BEGIN IMMEDIATE"):
        self.pid = os.getpid()
        self._connect = connect
        self._take_lock = take_lock  # () -> None once taken; raises model.Busy past its deadline
        self._drop_lock = drop_lock
        self._begin_sql = begin
        self.conn = None
        self._waiting = collections.deque()
        self._changed = threading.Condition()
        self._closing = False
        self.committed = [0, 0]  # groups committed, and the members they held (tests, benchmark)
        # Hooks run last in every group, inside its transaction, in the order added (the dispatcher's
        # claims): each is (conn) -> None or a callable, called with whether the group committed once
        # it is known. hook -> (due, in_savepoint): how it runs (WritesInGroups.at_end_of_groups).
        self.ended_groups = {}
        # The counts of the open group's members whose savepoints were kept (WritesInGroups.add_counts), and
        # what writes them, last in the group's transaction (None: each member writes its own).
        self.group_counts = collections.Counter()
        self.write_counts = None
        self._thread = threading.Thread(target=self._loop, name="stepd-writer", daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait()

    # -- the callers' side -----------------------------------------------------------------
    def run(self, fn):
        """`fn(conn)` in a group, on the loop; its result once the group committed."""
        member = self._submit(_Member(self, fn))
        self._wait_finished(member)
        return member.result

    def submit(self, fn, done):
        """`fn(conn)` in a group, on the loop, without waiting: `done(result, error)` is called on
        the loop once its group committed (error None) or failed (a runner's outcomes: the node's
        reader goes on reading meanwhile)."""
        self._submit(_Member(self, fn, done))

    def between(self, fn):
        """`fn(conn)` on the loop between two groups, outside any transaction (what SQLite will
        not do inside one: a checkpoint that lets the log start again); its result."""
        member = self._submit(_Member(self, fn, between=True))
        self._wait_finished(member)
        return member.result

    @contextmanager
    def turn(self, rollback=False):
        """The connection for the caller's own code, in a savepoint, in the next group; returns once
        the group committed (raises the group's error if it did not). `rollback`: the savepoint is
        undone even when the code succeeds (a dry run)."""
        member = self._submit(_Member(self))
        member.turn.wait()
        if member.error is not None:  # the group failed before this member's turn
            raise _copy(member.error)
        token = holding.set(member)
        try:
            with savepoint(self.conn, "member", rollback):
                yield self.conn
        except BaseException:
            member.own_failure = True
            raise
        finally:
            holding.reset(token)
            member.body_done.set()
        self._wait_finished(member)

    def _submit(self, member):
        with self._changed:
            if self._closing:
                raise RuntimeError("the writer is closed")
            self._waiting.append(member)
            self._changed.notify()
        return member

    def _wait_finished(self, member):
        member.finished.wait()
        if member.error is not None:  # its own (raised once, here), or the group's (one per member)
            raise member.error if member.own_failure else _copy(member.error)

    def close(self):
        """Finish the groups waiting, close the connection and end the loop."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    # -- the loop --------------------------------------------------------------------------
    def _loop(self):
        self.conn = self._connect()
        self._started.set()
        try:
            while True:
                first = self._next(block=True)
                if first is None:
                    return
                if first.between:
                    self._run_between(first)
                else:
                    self._group(first)
        finally:
            self.conn.close()

    def _group(self, first):
        conn = self.conn
        try:
            self._begin()
        except BaseException as exc:  # busy past the timeout: all who waited as long get it
            self._finish([first, *self._drain()], exc)
            return
        members, member, afterwards = [], first, []
        try:
            while member is not None:
                if not conn.in_transaction:  # SQLite rolled it back under an earlier member
                    raise _no_transaction(conn)
                if not members and member.fn is not None:
                    if not self._serve_first(member):
                        return  # it failed: the transaction held only it, and is rolled back
                else:
                    self._serve(member)
                members.append(member)
                member = self._next_in_group(len(members))
            if not conn.in_transaction:
                raise _no_transaction(conn)
            afterwards = [
                after for ended, how in list(self.ended_groups.items()) if (after := self._run_ended(ended, *how))
            ]
            self._write_group_counts()
            conn.execute("COMMIT")
        except BaseException as exc:
            if member is not None and member not in members:
                members.append(member)
            self._abandon()
            self._tell(afterwards, committed=False)
            self._finish([*members, *self._drain()], exc)
            return
        self._drop_lock()
        self.committed[0] += 1
        self.committed[1] += len(members)
        self._tell(afterwards, committed=True)
        self._finish(members, None)

    def _write_group_counts(self):
        counts, self.group_counts = self.group_counts, collections.Counter()
        if counts:
            self.write_counts(self.conn, counts)

    def _begin(self):
        self._take_lock()
        try:
            self.conn.execute(self._begin_sql)
        except BaseException:
            self._drop_lock()
            raise

    def _next_in_group(self, served):
        if served >= MAX_GROUP:
            return None
        member = self._next(block=False)
        if member is None:
            _let_ready_callers_join()
            member = self._next(block=False)
        return member

    def _next(self, block):
        """The next waiting member (None: none, or closing and none left). Not a `between` member
        while a group is open (block=False): it ends the group, and runs after its COMMIT."""
        with self._changed:
            while block and not self._waiting and not self._closing:
                self._changed.wait()
            if not self._waiting or (not block and self._waiting[0].between):
                return None
            return self._waiting.popleft()

    def _run_between(self, member):
        try:
            member.result = member.fn(self.conn)
        except Exception as exc:
            member.error, member.own_failure = exc, True
        self._finish([member], None)

    def _serve(self, member):
        """Give `member` the connection: run its job here, or lend it to its caller until done."""
        if member.fn is None:
            member.turn.set()
            member.body_done.wait()
            return
        try:
            member.result = self._run_job(member, "job")
        except Exception as exc:  # the job's own error, for its caller; the group goes on
            member.error, member.own_failure = exc, True

    def _serve_first(self, member):
        """Run the group's first member, a job, with no savepoint of its own: the transaction holds
        nothing else yet, so its failure undoes the transaction, and ends the group for it alone
        (the members waiting go in the next). Whether it succeeded. Two statements less a group
        (on PostgreSQL, subtransactions the server need not keep)."""
        token = holding.set(member)
        member.count_levels.append(collections.Counter())  # what a savepoint of its own would count
        try:
            member.result = member.fn(self.conn)
            self.group_counts.update(member.count_levels.pop())
            return True
        except Exception as exc:  # the job's own error, for its caller
            member.error, member.own_failure = exc, True
            member.count_levels.clear()
        finally:
            holding.reset(token)
        self._abandon()
        self._finish([member], None)
        return False

    def _abandon(self):
        """Give up the open group's transaction: its counts, its writes, the lock."""
        self.group_counts.clear()
        self._rollback()
        self._drop_lock()

    def _run_job(self, member, name):
        token = holding.set(member)
        try:
            with savepoint(self.conn, name):
                return member.fn(self.conn)
        finally:
            holding.reset(token)

    def _run_ended(self, ended, due, in_savepoint):
        """A hook at the end of a group, in a savepoint: one that fails undoes only itself. A hook
        that is not due now, or writes nothing, runs without one: SAVEPOINT and RELEASE are two
        round trips to PostgreSQL's server, in every group."""
        if due is not None and not due():
            return None
        if not in_savepoint:
            try:
                return ended(self.conn)
            except Exception:  # it wrote nothing: nothing to undo
                log.exception("a writer hook failed at the end of a group; the group commits without it")
                return None
        try:
            return self._run_job(_Member(self, ended), "ended")
        except Exception:
            if not self.conn.in_transaction:
                raise _no_transaction(self.conn) from None
            log.exception("a writer hook failed at the end of a group; the group commits without it")
            return None

    @staticmethod
    def _tell(afterwards, committed):
        for after in afterwards:
            try:
                after(committed)
            except Exception:
                log.exception("a writer hook failed after its group")

    def _rollback(self):
        if self.conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
            self.conn.execute("ROLLBACK")

    def _drain(self):
        """The members waiting, who share a failed group's error; `between` members stay (they
        are not part of a group, and run once the loop comes round to them)."""
        with self._changed:
            waiting = [member for member in self._waiting if not member.between]
            self._waiting = collections.deque(member for member in self._waiting if member.between)
        return waiting

    @staticmethod
    def _finish(members, error):
        """Wake every member; `error`: the group's, for each that has none of its own."""
        for member in members:
            if error is not None and not member.own_failure:
                member.error = error
            member.turn.set()  # one still waiting for its turn learns the group failed
            member.finished.set()
            if member.done is not None:
                try:
                    member.done(member.result, member.error)
                except Exception:
                    log.exception("what follows a write failed")


class WritesInGroups:
    """What a database (db.Database, postgres.PostgresDatabase) does with its process's writer, written
    once: each makes its Writer (`_new_writer`) and keeps `_threads_lock` and `_writer_state`."""

    def at_end_of_groups(self, hook, due=None, writes=True):
        """Run `hook(conn)` last in every group of this process's writer, inside its transaction;
        it returns None or a callable, called with whether the group committed (the node's claims).
        `due()`, when given, says whether it has anything to do in this group (if not, it is passed
        over); a hook that `writes` nothing runs outside a savepoint of its own."""
        self._writer().ended_groups[hook] = (due, writes)

    def not_at_end_of_groups(self, hook):
        self._writer().ended_groups.pop(hook, None)

    def between_groups(self, fn):
        """`fn(conn)` on this process's write connection between two of its groups, outside any
        transaction (Writer.between); its result."""
        return self._writer().between(fn)

    def write_connection(self):
        """This process's write connection, on which every write transaction runs (a test that
        sets a pragma on the writes, such as max_page_count to fill the disk, uses this)."""
        return self._writer().conn

    def group_commits(self):
        """(write transactions this process committed, the writes they held): how well concurrent
        writes were grouped."""
        return tuple(self._writer().committed)

    def _holding(self):
        """The writer's member whose code runs here now, if it is this database's."""
        member = holding.get()
        writer = self._writer_state
        return member if member is not None and member.writer is writer else None

    def _close_writer(self):
        """Close this process's writer and its connection, unless the caller is inside one of its
        writes (its group still needs the connection)."""
        if self._holding() is not None:
            return
        with self._threads_lock:
            writer, self._writer_state = self._writer_state, None
        if writer is not None and writer.pid == os.getpid():
            writer.close()

    def add_counts(self, counts):
        """Add `counts` ({key: n}) to the open group's, in the savepoint open now in this caller's
        write: written once at the group's end (`count_in_groups`), undone with that savepoint.
        False outside a write of this database, or where nothing writes them: the caller writes
        its own."""
        member = self._holding()
        if member is None or not member.count_levels or member.writer.write_counts is None:
            return False
        member.count_levels[-1].update(counts)
        return True

    def count_in_groups(self, write_counts):
        """Have every writer of this database write its members' counts once a group, with
        `write_counts(conn, counts)` (`add_counts`)."""
        self._write_counts = write_counts
        with self._threads_lock:  # the writers made from now on get it (`_writer`); none is made here
            if self._writer_state is not None:
                self._writer_state.write_counts = write_counts

    def refuse_writes(self, reason):
        """Make any write of this process a RuntimeError(`reason`), which no caller catches: the HTTP
        front writes nothing itself (handoff.py), so a write there is a mistake in stepd's code."""
        self._refusal = reason

    def _writer(self):
        """This process's writer (one per process: after a fork the child makes its own)."""
        if getattr(self, "_refusal", None):
            raise RuntimeError(self._refusal)
        with self._threads_lock:
            if self._writer_state is None or self._writer_state.pid != os.getpid():
                self._writer_state = self._new_writer()
                self._writer_state.write_counts = getattr(self, "_write_counts", None)
            return self._writer_state


@contextmanager
def savepoint(conn, name, rollback=False):
    """A savepoint on `conn`, undone if the body raises (or `rollback`). SQLite may have rolled
    the whole transaction back meanwhile (a full disk): then there is no savepoint left, and the
    body's own error is the one that surfaces. The counts added inside (`add_counts`) go to the
    savepoint around it, or to the group once the member's own is kept, or nowhere if undone
    (`WritesInGroups.add_counts`)."""
    member = holding.get()
    levels = member.count_levels if member is not None and member.writer.conn is conn else None
    if levels is not None:
        levels.append(collections.Counter())
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        rollback = True
        raise
    finally:
        counted = levels.pop() if levels is not None else None
        if conn.in_transaction:
            if rollback:
                conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")
        if counted and not rollback:
            (levels[-1] if levels else member.writer.group_counts).update(counted)


def _no_transaction(conn):
    """The error of a group whose transaction is gone under it: SQLite rolled it back (a full disk,
    an I/O error), or PostgreSQL's connection was lost (`lost`: the server restarted or ended it)."""
    if getattr(conn, "lost", False):
        return Unavailable("the connection to the database was lost; nothing of this write was kept")
    return Unwritable(ROLLED_BACK)


def _let_ready_callers_join():
    """One turn of gevent's loop (a sleep(0)), when this process runs on gevent, so the requests
    that are ready join this group rather than the next. Among OS threads it is not done: there
    sleep(0) hands the GIL away for up to the switch interval while the group holds the lock."""
    if time.sleep.__module__.startswith("gevent"):
        time.sleep(0)


def _copy(exc):
    """The same error for another member (an exception object is raised in one place only)."""
    return copy.copy(exc)
