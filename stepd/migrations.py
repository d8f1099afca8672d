"""The schema's history: migration N brings a file from schema version N-1 to N.

db.py applies them at start (`PRAGMA user_version` holds the version). A migration is
never edited once released: a change of the schema is a new one at the end. Statements
are split on ';', so none may contain one inside.
"""

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
]
