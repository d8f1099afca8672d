"""The store against a real SQLite file: transitions, compare-and-set under threads, migrations."""

import sqlite3
import threading

import pytest

import store as st
from store import PreconditionFailed, Store


@pytest.fixture
def db(tmp_path):
    store = Store(tmp_path / "s.db")
    store.migrate()
    return store


def fail(db, job, message="boom"):
    return db.finish_attempt(job, st.FAILED, error={"type": "ValueError", "message": message}, runner_id="r1")


def has_delegate(_type):
    return True


def started_process(db, *types):
    process, job = db.create_process("p", [(t, {"n": ("LONG", i)}) for i, t in enumerate(types)], "alice", "r1")
    return process, job


def test_pragmas_and_schema_version(db, tmp_path):
    conn = db.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == st.BUSY_TIMEOUT_MS
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(st.MIGRATIONS)


def test_migrate_twice_and_from_many_threads_is_safe(tmp_path):
    path = tmp_path / "m.db"
    errors = []

    def migrate():
        try:
            Store(path).migrate()
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Store(path).connection().execute("PRAGMA user_version").fetchone()[0] == len(st.MIGRATIONS)


def test_create_starts_step_zero_only(db):
    process, job = started_process(db, "a", "b", "c")
    assert [s["status"] for s in process["steps"]] == ["STARTED", "PENDING", "PENDING"]
    assert process["status"] == "RUNNING"
    assert (job.type, job.attempt, job.params) == ("a", 1, {"n": ("LONG", 0)})


def test_completion_starts_the_next_step_in_the_same_transaction(db):
    process, job = started_process(db, "a", "b")
    next_job = db.finish_attempt(job, st.COMPLETED, result={"x": ("STRING", "y")}, runner_id="r1")
    steps = db.get_process(process["id"])["steps"]
    assert [s["status"] for s in steps] == ["COMPLETED", "STARTED"]
    assert steps[0]["result"] == {"x": ("STRING", "y")}
    assert next_job.step_id == steps[1]["id"]
    history = db.get_step(next_job.step_id, with_history=True)["attempt_history"]
    assert [(a["trigger"], a["principal"]) for a in history] == [("start", "alice")]
    assert db.finish_attempt(next_job, st.COMPLETED, runner_id="r1") is None
    assert db.get_process(process["id"])["status"] == "COMPLETED"


def test_failure_halts_and_restart_carries_on(db):
    process, job = started_process(db, "a", "b")
    assert fail(db, job) is None
    halted = db.get_process(process["id"])
    assert halted["status"] == "FAILED"
    assert [s["status"] for s in halted["steps"]] == ["FAILED", "PENDING"]
    restarted = db.restart_failed_step(job.step_id, {"m": ("DOUBLE", 1.5)}, "bob", "r2", has_delegate)
    assert restarted.attempt == 2
    assert restarted.params == {"n": ("LONG", 0), "m": ("DOUBLE", 1.5)}
    assert db.get_process(process["id"])["status"] == "RUNNING"
    step = db.get_step(job.step_id, with_history=True)
    assert step["attempts"] == 2 and step["error"] is None
    assert [(a["attempt"], a["trigger"], a["principal"], a["status"]) for a in step["attempt_history"]] == [
        (1, "start", "alice", "FAILED"),
        (2, "restart", "bob", "STARTED"),
    ]


@pytest.mark.parametrize("state", ["PENDING", "STARTED", "COMPLETED"])
def test_only_a_failed_step_restarts(db, state):
    process, job = started_process(db, "a", "b")
    targets = {"STARTED": job.step_id, "PENDING": process["steps"][1]["id"]}
    if state == "COMPLETED":
        db.finish_attempt(job, st.COMPLETED, runner_id="r1")
        targets["COMPLETED"] = job.step_id
    with pytest.raises(PreconditionFailed) as refused:
        db.restart_failed_step(targets[state], {}, "bob", "r1", has_delegate)
    assert refused.value.errors == {"status": [f"Step is {state}; only a FAILED step can be restarted."]}


def test_restart_refuses_unknown_step_and_missing_delegate(db):
    _, job = started_process(db, "a")
    fail(db, job)
    with pytest.raises(PreconditionFailed) as unknown:
        db.restart_failed_step("nope", {}, "bob", "r1", has_delegate)
    assert "processStepId" in unknown.value.errors
    with pytest.raises(PreconditionFailed) as no_delegate:
        db.restart_failed_step(job.step_id, {}, "bob", "r1", lambda t: False)
    assert "type" in no_delegate.value.errors
    assert db.get_step(job.step_id)["attempts"] == 1


def test_restart_refuses_too_many_names_after_overlay(db):
    process, job = db.create_process(None, [("a", {f"k{i}": ("LONG", i) for i in range(200)})], "alice", "r1")
    fail(db, job)
    extra = {f"x{i}": ("LONG", i) for i in range(57)}
    with pytest.raises(PreconditionFailed) as refused:
        db.restart_failed_step(job.step_id, extra, "bob", "r1", has_delegate)
    assert "params" in refused.value.errors
    assert db.get_step(job.step_id)["status"] == "FAILED"
    ok = db.restart_failed_step(job.step_id, dict(list(extra.items())[:56]), "bob", "r1", has_delegate)
    assert len(ok.params) == 256


def test_concurrent_restarts_from_threads_have_one_winner(tmp_path):
    path = tmp_path / "race.db"
    setup = Store(path)
    setup.migrate()
    _, job = setup.create_process(None, [("a", {})], "alice", "r1")
    fail(setup, job)
    barrier = threading.Barrier(16)
    outcomes = []

    def restart(n):
        own = Store(path)  # each thread its own Store and connection, like separate workers
        barrier.wait()
        try:
            own.restart_failed_step(job.step_id, {"n": ("LONG", n)}, f"t{n}", "r1", has_delegate)
            outcomes.append("won")
        except PreconditionFailed:
            outcomes.append("refused")

    threads = [threading.Thread(target=restart, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 15 + ["won"]
    step = setup.get_step(job.step_id, with_history=True)
    assert step["attempts"] == 2 and len(step["attempt_history"]) == 2


def test_stale_outcome_is_ignored(db):
    _, job = started_process(db, "a", "b")
    failed = db.fail_step(job.step_id, "operator gave up")
    assert failed["error"] == {"type": "ExternalFailure", "message": "operator gave up"}
    # the delegate that was still running returns later: nothing changes
    assert db.finish_attempt(job, st.COMPLETED, runner_id="r1") is None
    assert db.get_step(job.step_id)["status"] == "FAILED"
    # and an old attempt cannot complete a newer one
    newer = db.restart_failed_step(job.step_id, {}, "bob", "r1", has_delegate)
    assert db.finish_attempt(job, st.COMPLETED, runner_id="r1") is None
    assert db.get_step(job.step_id)["attempts"] == newer.attempt == 2


def test_deferred_step_waits_for_complete_step(db):
    process, job = started_process(db, "a", "b")
    db.defer_attempt(job)
    assert db.get_step(job.step_id)["deferred"] is True
    assert db.finish_attempt(job, st.COMPLETED, runner_id="r1") is None  # a deferred attempt ends only from outside
    step, next_job = db.complete_step(job.step_id, {"ok": ("LONG", 1)}, "r1")
    assert step["status"] == "COMPLETED" and step["deferred"] is False and step["result"] == {"ok": ("LONG", 1)}
    assert next_job.type == "b"
    with pytest.raises(PreconditionFailed):
        db.complete_step(job.step_id, None, "r1")


def runner_row(runner_id):
    return {"id": runner_id, "host": "h", "pid": 1, "pid_started": None}


def test_orphans_of_a_gone_runner_are_interrupted_but_not_deferred_ones(db):
    _, job_a = started_process(db, "a")
    _, job_b = started_process(db, "b")
    db.defer_attempt(job_b)
    db.heartbeat(runner_row("r1"))
    assert db.interrupt_orphans(lambda row: True) == []  # r1 is alive
    assert db.connection().execute("SELECT count(*) FROM runners").fetchone()[0] == 1
    assert db.interrupt_orphans(lambda row: row["id"] != "r1") == [job_a.step_id]
    step = db.get_step(job_a.step_id, with_history=True)
    assert step["status"] == "FAILED" and step["error"]["type"] == "Interrupted"
    assert step["attempt_history"][0]["status"] == "FAILED"
    assert db.get_process(step["process_id"])["status"] == "FAILED"
    assert db.get_step(job_b.step_id)["status"] == "STARTED"
    assert db.connection().execute("SELECT count(*) FROM runners").fetchone()[0] == 0


def test_unregistered_runner_counts_as_gone(db):
    _, job = started_process(db, "a")  # runner r1 never registered
    db.heartbeat(runner_row("r2"))
    assert db.interrupt_orphans(lambda row: True) == [job.step_id]


def test_a_stopping_runner_interrupts_only_its_own_steps(db):
    _, mine = started_process(db, "a")
    _, theirs = db.create_process(None, [("a", {})], "alice", "r2")
    db.heartbeat(runner_row("r1"))
    assert db.interrupt_runner("r1", "stopping") == [mine.step_id]
    assert db.get_step(mine.step_id)["error"] == {"type": "Interrupted", "message": "stopping"}
    assert db.get_step(theirs.step_id)["status"] == "STARTED"


def test_attempt_is_current(db):
    _, job = started_process(db, "a")
    assert db.attempt_is_current(job)
    db.fail_step(job.step_id, "gave up")
    assert not db.attempt_is_current(job)


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Store(path).migrate()
    sqlite3.connect(path).execute(f"PRAGMA user_version = {len(st.MIGRATIONS) + 1}")
    with pytest.raises(sqlite3.DatabaseError, match="schema version"):
        Store(path).migrate()


def test_create_file_is_private_and_makes_folders(tmp_path):
    store = Store(tmp_path / "a" / "b" / "s.db")
    store.create_file()
    store.migrate()
    assert (tmp_path / "a" / "b" / "s.db").stat().st_mode & 0o777 == 0o600


def test_transaction_rolls_back_on_error(db):
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute("INSERT INTO tokens (name, role, secret_hash, created_at) VALUES ('x', 'reader', 'h', 'now')")
        raise RuntimeError("abort")
    assert db.connection().execute("SELECT count(*) FROM tokens").fetchone()[0] == 0


def test_busy_database_is_reported_as_busy(tmp_path):
    path = tmp_path / "busy.db"
    Store(path).migrate()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waiting = Store(path)
    waiting.connection().execute("PRAGMA busy_timeout = 50")
    try:
        with pytest.raises(sqlite3.OperationalError) as busy:
            waiting.heartbeat(runner_row("r"))
        assert st.is_busy(busy.value)
    finally:
        holder.execute("ROLLBACK")


def test_first_token_only_once(db):
    assert db.add_first_token("admin", "operator", "h1") is True
    assert db.add_first_token("admin2", "operator", "h2") is False
    assert db.add_token("admin", "reader", "h3") is False
    assert [t["name"] for t in db.list_tokens()] == ["admin"]


def test_a_writer_of_another_process_holding_the_lock_file_makes_us_busy(tmp_path, monkeypatch):
    import fcntl
    import os

    path = tmp_path / "locked.db"
    store = Store(path)
    store.migrate()
    monkeypatch.setattr(st, "BUSY_TIMEOUT_MS", 100)
    other = os.open(f"{path}.lock", os.O_RDWR)  # another open file description: as another process has
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(sqlite3.OperationalError) as busy:
            store.heartbeat(runner_row("r"))
        assert st.is_busy(busy.value)
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    store.heartbeat(runner_row("r"))  # and once it is free, writes go through
    assert store.connection().execute("SELECT count(*) FROM runners").fetchone()[0] == 1


def test_writers_of_one_store_take_turns(db):
    # 8 threads x 25 increments of one counter through read-modify-write transactions: none lost.
    db.connection().execute("INSERT INTO tokens VALUES ('counter', 'reader', '0', 'now')")

    def bump():
        for _ in range(25):
            with db.transaction() as conn:
                value = int(conn.execute("SELECT secret_hash FROM tokens WHERE name = 'counter'").fetchone()[0])
                conn.execute("UPDATE tokens SET secret_hash = ? WHERE name = 'counter'", (str(value + 1),))

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert db.connection().execute("SELECT secret_hash FROM tokens WHERE name = 'counter'").fetchone()[0] == "200"


def _plan(db, sql, params=()):
    return " | ".join(row[3] for row in db.connection().execute("EXPLAIN QUERY PLAN " + sql, params))


def test_refreshing_a_process_reads_only_its_own_steps(db):
    # The planner once chose the status index here: every FAILED step of every process, per write.
    plan = _plan(db, st.REFRESH_PROCESS, {"pid": "p", "now": "t"})
    assert "steps_by_status" not in plan
    assert plan.count("(process_id=?)") == 2, plan


def test_finding_running_steps_reads_only_running_steps(db):
    # Thousands of deferred steps must not be read every second by every runner.
    assert "steps_running" in _plan(db, st.RUNNING_STEPS)
    assert "steps_running" in _plan(db, st.RUNNING_STEPS + " AND runner_id = ?", ("r",))


def test_looking_for_due_retries_reads_only_waiting_steps(db):
    plan = _plan(db, st.DUE_RETRIES, ("t", 1))
    assert "steps_due_retries" in plan and "steps_by_status" not in plan
