"""db.Database against a real SQLite file: pragmas, migrations, transactions, savepoints, the
writer's turn, and SQLite's errors turned into the domain's."""

import fcntl
import os
import sqlite3
import threading

import pytest

import db as db_module
import migrations
from db import Database
from model import Busy, Conflict, Unavailable, Unusable


def test_pragmas_and_schema_version(database):
    conn = database.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == db_module.BUSY_TIMEOUT_MS
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations.MIGRATIONS)


def test_migrate_twice_and_from_many_threads_is_safe(tmp_path):
    path = tmp_path / "m.db"
    errors = []

    def migrate():
        try:
            Database(path).migrate()
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Database(path).connection().execute("PRAGMA user_version").fetchone()[0] == len(migrations.MIGRATIONS)


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Database(path).prepare()
    sqlite3.connect(path).execute(f"PRAGMA user_version = {len(migrations.MIGRATIONS) + 1}")
    with pytest.raises(Unusable, match="schema version"):
        Database(path).prepare()


def test_a_file_that_is_not_a_database_is_unusable(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(Unusable, match="not a database"):
        Database(path).prepare()


def test_a_folder_that_cannot_be_made_is_unusable(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(Unusable):
        Database(tmp_path / "file" / "s.db").prepare()


def test_prepare_makes_a_private_file_and_its_folders_and_closes_its_connection(tmp_path):
    database = Database(tmp_path / "a" / "b" / "s.db")
    database.prepare()
    assert (tmp_path / "a" / "b" / "s.db").stat().st_mode & 0o777 == 0o600
    assert getattr(database._local, "conn", None) is None  # nothing to inherit across a fork


def test_transaction_rolls_back_on_error(database):
    with pytest.raises(RuntimeError), database.transaction() as conn:
        conn.execute("INSERT INTO tokens (name, role, secret_hash, created_at) VALUES ('x', 'reader', 'h', 'now')")
        raise RuntimeError("abort")
    assert database.row("SELECT count(*) FROM tokens")[0] == 0


def test_a_savepoint_undoes_only_its_own_part_and_its_callbacks(database):
    called = []
    insert = "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES (?, 'reader', ?, 'now')"
    with database.transaction() as conn:
        conn.execute(insert, ("kept", "h1"))
        database.on_commit(lambda: called.append("kept"))
        with pytest.raises(RuntimeError), database.transaction():
            conn.execute(insert, ("undone", "h2"))
            database.on_commit(lambda: called.append("undone"))
            raise RuntimeError("abort the inner part")
        assert called == []  # nothing is called before the commit
    assert [row[0] for row in database.rows("SELECT name FROM tokens")] == ["kept"]
    assert called == ["kept"]


def test_a_rolled_back_transaction_calls_no_callback(database):
    called = []
    with database.transaction(rollback=True) as conn:
        conn.execute("INSERT INTO tokens (name, role, secret_hash, created_at) VALUES ('x', 'reader', 'h', 'now')")
        database.on_commit(lambda: called.append("x"))
    assert called == [] and database.row("SELECT count(*) FROM tokens")[0] == 0


def test_on_commit_outside_a_transaction_calls_at_once(database):
    called = []
    database.on_commit(lambda: called.append(1))
    assert called == [1]


def test_a_write_inside_a_read_snapshot_is_refused(database):
    with database.snapshot(), pytest.raises(RuntimeError, match="read snapshot"), database.transaction():
        pass


def test_a_duplicate_key_is_a_conflict(database):
    insert = "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES ('x', 'reader', ?, 'now')"
    with database.transaction() as conn:
        conn.execute(insert, ("h1",))
    with pytest.raises(Conflict), database.transaction() as conn:
        conn.execute(insert, ("h2",))


def test_a_lock_held_by_another_connection_is_busy(tmp_path):
    path = tmp_path / "busy.db"
    Database(path).prepare()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waiting = Database(path)
    waiting.connection().execute("PRAGMA busy_timeout = 50")
    try:
        with pytest.raises(Busy), waiting.transaction() as conn:
            conn.execute("DELETE FROM runners")
    finally:
        holder.execute("ROLLBACK")


def test_a_writer_of_another_process_holding_the_lock_file_makes_us_busy(database, monkeypatch):
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 100)
    other = os.open(f"{database.path}.lock", os.O_RDWR)  # another open file description: as another process has
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(Busy), database.transaction():
            pass
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    with database.transaction() as conn:  # and once it is free, writes go through
        conn.execute("INSERT INTO tokens VALUES ('t', 'reader', 'h', 'now')")
    assert database.row("SELECT count(*) FROM tokens")[0] == 1


def test_writers_of_one_database_take_turns(database):
    # 8 threads x 25 increments of one counter through read-modify-write transactions: none lost.
    database.connection().execute("INSERT INTO tokens VALUES ('counter', 'reader', '0', 'now')")

    def bump():
        for _ in range(25):
            with database.transaction() as conn:
                value = int(conn.execute("SELECT secret_hash FROM tokens WHERE name = 'counter'").fetchone()[0])
                conn.execute("UPDATE tokens SET secret_hash = ? WHERE name = 'counter'", (str(value + 1),))

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert database.row("SELECT secret_hash FROM tokens WHERE name = 'counter'")[0] == "200"


def test_a_database_that_does_not_answer_is_unavailable(tmp_path):
    path = tmp_path / "gone.db"
    Database(path).prepare()
    path.unlink()
    path.mkdir()  # a folder where the file was: nothing can open it
    with pytest.raises(Unavailable):
        Database(path).ping()


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("database is locked", Busy),
        ("database table is locked", Busy),
        ("database or disk is full", db_module.Unwritable),
        ("attempt to write a readonly database", db_module.Unwritable),
    ],
)
def test_sqlite_errors_become_the_domains(text, kind):
    assert isinstance(db_module.domain_error(sqlite3.OperationalError(text)), kind)


def test_other_sqlite_errors_stay_unexpected():
    assert db_module.domain_error(sqlite3.OperationalError("no such table: x")) is None
    with pytest.raises(sqlite3.OperationalError), db_module.sqlite_errors():
        raise sqlite3.OperationalError("no such table: x")
