"""SQLite storage: connections, migrations, and every state change of processes and steps.

Each state change is one `BEGIN IMMEDIATE` transaction whose UPDATE is a compare-and-set
on the step's status (and attempt number), so concurrent requests and worker processes
sharing the file can never both win. Rows come out as plain dicts.
"""

import fcntl
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

BUSY_TIMEOUT_MS = 5000
ANSWER_KEPT_SECONDS = 24 * 3600  # how long the answer to a request with an Idempotency-Key counts
MAX_PARAMS = 256

COMPLETED, FAILED = "COMPLETED", "FAILED"  # the outcomes a runner records


class PreconditionFailed(Exception):
    """A request that is well formed but does not fit the current state (HTTP 412)."""

    def __init__(self, errors):
        super().__init__(errors)
        self.errors = errors


def is_busy(exc):
    """Whether a sqlite3 error means another writer held the lock past the busy timeout."""
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


# SQLite's words for a database that cannot take a write now but may later: the disk is full,
# or the file was made read-only. Reads still work, and a retry may succeed once it clears.
UNWRITABLE = ("database or disk is full", "attempt to write a readonly database")


def is_unwritable(exc):
    """Whether a sqlite3 error means the file cannot be written now (disk full, read-only)."""
    return isinstance(exc, sqlite3.OperationalError) and any(words in str(exc) for words in UNWRITABLE)


def iso(moment):
    """A time as stepd writes it: UTC, ISO 8601 with milliseconds and a Z suffix (so it sorts as text)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso():
    return iso(datetime.now(UTC))


def new_id():
    """An opaque URL-safe id (22 characters, 128 random bits)."""
    return secrets.token_urlsafe(16)


# Params are held as {name: (TYPE, value)} in Python and as {name: [TYPE, value]} in JSON.
def params_to_json(params):
    return json.dumps({name: [kind, value] for name, (kind, value) in params.items()}, allow_nan=False)


def params_from_json(text):
    if text is None:
        return None
    return {name: (kind, value) for name, (kind, value) in json.loads(text).items()}


MIGRATIONS = [
    # 1: the initial schema.
    """
    CREATE TABLE processes (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        id          TEXT NOT NULL UNIQUE,
        name        TEXT,
        status      TEXT NOT NULL CHECK (status IN ('RUNNING', 'COMPLETED', 'FAILED')),
        principal   TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    );
    CREATE INDEX processes_by_status ON processes (status, seq);

    CREATE TABLE steps (
        seq            INTEGER PRIMARY KEY AUTOINCREMENT,
        id             TEXT NOT NULL UNIQUE,
        process_id     TEXT NOT NULL REFERENCES processes (id),
        position       INTEGER NOT NULL,
        type           TEXT NOT NULL,
        status         TEXT NOT NULL CHECK (status IN ('PENDING', 'STARTED', 'COMPLETED', 'FAILED')),
        params         TEXT NOT NULL,
        result         TEXT,
        attempts       INTEGER NOT NULL DEFAULT 0,
        error_type     TEXT,
        error_message  TEXT,
        deferred       INTEGER NOT NULL DEFAULT 0,
        runner_id      TEXT,
        created_at     TEXT NOT NULL,
        started_at     TEXT,
        finished_at    TEXT,
        UNIQUE (process_id, position)
    );
    CREATE INDEX steps_by_status ON steps (status, seq);
    CREATE INDEX steps_by_type ON steps (type, seq);

    CREATE TABLE attempts (
        step_id        TEXT NOT NULL REFERENCES steps (id),
        attempt        INTEGER NOT NULL,
        trigger        TEXT NOT NULL CHECK (trigger IN ('start', 'restart')),
        principal      TEXT NOT NULL,
        params         TEXT NOT NULL,
        status         TEXT NOT NULL CHECK (status IN ('STARTED', 'COMPLETED', 'FAILED')),
        error_type     TEXT,
        error_message  TEXT,
        started_at     TEXT NOT NULL,
        finished_at    TEXT,
        PRIMARY KEY (step_id, attempt)
    ) WITHOUT ROWID;

    CREATE TABLE runners (
        id            TEXT PRIMARY KEY,
        host          TEXT NOT NULL,
        pid           INTEGER NOT NULL,
        pid_started   TEXT,
        started_at    TEXT NOT NULL,
        heartbeat_at  REAL NOT NULL
    );

    CREATE TABLE tokens (
        name         TEXT PRIMARY KEY,
        role         TEXT NOT NULL CHECK (role IN ('reader', 'operator')),
        secret_hash  TEXT NOT NULL UNIQUE,
        created_at   TEXT NOT NULL
    );
    """,
    # 2: automatic retries (a step waits STARTED with next_retry_at set), the 'retry' trigger,
    # and stored answers to requests that carried an Idempotency-Key.
    """
    ALTER TABLE steps ADD COLUMN next_retry_at TEXT;
    ALTER TABLE steps ADD COLUMN retries_used INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX steps_due_retries ON steps (next_retry_at) WHERE next_retry_at IS NOT NULL;
    CREATE INDEX steps_running ON steps (runner_id)
        WHERE status = 'STARTED' AND deferred = 0 AND next_retry_at IS NULL;
    CREATE INDEX steps_failed_oldest_first ON steps (finished_at, seq) WHERE status = 'FAILED';

    CREATE TABLE attempts_v2 (
        step_id        TEXT NOT NULL REFERENCES steps (id),
        attempt        INTEGER NOT NULL,
        trigger        TEXT NOT NULL CHECK (trigger IN ('start', 'restart', 'retry')),
        principal      TEXT NOT NULL,
        params         TEXT NOT NULL,
        status         TEXT NOT NULL CHECK (status IN ('STARTED', 'COMPLETED', 'FAILED')),
        error_type     TEXT,
        error_message  TEXT,
        started_at     TEXT NOT NULL,
        finished_at    TEXT,
        PRIMARY KEY (step_id, attempt)
    ) WITHOUT ROWID;
    INSERT INTO attempts_v2 SELECT * FROM attempts;
    DROP TABLE attempts;
    ALTER TABLE attempts_v2 RENAME TO attempts;

    CREATE TABLE idempotent_requests (
        principal    TEXT NOT NULL,
        key          TEXT NOT NULL,
        fingerprint  TEXT NOT NULL,
        status       INTEGER NOT NULL,
        body         TEXT NOT NULL,
        created_at   REAL NOT NULL,
        PRIMARY KEY (principal, key)
    );
    CREATE INDEX idempotent_requests_by_age ON idempotent_requests (created_at);
    """,
]

# `+status` keeps SQLite off the status index: without it the planner walks every FAILED step
# of every process (9 ms at 63,000 of them, inside the write lock) instead of this process's
# few steps through the (process_id, position) index.
REFRESH_PROCESS = """
    UPDATE processes SET updated_at = :now, status = CASE
        WHEN EXISTS (SELECT 1 FROM steps WHERE process_id = :pid AND +status = 'FAILED') THEN 'FAILED'
        WHEN (SELECT status FROM steps WHERE process_id = :pid ORDER BY position DESC LIMIT 1)
             = 'COMPLETED' THEN 'COMPLETED'
        ELSE 'RUNNING' END
    WHERE id = :pid
"""
# Steps a runner is executing right now (the partial index steps_running holds just these).
RUNNING_STEPS = (
    "SELECT id, process_id, attempts, runner_id FROM steps INDEXED BY steps_running"
    " WHERE status = 'STARTED' AND deferred = 0 AND next_retry_at IS NULL"
)
# INDEXED BY: left to itself the planner prefers the status index, which holds every STARTED
# step (deferred ones and those waiting for a retry included).
DUE_RETRIES = (
    "SELECT s.id, s.process_id, s.type, s.params, s.attempts, s.retries_used, a.principal"
    " FROM steps s INDEXED BY steps_due_retries JOIN attempts a ON a.step_id = s.id AND a.attempt = s.attempts"
    " WHERE s.next_retry_at <= ? AND s.status = 'STARTED' ORDER BY s.next_retry_at LIMIT ?"
)

STEP_COLUMNS = (
    "id, process_id, position, type, status, params, result, attempts, error_type, error_message,"
    " deferred, next_retry_at, created_at, started_at, finished_at"
)
PROCESS_COLUMNS = "seq, id, name, status, principal, created_at, updated_at"


def _error(error_type, message):
    return None if error_type is None else {"type": error_type, "message": message}


def _step(row):
    return {
        "id": row["id"],
        "process_id": row["process_id"],
        "position": row["position"],
        "type": row["type"],
        "status": row["status"],
        "params": params_from_json(row["params"]),
        "result": params_from_json(row["result"]),
        "attempts": row["attempts"],
        "error": _error(row["error_type"], row["error_message"]),
        "deferred": bool(row["deferred"]),
        "next_retry_at": row["next_retry_at"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }


def _attempt(row):
    return {
        "attempt": row["attempt"],
        "trigger": row["trigger"],
        "principal": row["principal"],
        "params": params_from_json(row["params"]),
        "status": row["status"],
        "error": _error(row["error_type"], row["error_message"]),
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }


def _process(row):
    return {key: row[key] for key in ("id", "name", "status", "created_at", "updated_at")}


class Store:
    """One SQLite file; one connection per thread; explicit transactions."""

    def __init__(self, path, sync="full"):
        self.path = str(path)
        self.sync = sync.upper()  # STEPD_SYNC: FULL or NORMAL, checked by config.py
        self._local = threading.local()
        self._threads_lock = threading.Lock()
        self._lock_owner = None
        self._lock_fd = None

    def create_file(self):
        """Make the file's folder, and the file readable by its owner only (SQLite gives -wal and
        -shm the same mode), before the first connection creates it with the default umask."""
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))

    # -- connections and transactions ------------------------------------------------
    def _connect(self):
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing implicit.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._use_wal(conn)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA synchronous = {self.sync}")
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
                if not is_busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def connection(self):
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

    @contextmanager
    def transaction(self, rollback=False):
        """A write transaction: takes the write lock at once, commits or rolls back.

        Inside another write transaction of this thread it is a savepoint of that one, so a
        request can wrap several store calls in one atomic change (Idempotency-Key, dry run).
        `rollback=True` checks everything and then undoes it (dry run).
        """
        conn = self.connection()
        if getattr(self._local, "writing", False):
            with self._savepoint(conn, rollback):
                yield conn
            return
        if conn.in_transaction:
            raise RuntimeError("a write transaction cannot start inside a read snapshot")
        self._local.on_commit = []
        with self._writer_turn():
            conn.execute("BEGIN IMMEDIATE")
            self._local.writing = True
            try:
                yield conn
                if not conn.in_transaction:  # SQLite rolled it back (a full disk) and someone caught that
                    raise sqlite3.OperationalError("database or disk is full: the transaction was rolled back")
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

    def on_commit(self, callback):
        """Call `callback` once this thread's write transaction commits (now, if none is open).

        A job handed to the runner before its STARTED row is committed would be dropped as
        stale, so the runner submits through this.
        """
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
            raise sqlite3.OperationalError("database is locked (by this process's other writers)")
        try:
            fd = self._lock_file()
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise sqlite3.OperationalError("database is locked (by another process)") from None
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

    @contextmanager
    def snapshot(self):
        """A read transaction: every query inside sees the same state."""
        conn = self.connection()
        if conn.in_transaction:  # inside a write transaction: it already sees one state
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def ping(self):
        self.connection().execute("SELECT 1 FROM processes LIMIT 1").fetchall()

    def migrate(self):
        """Bring the schema to the newest version; safe to run from several processes."""
        # A current schema (as every worker finds it after the master's migration) needs no write
        # lock: a worker starting while a writer holds it must not fail, or gunicorn stops the service.
        if self.connection().execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
            return len(MIGRATIONS)
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise sqlite3.DatabaseError(
                    f"{self.path} has schema version {version}; this stepd knows up to {len(MIGRATIONS)}"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):  # so: no ';' inside a migration's statements
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
        return len(MIGRATIONS)

    # -- processes -------------------------------------------------------------------
    def create_process(self, name, steps, principal, runner_id):
        """Insert a process and its PENDING steps and start step 0; returns (process, job)."""
        now = now_iso()
        process_id = new_id()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO processes (id, name, status, principal, created_at, updated_at)"
                " VALUES (?, ?, 'RUNNING', ?, ?, ?)",
                (process_id, name, principal, now, now),
            )
            db.executemany(
                "INSERT INTO steps (id, process_id, position, type, status, params, created_at)"
                " VALUES (?, ?, ?, ?, 'PENDING', ?, ?)",
                [
                    (new_id(), process_id, position, step_type, params_to_json(params), now)
                    for position, (step_type, params) in enumerate(steps)
                ],
            )
            job = self._start_step(db, process_id, 0, principal, runner_id, now)
            process = self._load_process(db, process_id)
        return process, job

    def get_process(self, process_id):
        with self.snapshot() as db:
            return self._load_process(db, process_id)

    def list_processes(self, status=None, limit=50, before_seq=None):
        return self._newest_first("processes", PROCESS_COLUMNS, _process, limit, before_seq, status=status)

    def _load_process(self, db, process_id):
        row = db.execute(f"SELECT {PROCESS_COLUMNS} FROM processes WHERE id = ?", (process_id,)).fetchone()
        if row is None:
            return None
        process = _process(row)
        rows = db.execute(
            f"SELECT {STEP_COLUMNS} FROM steps WHERE process_id = ? ORDER BY position", (process_id,)
        ).fetchall()
        process["steps"] = [_step(r) for r in rows]
        return process

    def _newest_first(self, table, columns, convert, limit, before_seq, **equals):
        """A page of `limit` rows, newest first, whose columns equal the given (non-None) values,
        and the seq to continue before (None on the last page)."""
        wanted = {column: value for column, value in equals.items() if value is not None}
        conditions = [f"{column} = ?" for column in wanted]
        args = list(wanted.values())
        if before_seq is not None:
            conditions.append("seq < ?")
            args.append(before_seq)
        where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        rows = (
            self.connection()
            .execute(f"SELECT {columns} FROM {table} {where} ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
            .fetchall()
        )
        next_seq = rows[limit - 1]["seq"] if len(rows) > limit else None
        return [convert(r) for r in rows[:limit]], next_seq

    # -- steps -----------------------------------------------------------------------
    def get_step(self, step_id, with_history=False):
        with self.snapshot() as db:
            row = db.execute(f"SELECT {STEP_COLUMNS} FROM steps WHERE id = ?", (step_id,)).fetchone()
            if row is None:
                return None
            step = _step(row)
            if with_history:
                rows = db.execute("SELECT * FROM attempts WHERE step_id = ? ORDER BY attempt", (step_id,)).fetchall()
                step["attempt_history"] = [_attempt(r) for r in rows]
        return step

    def list_steps(self, status=None, step_type=None, limit=50, before_seq=None):
        columns = f"seq, {STEP_COLUMNS}"
        return self._newest_first("steps", columns, _step, limit, before_seq, status=status, type=step_type)

    def restart_failed_step(self, step_id, overrides, principal, runner_id, has_delegate):
        """FAILED -> STARTED for one step, with the given params laid over the failed ones."""
        now = now_iso()
        with self.transaction() as db:
            row = db.execute(
                "SELECT id, process_id, type, status, params, attempts FROM steps WHERE id = ?", (step_id,)
            ).fetchone()
            if row is None:
                raise PreconditionFailed({"processStepId": ["No step has this id."]})
            if row["status"] != FAILED:
                raise PreconditionFailed({"status": [f"Step is {row['status']}; only a FAILED step can be restarted."]})
            if not has_delegate(row["type"]):
                raise PreconditionFailed({"type": [f"No delegate is registered for step type {row['type']!r}."]})
            params = {**params_from_json(row["params"]), **overrides}
            if len(params) > MAX_PARAMS:
                raise PreconditionFailed(
                    {"params": [f"The merged params have {len(params)} names; at most {MAX_PARAMS} are allowed."]}
                )
            changed = db.execute(
                "UPDATE steps SET status = 'STARTED', attempts = attempts + 1, params = ?, error_type = NULL,"
                " error_message = NULL, result = NULL, deferred = 0, runner_id = ?, started_at = ?,"
                " finished_at = NULL, next_retry_at = NULL, retries_used = 0"
                " WHERE id = ? AND status = 'FAILED' AND attempts = ?",
                (params_to_json(params), runner_id, now, step_id, row["attempts"]),
            ).rowcount
            if changed != 1:  # cannot happen under BEGIN IMMEDIATE; kept as the compare-and-set's check
                raise PreconditionFailed({"status": ["Step changed while it was being restarted."]})
            attempt = row["attempts"] + 1
            self._insert_attempt(db, step_id, attempt, "restart", principal, params, now)
            self._refresh_process(db, row["process_id"], now)
        return Job(step_id, row["process_id"], row["type"], params, attempt)

    def finish_attempt(self, job, status, result=None, error=None, runner_id=None):
        """Record what a delegate did; COMPLETED starts the next step. Returns the next job or None.

        A stale outcome (the step was failed, completed or interrupted meanwhile) changes
        nothing and returns None.
        """
        now = now_iso()
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE steps SET status = ?, result = ?, error_type = ?, error_message = ?, finished_at = ?"
                " WHERE id = ? AND status = 'STARTED' AND attempts = ? AND deferred = 0 AND next_retry_at IS NULL",
                (
                    status,
                    None if result is None else params_to_json(result),
                    error and error["type"],
                    error and error["message"],
                    now,
                    job.step_id,
                    job.attempt,
                ),
            ).rowcount
            if changed != 1:
                return None
            self._close_attempt(db, job.step_id, job.attempt, status, error, now)
            next_job = self._start_next(db, job.step_id, runner_id, now) if status == COMPLETED else None
            self._refresh_process(db, job.process_id, now)
        return next_job

    def defer_attempt(self, job):
        """Mark a running attempt as waiting for complete-step or fail-step."""
        with self.transaction() as db:
            db.execute(
                "UPDATE steps SET deferred = 1 WHERE id = ? AND status = 'STARTED' AND attempts = ?",
                (job.step_id, job.attempt),
            )

    def failed_steps(self, where, after=None, limit=1000):
        """FAILED steps matching `where` (type, process_id, failed_before, failed_after, failed_until
        (also strictly before); None = any), oldest failure first, after the (finished_at, seq) position `after`.

        Returns up to `limit` (id, finished_at, seq) rows and whether more match.
        """
        conditions, args = ["status = 'FAILED'"], []
        for column, operator, key in (
            ("type", "=", "type"),
            ("process_id", "=", "process_id"),
            ("finished_at", "<", "failed_before"),
            ("finished_at", ">", "failed_after"),
            ("finished_at", "<", "failed_until"),
        ):
            if where.get(key) is not None:
                conditions.append(f"{column} {operator} ?")
                args.append(where[key])
        if after is not None:
            conditions.append("(finished_at, seq) > (?, ?)")
            args.extend(after)
        rows = (
            self.connection()
            .execute(
                f"SELECT id, finished_at, seq FROM steps WHERE {' AND '.join(conditions)}"
                " ORDER BY finished_at, seq LIMIT ?",
                (*args, limit + 1),
            )
            .fetchall()
        )
        return [tuple(row) for row in rows[:limit]], len(rows) > limit

    # -- automatic retries -------------------------------------------------------------
    def schedule_retry(self, job, error, retry_at):
        """Close a failed attempt and leave the step STARTED until `retry_at` (ISO time).

        Any worker's runner may pick it up then (claim_due_retries); returns whether the
        attempt was still current.
        """
        now = now_iso()
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE steps SET error_type = ?, error_message = ?, next_retry_at = ?, runner_id = NULL"
                " WHERE id = ? AND status = 'STARTED' AND attempts = ? AND deferred = 0 AND next_retry_at IS NULL",
                (error["type"], error["message"], retry_at, job.step_id, job.attempt),
            ).rowcount
            if changed != 1:
                return False
            self._close_attempt(db, job.step_id, job.attempt, FAILED, error, now)
            self._refresh_process(db, job.process_id, now)
        return True

    def claim_due_retries(self, runner_id, limit):
        """Begin the next attempt (trigger 'retry') of up to `limit` steps whose retry is due.

        The compare-and-set on attempts and next_retry_at makes each retry begin exactly once,
        however many workers look for due retries at the same moment.
        """
        now = now_iso()
        if not self.connection().execute(DUE_RETRIES, (now, 1)).fetchone():
            return []  # polled often by every worker: look first, take the write lock only for work
        jobs = []
        with self.transaction() as db:
            rows = db.execute(DUE_RETRIES, (now, limit)).fetchall()
            for row in rows:
                changed = db.execute(
                    "UPDATE steps SET attempts = attempts + 1, retries_used = retries_used + 1, next_retry_at = NULL,"
                    " error_type = NULL, error_message = NULL, runner_id = ?, started_at = ?"
                    " WHERE id = ? AND status = 'STARTED' AND attempts = ? AND next_retry_at IS NOT NULL",
                    (runner_id, now, row["id"], row["attempts"]),
                ).rowcount
                if changed != 1:
                    continue
                params = params_from_json(row["params"])
                attempt = row["attempts"] + 1
                self._insert_attempt(db, row["id"], attempt, "retry", row["principal"], params, now)
                jobs.append(Job(row["id"], row["process_id"], row["type"], params, attempt, row["retries_used"] + 1))
            for process_id in {job.process_id for job in jobs}:
                self._refresh_process(db, process_id, now)
        return jobs

    def complete_step(self, step_id, result, runner_id):
        """STARTED -> COMPLETED from outside; returns (step, next job or None)."""
        return self._end_started_step(step_id, COMPLETED, result, None, runner_id)

    def fail_step(self, step_id, message):
        """STARTED -> FAILED from outside; returns the step."""
        step, _ = self._end_started_step(step_id, FAILED, None, {"type": "ExternalFailure", "message": message}, None)
        return step

    def _end_started_step(self, step_id, status, result, error, runner_id):
        now = now_iso()
        with self.transaction() as db:
            row = db.execute(
                "SELECT process_id, status, attempts, next_retry_at FROM steps WHERE id = ?", (step_id,)
            ).fetchone()
            if row is None:
                raise PreconditionFailed({"processStepId": ["No step has this id."]})
            if row["next_retry_at"] is not None and status == COMPLETED:
                raise PreconditionFailed(
                    {"status": ["Step is waiting for an automatic retry; fail it to stop the retries."]}
                )
            changed = db.execute(
                "UPDATE steps SET status = ?, result = ?, error_type = ?, error_message = ?, deferred = 0,"
                " next_retry_at = NULL, finished_at = ? WHERE id = ? AND status = 'STARTED' AND attempts = ?",
                (
                    status,
                    None if result is None else params_to_json(result),
                    error and error["type"],
                    error and error["message"],
                    now,
                    step_id,
                    row["attempts"],
                ),
            ).rowcount
            if changed != 1:
                raise PreconditionFailed(
                    {"status": [f"Step is {row['status']}; only a STARTED step can be {status.lower()}."]}
                )
            self._close_attempt(db, step_id, row["attempts"], status, error, now)
            next_job = self._start_next(db, step_id, runner_id, now) if status == COMPLETED else None
            self._refresh_process(db, row["process_id"], now)
            step = _step(db.execute(f"SELECT {STEP_COLUMNS} FROM steps WHERE id = ?", (step_id,)).fetchone())
        return step, next_job

    # -- helpers that run inside a transaction ---------------------------------------
    def _start_next(self, db, step_id, runner_id, now):
        row = db.execute(
            "SELECT s.process_id, s.position, p.principal FROM steps s JOIN processes p ON p.id = s.process_id"
            " WHERE s.id = ?",
            (step_id,),
        ).fetchone()
        return self._start_step(db, row["process_id"], row["position"] + 1, row["principal"], runner_id, now)

    def _start_step(self, db, process_id, position, principal, runner_id, now):
        """PENDING -> STARTED for the step at `position`, if there is one; returns its job."""
        row = db.execute(
            "SELECT id, type, params FROM steps WHERE process_id = ? AND position = ?", (process_id, position)
        ).fetchone()
        if row is None:
            return None
        changed = db.execute(
            "UPDATE steps SET status = 'STARTED', attempts = 1, runner_id = ?, started_at = ?"
            " WHERE id = ? AND status = 'PENDING'",
            (runner_id, now, row["id"]),
        ).rowcount
        if changed != 1:
            return None
        params = params_from_json(row["params"])
        self._insert_attempt(db, row["id"], 1, "start", principal, params, now)
        return Job(row["id"], process_id, row["type"], params, 1)

    @staticmethod
    def _insert_attempt(db, step_id, attempt, trigger, principal, params, now):
        db.execute(
            "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, started_at)"
            " VALUES (?, ?, ?, ?, ?, 'STARTED', ?)",
            (step_id, attempt, trigger, principal, params_to_json(params), now),
        )

    @staticmethod
    def _close_attempt(db, step_id, attempt, status, error, now):
        db.execute(
            "UPDATE attempts SET status = ?, error_type = ?, error_message = ?, finished_at = ?"
            " WHERE step_id = ? AND attempt = ? AND status = 'STARTED'",
            (status, error and error["type"], error and error["message"], now, step_id, attempt),
        )

    @staticmethod
    def _refresh_process(db, process_id, now):
        """A process is FAILED while a step is, COMPLETED when its last step is, else RUNNING."""
        db.execute(REFRESH_PROCESS, {"pid": process_id, "now": now})

    # -- runners: who is executing which step ------------------------------------------
    def heartbeat(self, runner):
        """Say this runner is alive (registering it if needed). `runner`: id, host, pid, pid_started."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runners (id, host, pid, pid_started, started_at, heartbeat_at)"
                " VALUES (:id, :host, :pid, :pid_started, :now, :beat)"
                " ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                {**runner, "now": now_iso(), "beat": time.time()},
            )

    def interrupt_orphans(self, is_alive):
        """Fail every STARTED, non-deferred step whose runner is gone; forget gone runners.

        `is_alive(row)` judges a runners row; a step whose runner has no row is orphaned
        too. Returns the ids of the steps it failed.
        """
        # Called every second by every worker: look first, take the write lock only for work.
        if not self._find_orphans(self.connection(), is_alive):
            return []
        now = now_iso()
        with self.transaction() as db:
            orphans, gone = self._find_orphans(db, is_alive)
            for row in orphans:
                self._interrupt(db, row, f"The worker running this step (runner {row['runner_id']}) is gone.", now)
            db.executemany("DELETE FROM runners WHERE id = ?", [(runner_id,) for runner_id in gone])
        return [row["id"] for row in orphans]

    @staticmethod
    def _find_orphans(db, is_alive):
        """(orphaned step rows, ids of gone runners), or () when there are neither."""
        runners = db.execute("SELECT * FROM runners").fetchall()
        alive = {r["id"] for r in runners if is_alive(r)}
        gone = [r["id"] for r in runners if r["id"] not in alive]
        started = db.execute(RUNNING_STEPS).fetchall()
        orphans = [row for row in started if row["runner_id"] not in alive]
        return (orphans, gone) if orphans or gone else ()

    def interrupt_runner(self, runner_id, reason):
        """Fail the STARTED, non-deferred steps of one runner that is stopping, and forget it."""
        now = now_iso()
        with self.transaction() as db:
            rows = db.execute(RUNNING_STEPS + " AND runner_id = ?", (runner_id,)).fetchall()
            for row in rows:
                self._interrupt(db, row, reason, now)
            db.execute("DELETE FROM runners WHERE id = ?", (runner_id,))
        return [row["id"] for row in rows]

    def _interrupt(self, db, row, message, now):
        error = {"type": "Interrupted", "message": message}
        changed = db.execute(
            "UPDATE steps SET status = 'FAILED', error_type = ?, error_message = ?, finished_at = ?"
            " WHERE id = ? AND status = 'STARTED' AND attempts = ? AND deferred = 0 AND next_retry_at IS NULL",
            (error["type"], message, now, row["id"], row["attempts"]),
        ).rowcount
        if changed == 1:
            self._close_attempt(db, row["id"], row["attempts"], FAILED, error, now)
            self._refresh_process(db, row["process_id"], now)

    def attempt_is_current(self, job):
        """Whether this attempt is still STARTED and waiting for its delegate (a cheap read)."""
        row = (
            self.connection()
            .execute(
                "SELECT 1 FROM steps WHERE id = ? AND status = 'STARTED' AND attempts = ? AND deferred = 0"
                " AND next_retry_at IS NULL",
                (job.step_id, job.attempt),
            )
            .fetchone()
        )
        return row is not None

    # -- answers to requests with an Idempotency-Key ----------------------------------------
    def stored_answer(self, db, principal, key):
        """The answer stored for this principal's key in the last ANSWER_KEPT_SECONDS, or None."""
        row = db.execute(
            "SELECT fingerprint, status, body FROM idempotent_requests"
            " WHERE principal = ? AND key = ? AND created_at >= ?",
            (principal, key, time.time() - ANSWER_KEPT_SECONDS),
        ).fetchone()
        return dict(row) if row else None

    def store_answer(self, db, principal, key, fingerprint, status, body):
        db.execute(
            "INSERT OR REPLACE INTO idempotent_requests (principal, key, fingerprint, status, body, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (principal, key, fingerprint, status, body, time.time()),
        )

    def forget_answers(self):
        """Delete answers older than ANSWER_KEPT_SECONDS; returns how many."""
        before = time.time() - ANSWER_KEPT_SECONDS
        if (
            not self.connection()
            .execute("SELECT 1 FROM idempotent_requests WHERE created_at < ? LIMIT 1", (before,))
            .fetchone()
        ):
            return 0
        with self.transaction() as db:
            return db.execute("DELETE FROM idempotent_requests WHERE created_at < ?", (before,)).rowcount

    # -- API tokens ------------------------------------------------------------------
    def add_token(self, name, role, secret_hash):
        """Insert a token; returns False if the name is taken."""
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                    (name, role, secret_hash, now_iso()),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def add_first_token(self, name, role, secret_hash):
        """Insert a token only if no token exists at all; returns whether it did."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM tokens LIMIT 1").fetchone():
                return False
            db.execute(
                "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                (name, role, secret_hash, now_iso()),
            )
        return True

    def token_by_hash(self, secret_hash):
        row = (
            self.connection()
            .execute("SELECT name, role, secret_hash FROM tokens WHERE secret_hash = ?", (secret_hash,))
            .fetchone()
        )
        return dict(row) if row else None

    def token_by_name(self, name):
        row = self.connection().execute("SELECT name, role, secret_hash FROM tokens WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else None

    def list_tokens(self):
        rows = self.connection().execute("SELECT name, role, created_at FROM tokens ORDER BY name").fetchall()
        return [dict(r) for r in rows]

    def revoke_token(self, name):
        with self.transaction() as db:
            return db.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount == 1


class Job:
    """One attempt of one step, to be handed to its delegate."""

    __slots__ = ("step_id", "process_id", "type", "params", "attempt", "retries_used")

    def __init__(self, step_id, process_id, step_type, params, attempt, retries_used=0):
        self.step_id = step_id
        self.process_id = process_id
        self.type = step_type
        self.params = params
        self.attempt = attempt
        self.retries_used = retries_used  # automatic retries since the last start or manual restart

    def __repr__(self):
        return f"Job({self.step_id!r}, attempt={self.attempt})"
