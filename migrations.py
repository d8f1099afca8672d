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
]
