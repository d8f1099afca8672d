"""PostgreSQL (postgres.py): the schema, its migrations under the advisory lock, the refusal of a
newer schema, the connection's types, and what the commands do with a postgresql:// STEPD_DB.

Each test gets a fresh database of the test process's own cluster (fixture postgres_url); without
Debian's postgresql-15 they are skipped, and under CI they fail.
"""

import re
import sqlite3
import subprocess
import sys
import time

import psycopg
import pytest
from helpers import ROOT, all_at_once, free_port, run_cli, wait_for

from stepd import postgres
from stepd.db import Database
from stepd.model import COMPLETED, FAILED, VERSION, Unusable, now_iso
from stepd.store import Store
from stepd.wiring import open_store

# SQLite's declared type of a column -> the PostgreSQL types it may have (postgres.py says why each).
TYPES = {
    "TEXT": {"text", "timestamp with time zone", "json"},
    "INTEGER": {"bigint", "integer", "smallint"},
    "REAL": {"double precision"},
}


def sqlite_schema(tmp_path):
    """{table: [(column, declared type, not null)]} and the names of the indexes and triggers made by a
    migration, of a SQLite file at the newest schema."""
    Database(tmp_path / "s.db").prepare()
    conn = sqlite3.connect(tmp_path / "s.db")
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {
            table: [(r[1], r[2], bool(r[3] or r[5])) for r in conn.execute(f"PRAGMA table_info({table})")]
            for table in tables
            if table != "sqlite_sequence"
        }
        made = conn.execute("SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger') AND sql IS NOT NULL")
        indexes = {r[0] for r in made}
    finally:
        conn.close()
    return columns, indexes


# What only PostgreSQL has (migration 5): several nodes share a database there, and only there.
POSTGRES_ONLY_TABLES = {"nodes"}
POSTGRES_ONLY_COLUMNS = {("runners", "node_id")}
POSTGRES_ONLY_INDEXES = {"runners_by_node"}


def postgres_schema(url):
    """The same of a PostgreSQL database (stepd_schema, the versions table, and what only PostgreSQL
    has, left out)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name <> 'stepd_schema' ORDER BY table_name, ordinal_position"
        ).fetchall()
        indexes = conn.execute(
            "SELECT indexname FROM pg_indexes i WHERE schemaname = 'public' AND tablename <> 'stepd_schema'"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
            " UNION SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
        ).fetchall()
    columns = {}
    for table, column, kind, nullable in rows:
        if table not in POSTGRES_ONLY_TABLES and (table, column) not in POSTGRES_ONLY_COLUMNS:
            columns.setdefault(table, []).append((column, kind, nullable == "NO"))
    return columns, {name for (name,) in indexes} - POSTGRES_ONLY_INDEXES


def versions(url):
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version, stepd FROM stepd_schema ORDER BY version").fetchall()


# -- the schema --------------------------------------------------------------------------------------
def test_the_schema_has_sqlites_tables_columns_indexes_and_triggers_in_postgresqls_types(tmp_path, postgres_url):
    """The same tables, columns (in order, with the same NOT NULL), indexes and triggers as SQLite's
    newest schema: a SQLite migration without its PostgreSQL twin fails here."""
    assert postgres.PostgresDatabase(postgres_url).prepare() == postgres.SCHEMA_VERSION
    sqlite_columns, sqlite_indexes = sqlite_schema(tmp_path)
    pg_columns, pg_indexes = postgres_schema(postgres_url)
    assert sorted(pg_columns) == sorted(sqlite_columns)
    for table, columns in sqlite_columns.items():
        assert [(name, null) for name, _, null in pg_columns[table]] == [(name, null) for name, _, null in columns]
        for (name, declared, _), (_, kind, _) in zip(columns, pg_columns[table], strict=True):
            assert kind in TYPES[declared], f"{table}.{name}: {declared} in SQLite, {kind} in PostgreSQL"
    assert pg_indexes == sqlite_indexes


def test_a_migrated_database_records_its_versions_and_a_second_start_applies_nothing(postgres_url):
    database = postgres.PostgresDatabase(postgres_url)
    assert database.schema_version() == 0
    assert database.prepare() == postgres.SCHEMA_VERSION
    assert database.prepare() == 0
    assert database.schema_version() == postgres.SCHEMA_VERSION
    assert versions(postgres_url) == [(n, VERSION) for n in range(1, postgres.SCHEMA_VERSION + 1)]
    with psycopg.connect(postgres_url) as conn:
        [(secret,)] = conn.execute("SELECT value FROM secrets WHERE name = 'session'").fetchall()
    assert len(secret) == 64 and int(secret, 16)


def test_the_connection_reads_times_as_stepds_iso_text_and_json_as_written(postgres_url):
    """timestamptz in, stepd's ISO text out (compared as text by the store); json kept as written:
    the params' order and a double that jsonb would make an integer."""
    postgres.PostgresDatabase(postgres_url).prepare()
    now = now_iso()
    params = '{"z": ["DOUBLE", 1e300], "a": ["LONG", 1], "m": ["DOUBLE", -0.0]}'
    with postgres.connect(postgres_url) as conn:
        conn.execute(
            "INSERT INTO processes (id, status, principal, created_at, updated_at)"
            " VALUES ('p', 'RUNNING', 'a', %s, %s)",
            (now, now),
        )
        conn.execute(
            "INSERT INTO steps (id, process_id, position, type, status, params, created_at, next_retry_at)"
            " VALUES ('s', 'p', 0, 't', 'STARTED', %s, %s, %s)",
            (params, now, "2026-01-02T03:04:05.678Z"),
        )
        row = conn.execute("SELECT created_at, next_retry_at, params, deferred FROM steps").fetchone()
        due = conn.execute("SELECT count(*) FROM steps WHERE next_retry_at <= %s", (now,)).fetchone()[0]
    assert row == (now, "2026-01-02T03:04:05.678Z", params, 0)
    assert due == (1 if now >= "2026-01-02T03:04:05.678Z" else 0)


# -- nodes that start at once migrate once --------------------------------------------------------------
def test_threads_migrating_one_fresh_database_at_once_migrate_it_once(postgres_url):
    applied = all_at_once(12, lambda _: postgres.PostgresDatabase(postgres_url).prepare())
    assert sorted(applied) == [0] * 11 + [postgres.SCHEMA_VERSION]
    assert [version for version, _ in versions(postgres_url)] == list(range(1, postgres.SCHEMA_VERSION + 1))


def test_processes_started_together_wait_for_the_lock_and_migrate_once(postgres_url):
    """Four `stepd migrate` processes queue on the advisory lock (held here until all four wait on
    it), then one migrates and the others find the schema current: all exit 0."""
    env = {"STEPD_DB": postgres_url, "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "stepd", "migrate"]
    with psycopg.connect(postgres_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (postgres.MIGRATION_LOCK,))
        procs = [
            subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        try:

            def waiting():
                return holder.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ).fetchone()[0]

            wait_for(lambda: waiting() == 4, timeout=30, what="four processes waiting on the migration lock")
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (postgres.MIGRATION_LOCK,))
        outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outputs
    applied = sorted(int(re.search(r"\((\d+) migration\(s\) applied now\)", out)[1]) for out, _ in outputs)
    assert applied == [0, 0, 0, postgres.SCHEMA_VERSION], outputs
    assert "***" in outputs[0][0] and postgres_url.split(":")[2].split("@")[0] not in outputs[0][0]  # no password
    assert len(versions(postgres_url)) == postgres.SCHEMA_VERSION


# -- a node older than the schema ------------------------------------------------------------------------
def newer_schema(url):
    """The database as a newer stepd (9.9.9) would leave it: one migration past this one's."""
    postgres.PostgresDatabase(url).prepare()
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO stepd_schema (version, stepd) VALUES (%s, '9.9.9')", (postgres.SCHEMA_VERSION + 1,))
    return postgres.SCHEMA_VERSION + 1


def test_a_stepd_older_than_the_schema_refuses_naming_both_versions(postgres_url):
    newer = newer_schema(postgres_url)
    with pytest.raises(Unusable) as refused:
        postgres.PostgresDatabase(postgres_url).prepare()
    message = str(refused.value)
    assert f"PostgreSQL schema version {newer} (from stepd 9.9.9)" in message
    assert f"this stepd ({VERSION}) knows up to {postgres.SCHEMA_VERSION}" in message
    assert "\n" not in message


def test_stepd_migrate_refuses_a_newer_schema_in_one_line(postgres_url):
    newer = newer_schema(postgres_url)
    result = run_cli(postgres_url, "migrate")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("stepd migrate: postgresql://stepd:***@127.0.0.1:")
    assert f"schema version {newer} (from stepd 9.9.9)" in line and f"knows up to {postgres.SCHEMA_VERSION}" in line


def test_a_node_starting_on_a_newer_schema_refuses_naming_both_versions(postgres_url):
    """`stepd serve` itself: the one line of a refused start names both versions."""
    newer = newer_schema(postgres_url)
    env = {"STEPD_DB": postgres_url, "STEPD_PORT": str(free_port()), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "stepd", "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done
    assert f"schema version {newer} (from stepd 9.9.9)" in done.stderr
    assert f"this stepd ({VERSION}) knows up to {postgres.SCHEMA_VERSION}" in done.stderr
    assert postgres_url.split(":")[2].split("@")[0] not in done.stderr + done.stdout  # the password is never said


# -- what a postgresql:// STEPD_DB does today ------------------------------------------------------------
def test_opening_the_store_of_a_postgresql_url_migrates_it_and_serves_from_it(postgres_url):
    store = open_store({"STEPD_DB": postgres_url, "STEPD_SYNC": "full"})
    try:
        assert postgres.PostgresDatabase(postgres_url).schema_version() == postgres.SCHEMA_VERSION
        assert isinstance(store.db, postgres.PostgresDatabase)
        process, _job = store.create_process("one", [("noop", {})], "ops", None)
        assert store.get_process(process["id"])["name"] == "one"
    finally:
        store.db.close()


def test_read_connections_are_lent_from_a_bounded_pool_and_given_back(postgres_url, monkeypatch):
    """At most `read_connections` callers hold one at once (a further one waits, then is Busy), and one
    given back (release(), or its thread's end) serves the next caller without a new connection."""
    import threading

    from stepd.model import Busy

    monkeypatch.setattr(postgres, "POOL_WAIT_SECONDS", 0.2)
    database = postgres.PostgresDatabase(postgres_url, read_connections=2)
    database.prepare()
    try:
        first = database.connection()
        database.rows("SELECT 1")
        database.release()
        assert database.connection() is first  # given back, lent again: no new connection
        held, go = threading.Event(), threading.Event()

        def hold():
            database.rows("SELECT 1")
            held.set()
            go.wait(5)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(5)
        outcome = []
        third = threading.Thread(target=lambda: outcome.append(_try_read(database, Busy)))
        third.start()
        third.join()
        assert outcome == ["Busy"], "a third caller waits for one of the two, then is Busy"
        go.set()
        holder.join()  # its thread ended: its connection is back
        fourth = threading.Thread(target=lambda: outcome.append(_try_read(database, Busy)))
        fourth.start()
        fourth.join()
        assert outcome == ["Busy", "read"]
    finally:
        database.close()


def _try_read(database, busy):
    try:
        database.rows("SELECT 1")
    except busy:
        return "Busy"
    return "read"


def test_the_commands_that_need_the_store_refuse_postgresql_and_backup_names_pg_dump(postgres_url):
    for args in (["token", "list"], ["purge", "--older-than", "1"]):
        result = run_cli(postgres_url, *args)
        assert result.exit_code == 2, args
        assert "only `stepd migrate` and `stepd check` work on it" in result.stderr and "***" in result.stderr
    result = run_cli(postgres_url, "backup", "/tmp/never-written.db")
    assert result.exit_code == 2 and "pg_dump" in result.stderr


def test_an_unreachable_server_is_one_line_without_the_password():
    url = f"postgresql://stepd:hunter2@127.0.0.1:{free_port()}/nothing"
    started = time.monotonic()
    with pytest.raises(Unusable) as refused:
        postgres.PostgresDatabase(url).prepare()
    assert time.monotonic() - started < postgres.CONNECT_SECONDS
    message = str(refused.value)
    assert message.startswith("cannot connect to postgresql://stepd:***@127.0.0.1:") and "hunter2" not in message
    assert "\n" not in message


def test_a_node_waiting_too_long_for_anothers_migration_gives_up_saying_so(postgres_url, monkeypatch):
    monkeypatch.setattr(postgres, "LOCK_WAIT", "200ms")
    with psycopg.connect(postgres_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (postgres.MIGRATION_LOCK,))
        with pytest.raises(Unusable, match="another stepd has been migrating .* for 200ms"):
            postgres.PostgresDatabase(postgres_url).prepare()
    assert postgres.PostgresDatabase(postgres_url).prepare() == postgres.SCHEMA_VERSION  # the lock gone: it migrates


def test_a_migration_that_fails_leaves_nothing_half_done(postgres_url, monkeypatch):
    """PostgreSQL's DDL is transactional: the migrations due at a start are applied together or not at all."""
    monkeypatch.setattr(postgres, "MIGRATIONS", [*postgres.MIGRATIONS, "CREATE TABLE half (x int); SELECT 1 / 0"])
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", len(postgres.MIGRATIONS))
    with pytest.raises(Unusable, match="division by zero"):
        postgres.PostgresDatabase(postgres_url).prepare()
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
    assert tables == 0


# -- the tallies of GET /metrics --------------------------------------------------------------------------
TALLY_WRITES = [
    "INSERT INTO processes (id, status, principal, created_at, updated_at) VALUES ('p', 'RUNNING', 'a', now(), now())",
    "INSERT INTO steps (id, process_id, position, type, status, params, created_at)"
    " VALUES ('s0', 'p', 0, 'check', 'STARTED', '{}', now()), ('s1', 'p', 1, 'noop', 'PENDING', '{}', now())",
    "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, started_at)"
    " VALUES ('s0', 1, 'start', 'a', '{}', 'STARTED', now())",
    "UPDATE attempts SET status = 'FAILED', error_type = 'Timeout' WHERE step_id = 's0'",
    "UPDATE steps SET status = 'FAILED' WHERE id = 's0'",
    "UPDATE processes SET status = 'FAILED'",
    "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, started_at)"
    " VALUES ('s0', 2, 'restart', 'a', '{}', 'COMPLETED', now())",  # inserted already ended: its outcome counts
    "UPDATE steps SET status = 'COMPLETED' WHERE id = 's0'",
    "UPDATE steps SET status = 'COMPLETED' WHERE id = 's0'",  # no change of status: no change of tally
    "UPDATE steps SET status = 'CANCELLED' WHERE id = 's1'",
    "UPDATE processes SET status = 'CANCELLED'",
    "DELETE FROM attempts",
    "DELETE FROM steps WHERE id = 's1'",
]


# PostgreSQL's tallies are a log of changes (migration 3): each one is the sum of its rows.
SUMMED_TALLIES = (
    "SELECT series, a, b, sum(n)::bigint FROM tally GROUP BY series, a, b HAVING sum(n) <> 0 ORDER BY series, a, b"
)


def tallies_after_a_lifecycle(store):
    """The store's verbs, as the API calls them: a start, a timeout, a restart, a completion that begins
    the next step, a cancel; then the tallies GET /metrics reads (non-zero ones)."""
    process, job = store.create_process("p", [("check", {}), ("noop", {})], "a", "r1")
    timeout = {"type": "Timeout", "message": "too long"}
    store.finish_attempt(job, FAILED, error=timeout, runner_id="r1")
    job = store.restart_failed_step(job.step_id, {}, "a", "r1", lambda step_type: True)
    store.finish_attempt(job, COMPLETED, runner_id="r1")
    store.cancel_process(process["id"], "enough", "a")
    tallies = store.metric_tallies()
    return sorted(
        [(series, *row[:-1], row[-1]) for series in ("attempts", "outcomes") for row in tallies[series] if row[-1]]
        + [(series, status, "", n) for series in ("processes", "steps") for status, n in tallies[series] if n]
    )


def test_the_store_keeps_the_same_tallies_on_both_backends(tmp_path, postgres_url):
    """The tallies are the store's (each change adds what it changed, at its end; SQLite's migration 8,
    PostgreSQL's 4): the same verbs leave the same tallies on both, and PostgreSQL's fold of its log
    keeps their sums with one row a key."""
    Database(tmp_path / "t.db").prepare()
    postgres.PostgresDatabase(postgres_url).prepare()
    on_sqlite = tallies_after_a_lifecycle(Store(Database(tmp_path / "t.db")))
    on_postgres = tallies_after_a_lifecycle(Store(postgres.PostgresDatabase(postgres_url)))
    assert (
        on_postgres
        == on_sqlite
        == [
            ("attempts", "check", "restart", 1),
            ("attempts", "check", "start", 1),
            ("attempts", "noop", "start", 1),
            ("outcomes", "check", "completed", 1),
            ("outcomes", "check", "timeout", 1),
            ("processes", "CANCELLED", "", 1),
            ("steps", "CANCELLED", "", 1),
            ("steps", "COMPLETED", "", 1),
        ]
    )
    with psycopg.connect(postgres_url, autocommit=True) as pg:
        assert pg.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal").fetchone()[0] == 0
        summed = pg.execute(SUMMED_TALLIES).fetchall()
        pg.execute(postgres.FOLD_TALLIES)
        assert pg.execute(SUMMED_TALLIES).fetchall() == summed
        keys = pg.execute("SELECT count(*), count(DISTINCT (series, a, b)) FROM tally").fetchone()
    assert keys[0] == keys[1]


def test_a_database_migrated_with_rows_starts_with_their_tallies(postgres_url, monkeypatch):
    with monkeypatch.context() as older:  # a database left at schema 1 by a stepd before the tallies
        older.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:1])
        older.setattr(postgres, "SCHEMA_VERSION", 1)
        postgres.PostgresDatabase(postgres_url).prepare()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for sql in TALLY_WRITES[:4]:
            conn.execute(sql)
    assert postgres.PostgresDatabase(postgres_url).prepare() == postgres.SCHEMA_VERSION - 1
    with psycopg.connect(postgres_url) as conn:
        tallies = conn.execute(SUMMED_TALLIES).fetchall()
    assert tallies == [
        ("attempts", "check", "start", 1),
        ("outcomes", "check", "timeout", 1),
        ("processes", "RUNNING", "", 1),
        ("steps", "PENDING", "", 1),
        ("steps", "STARTED", "", 1),
    ]
