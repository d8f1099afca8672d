"""The SQLite file: connections, WAL, the writer's turn, transactions, savepoints, migrations.

The only module that imports sqlite3. SQLite's errors leave it as the domain's own
(model.Busy, Unwritable, Unavailable, Unusable, Conflict), so no caller needs to know
SQLite's wording; any other sqlite3 error is unexpected and stays as it is (a 500).
"""

import fcntl
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from migrations import MIGRATIONS
from model import Busy, Conflict, Unavailable, Unusable, Unwritable

BUSY_TIMEOUT_MS = 5000
JOURNAL_SIZE_LIMIT = 1024 * 1024
# The runners copy the log into the file once a second (Runner._heartbeat_loop), off every
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


class Database:
    """One SQLite file; one connection per thread; explicit transactions."""

    def __init__(self, path, sync="full"):
        self.path = str(path)
        self.sync = sync.upper()  # STEPD_SYNC: FULL or NORMAL, checked by config.py
        self._local = threading.local()
        self._threads_lock = threading.Lock()
        self._lock_owner = None
        self._lock_fd = None

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

    def ping(self):
        """Raise Unavailable unless the database answers a read."""
        try:
            self.connection().execute("SELECT 1 FROM processes LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise Unavailable(str(exc)) from exc

    # -- connections -----------------------------------------------------------------------
    def _connect(self):
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing implicit.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
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
        """This thread's connection (made on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def close(self):
        """Close this thread's connection (e.g. before a fork)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

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
        """A write transaction: takes the write lock at once, commits or rolls back.

        Inside another write transaction of this thread it is a savepoint of that one, so a
        request can wrap several changes in one atomic change (Idempotency-Key, dry run).
        `rollback=True` checks everything and then undoes it (dry run).
        """
        conn = self.connection()
        if getattr(self._local, "writing", False):
            with sqlite_errors(), self._savepoint(conn, rollback):
                yield conn
            return
        if conn.in_transaction:
            raise RuntimeError("a write transaction cannot start inside a read snapshot")
        self._local.on_commit = []
        with sqlite_errors(), self._writer_turn():
            conn.execute("BEGIN IMMEDIATE")
            self._local.writing = True
            try:
                yield conn
                if not conn.in_transaction:  # SQLite rolled it back (a full disk) and someone caught that
                    raise Unwritable("database or disk is full: the transaction was rolled back")
                conn.execute("ROLLBACK" if rollback else "COMMIT")
            except BaseException:
                if conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._local.writing = False
                callbacks, self._local.on_commit = self._local.on_commit, []
        if not rollback:
            for callback in callbacks:
                callback()

    @contextmanager
    def _savepoint(self, conn, rollback):
        callbacks_before = len(self._local.on_commit)
        conn.execute("SAVEPOINT nested")
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
                    conn.execute("ROLLBACK TO nested")
                conn.execute("RELEASE nested")

    def in_transaction(self):
        """Whether this thread's connection is inside a transaction (SQLite ends one by itself
        on some errors, a full disk among them)."""
        return self.connection().in_transaction

    def on_commit(self, callback):
        """Call `callback` once this thread's write transaction commits (now, if none is open);
        never if it rolls back."""
        if getattr(self._local, "writing", False):
            self._local.on_commit.append(callback)
        else:
            callback()

    @contextmanager
    def _writer_turn(self):
        """Wait for this writer's turn: threads on a lock, processes on a lock file.

        SQLite alone would do, but its busy handler polls with sleeps growing to 100 ms, so
        under contention some writers wait far longer than others. Here a waiting thread
        wakes as soon as the lock is free, and processes poll every millisecond or two.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        if not self._threads_lock.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
            raise Busy("database is locked (by this process's other writers)")
        try:
            fd = self._lock_file()
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Busy("database is locked (by another process)") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.002)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._threads_lock.release()

    def _lock_file(self):
        # One descriptor per process: a descriptor inherited across fork would share the lock.
        if self._lock_owner != os.getpid():
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            self._lock_owner = os.getpid()
        return self._lock_fd
