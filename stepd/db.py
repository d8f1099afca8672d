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

from stepd.migrations import MIGRATIONS
from stepd.model import Busy, Conflict, Unavailable, Unusable, Unwritable
from stepd.writer import Writer, WritesInGroups, savepoint

BUSY_TIMEOUT_MS = 5000
# The node copies the log into the file four times a second (its checkpoint chore, wiring.py, and
# `Database.checkpoint`), off every request's path, and the log then starts again from its
# beginning. SQLite's own automatic checkpoint, run inside whichever COMMIT crosses its threshold
# (1,000 pages), would put that copy and its fsync inside a request; it is kept only as a bound
# on the log when no node runs (the commands), at a size the node's checkpoints never let the
# log reach.
AUTOCHECKPOINT_PAGES = 20_000
# A log that grew past this (a burst of large writes) is cut back to it when it starts again, so
# its disk space comes back. Above what a second of writes fills at full speed (~10 MB measured),
# so that in steady work the log is written over in place: cutting it back each second, inside a
# COMMIT, cost milliseconds of freeing and then growing the file again.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
# The log is made to start again (`Database.checkpoint`, step 2) once it holds this many pages
# (32 MB of 4 KB pages): that step holds the writes for its copy and two syncs (2-20 ms measured),
# so the longer between two, the fewer requests wait on one; well below JOURNAL_SIZE_LIMIT.
RESTART_LOG_PAGES = 8192
# No memory map of the file (set, not left to how SQLite was built): each connection reads into its
# own cache, bounded (cache_size), and the kernel's page cache keeps the file. A map of up to 1 GB paid
# off while several processes wrote the file and each dropped the others' cache on every write. With
# one writer a process it gains little (GET one step 1,658/s with it, 1,660 without; the deferred
# restart row about 4% in an interleaved A/B), and the mapped pages of a file that grows with every
# attempt were the node's only memory growth: resident +32.8% from 10,000 to 100,000 restarts with
# the map, +4.0% without (BENCHMARKS.md). A node's memory that stays put is worth the 4%.
MMAP_BYTES = 0
SCHEMA_VERSION = len(MIGRATIONS)

# SQLite's words for a database that cannot take a write now but may later: the disk is full,
# or the file was made read-only. Reads still work, and a retry may succeed once it clears.
UNWRITABLE = ("database or disk is full", "attempt to write a readonly database")


def statements(script):
    """The statements of one migration, split on ';' where SQLite says one is complete (a
    trigger's body keeps its own)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


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


def _domain(error):
    """The domain's error for `error` where it has one (else `error` itself; None stays None)."""
    if isinstance(error, sqlite3.Error):
        return domain_error(error) or error
    return error


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


def _copy_back(conn):
    """One PASSIVE checkpoint on `conn`: whatever of the log no reader still needs. Returns the
    log's length in pages (-1 when the file is not in WAL mode)."""
    with sqlite_errors():
        return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def _off_the_loop(fn):
    """`fn()` on a native thread (gevent's pool) when this process runs on gevent, else here."""
    if time.sleep.__module__.startswith("gevent"):
        import gevent  # noqa: PLC0415 - only a process on gevent gets here

        return gevent.get_hub().threadpool.apply(fn)
    return fn()


class Database(WritesInGroups):
    """One SQLite file; one connection per thread; explicit transactions."""

    dialect = "sqlite"  # the store's spelling where a statement must differ (store.py)

    def __init__(self, path, sync="full"):
        self.path = str(path)
        self.sync = sync.upper()  # STEPD_SYNC: FULL or NORMAL, checked by config.py
        self._local = threading.local()
        self._threads_lock = threading.Lock()
        self._lock_owner = None
        self._lock_fd = None
        self._writer_state = None  # a writer.Writer, made on the first write of each process

    def release(self):
        """Nothing to give back: an SQLite connection per thread costs no server process
        (postgres.PostgresDatabase.release lends its connections from a pool)."""

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
                if callable(script):
                    script(conn)
                else:
                    for statement in statements(script):
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
        return SCHEMA_VERSION

    def checkpoint(self):
        """Copy the write-ahead log back into the file, and let it start again from its beginning
        once it is long; the node does it every wiring.CHECKPOINT_SECONDS. Two steps, neither on gevent's loop
        (SQLite lets go of the GIL while it copies pages and syncs, so the loop's requests go on):

        1. the bulk, with a connection of this thread's own, beside the writes: a PASSIVE
           checkpoint never waits on the writer;
        2. once the log holds RESTART_LOG_PAGES, the frames committed during 1, by the writer's
           connection between two groups (the writes wait for that short copy): the whole log is
           then in the file, and the next group's first write starts the log again.

        Without 2 a log written without a pause is never all copied when a write begins, so it
        never starts again: it grew to AUTOCHECKPOINT_PAGES (80 MB), where one COMMIT ran SQLite's
        own checkpoint and the next cut the file back, 25-65 ms inside the groups (measured at
        500 restarts/s: the fixed-rate row's p99)."""
        log_pages = _off_the_loop(lambda: _copy_back(self.connection()))
        if log_pages >= RESTART_LOG_PAGES:
            self.between_groups(lambda conn: _off_the_loop(lambda: _copy_back(conn)))

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
        # process's write connection, lent by the writer's loop to one caller at a time.
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=not shared
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._use_wal(conn)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA synchronous = {self.sync}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        # Statement and savepoint journals in memory, not in a temporary file: every write is a
        # savepoint of its group, and every statement that fires the tallies' triggers (migration 7)
        # keeps a statement journal (measured: +31 us a step transition in temporary files, +9 in memory).
        conn.execute("PRAGMA temp_store = MEMORY")
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
        """This caller's connection (made on first use); inside a write, the write connection, so
        that a read there sees the write's own changes."""
        member = self._holding()
        if member is not None:
            return member.writer.conn
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
        self._close_writer()

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
        """A write transaction: this caller's code gets the write connection in its turn and
        returns once its group committed (writer.py). Each caller runs in a savepoint of its own
        and keeps its own error; callers writing at the same moment share one commit.

        Inside another write transaction of this caller it is a savepoint of that one, so a
        request can wrap several changes in one atomic change (Idempotency-Key, dry run).
        `rollback=True` checks everything and then undoes it (dry run).
        """
        member = self._holding()
        if member is not None:
            with sqlite_errors(), savepoint(member.writer.conn, "nested", rollback):
                yield member.writer.conn
            return
        if self.connection().in_transaction:
            raise RuntimeError("a write transaction cannot start inside a read snapshot")
        with sqlite_errors(), self._writer().turn(rollback) as conn:
            yield conn

    def write(self, fn):
        """`fn(conn)` as one write, run on the writer's loop (no switch to the caller's thread
        and back); its result once its group committed."""
        member = self._holding()
        if member is not None:
            with self.transaction() as conn:
                return fn(conn)
        with sqlite_errors():
            return self._writer().run(fn)

    def submit(self, fn, done):
        """`fn(conn)` as one write on the writer's loop, without waiting: `done(result, error)` is
        called on the loop once its group committed (error None) or failed (the domain's error)."""

        def finished(result, error):
            done(result, _domain(error))

        self._writer().submit(fn, finished)

    def _new_writer(self):
        return Writer(lambda: self._connect(shared=True), self._take_lock, self._drop_lock)

    def _lock_file(self):
        # One descriptor per process: a descriptor inherited across fork would share the lock.
        if self._lock_owner != os.getpid():
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            self._lock_owner = os.getpid()
        return self._lock_fd

    def _take_lock(self):
        """The lock file, which every process's writer takes before BEGIN IMMEDIATE.

        SQLite alone would do, but its busy handler polls with sleeps growing to 100 ms, so
        under contention some writers wait far longer than others; here a process polls every
        millisecond or two (a sleep, so a gevent worker's other requests run meanwhile).
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        fd, delay = self._lock_file(), 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Busy("database is locked (by another process)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.002)

    def _drop_lock(self):
        fcntl.flock(self._lock_file(), fcntl.LOCK_UN)
