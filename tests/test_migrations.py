"""migrations.py alone: a file made by an older stepd is brought to the newest schema, its rows kept."""

import sqlite3

import pytest

from stepd import migrations
from stepd.db import Database, statements
from stepd.model import Unusable


def file_at_version(path, version):
    """A file as the stepd of schema `version` left it (its migrations, applied as db.py does)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    for number, script in enumerate(migrations.MIGRATIONS[:version], start=1):
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    return conn


def seed_version_2(conn):
    conn.execute(
        "INSERT INTO processes (id, name, status, principal, created_at, updated_at)"
        " VALUES ('p1', 'old', 'FAILED', 'ops', 't1', 't2'), ('p2', NULL, 'RUNNING', 'ops', 't3', 't3')"
    )
    conn.execute(
        "INSERT INTO steps (id, process_id, position, type, status, params, attempts, error_type, error_message,"
        " created_at, started_at, finished_at, next_retry_at, retries_used)"
        " VALUES ('s1', 'p1', 0, 'check', 'FAILED', '{}', 1, 'ValueError', 'no', 't1', 't1', 't2', NULL, 0),"
        " ('s2', 'p2', 0, 'retry_count', 'STARTED', '{}', 1, 'E', 'm', 't3', 't3', NULL, 't9', 1)"
    )
    conn.execute(
        "INSERT INTO attempts VALUES ('s1', 1, 'start', 'ops', '{}', 'FAILED', 'ValueError', 'no', 't1', 't2'),"
        " ('s2', 1, 'retry', 'ops', '{}', 'FAILED', 'E', 'm', 't3', 't3')"
    )


@pytest.fixture
def migrated(tmp_path):
    """A file of schema 2 with rows, migrated by Database.prepare(); a plain connection to it."""
    path = tmp_path / "old.db"
    seed_version_2(file_at_version(path, 2))
    Database(path).prepare()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    yield conn
    conn.close()


def test_the_claim_reads_queued_steps_in_order_without_sorting(migrated):
    """Schema 5: the oldest queued attempts come straight from the index (no sort of them all)."""
    from stepd.store import QUEUED_STEPS

    plan = " ".join(row[3] for row in migrated.execute(f"EXPLAIN QUERY PLAN {QUEUED_STEPS}", (5,)))
    assert "steps_running" in plan and "TEMP B-TREE" not in plan, plan


def test_a_version_2_file_is_migrated_keeping_every_row(migrated):
    assert migrated.execute("PRAGMA user_version").fetchone()[0] == len(migrations.MIGRATIONS) == 10
    assert migrated.execute("SELECT seq, id, name, status, intervened_by FROM processes ORDER BY seq").fetchall() == [
        (1, "p1", "old", "FAILED", None),
        (2, "p2", None, "RUNNING", None),
    ]
    steps = migrated.execute(
        "SELECT id, status, error_type, next_retry_at, retries_used, intervened_by FROM steps ORDER BY seq"
    ).fetchall()
    assert steps == [("s1", "FAILED", "ValueError", None, 0, None), ("s2", "STARTED", "E", "t9", 1, None)]
    assert migrated.execute(
        "SELECT step_id, attempt, trigger, status, request_id FROM attempts ORDER BY step_id"
    ).fetchall() == [("s1", 1, "start", "FAILED", None), ("s2", 1, "retry", "FAILED", None)]  # schema 6: no id before
    assert migrated.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert migrated.execute("PRAGMA foreign_key_check").fetchall() == []


def test_the_rebuilt_tables_refer_to_each_other_by_their_final_names(migrated):
    assert [row[2] for row in migrated.execute("PRAGMA foreign_key_list(steps)")] == ["processes"]
    assert [row[2] for row in migrated.execute("PRAGMA foreign_key_list(attempts)")] == ["steps"]
    names = {name for (name,) in migrated.execute("SELECT name FROM sqlite_master")}
    assert not {name for name in names if name.endswith("_v3")}
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        migrated.execute(
            "INSERT INTO steps (id, process_id, position, type, status, params, created_at)"
            " VALUES ('x', 'no-such-process', 0, 't', 'PENDING', '{}', 't')"
        )


def test_ids_go_on_after_the_old_ones(migrated):
    migrated.execute(
        "INSERT INTO processes (id, status, principal, created_at, updated_at) VALUES ('p3', 'RUNNING', 'o', 't', 't')"
    )
    assert migrated.execute("SELECT seq FROM processes WHERE id = 'p3'").fetchone() == (3,)
    assert dict(migrated.execute("SELECT name, seq FROM sqlite_sequence")) == {"processes": 3, "steps": 2}


def test_the_new_statuses_are_accepted_and_others_still_refused(migrated):
    migrated.execute("UPDATE processes SET status = 'CANCELLED' WHERE id = 'p2'")
    migrated.execute("UPDATE steps SET status = 'SKIPPED' WHERE id = 's1'")
    migrated.execute("UPDATE steps SET status = 'CANCELLED' WHERE id = 's2'")
    migrated.execute("UPDATE attempts SET status = 'CANCELLED' WHERE step_id = 's2'")
    for sql in (
        "UPDATE processes SET status = 'SKIPPED' WHERE id = 'p1'",
        "UPDATE steps SET status = 'DONE' WHERE id = 's1'",
        "UPDATE attempts SET status = 'SKIPPED' WHERE step_id = 's1'",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            migrated.execute(sql)


def test_every_index_is_there_again_and_the_new_ones_too(migrated):
    indexes = {name for (name,) in migrated.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {
        "processes_by_status",
        "steps_by_status",
        "steps_by_type",
        "steps_due_retries",
        "steps_running",
        "steps_failed_oldest_first",
        "processes_by_name",
        "processes_by_creation",
        "steps_by_error_type",
        "processes_finished_oldest_first",
    } <= indexes


def test_a_fresh_file_gets_the_same_schema_as_a_migrated_one(migrated, tmp_path):
    fresh = tmp_path / "fresh.db"
    Database(fresh).prepare()

    def schema(conn):
        rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name != 'sqlite_sequence'")
        return sorted(rows.fetchall(), key=lambda row: row[1])

    assert schema(sqlite3.connect(fresh)) == schema(migrated)


def test_each_file_gets_a_secret_of_its_own_once(migrated, tmp_path):
    """Migration 4 makes the secret that signs the operator page's cookies: 256 random bits, one per
    file, kept as it is by every later start (so every process of a service, and a restart, sign alike)."""
    [(secret,)] = migrated.execute("SELECT value FROM secrets WHERE name = 'session'").fetchall()
    assert len(secret) == 64 and int(secret, 16)
    other = tmp_path / "other.db"
    Database(other).prepare()
    Database(other).prepare()  # a second start migrates nothing
    assert sqlite3.connect(other).execute("SELECT value FROM secrets").fetchall() != [(secret,)]
    assert len(sqlite3.connect(other).execute("SELECT value FROM secrets").fetchall()) == 1


def test_schema_8_keeps_the_tallies_without_triggers(migrated, tmp_path):
    """Migration 7 counted what the file held; 8 drops its triggers (the store adds what each of its
    changes writes), keeping those counts."""
    from stepd.invariants import check

    assert migrated.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == []
    tally = dict(migrated.execute("SELECT a, n FROM tally WHERE series = 'steps' AND n != 0").fetchall())
    assert tally == {"FAILED": 1, "STARTED": 1}
    assert check(tmp_path / "old.db").problems == []


def test_schema_9_checks_each_list_as_ors_and_still_refuses_what_it_refused(migrated):
    """Migration 9 edits the tables' text in place: no CHECK of a list is left, every value of each
    list is still accepted and any other refused, and the file is sound."""
    texts = " ".join(sql for (sql,) in migrated.execute("SELECT sql FROM sqlite_master WHERE type = 'table'"))
    assert " IN (" not in texts and "status = 'SKIPPED' OR status = 'CANCELLED'" in texts
    migrated.execute("UPDATE processes SET status = 'COMPLETED' WHERE id = 'p2'")
    migrated.execute("UPDATE steps SET status = 'PENDING' WHERE id = 's2'")
    migrated.execute("UPDATE attempts SET trigger = 'restart', status = 'STARTED' WHERE step_id = 's2'")
    migrated.execute("INSERT INTO tally (series, a, b, n) VALUES ('outcomes', 'noop', 'failed', 1)")
    for sql in (
        "UPDATE processes SET status = 'PENDING' WHERE id = 'p1'",
        "UPDATE steps SET status = 'RUNNING' WHERE id = 's1'",
        "UPDATE attempts SET trigger = 'resume' WHERE step_id = 's1'",
        "UPDATE attempts SET status = 'PENDING' WHERE step_id = 's1'",
        "INSERT INTO tally (series, a, b, n) VALUES ('minutes', 'x', '', 1)",
        "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES ('t', 'admin', 'h', 't')",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            migrated.execute(sql)
    assert migrated.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_a_failed_schema_9_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """An edit whose text does not parse raises inside the migration's transaction: the file keeps
    schema 8 and its tables' text, and a later start (the edit mended) migrates it."""
    path = tmp_path / "eight.db"
    conn = file_at_version(path, 2)
    seed_version_2(conn)
    for number, script in enumerate(migrations.MIGRATIONS[2:8], start=3):
        for statement in statements(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    tables_sql = "SELECT group_concat(sql) FROM sqlite_master WHERE type = 'table'"
    texts = conn.execute(tables_sql).fetchone()
    conn.close()
    monkeypatch.setattr(migrations, "_as_ors", lambda check: f"CHECK ({check.group(1)} = ")  # cannot parse
    with pytest.raises(Unusable, match="malformed database schema"):
        Database(path).prepare()
    after = sqlite3.connect(path)
    assert after.execute("PRAGMA user_version").fetchone()[0] == 8
    assert after.execute(tables_sql).fetchone() == texts
    assert after.execute("SELECT count(*) FROM steps").fetchone()[0] == 2
    monkeypatch.undo()
    Database(path).prepare()
    assert after.execute("PRAGMA user_version").fetchone()[0] == len(migrations.MIGRATIONS)
    assert " IN (" not in after.execute(tables_sql).fetchone()[0]
    assert after.execute("SELECT count(*) FROM steps WHERE status = 'STARTED'").fetchone()[0] == 1


def test_schema_10_indexes_only_the_statuses_a_step_stays_in(migrated):
    """Migration 10: COMPLETED steps are not in steps_by_status; the others are."""
    migrated.execute("UPDATE steps SET status = 'COMPLETED' WHERE id = 's1'")
    by_status = migrated.execute(
        "SELECT status FROM steps INDEXED BY steps_by_status WHERE status != 'COMPLETED'"
    ).fetchall()
    assert by_status == [("STARTED",)]
    with pytest.raises(sqlite3.OperationalError, match="no query solution"):  # it cannot answer for COMPLETED
        migrated.execute("SELECT id FROM steps INDEXED BY steps_by_status WHERE status = 'COMPLETED'")
