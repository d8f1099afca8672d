"""db.Database against a real SQLite file: pragmas, migrations, transactions, savepoints, the
writer's turn, and SQLite's errors turned into the domain's."""

import contextlib
import fcntl
import os
import sqlite3
import threading
import time

import pytest
from helpers import all_at_once, wait_for

from stepd import db as db_module
from stepd import migrations
from stepd.db import Database
from stepd.model import Busy, Conflict, PreconditionFailed, Unavailable, Unusable, Unwritable
from stepd.store import Store


def test_pragmas_and_schema_version(database):
    conn = database.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == db_module.BUSY_TIMEOUT_MS
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations.MIGRATIONS)
    # Reads and writes alike: the node checkpoints, not a request's COMMIT; no memory map of the file.
    for each in (conn, database.write_connection()):
        assert each.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == db_module.AUTOCHECKPOINT_PAGES
        assert each.execute("PRAGMA mmap_size").fetchone()[0] == db_module.MMAP_BYTES


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


def test_a_savepoint_undoes_only_its_own_part(database):
    insert = "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES (?, 'reader', ?, 'now')"
    with database.transaction() as conn:
        conn.execute(insert, ("kept", "h1"))
        with pytest.raises(RuntimeError), database.transaction():
            conn.execute(insert, ("undone", "h2"))
            raise RuntimeError("abort the inner part")
    assert [row[0] for row in database.rows("SELECT name FROM tokens")] == ["kept"]


def test_a_rolled_back_transaction_leaves_nothing(database):
    with database.transaction(rollback=True) as conn:
        conn.execute("INSERT INTO tokens (name, role, secret_hash, created_at) VALUES ('x', 'reader', 'h', 'now')")
    assert database.row("SELECT count(*) FROM tokens")[0] == 0


def test_a_write_inside_a_read_snapshot_is_refused(database):
    with database.snapshot(), pytest.raises(RuntimeError, match="read snapshot"), database.transaction():
        pass


def test_a_duplicate_key_is_a_conflict(database):
    insert = "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES ('x', 'reader', ?, 'now')"
    with database.transaction() as conn:
        conn.execute(insert, ("h1",))
    with pytest.raises(Conflict), database.transaction() as conn:
        conn.execute(insert, ("h2",))


def test_a_lock_held_by_another_connection_is_busy(tmp_path, monkeypatch):
    path = tmp_path / "busy.db"
    Database(path).prepare()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 50)  # SQLite's own busy timeout, at connect
    waiting = Database(path)
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


# -- group commit: writes of one process at the same moment share one transaction -------------
def insert_token(conn, name):
    conn.execute(
        "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES (?, 'reader', ?, 'now')", (name, name)
    )


def committed_names(database):
    """The token names as another connection sees them: only what is committed."""
    with sqlite3.connect(database.path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM tokens")}


def test_concurrent_writers_share_transactions_and_each_returns_only_once_committed(database):
    seen_on_return = {}

    def write(index):
        name = f"t{index}"
        with database.transaction() as conn:
            time.sleep(0.02)  # holds the group open while the other threads join it
            insert_token(conn, name)
        seen_on_return[name] = name in committed_names(database)

    groups_before, writes_before = database.group_commits()
    all_at_once(16, write)
    groups_after, writes_after = database.group_commits()
    groups, writes = groups_after - groups_before, writes_after - writes_before
    assert committed_names(database) == {f"t{n}" for n in range(16)}
    assert all(seen_on_return.values()) and len(seen_on_return) == 16, seen_on_return
    assert writes == 16
    assert groups < 16, "no two writes shared a transaction"


def test_a_failing_writer_is_undone_alone_and_the_others_of_its_group_commit(database):
    inside = threading.Barrier(3, timeout=5)
    outcomes = {}

    def write(name):
        try:
            with database.transaction() as conn:
                insert_token(conn, name)
                if name == "failing":
                    raise PreconditionFailed.on("x", "no")
            outcomes[name] = "ok"
        except PreconditionFailed:
            outcomes[name] = "refused"

    def in_one_group(name):  # all three enter before any body runs: one group
        inside.wait()
        write(name)

    threads = [threading.Thread(target=in_one_group, args=(n,)) for n in ("a", "failing", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert outcomes == {"a": "ok", "failing": "refused", "b": "ok"}
    assert committed_names(database) == {"a", "b"}


def test_a_dry_run_in_a_group_undoes_only_itself(database):
    with database.transaction(rollback=True) as conn:
        insert_token(conn, "dry")
    with database.transaction() as conn:
        insert_token(conn, "kept")
    assert committed_names(database) == {"kept"}


def test_a_group_whose_transaction_sqlite_rolled_back_fails_and_the_next_one_works(database):
    with pytest.raises(Unwritable), database.transaction() as conn:
        insert_token(conn, "lost")
        conn.execute("ROLLBACK")  # as SQLite does by itself on a full disk
    assert committed_names(database) == set()
    with database.transaction() as conn:
        insert_token(conn, "after")
    assert committed_names(database) == {"after"}


def test_the_counts_of_a_group_that_failed_are_not_written_with_the_next(database):
    """Counts a member added (`add_counts`) are written once a group, last in its transaction; a group
    that fails (here SQLite rolled it back) writes none of them, and the next group writes only its own."""
    written = []
    database.count_in_groups(lambda conn, counts: written.append(dict(counts)))

    def counts_then_rolled_back(conn):
        assert database.add_counts({"lost": 5})
        conn.execute("ROLLBACK")  # as SQLite does by itself on a full disk

    with pytest.raises(Unwritable):
        database.write(counts_then_rolled_back)
    database.write(lambda conn: database.add_counts({"kept": 1}) and database.add_counts({"kept": 2}))
    assert written == [{"kept": 3}]
    assert not database.add_counts({"outside": 1})  # no write of this caller open: it writes its own


def test_a_groups_first_job_has_no_savepoint_and_fails_alone(database):
    """The first member of a group needs no savepoint (its failure rolls back a transaction that
    holds nothing else): two statements less a group. When it fails, none of its writes is in the
    file, its caller gets its own error, and the members waiting commit in the next group."""
    database.write(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))
    sent = []
    database.write_connection().set_trace_callback(sent.append)
    database.write(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
    assert sent == ["BEGIN IMMEDIATE", "INSERT INTO t VALUES (1)", "COMMIT"]
    writer = database._writer()
    second = threading.Thread(target=database.write, args=(lambda conn: conn.execute("INSERT INTO t VALUES (3)"),))

    def fails_after_a_write(conn):
        conn.execute("INSERT INTO t VALUES (2)")
        second.start()  # its write waits behind this one
        wait_for(lambda: writer._waiting, what="the second write waiting behind this one")
        raise PreconditionFailed.on("n", "refused after writing")

    sent.clear()
    with pytest.raises(PreconditionFailed):
        database.write(fails_after_a_write)
    second.join(5)
    assert sent == ["BEGIN IMMEDIATE", "INSERT INTO t VALUES (2)", "ROLLBACK"] + [
        "BEGIN IMMEDIATE", "INSERT INTO t VALUES (3)", "COMMIT"
    ]  # fmt: skip
    assert [n for (n,) in database.rows("SELECT n FROM t ORDER BY n")] == [1, 3]


def test_a_store_starts_no_writer_until_its_first_write(database):
    """Making a Store (the app factory, every command) opens no write connection and starts no
    writer thread (a process that forks after it must not carry one); the first write's writer
    writes the store's tallies once a group."""
    store = Store(database)
    assert database._writer_state is None
    store.add_token("ops", "operator", "hash")
    assert database._writer_state is not None and database._writer_state.write_counts is not None


def test_members_after_sqlite_rolled_their_group_back_fail_and_leave_nothing_in_the_file(database):
    """The defect of the group commit: once SQLite rolled the shared transaction back (a full
    disk), the next member's SAVEPOINT started a transaction of its own and its RELEASE committed
    it, while that member was told its write failed. Now every member of that group gets the
    error, nothing of theirs is in the file, and the next group works."""
    inside = threading.Barrier(3, timeout=5)
    first_in = threading.Event()
    outcomes = {}

    def write(name):
        inside.wait()  # all three join one group before any body runs
        if name != "rolled-back":
            first_in.wait(5)
        try:
            with database.transaction() as conn:
                if name == "rolled-back":
                    first_in.set()
                    time.sleep(0.05)  # the others are queued behind this body
                    insert_token(conn, name)
                    conn.execute("ROLLBACK")  # as SQLite does by itself on a full disk
                    return
                insert_token(conn, name)
            outcomes[name] = "ok"
        except Unwritable:
            outcomes[name] = "unwritable"
        finally:
            outcomes.setdefault(name, "returned")

    threads = [threading.Thread(target=write, args=(n,)) for n in ("rolled-back", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert outcomes == {"rolled-back": "unwritable", "b": "unwritable", "c": "unwritable"}, outcomes
    assert committed_names(database) == set()
    with database.transaction() as conn:
        insert_token(conn, "next")
    assert committed_names(database) == {"next"}


def test_writers_waiting_behind_another_processs_lock_get_busy_and_change_nothing(database, monkeypatch):
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 200)
    other = os.open(f"{database.path}.lock", os.O_RDWR)  # as another process has it
    fcntl.flock(other, fcntl.LOCK_EX)
    answers = []

    def write(index):
        try:
            with database.transaction() as conn:
                insert_token(conn, f"w{index}")
            answers.append("ok")
        except Busy:
            answers.append("busy")

    try:
        all_at_once(4, write)
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    assert answers == ["busy"] * 4
    assert committed_names(database) == set()


def wal_restarts(database):
    """The log's checkpoint sequence number (bytes 12-15 of its header): SQLite adds one each time
    the log starts again from its beginning."""
    with open(f"{database.path}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


@contextlib.contextmanager
def a_group_held_open(database, name, rolled_back=False):
    """A group of the writer holding its transaction open (with the token `name` written) until
    the block ends. `rolled_back`: SQLite then rolls it back, as it does by itself on a full disk."""
    inside, release = threading.Event(), threading.Event()
    errors = []

    def hold():
        try:
            with database.transaction() as conn:
                insert_token(conn, name)
                inside.set()
                release.wait(5)
                if rolled_back:
                    conn.execute("ROLLBACK")
        except Unwritable as exc:
            errors.append(exc)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(5)
    try:
        yield
    finally:
        release.set()
        holder.join(5)
    assert len(errors) == rolled_back, errors


def in_a_thread(fn):
    """Start `fn()` on a thread; returns (the thread, a dict that gets its result as "value")."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=fn()))
    thread.start()
    return thread, result


def test_a_write_between_groups_runs_outside_any_transaction_after_the_open_group_commits(database):
    """A `between` member queued while a group is open ends that group: it runs once its COMMIT is
    done, outside any transaction."""
    seen = {}

    def between(conn):
        seen["in_transaction"] = conn.in_transaction
        seen["held_committed"] = "held" in committed_names(database)
        return "done"

    with a_group_held_open(database, "held"):
        asker, result = in_a_thread(lambda: database.between_groups(between))
        time.sleep(0.05)  # the between member is queued behind the open group
    asker.join(5)
    assert result == {"value": "done"}
    assert seen == {"in_transaction": False, "held_committed": True}


def test_a_write_between_groups_keeps_its_own_error_and_the_writer_goes_on(database):
    def fails(conn):
        raise ValueError("its own")

    with pytest.raises(ValueError, match="its own"):
        database.between_groups(fails)
    with database.transaction() as conn:
        insert_token(conn, "after")
    assert committed_names(database) == {"after"}


def test_a_failed_group_does_not_fail_a_write_waiting_between_groups(database):
    """The members waiting when a group fails share its error; one waiting between groups is not
    part of any group, and runs afterwards."""
    with a_group_held_open(database, "lost", rolled_back=True):
        asker, result = in_a_thread(lambda: database.between_groups(lambda conn: "ran"))
        time.sleep(0.05)
    asker.join(5)
    assert result == {"value": "ran"}
    assert committed_names(database) == set()


def test_a_short_log_is_left_to_run_on(database):
    """Below RESTART_LOG_PAGES the checkpoint copies, but does not hold the writes to let the log
    start again: a group committed during its copy leaves the log going on from where it was."""
    assert checkpoint_with_a_group_committed_during_its_copy(database) == 0


def test_the_checkpoint_lets_the_log_start_again_when_a_group_committed_during_its_copy(database, monkeypatch):
    """The log starts again only if, when a write begins, all of it is in the file. A group that
    commits while the checkpoint's first copy runs (here: held open across it) leaves frames that
    copy never saw; the checkpoint's second step, between groups on the writer's connection, copies
    them, so the next write starts the log again. Without it the log only grows under steady writes
    (to 80 MB, where a COMMIT ran SQLite's own checkpoint and cut the file back)."""
    monkeypatch.setattr(db_module, "RESTART_LOG_PAGES", 1)  # a test's log is short
    assert checkpoint_with_a_group_committed_during_its_copy(database) == 1


def checkpoint_with_a_group_committed_during_its_copy(database):
    """Checkpoint while a group holds its transaction open across the first copy, write once more,
    and return how many times the log started again meanwhile."""
    with database.transaction() as conn:
        insert_token(conn, "first")
    with a_group_held_open(database, "during"):
        before = wal_restarts(database)
        checkpointer, _ = in_a_thread(database.checkpoint)
        time.sleep(0.1)  # its first copy is done; its second (if any) waits behind the open group
    checkpointer.join(5)
    with database.transaction() as conn:
        insert_token(conn, "next")
    assert committed_names(database) == {"first", "during", "next"}
    return wal_restarts(database) - before


# -- hooks at the end of every group (the dispatcher's claims) -------------------------------------------
def test_a_hook_that_is_not_due_is_passed_over_and_one_that_is_runs_in_the_group(database):
    calls = []

    def hook(conn):
        calls.append(conn.in_transaction)

    due = [False]
    database.at_end_of_groups(hook, due=lambda: due[0])
    try:
        database.write(lambda conn: insert_token(conn, "first"))
        assert calls == []
        due[0] = True
        database.write(lambda conn: insert_token(conn, "second"))
        assert calls == [True]
    finally:
        database.not_at_end_of_groups(hook)


def test_a_hook_that_writes_nothing_runs_outside_a_savepoint_and_its_failure_fails_no_group(database):
    """No SAVEPOINT (a round trip to PostgreSQL's server, in every group) for a hook that only reads
    its own lists; one that fails anyway leaves the group to commit."""
    seen = {}

    def hook(conn):
        try:
            conn.execute("RELEASE ended")  # the savepoint a writing hook runs in
            seen["savepoint"] = True
        except Exception:
            seen["savepoint"] = False
        raise RuntimeError("a hook's own failure")

    database.at_end_of_groups(hook, writes=False)
    try:
        database.write(lambda conn: insert_token(conn, "kept"))
    finally:
        database.not_at_end_of_groups(hook)
    assert seen == {"savepoint": False}
    assert "kept" in committed_names(database)
