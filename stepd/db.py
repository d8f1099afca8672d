"""The SQLite file: connections, WAL, the writer's turn, transactions, savepoints, migrations.

The only module that imports sqlite3. SQLite's errors leave it as the domain's own
(model.Busy, Unwritable, Unavailable, Unusable, Conflict), so no caller needs to know
SQLite's wording; any other sqlite3 error is unexpected and stays as it is (a 500).
"""

import copy
import fcntl
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from stepd.migrations import MIGRATIONS
from stepd.model import Busy, Conflict, Unavailable, Unusable, Unwritable

BUSY_TIMEOUT_MS = 5000
JOURNAL_SIZE_LIMIT = 1024 * 1024
# The runners copy the log into the file once a second (their checkpoint chore, wiring.py), off every
# request's path. SQLite's own automatic checkpoint, run inside whichever COMMIT crosses its
# threshold (1,000 pages), would put that copy and its fsync inside a request; it is kept only
# as a bound on the log when no runner runs at all, at a size the runners' checkpoints never
# let the log reach.
AUTOCHECKPOINT_PAGES = 20_000
# Reads of the file through a memory map, not read() into each connection's own cache: a
# connection's cache is dropped whenever another process wrote since its last transaction
# (every request, with two workers and a runner writing), and a mapped page costs no copy.
MMAP_BYTES = 1 << 30
SCHEMA_VERSION = len(MIGRATIONS)
MAX_GROUP = 64  # callers in one group transaction at most (the lock is held for one group only)

# SQLite's words for a database that cannot take a write now but may later: the disk is full,
# or the file was made read-only. Reads still work, and a retry may succeed once it clears.
UNWRITABLE = ("database or disk is full", "attempt to write a readonly database")


def domain_error(exc):
    """The domain's error for a sqlite3 error, or None when it is an unexpected one."""
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(str(exc))
    if not isinstance(exc, sqlite3.OperationalError):
        return None
    text = str(exc)
    if "locked" in text or "busy" in text:
        return Busy(text)
    if any(words in text for words in UNWRITABLE):
        return Unwritable(text)
    return None


@contextmanager
def sqlite_errors():
    """Raise SQLite's errors inside as the domain's (those it has a name for)."""
    try:
        yield
    except sqlite3.Error as exc:
        translated = domain_error(exc)
        if translated is None:
            raise
        raise translated from exc


def read_only(path):
    """A connection that cannot change the file (SQLite's read-only mode), rows as sqlite3.Row:
    for readers outside the service (invariants.py, `stepd check`)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


class Database:
    """One SQLite file; one connection per thread; explicit transactions."""

    def __init__(self, path, sync="full"):
        self.path = str(path)
        self.sync = sync.upper()  # STEPD_SYNC: FULL or NORMAL, checked by config.py
        self._local = threading.local()
        self._threads_lock = threading.Lock()
        self._lock_owner = None
        self._lock_fd = None
        self._writer_state = None  # a _Writer, made on the first write of each process

    # -- the boot sequence -----------------------------------------------------------------
    def prepare(self):
        """Make the file if needed, migrate it, and close this thread's connection (so none is
        inherited across a fork). Raises Unusable, with one line saying why, if it cannot be used."""
        try:
            self.create_file()
            self.migrate()
        except OSError as exc:
            raise Unusable(str(exc)) from exc
        except (sqlite3.DatabaseError, Busy, Unwritable) as exc:
            raise Unusable(str(exc)) from exc
        finally:
            self.close()

    def create_file(self):
        """Make the file's folder, and the file readable by its owner only (SQLite gives -wal and
        -shm the same mode), before the first connection creates it with the default umask."""
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))

    def migrate(self):
        """Bring the schema to the newest version; safe to run from several processes."""
        # A current schema (as every worker finds it after the master's migration) needs no write
        # lock: a worker starting while a writer holds it must not fail, or gunicorn stops the service.
        if self.connection().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return SCHEMA_VERSION
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise Unusable(f"{self.path} has schema version {version}; this stepd knows up to {SCHEMA_VERSION}")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
        return SCHEMA_VERSION

    def checkpoint(self):
        """Copy the write-ahead log back into the file where no reader needs it (never waits on
        a writer); the runners do it once a second, so the log stays short."""
        with sqlite_errors():
            self.connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def backup(self, target):
        """Copy the database to `target` with SQLite's online backup, in one step: one consistent
        state, taken beside running writers (WAL: a reader never blocks them). Written to a
        temporary file first and renamed, so `target` is never half a copy. Returns its pages."""
        target = Path(target)
        partial = target.with_name(target.name + ".part")
        partial.unlink(missing_ok=True)
        # Readable by its owner only, as the database is: the copy holds every param and the tokens' hashes.
        os.close(os.open(partial, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        with sqlite_errors():
            source = read_only(self.path)
            copy = sqlite3.connect(partial)
            try:
                source.backup(copy)
                pages = copy.execute("PRAGMA page_count").fetchone()[0]
            finally:
                copy.close()
                source.close()
        os.replace(partial, target)
        return pages

    def ping(self):
        """Raise Unavailable unless the database answers a read."""
        try:
            self.connection().execute("SELECT 1 FROM processes LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise Unavailable(str(exc)) from exc

    # -- connections -----------------------------------------------------------------------
    def _connect(self, shared=False):
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing implicit. `shared`: the
        # process's write connection, used by one caller at a time (under the _Writer's condition).
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=not shared
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._use_wal(conn)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA synchronous = {self.sync}")
        # A log that grew (a burst of large writes) is cut back to this once it restarts, so
        # its disk space comes back.
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        return conn

    @staticmethod
    def _use_wal(conn):
        """Switch the file to WAL once. Switching does not wait on the busy timeout (SQLite answers
        "locked" at once while another connection creates the file), so wait here."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if not isinstance(domain_error(exc), Busy) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def connection(self):
        """This caller's connection (made on first use); inside a write, the write connection."""
        if getattr(self._local, "writing", False):
            return self._writer_state.conn
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def close(self):
        """Close this caller's connection, and this process's write connection (e.g. before a fork)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._threads_lock:
            writer, self._writer_state = self._writer_state, None
        if writer is not None and writer.pid == os.getpid() and writer.group is None:
            writer.conn.close()

    # -- reads -----------------------------------------------------------------------------
    def rows(self, sql, args=()):
        """All rows of one query, on this thread's connection (inside its transaction, if one is open)."""
        with sqlite_errors():
            return self.connection().execute(sql, args).fetchall()

    def row(self, sql, args=()):
        """The first row of one query, or None."""
        with sqlite_errors():
            return self.connection().execute(sql, args).fetchone()

    @contextmanager
    def snapshot(self):
        """A read transaction: every query inside sees the same state."""
        conn = self.connection()
        if conn.in_transaction:  # inside a write transaction: it already sees one state
            yield conn
            return
        with sqlite_errors():
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    # -- writes ----------------------------------------------------------------------------
    @contextmanager
    def transaction(self, rollback=False):
        """A write transaction: takes the write lock, commits or rolls back.

        Inside another write transaction of this caller it is a savepoint of that one, so a
        request can wrap several changes in one atomic change (Idempotency-Key, dry run).
        `rollback=True` checks everything and then undoes it (dry run).

        The callers of one process that write at the same moment share one SQLite transaction
        (group commit, `_Group`): each runs in a savepoint of its own, on the process's one
        write connection, one after the other; each gets its own error, and none returns before
        the shared COMMIT succeeded. A batch costs one turn at the lock and one commit however
        many requests it holds.
        """
        conn = self.connection()  # inside a write: the process's write connection
        if getattr(self._local, "writing", False):
            with sqlite_errors(), self._savepoint(conn, rollback):
                yield conn
            return
        if conn.in_transaction:
            raise RuntimeError("a write transaction cannot start inside a read snapshot")
        self._local.on_commit = []
        with sqlite_errors():
            group = self._writer().join()
        try:
            with sqlite_errors(), group.body() as conn:
                self._local.writing = True
                try:
                    with self._savepoint(conn, rollback, name="member"):
                        yield conn
                    if not conn.in_transaction:  # SQLite rolled it back (a full disk) and someone caught that
                        raise Unwritable("database or disk is full: the transaction was rolled back")
                finally:
                    self._local.writing = False
        except BaseException:
            group.leave()  # the others' writes still commit; this one's savepoint is undone
            self._local.on_commit = []
            raise
        group.leave()
        with sqlite_errors():
            group.wait_committed()
        callbacks, self._local.on_commit = self._local.on_commit, []
        if not rollback:
            for callback in callbacks:
                callback()

    @contextmanager
    def _savepoint(self, conn, rollback, name="nested"):
        callbacks_before = len(self._local.on_commit)
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            rollback = True
            raise
        finally:
            if rollback:  # what was undone must not be acted on after the commit either
                del self._local.on_commit[callbacks_before:]
            # SQLite itself rolls the whole transaction back on some errors (a full disk): then
            # there is no savepoint left, and the original error must be the one that surfaces.
            if conn.in_transaction:
                if rollback:
                    conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")

    def on_commit(self, callback):
        """Call `callback` once this caller's write transaction commits (now, if none is open);
        never if it rolls back."""
        if getattr(self._local, "writing", False):
            self._local.on_commit.append(callback)
        else:
            callback()

    def write_connection(self):
        """This process's write connection, on which every write transaction runs (a test that
        sets a pragma on the writes, such as max_page_count to fill the disk, uses this)."""
        return self._writer().conn

    def group_commits(self):
        """(write transactions this process committed, the writes they held): how well concurrent
        writes were grouped."""
        return tuple(self._writer().committed)

    def _writer(self):
        """This process's writing side: its write connection and the group now open (one per
        process: after a fork the child makes its own)."""
        with self._threads_lock:
            if self._writer_state is None or self._writer_state.pid != os.getpid():
                self._writer_state = _Writer(self._connect(shared=True), self._lock_file())
            return self._writer_state

    def _lock_file(self):
        # One descriptor per process: a descriptor inherited across fork would share the lock.
        if self._lock_owner != os.getpid():
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            self._lock_owner = os.getpid()
        return self._lock_fd


class _Writer:
    """A process's writing side: its one write connection, the lock file, and the group of
    callers sharing a transaction on it now (group commit; see Database.transaction)."""

    def __init__(self, conn, lock_fd):
        self.pid = os.getpid()
        self.conn = conn
        self.lock_fd = lock_fd
        self.changed = threading.Condition()  # guards everything below; waited on by every caller
        self.group = None  # the _Group open now (taking members, or committing)
        self.committed = [0, 0]  # groups committed, and the writes they held (tests, benchmark)
        self.conn_in_use = False  # a member's body runs on conn: savepoints are a stack, one at a time

    def join(self):
        """Become a member of the group open now, or open one; returns it. Busy after the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        with self.changed:
            while self.group is not None and not self.group.accepting:  # committing: wait for the next
                self._wait(deadline, "database is locked (by this process's other writers)")
            if self.group is not None:
                self.group.join()
                return self.group
            group = self.group = _Group(self)
        try:  # the first member opens it: the file's lock, then BEGIN IMMEDIATE (both may wait)
            self._take_lock(deadline)
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
                raise
        except BaseException as exc:
            with self.changed:
                group.failed, group.accepting, group.done, self.group = exc, False, True, None
                self.changed.notify_all()
            raise
        with self.changed:
            group.open = True
            self.changed.notify_all()
        return group

    def _wait(self, deadline, busy_message):
        left = deadline - time.monotonic()
        if left <= 0:
            raise Busy(busy_message)
        self.changed.wait(timeout=left)

    def _take_lock(self, deadline):
        """The lock file, which every process's writer takes before BEGIN IMMEDIATE.

        SQLite alone would do, but its busy handler polls with sleeps growing to 100 ms, so
        under contention some writers wait far longer than others; here a process polls every
        millisecond or two (a sleep, so a gevent worker's other requests run meanwhile).
        """
        delay = 0.0005
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Busy("database is locked (by another process)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.002)


class _Group:
    """Callers of one process sharing one write transaction: each runs its body in a savepoint,
    the last to leave commits, and each returns once that commit is done."""

    def __init__(self, writer):
        self.writer = writer
        self.open = False  # BEGIN IMMEDIATE has run
        self.accepting = True  # new callers may join (until the commit begins, or it is full)
        self.members = 1  # callers in it whose body has not ended (its opener is the first)
        self.size = 1
        self.committing = False
        self.done = False
        self.failed = None  # what stopped the transaction, for every member

    def join(self):  # under writer.changed
        self.members += 1
        self.size += 1
        self.accepting = self.size < MAX_GROUP

    @contextmanager
    def body(self):
        """The write connection, once the transaction is open and no other member's body runs."""
        writer = self.writer
        with writer.changed:
            while not self.failed and (not self.open or writer.conn_in_use):
                writer.changed.wait()
            if not self.failed and not writer.conn.in_transaction:
                # SQLite rolled the group's transaction back under an earlier member (a full disk,
                # an I/O error). A SAVEPOINT now would begin a transaction of its own, and its
                # RELEASE would commit this member's write while the group reports failure.
                self.failed = Unwritable("database or disk is full: the transaction was rolled back")
            if self.failed:
                raise _copy(self.failed)
            writer.conn_in_use = True
        try:
            yield writer.conn
        finally:
            with writer.changed:
                writer.conn_in_use = False
                writer.changed.notify_all()

    def leave(self):
        """This member's body has ended; the last one out commits.

        In a gevent worker it first lets the requests that are ready run, so those that write
        join this transaction instead of waiting for the next one."""
        writer = self.writer
        with writer.changed:
            self.members -= 1
            if self.members or not self.open:
                return
        _let_ready_callers_join()
        with writer.changed:
            if self.members or self.committing:
                return  # someone joined meanwhile: the last of them commits
            self.accepting, self.committing = False, True
        self._commit()

    def _commit(self):
        conn = self.writer.conn
        try:
            if not conn.in_transaction:  # SQLite rolled it all back (a full disk)
                raise Unwritable("database or disk is full: the transaction was rolled back")
            conn.execute("COMMIT")
            self.writer.committed[0] += 1
            self.writer.committed[1] += self.size
        except BaseException as exc:
            self.failed = exc
            if conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                conn.execute("ROLLBACK")
        finally:
            fcntl.flock(self.writer.lock_fd, fcntl.LOCK_UN)
            with self.writer.changed:
                self.done = True
                self.writer.group = None
                self.writer.changed.notify_all()

    def wait_committed(self):
        """Return once the group's transaction committed; raise what stopped it otherwise."""
        with self.writer.changed:
            while not self.done:
                self.writer.changed.wait()
        if self.failed:
            raise _copy(self.failed)


def _let_ready_callers_join():
    """One turn of gevent's loop (a sleep(0)), when this process runs on gevent. Among OS threads
    it is not done: there sleep(0) hands the GIL away for up to the switch interval (5 ms,
    measured as a quarter of a runner's samples) while this process holds the write lock."""
    if time.sleep.__module__.startswith("gevent"):
        time.sleep(0)


def _copy(exc):
    """The same error for another member (an exception object is raised in one place only)."""
    return copy.copy(exc)
