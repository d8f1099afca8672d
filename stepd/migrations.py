"""The schema's history: migration N brings a file from schema version N-1 to N.

db.py applies them at start (`PRAGMA user_version` holds the version). A migration is
never edited once released: a change of the schema is a new one at the end. A migration is
SQL text, or a function of the write connection where SQL alone cannot say it (9). Statements
are split on ';' where SQLite says a statement is complete (`db.statements`), so a trigger's
body keeps its own; no string literal may hold a ';'.
"""

import re

# A CHECK that a column's value is IN a list of constants, as the tables' text has it (lists of two too: alike).
CHECK_IN_A_LIST = re.compile(r"CHECK \((\w+) IN \(([^()]*)\)\)")


def _checks_as_ors(conn):
    """Migration 9. SQLite checks `x IN (three or more constants)` by building a temporary index
    of the list, at every run of a statement that checks it: every INSERT, and every UPDATE of the
    column (a step's status, an attempt's trigger and status, a process's status). That cost 11 us
    of a step's 49 in the store (BENCHMARKS.md); `x = a OR x = b OR ...` costs nothing measurable.
    The two checks hold the same rows, so no row is read or rewritten: the tables' text is edited
    in place, by SQLite's own procedure for changing a table's constraints (its ALTER TABLE page,
    "Making Other Kinds Of Table Schema Changes"): writable_schema, the edit, the schema's version
    one up so that every connection reads the new text, then a statement on each table edited (it
    reads the schema again: a text that does not parse raises), all inside the migration's
    transaction (db.migrate), which an error rolls back. SQLite's page suggests an integrity_check
    too; it would read every row of a large file, and the edit changes no row. (An SQLite set to
    SQLITE_DBCONFIG_DEFENSIVE refuses writable_schema; Python's sqlite3 does not set it.)"""
    tables = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql LIKE '%CHECK%'").fetchall()
    edited = {name: new for name, sql in tables if (new := CHECK_IN_A_LIST.sub(_as_ors, sql)) != sql}
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("PRAGMA writable_schema = ON")
    try:
        for name, sql in edited.items():
            conn.execute("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?", (sql, name))
        conn.execute(f"PRAGMA schema_version = {version + 1}")
    finally:
        conn.execute("PRAGMA writable_schema = OFF")
    for name in edited:
        conn.execute(f'SELECT * FROM "{name}" LIMIT 0')


def _as_ors(check):
    # The lists of migrations 1-8 are plain literals without a comma or a parenthesis inside, so
    # splitting on commas is enough.
    column, values = check.group(1), [value.strip() for value in check.group(2).split(",")]
    return "CHECK (" + " OR ".join(f"{column} = {value}" for value in values) + ")"


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
    # 3: process data and lifecycle: the CANCELLED and SKIPPED statuses (a CANCELLED
    # attempt too), who intervened, when and why, and the indexes of retention and the new list
    # filters. A CHECK constraint cannot be altered in SQLite, so the three tables are rebuilt:
    # each new table refers to the other new ones (processes_v3, steps_v3), so no old table is
    # referred to once its children are gone and each DROP runs with foreign keys on; each RENAME
    # then rewrites the references to the final names. On a large file this runs for a while at
    # the first start (roughly a second per few hundred thousand steps), once. A COMPLETED or
    # CANCELLED process is never changed again, so its updated_at is when it finished: retention
    # walks processes_finished_oldest_first.
    """
    CREATE TABLE processes_v3 (
        seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
        id                   TEXT NOT NULL UNIQUE,
        name                 TEXT,
        status               TEXT NOT NULL CHECK (status IN ('RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
        principal            TEXT NOT NULL,
        created_at           TEXT NOT NULL,
        updated_at           TEXT NOT NULL,
        intervened_by        TEXT,
        intervened_at        TEXT,
        intervention_reason  TEXT
    );
    INSERT INTO processes_v3 (seq, id, name, status, principal, created_at, updated_at)
        SELECT seq, id, name, status, principal, created_at, updated_at FROM processes;

    CREATE TABLE steps_v3 (
        seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
        id                   TEXT NOT NULL UNIQUE,
        process_id           TEXT NOT NULL REFERENCES processes_v3 (id),
        position             INTEGER NOT NULL,
        type                 TEXT NOT NULL,
        status               TEXT NOT NULL
            CHECK (status IN ('PENDING', 'STARTED', 'COMPLETED', 'FAILED', 'SKIPPED', 'CANCELLED')),
        params               TEXT NOT NULL,
        result               TEXT,
        attempts             INTEGER NOT NULL DEFAULT 0,
        error_type           TEXT,
        error_message        TEXT,
        deferred             INTEGER NOT NULL DEFAULT 0,
        runner_id            TEXT,
        created_at           TEXT NOT NULL,
        started_at           TEXT,
        finished_at          TEXT,
        next_retry_at        TEXT,
        retries_used         INTEGER NOT NULL DEFAULT 0,
        intervened_by        TEXT,
        intervened_at        TEXT,
        intervention_reason  TEXT,
        UNIQUE (process_id, position)
    );
    INSERT INTO steps_v3 (seq, id, process_id, position, type, status, params, result, attempts, error_type,
                          error_message, deferred, runner_id, created_at, started_at, finished_at,
                          next_retry_at, retries_used)
        SELECT seq, id, process_id, position, type, status, params, result, attempts, error_type,
               error_message, deferred, runner_id, created_at, started_at, finished_at,
               next_retry_at, retries_used FROM steps;

    CREATE TABLE attempts_v3 (
        step_id        TEXT NOT NULL REFERENCES steps_v3 (id),
        attempt        INTEGER NOT NULL,
        trigger        TEXT NOT NULL CHECK (trigger IN ('start', 'restart', 'retry')),
        principal      TEXT NOT NULL,
        params         TEXT NOT NULL,
        status         TEXT NOT NULL CHECK (status IN ('STARTED', 'COMPLETED', 'FAILED', 'CANCELLED')),
        error_type     TEXT,
        error_message  TEXT,
        started_at     TEXT NOT NULL,
        finished_at    TEXT,
        PRIMARY KEY (step_id, attempt)
    ) WITHOUT ROWID;
    INSERT INTO attempts_v3 SELECT * FROM attempts;

    DROP TABLE attempts;
    DROP TABLE steps;
    DROP TABLE processes;
    ALTER TABLE processes_v3 RENAME TO processes;
    ALTER TABLE steps_v3 RENAME TO steps;
    ALTER TABLE attempts_v3 RENAME TO attempts;

    CREATE INDEX processes_by_status ON processes (status, seq);
    CREATE INDEX steps_by_status ON steps (status, seq);
    CREATE INDEX steps_by_type ON steps (type, seq);
    CREATE INDEX steps_due_retries ON steps (next_retry_at) WHERE next_retry_at IS NOT NULL;
    CREATE INDEX steps_running ON steps (runner_id)
        WHERE status = 'STARTED' AND deferred = 0 AND next_retry_at IS NULL;
    CREATE INDEX steps_failed_oldest_first ON steps (finished_at, seq) WHERE status = 'FAILED';

    CREATE INDEX processes_by_name ON processes (name, seq) WHERE name IS NOT NULL;
    CREATE INDEX processes_by_creation ON processes (created_at);
    CREATE INDEX steps_by_error_type ON steps (error_type, seq) WHERE error_type IS NOT NULL;
    CREATE INDEX processes_finished_oldest_first ON processes (updated_at)
        WHERE status IN ('COMPLETED', 'CANCELLED');
    """,
    # 4: a secret the service keeps in its own file, made once, with the file's fourth schema: it
    # signs the operator page's session cookies and CSRF tokens (stepd/ui), so every process of the
    # service signs alike and a restart keeps the signed-in sessions. STEPD_SECRET_KEY, when set, is
    # used instead.
    """
    CREATE TABLE secrets (
        name   TEXT PRIMARY KEY,
        value  TEXT NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO secrets (name, value) VALUES ('session', lower(hex(randomblob(32))))
    """,
    # 5: the index of running and queued steps also orders the queued ones by when they were
    # queued, so the node's claim (the oldest first, store.QUEUED_STEPS) reads them in order
    # instead of sorting every queued step at each claim (40,000 of them behind a burst of starts).
    """
    DROP INDEX steps_running;
    CREATE INDEX steps_running ON steps (runner_id, started_at)
        WHERE status = 'STARTED' AND deferred = 0 AND next_retry_at IS NULL
    """,
    # 6: the X-Request-Id of the request that began each attempt (a start, a restart, a
    # complete-step or skip that began the next step; the next steps a completion begins, and
    # automatic retries, keep their attempt's), shown in the attempt history and put on every
    # line about the attempt. Attempts from before have none.
    """
    ALTER TABLE attempts ADD COLUMN request_id TEXT
    """,
    # 7: tallies for GET /metrics (metrics.py), kept by triggers in the transaction of every write, so a
    # scrape reads a few rows instead of counting 10^6: steps and processes by status (exact, as a
    # count(*) would say), and the attempts begun and ended by type (counters that only go up: retention
    # deleting attempts takes nothing off). One small table, so a commit writes one more page, not four.
    # Each status has its row from here, so the triggers of statuses only UPDATE (a later status needs
    # its row made by the migration that adds it). A file migrated here starts with the tallies of what
    # it holds; an attempt inserted already ended (a seeded file) counts its outcome too.
    """
    CREATE TABLE tally (
        series  TEXT NOT NULL CHECK (series IN ('steps', 'processes', 'attempts', 'outcomes')),
        a       TEXT NOT NULL,
        b       TEXT NOT NULL,
        n       INTEGER NOT NULL,
        PRIMARY KEY (series, a, b)
    ) WITHOUT ROWID;
    INSERT INTO tally (series, a, b, n)
        SELECT 'steps', s.status, '', (SELECT COUNT(*) FROM steps WHERE steps.status = s.status)
        FROM (SELECT 'PENDING' AS status UNION ALL SELECT 'STARTED' UNION ALL SELECT 'COMPLETED'
              UNION ALL SELECT 'FAILED' UNION ALL SELECT 'SKIPPED' UNION ALL SELECT 'CANCELLED') s;
    INSERT INTO tally (series, a, b, n)
        SELECT 'processes', s.status, '', (SELECT COUNT(*) FROM processes WHERE processes.status = s.status)
        FROM (SELECT 'RUNNING' AS status UNION ALL SELECT 'COMPLETED' UNION ALL SELECT 'FAILED'
              UNION ALL SELECT 'CANCELLED') s;
    INSERT INTO tally (series, a, b, n)
        SELECT 'attempts', s.type, a.trigger, COUNT(*) FROM attempts a JOIN steps s ON s.id = a.step_id
        GROUP BY s.type, a.trigger;
    INSERT INTO tally (series, a, b, n)
        SELECT 'outcomes', s.type, CASE WHEN a.status = 'COMPLETED' THEN 'completed'
                                       WHEN a.error_type = 'Interrupted' THEN 'interrupted'
                                       WHEN a.error_type = 'Timeout' THEN 'timeout' ELSE 'failed' END AS outcome,
               COUNT(*)
        FROM attempts a JOIN steps s ON s.id = a.step_id WHERE a.status IN ('COMPLETED', 'FAILED')
        GROUP BY s.type, outcome;

    CREATE TRIGGER tally_step_insert AFTER INSERT ON steps BEGIN
        UPDATE tally SET n = n + 1 WHERE series = 'steps' AND a = NEW.status AND b = '';
    END;
    CREATE TRIGGER tally_step_update AFTER UPDATE OF status ON steps WHEN OLD.status != NEW.status BEGIN
        UPDATE tally SET n = n + (CASE a WHEN NEW.status THEN 1 ELSE -1 END)
            WHERE series = 'steps' AND a IN (OLD.status, NEW.status) AND b = '';
    END;
    CREATE TRIGGER tally_step_delete AFTER DELETE ON steps BEGIN
        UPDATE tally SET n = n - 1 WHERE series = 'steps' AND a = OLD.status AND b = '';
    END;
    CREATE TRIGGER tally_process_insert AFTER INSERT ON processes BEGIN
        UPDATE tally SET n = n + 1 WHERE series = 'processes' AND a = NEW.status AND b = '';
    END;
    CREATE TRIGGER tally_process_update AFTER UPDATE OF status ON processes WHEN OLD.status != NEW.status BEGIN
        UPDATE tally SET n = n + (CASE a WHEN NEW.status THEN 1 ELSE -1 END)
            WHERE series = 'processes' AND a IN (OLD.status, NEW.status) AND b = '';
    END;
    CREATE TRIGGER tally_process_delete AFTER DELETE ON processes BEGIN
        UPDATE tally SET n = n - 1 WHERE series = 'processes' AND a = OLD.status AND b = '';
    END;
    CREATE TRIGGER tally_attempt_insert AFTER INSERT ON attempts BEGIN
        INSERT INTO tally (series, a, b, n)
            VALUES ('attempts', (SELECT type FROM steps WHERE id = NEW.step_id), NEW.trigger, 1)
            ON CONFLICT (series, a, b) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER tally_outcome_insert AFTER INSERT ON attempts WHEN NEW.status IN ('COMPLETED', 'FAILED') BEGIN
        INSERT INTO tally (series, a, b, n)
            VALUES ('outcomes', (SELECT type FROM steps WHERE id = NEW.step_id),
                    CASE WHEN NEW.status = 'COMPLETED' THEN 'completed'
                         WHEN NEW.error_type = 'Interrupted' THEN 'interrupted'
                         WHEN NEW.error_type = 'Timeout' THEN 'timeout' ELSE 'failed' END, 1)
            ON CONFLICT (series, a, b) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER tally_outcome_update AFTER UPDATE OF status ON attempts
        WHEN OLD.status = 'STARTED' AND NEW.status IN ('COMPLETED', 'FAILED') BEGIN
        INSERT INTO tally (series, a, b, n)
            VALUES ('outcomes', (SELECT type FROM steps WHERE id = NEW.step_id),
                    CASE WHEN NEW.status = 'COMPLETED' THEN 'completed'
                         WHEN NEW.error_type = 'Interrupted' THEN 'interrupted'
                         WHEN NEW.error_type = 'Timeout' THEN 'timeout' ELSE 'failed' END, 1)
            ON CONFLICT (series, a, b) DO UPDATE SET n = n + 1;
    END
    """,
    # 8: the tallies are kept by the store instead of triggers: each change adds what it changed
    # once, at its end (store.py, Change.tally). Per row, the triggers cost a fifth of a step's
    # transition and of a process's start in the store (a statement journal and one or two more
    # statements per row changed). The table and what it holds stay.
    """
    DROP TRIGGER tally_step_insert;
    DROP TRIGGER tally_step_update;
    DROP TRIGGER tally_step_delete;
    DROP TRIGGER tally_process_insert;
    DROP TRIGGER tally_process_update;
    DROP TRIGGER tally_process_delete;
    DROP TRIGGER tally_attempt_insert;
    DROP TRIGGER tally_outcome_insert;
    DROP TRIGGER tally_outcome_update;
    """,
    # 9: every CHECK of a value IN a list becomes the same check as a chain of ORs (`_checks_as_ors`).
    _checks_as_ors,
    # 10: the index of steps by status leaves out COMPLETED, the status nearly every step ends in
    # and most of a file's steps are in: a step's last move there is a delete, not a move (6% more
    # steps a second alone, 9% at the peers' 1,000 x 10; BENCHMARKS.md). A list of the COMPLETED
    # steps walks the steps newest first and stops at its page (they are found at once in all but a
    # file whose newest steps are nearly all not yet run); the page's counts come from the tallies
    # (store.status_counts).
    # PENDING stays in: leaving it out too gained nothing more measurable, and a list of the
    # PENDING steps of a quiet file, few and old, would have read the whole file.
    """
    DROP INDEX steps_by_status;
    CREATE INDEX steps_by_status ON steps (status, seq) WHERE status != 'COMPLETED'
    """,
]
