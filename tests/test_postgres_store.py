"""PostgreSQL under the store (postgres.py): the store's SQL respelt for psycopg, rows read as
sqlite3.Row is, PostgreSQL's errors as the domain's, the writer's transactions and the read
snapshots, the claims that skip what another holds, and `stepd check` on a PostgreSQL URL.

What every backend must do is test_store.py's contract; these are what PostgreSQL adds to get there.
Each test gets a fresh database of the test process's own cluster (fixture postgres_url).
"""

import gc
import threading
import time

import psycopg
import pytest
from helpers import all_at_once, run_cli, wait_for

from stepd import postgres
from stepd import store as st
from stepd.model import COMPLETED, Busy, Conflict, Unavailable, Unwritable, now_iso
from stepd.postgres import PostgresDatabase, Row, postgres_sql
from stepd.store import Store


@pytest.fixture
def database(postgres_url):
    """A migrated PostgresDatabase, closed at the end."""
    database = PostgresDatabase(postgres_url)
    database.prepare()
    yield database
    database.close()


@pytest.fixture
def stores(postgres_url):
    """Opens stores on one migrated database, each with its own PostgresDatabase (as nodes have)."""
    PostgresDatabase(postgres_url).prepare()
    opened = []

    def open_one():
        opened.append(Store(PostgresDatabase(postgres_url)))
        return opened[-1]

    yield open_one
    for store in opened:
        store.db.close()


@pytest.fixture
def admin(postgres_url):
    """A plain psycopg connection of the test's own (autocommit), to hold locks and look around."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


def queued(store, count):
    """`count` processes whose one step is queued (no runner has it), oldest first: their step ids."""
    return [store.create_process(None, [("a", {})], "alice", None)[0]["steps"][0]["id"] for _ in range(count)]


# -- the store's SQL, respelt --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sqlite", "psycopg_spelling"),
    [
        ("SELECT * FROM t WHERE id = ? AND attempts = ?", "SELECT * FROM t WHERE id = %s AND attempts = %s"),
        ("UPDATE t SET r = :runner_id WHERE id = :id", "UPDATE t SET r = %(runner_id)s WHERE id = %(id)s"),
        ("SELECT id FROM steps INDEXED BY steps_running WHERE x", "SELECT id FROM steps WHERE x"),
        ("WHERE p = :p AND +status = 'X'", "WHERE p = %(p)s AND COALESCE(status, status) = 'X'"),
        ("WHERE id = ? AND +s.retry_at IS NULL", "WHERE id = %s AND COALESCE(s.retry_at, s.retry_at) IS NULL"),
        ("SET attempts = attempts + 1", "SET attempts = attempts + 1"),
        ("SELECT 'what? :no' || ?", "SELECT 'what? :no' || %s"),  # quoted text: no marks in it
        ("SELECT 'it''s ?', ?", "SELECT 'it''s ?', %s"),
        ("SELECT '50%' LIKE ? || '%'", "SELECT '50%%' LIKE %s || '%%'"),  # psycopg reads % even there
        ("SELECT x % 2, ?::text", "SELECT x %% 2, %s::text"),
    ],
)  # fmt: skip
def test_the_stores_sql_is_respelt_for_psycopg(sqlite, psycopg_spelling):
    assert postgres_sql(sqlite) == psycopg_spelling
    assert postgres_sql(sqlite) is postgres_sql(sqlite)  # worked out once per statement


def test_respelt_statements_run_with_their_marks_and_literals(database):
    conn = database.connection()
    assert conn.execute("SELECT ? || '%?', 7 % 4", ("x",)).fetchone() == ("x%?", 3)
    assert conn.execute("SELECT :a::int + 1, :b || ':c'", {"a": "41", "b": "q", "unused": 0}).fetchone() == (42, "q:c")


# -- rows ------------------------------------------------------------------------------------------------
def test_a_row_reads_by_position_and_by_name_as_sqlite3_row_does(database):
    row = database.row("SELECT 'p1' AS id, 2 AS attempts, NULL AS result")
    assert isinstance(row, Row)
    assert (row[0], row[1], row[-1], row["id"], row["attempts"], row["result"]) == ("p1", 2, None, "p1", 2, None)
    assert tuple(row) == ("p1", 2, None) and row[:2] == ("p1", 2)
    assert dict(row) == {"id": "p1", "attempts": 2, "result": None} and row.keys() == ["id", "attempts", "result"]
    identifier, attempts, _ = row
    assert (identifier, attempts) == ("p1", 2)
    with pytest.raises(KeyError):
        row["nothing"]
    other = database.row("SELECT 1 AS a, 2 AS b")  # another shape, another class: its own names
    assert dict(other) == {"a": 1, "b": 2} and dict(row)["id"] == "p1"
    assert dict(database.rows("SELECT 'x', 1 UNION ALL SELECT 'y', 2")) == {"x": 1, "y": 2}


# -- errors --------------------------------------------------------------------------------------------------
def test_a_duplicate_key_is_a_conflict_and_the_group_goes_on(database):
    """A unique violation inside a nested write is Conflict; its savepoint is undone (the transaction,
    INERROR meanwhile, is open again) and the outer write commits the rest."""
    insert = "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES (?, 'reader', ?, now())"
    with database.transaction() as conn:
        conn.execute(insert, ("a", "h1"))
        with pytest.raises(Conflict, match="duplicate key"), database.transaction() as inner:
            inner.execute(insert, ("a", "h2"))
        conn.execute(insert, ("b", "h3"))
    assert [row["name"] for row in database.rows("SELECT name FROM tokens ORDER BY name")] == ["a", "b"]


def test_a_write_waiting_on_anothers_row_lock_past_the_lock_timeout_is_busy(database, admin, monkeypatch):
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT", "200ms")
    store = Store(database)
    [step_id] = queued(store, 1)
    with admin.transaction():
        admin.execute("SELECT 1 FROM steps WHERE id = %s FOR UPDATE", (step_id,))
        started = time.monotonic()
        with pytest.raises(Busy, match="lock timeout"):
            store.fail_step(step_id, "gave up")
        assert time.monotonic() - started < 3
    assert store.fail_step(step_id, "gave up")["status"] == "FAILED"  # the lock gone, it goes through


def test_a_deadlock_is_busy_for_the_one_postgresql_fails(stores, admin):
    """Two writers each holding a row the other wants: PostgreSQL fails one statement (Busy), the other
    commits. Neither store would do this; two raw turns do."""
    first, second = stores(), stores()
    admin.execute("INSERT INTO secrets (name, value) VALUES ('x', '0'), ('y', '0')")
    both_hold = threading.Barrier(2)

    def cross(n):
        own, other = ("x", "y") if n == 0 else ("y", "x")
        store = (first, second)[n]
        try:
            with store.atomic() as conn:
                conn.execute("SET LOCAL deadlock_timeout = '50ms'")
                conn.execute("UPDATE secrets SET value = ? WHERE name = ?", (str(n), own))
                both_hold.wait(10)
                conn.execute("UPDATE secrets SET value = ? WHERE name = ?", (str(n), other))
        except Busy as exc:
            return exc
        return None

    outcomes = all_at_once(2, cross)
    assert sum(isinstance(outcome, Busy) for outcome in outcomes) == 1, outcomes
    assert "deadlock detected" in str(next(o for o in outcomes if o is not None))


def test_a_serialization_failure_is_busy(database, admin):
    admin.execute("INSERT INTO secrets (name, value) VALUES ('x', '0')")
    conn = database.connection()
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    conn.execute("SELECT value FROM secrets WHERE name = 'x'").fetchall()
    admin.execute("UPDATE secrets SET value = '1' WHERE name = 'x'")
    with pytest.raises(Busy, match="could not serialize"):
        conn.execute("UPDATE secrets SET value = '2' WHERE name = 'x'")
    conn.execute("ROLLBACK")


def test_a_read_only_database_is_unwritable_and_reads_go_on(postgres_url, admin):
    PostgresDatabase(postgres_url).prepare()
    admin.execute(f"ALTER DATABASE {postgres_url.rsplit('/', 1)[1]} SET default_transaction_read_only = on")
    store = Store(PostgresDatabase(postgres_url))  # its connections are made now: read only
    try:
        with pytest.raises(Unwritable, match="read-only transaction"):
            store.add_token("t", "reader", "h")
        assert store.list_tokens() == []
    finally:
        store.db.close()


@pytest.mark.parametrize(
    ("state", "kind"),
    [("23505", Conflict), ("23503", Conflict), ("40001", Busy), ("40P01", Busy), ("55P03", Busy), ("57014", Busy),
     ("53100", Unwritable), ("25006", Unwritable), ("57P01", Unavailable), ("08006", Unavailable)],
)  # fmt: skip
def test_postgresqls_error_codes_become_the_domains(state, kind):
    """The table itself, for the codes a test cannot make the server send (a full disk)."""
    assert isinstance(postgres.domain_error(psycopg.errors.lookup(state)("text")), kind)


def test_other_postgresql_errors_stay_unexpected(database):
    with pytest.raises(psycopg.errors.UndefinedTable):
        database.rows("SELECT * FROM nothing_here")
    assert postgres.domain_error(psycopg.errors.lookup("22012")("division by zero")) is None


def test_a_connection_the_server_ended_is_made_again_for_reads_and_writes(database, admin):
    """pg_terminate_backend (as a server restart would): the next read, and the next group of the
    writer, find the connection gone before any transaction began, and go on on a new one."""
    store = Store(database)
    store.add_token("a", "reader", "h1")
    assert store.list_tokens()
    pids = [database.connection().raw.info.backend_pid, database.write_connection().raw.info.backend_pid]
    admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    assert [t["name"] for t in store.list_tokens()] == ["a"]
    assert store.add_token("b", "reader", "h2")
    assert database.connection().raw.info.backend_pid not in pids
    assert database.write_connection().raw.info.backend_pid not in pids


def test_a_transaction_the_server_ended_is_unavailable_and_not_sent_again(database, admin):
    conn = database.connection()
    conn.execute("BEGIN")  # held until the next statement (Connection): the transaction is on the server after it
    assert conn.execute("SELECT 1").fetchone() == (1,)
    admin.execute("SELECT pg_terminate_backend(%s)", (conn.raw.info.backend_pid,))
    with pytest.raises(Unavailable):
        conn.execute("SELECT 1")
    assert conn.execute("SELECT 1").fetchone() == (1,)  # outside the lost transaction: a new connection


def _sending(conn, monkeypatch):
    """The texts `conn` sends to the server from now on, one a round trip (executemany aside)."""
    sent, send = [], conn.raw.execute
    monkeypatch.setattr(conn.raw, "execute", lambda sql, *args, **kw: (sent.append(sql), send(sql, *args, **kw))[1])
    return sent


def test_begin_savepoint_release_and_the_tallies_go_with_the_next_statement(database, monkeypatch):
    """A round trip to the server is the writer's cost on PostgreSQL: what needs no answer waits
    for the next statement, and a transaction that only began sends nothing."""
    conn = postgres.Connection(database.url)
    conn.execute("BEGIN")
    conn.execute("SAVEPOINT job")
    assert conn.in_transaction and conn.raw is None  # held: not even connected yet
    conn.execute("RELEASE job")
    conn.execute("COMMIT")
    assert not conn.in_transaction and conn.raw is None
    assert conn.execute("SELECT 1").fetchone() == (1,)
    sent = _sending(conn, monkeypatch)
    conn.execute("BEGIN")
    conn.execute("SAVEPOINT job")
    assert conn.execute("SELECT count(*) FROM tally WHERE a = ?", ("it's 100%",)).fetchone() == (0,)
    conn.execute("RELEASE job")
    odd = conn.literal("it's 100%")
    conn.execute_later(f"INSERT INTO tally (series, a, b, n) VALUES ('steps', {odd}, '', 2)")
    conn.execute("COMMIT")
    assert sent == [
        "BEGIN; SAVEPOINT job",
        "SELECT count(*) FROM tally WHERE a = %s",
        "RELEASE job; INSERT INTO tally (series, a, b, n) VALUES ('steps', 'it''s 100%%', '', 2); COMMIT",
    ]
    assert conn.execute("SELECT sum(n) FROM tally WHERE a = ?", ("it's 100%",)).fetchone() == (2,)
    conn.close()


def test_a_rollback_drops_what_waited_and_ends_an_aborted_transaction(database):
    conn = postgres.Connection(database.url)
    conn.execute("BEGIN")
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1 / 0")
    conn.execute("RELEASE job")  # held; it would fail in the aborted transaction, before the ROLLBACK
    conn.execute("ROLLBACK")
    assert not conn.in_transaction and conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()


def test_a_held_statement_that_fails_fails_the_next_one_and_the_transaction(database):
    conn = postgres.Connection(database.url)
    conn.execute("BEGIN")
    conn.execute("SAVEPOINT job")
    conn.execute("RELEASE nothing_by_this_name")
    with pytest.raises(psycopg.errors.InvalidSavepointSpecification):
        conn.execute("SELECT 1")
    assert conn.in_transaction  # failed: rolled back by its owner, as the writer does
    conn.execute("ROLLBACK")
    assert not conn.in_transaction and conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()


def test_the_writers_compare_and_sets_find_their_rows_by_key_whatever_the_statistics_say(database):
    """A burst after a quiet time: the statistics say no step runs (ANALYZEd when all were done),
    then 300 are queued. The writer's batch of completions must still reach each row through its
    key: neither a whole-table scan (a plan made for the small table) nor steps_running or a status
    index (every queued step). Measured before: 1-4 ms a batch in make bench's engine row."""
    store = Store(database)
    store.heartbeat({"id": "r1", "host": "h", "pid": 1, "pid_started": None})
    for _ in range(30):
        _, job = store.create_process(None, [("a", {}), ("b", {})], "alice", "r1")
        store.finish_attempt(store.finish_attempt(job, COMPLETED, runner_id="r1"), COMPLETED, runner_id="r1")
    database.connection().execute("ANALYZE")
    queued(store, 300)
    _, job = store.create_process(None, [("a", {}), ("b", {})], "alice", "r1")
    values = {"step_ids": [job.step_id], "attempts": [1], "results": [None], "request_ids": [None], "runner_id": "r1"}
    with database.transaction(rollback=True) as conn:
        rows = conn.execute("EXPLAIN " + st.COMPLETE_AND_BEGIN_NEXT, {**values, "now": now_iso()}).fetchall()
    plan = "\n".join(row[0] for row in rows)
    assert "Seq Scan" not in plan and "steps_running" not in plan and "_by_status" not in plan, plan
    assert plan.count("Index Scan using steps_id_key") == 1 and "steps_process_id_position_key" in plan, plan
    # the claim walks the queued steps once (steps_running, oldest first), then each claimed by its id
    with database.transaction(rollback=True) as conn:
        rows = conn.execute("EXPLAIN " + st.CLAIM_QUEUED_SKIPPING_LOCKED, (4, "r1")).fetchall()
    plan = "\n".join(row[0] for row in rows)
    assert plan.count("steps_running") == 1 and "steps_id_key" in plan and "_by_status" not in plan, plan
    # due retries through their own index, not every STARTED step's
    with database.transaction(rollback=True) as conn:
        rows = conn.execute("EXPLAIN " + st.DUE_RETRIES_TO_BEGIN[st.POSTGRES], (now_iso(), 4)).fetchall()
    plan = "\n".join(row[0] for row in rows)
    assert "steps_due_retries" in plan and "_by_status" not in plan and "Seq Scan" not in plan, plan


def test_members_of_a_group_whose_connection_the_server_ended_are_told_unavailable(database, admin):
    """The server ends the writer's connection in the middle of a group (a restart): the member
    whose statement found it gets Unavailable, and so does every other member of that group, not
    SQLite's "rolled back" (disk full); nothing of theirs is kept and the next group reconnects."""
    writer = database._writer()
    database.write(lambda conn: conn.execute("CREATE TABLE kept (n integer)"))
    outcomes = {}

    def second():
        try:
            database.write(lambda conn: conn.execute("INSERT INTO kept VALUES (2)"))
            outcomes["second"] = "written"
        except Exception as exc:  # asserted below
            outcomes["second"] = exc

    waiting = threading.Thread(target=second)
    with pytest.raises(Unavailable), database.transaction() as conn:  # a turn: the group's first member
        conn.execute("INSERT INTO kept VALUES (1)")  # its transaction is on the server now
        waiting.start()
        wait_for(lambda: writer._waiting, what="the second write waiting behind this one")
        admin.execute("SELECT pg_terminate_backend(%s)", (conn.raw.info.backend_pid,))
        conn.execute("INSERT INTO kept VALUES (3)")
    waiting.join(5)
    assert isinstance(outcomes["second"], Unavailable), outcomes
    database.write(lambda conn: conn.execute("INSERT INTO kept VALUES (4)"))
    assert [n for (n,) in database.rows("SELECT n FROM kept")] == [4]


def test_an_unreachable_server_is_unavailable_for_a_request_and_ping(postgres_cluster):
    database = PostgresDatabase(postgres_cluster.url("no_such_database"))
    with pytest.raises(Unavailable, match="no_such_database"):
        database.rows("SELECT 1")
    with pytest.raises(Unavailable):
        database.ping()
    with pytest.raises(Unavailable):  # a write too: its group fails, the writer stays for the next
        Store(database).add_token("t", "reader", "h")
    database.close()


# -- reads, writes and connections --------------------------------------------------------------------
def test_a_snapshot_sees_one_state_while_another_node_commits(stores):
    reader, writer = stores(), stores()
    queued(writer, 1)
    with reader.db.snapshot() as conn:
        before = conn.execute("SELECT count(*) FROM processes").fetchone()[0]
        queued(writer, 2)
        assert conn.execute("SELECT count(*) FROM processes").fetchone()[0] == before == 1
    assert reader.db.row("SELECT count(*) FROM processes")[0] == 3


def test_concurrent_writers_of_one_database_share_transactions(database):
    """The writer's groups on PostgreSQL: callers writing at once share commits, each returns once
    its group committed, and a read inside a write sees that write's own changes."""
    store = Store(database)
    groups, writes = database.group_commits()

    def add(n):
        with store.atomic() as conn:
            conn.execute("INSERT INTO secrets (name, value) VALUES (?, ?)", (f"k{n}", str(n)))
            return conn.execute("SELECT value FROM secrets WHERE name = ?", (f"k{n}",)).fetchone()[0]

    assert all_at_once(16, add) == [str(n) for n in range(16)]
    groups_after, writes_after = database.group_commits()
    assert writes_after - writes == 16 and groups_after - groups <= 16
    assert database.row("SELECT count(*) FROM secrets WHERE name LIKE 'k%'")[0] == 16


def test_a_threads_connection_goes_back_to_the_pool_when_the_thread_ends(database, admin):
    """Threads (greenlets, in the node) come and go; their connections do not: each one's goes back to
    the pool as it ends, and the next thread's read takes it again, so the count stays put."""

    def connections():
        return admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]

    def four_threads_reading():
        threads = [threading.Thread(target=database.rows, args=("SELECT pg_sleep(0.05)",)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        gc.collect()

    four_threads_reading()
    after_one_round = connections()
    assert 1 <= after_one_round <= 4
    for _ in range(3):
        four_threads_reading()
    assert connections() == after_one_round, "the later threads took the connections given back"
    database.close()
    time.sleep(0.2)  # the server notices the client's goodbye
    assert connections() == 0


# -- claims -------------------------------------------------------------------------------------------------
def test_a_claim_skips_the_attempts_another_transaction_holds_without_waiting(stores, admin):
    store = stores()
    oldest, *others = queued(store, 3)
    with admin.transaction():
        admin.execute("SELECT 1 FROM steps WHERE id = %s FOR UPDATE", (oldest,))
        started = time.monotonic()
        jobs = store.claim_queued("r1", 10)
        assert time.monotonic() - started < 1  # never the lock timeout's 5 s
    assert [job.step_id for job in jobs] == others  # oldest first, the held one left
    assert [job.step_id for job in store.claim_queued("r2", 10)] == [oldest]


def test_two_claimers_at_once_each_get_different_attempts_and_together_all(stores):
    setup, claimers = stores(), [stores(), stores()]
    for _round in range(5):
        ids = queued(setup, 12)
        claimed = all_at_once(2, lambda n: [job.step_id for job in claimers[n].claim_queued(f"r{n}", 8)])
        assert not set(claimed[0]) & set(claimed[1])  # never one attempt to both
        assert sorted(claimed[0] + claimed[1]) == sorted(ids)  # 16 places for 12: every one is taken
        assert claimers[0].claim_queued("r0", 100) == []
        runners = dict(setup.db.rows("SELECT id, runner_id FROM steps WHERE id = ANY(?)", (ids,)))
        assert [runners[step_id] for step_id in claimed[0]] == ["r0"] * len(claimed[0])
        assert [runners[step_id] for step_id in claimed[1]] == ["r1"] * len(claimed[1])


def test_a_due_retry_another_transaction_holds_is_skipped_then_begun_once(stores, admin):
    store = stores()
    _, job = store.create_process(None, [("a", {})], "alice", "r1")
    store.schedule_retry(job, {"type": "E", "message": "later"}, "2000-01-01T00:00:00.000Z")
    with admin.transaction():
        admin.execute("SELECT 1 FROM steps WHERE id = %s FOR UPDATE", (job.step_id,))
        started = time.monotonic()
        assert store.claim_due_retries("r2", 10) == []
        assert time.monotonic() - started < 1
    [retry] = store.claim_due_retries("r2", 10)
    assert (retry.step_id, retry.attempt) == (job.step_id, 2)
    assert store.claim_due_retries("r2", 10) == []


# -- the tallies' log of changes ------------------------------------------------------------------------------
def test_a_checkpoint_folds_the_tallies_into_a_row_each_keeping_their_sums(stores, admin):
    """Folds running at once on two nodes, beside writers, keep every sum (each row in one fold)."""
    first, second = stores(), stores()
    for _ in range(5):
        _, job = first.create_process(None, [("a", {}), ("b", {})], "alice", "r1")
        first.finish_attempt(job, "COMPLETED", runner_id="r1")
    rows = admin.execute("SELECT count(*) FROM tally").fetchone()[0]

    def fold_or_write(n):
        if n < 2:
            (first, second)[n].checkpoint()
        else:
            queued(second, 1)  # one more step STARTED, process RUNNING, attempt of `a` begun

    all_at_once(3, fold_or_write)
    first.checkpoint()
    after = first.metric_tallies()
    assert {status: n for status, n in after["steps"] if n} == {"COMPLETED": 5, "STARTED": 6}
    assert {status: n for status, n in after["processes"] if n} == {"RUNNING": 6}
    assert after["attempts"] == [("a", "start", 6), ("b", "start", 5)]
    assert after["outcomes"] == [("a", "completed", 5)]
    count, keys = admin.execute("SELECT count(*), count(DISTINCT (series, a, b)) FROM tally").fetchone()
    assert count == keys < rows


# -- stepd check --------------------------------------------------------------------------------------------
def test_stepd_check_reads_a_postgresql_database_and_finds_what_is_broken(stores, postgres_url, admin):
    store = stores()
    process, job = store.create_process("p", [("a", {}), ("b", {})], "alice", None)
    store.finish_attempt(job, "COMPLETED", runner_id=None)
    result = run_cli(postgres_url, "check")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("postgresql://stepd:***@") and "1 processes, 2 steps, 2 attempts checked" in lines[0]
    assert lines[-1] == "ok" and postgres_url.split(":")[2].split("@")[0] not in result.output
    admin.execute("UPDATE processes SET status = 'COMPLETED' WHERE id = %s", (process["id"],))
    broken = run_cli(postgres_url, "check")
    assert broken.exit_code == 1
    said = f"BROKEN: process {process['id']} is COMPLETED, its steps ['COMPLETED', 'STARTED'] say RUNNING"
    assert said in broken.stdout


def test_stepd_check_refuses_a_database_without_stepds_schema_or_server(postgres_url, postgres_cluster):
    empty = run_cli(postgres_url, "check")
    assert empty.exit_code == 2 and "has no stepd schema yet" in empty.stderr and "***" in empty.stderr
    gone = run_cli(postgres_cluster.url("no_such_database"), "check")
    assert gone.exit_code == 2 and "cannot connect to" in gone.stderr


# -- nodes: a dead one's running attempts, never a live one's -----------------------------------------------
def running_on(store, admin, node_id, beat_seconds_ago):
    """A node beating `beat_seconds_ago`, a runner of it, and one attempt running there: the step's id."""
    admin.execute(
        "INSERT INTO nodes (id, host, pid, heartbeat_at) VALUES (%s, 'h', 1, now() - make_interval(secs => %s))",
        (node_id, beat_seconds_ago),
    )
    store.heartbeat({"id": f"runner-{node_id}", "host": "h", "pid": 1, "pid_started": None, "node_id": node_id})
    (step_id,) = queued(store, 1)
    assert [job.step_id for job in store.claim_queued(f"runner-{node_id}", 1)] == [step_id]
    return step_id


def test_a_dead_nodes_running_attempts_are_interrupted_and_a_live_ones_kept(stores, admin):
    store = stores()
    dead = running_on(store, admin, "dead", 30)
    live = running_on(store, admin, "live", 0)
    (waiting,) = queued(store, 1)
    assert store.interrupt_dead_nodes(5.0) == [dead]
    step = store.get_step(dead)
    assert (step["status"], step["error"]["type"]) == ("FAILED", "Interrupted")
    assert "node dead" in step["error"]["message"] and step["attempts"] == 1
    assert store.get_step(live)["phase"] == "RUNNING"
    assert store.get_step(waiting)["phase"] == "QUEUED", "queued work stays queued, for any node"
    assert [row[0] for row in admin.execute("SELECT id FROM nodes").fetchall()] == ["live"]
    assert [row[0] for row in admin.execute("SELECT id FROM runners").fetchall()] == ["runner-live"]
    assert store.interrupt_dead_nodes(5.0) == [], "a second sweep (another node's) finds nothing to do"


def test_a_node_that_beats_again_after_the_look_keeps_its_attempt(stores, admin, monkeypatch):
    """river#1302: the look saw the node late, the node beat again before the write. The write's own
    compare-and-set reads the node's heartbeat afresh, and leaves its attempt running."""
    from stepd import store as store_module

    store = stores()
    step_id = running_on(store, admin, "slow", 30)
    stale_look = store_module.DEAD_NODES_RUNNING.replace("n.heartbeat_at <", "now() - interval '1 hour' <")

    def beat_then_look(sql, *args):
        admin.execute("UPDATE nodes SET heartbeat_at = now() WHERE id = 'slow'")  # between the look and the write
        return sql

    monkeypatch.setattr(store_module, "DEAD_NODES", "SELECT id FROM nodes WHERE ? > 0 LIMIT 1")  # sees it late
    monkeypatch.setattr(store_module, "DEAD_NODES_RUNNING", beat_then_look(stale_look))
    assert store.interrupt_dead_nodes(5.0) == []
    assert store.get_step(step_id)["phase"] == "RUNNING" and store.get_step(step_id)["error"] is None


def test_a_node_that_died_before_its_first_beat_has_its_running_attempt_interrupted(stores):
    """A runner's registration writes its node's row (with its heartbeat at that moment): a node that
    dies before it ever beat has a row that ages like any other, and its runner's attempt ends. Without
    that row the runner named a node no sweep could judge, and its attempt stayed running for ever."""
    store = stores()
    store.heartbeat({"id": "runner-early", "host": "h", "pid": 1, "pid_started": None, "node_id": "early"})
    (step_id,) = queued(store, 1)
    assert [job.step_id for job in store.claim_queued("runner-early", 1)] == [step_id]
    assert wait_for(lambda: stores().interrupt_dead_nodes(0.2), timeout=5, what="the node judged dead") == [step_id]
    assert "node early" in store.get_step(step_id)["error"]["message"]


def test_a_runner_left_by_a_node_whose_row_is_gone_has_its_attempt_interrupted(stores, admin):
    """A node that stopped and deleted its row while one of its runners was still registered (its end
    not recorded in time): that runner's attempt is Interrupted by any node's sweep, at once."""
    store = stores()
    step_id = running_on(store, admin, "stopped", 0)
    admin.execute("DELETE FROM nodes WHERE id = 'stopped'")
    assert store.interrupt_dead_nodes(5.0) == [step_id]
    assert "node stopped) is gone" in store.get_step(step_id)["error"]["message"]
    assert admin.execute("SELECT count(*) FROM runners").fetchone()[0] == 0
    assert store.interrupt_dead_nodes(5.0) == []


def test_a_runner_registered_during_an_orphan_sweep_keeps_its_claim(stores):
    """The sweep's write reads the running steps, then the runners: a runner that registers and claims
    between two of its statements (each its own snapshot on PostgreSQL) is not taken for gone."""
    sweeper, other = stores(), stores()
    sweeper.heartbeat({"id": "gone", "host": "h", "pid": 1, "pid_started": None})  # something for the sweep to do
    (step_id,) = queued(other, 1)
    looks = []

    def is_alive(row):
        looks.append(row["id"])
        if looks.count("gone") == 2:  # inside the sweep's write, after its first read
            other.heartbeat({"id": "new", "host": "h", "pid": 2, "pid_started": None})
            assert [job.step_id for job in other.claim_queued("new", 1)] == [step_id]
        return row["id"] != "gone"

    assert sweeper.interrupt_orphans(is_alive) == []
    assert sweeper.get_step(step_id)["phase"] == "RUNNING"


def test_two_nodes_deleting_the_same_finished_processes_take_them_out_of_the_tallies_once(stores, admin):
    """Retention runs on every node: a batch locks the processes it deletes, and another node's batch
    of the same processes passes them over, rather than taking them out of the tallies a second time."""
    first, second = stores(), stores()
    ids = []
    for _ in range(3):
        process, job = first.create_process(None, [("a", {})], "alice", "r1")
        first.finish_attempt(job, "COMPLETED", runner_id="r1")
        ids.append(process["id"])
    later = "9999-01-01T00:00:00.000Z"
    with first.atomic():
        assert first.delete_finished(ids, later) == (3, 9)
        racing = threading.Thread(target=lambda: ids.append(second.delete_finished(ids[:3], later)))
        racing.start()
        racing.join(timeout=2)  # passes the locked rows over at once (without the lock: it waits for them)
    racing.join()
    assert ids[3] == (0, 0)
    tallies = admin.execute("SELECT a, sum(n) FROM tally WHERE series = 'processes' GROUP BY a").fetchall()
    assert {status: n for status, n in tallies if n} == {}
    assert run_cli(first.db.url, "check").exit_code == 0


def test_a_cancel_waiting_for_another_nodes_restart_tallies_the_process_from_its_new_status(stores, admin):
    """A restart (one node) and a cancel (another) of one FAILED process: the cancel waits for the
    restart's locks, then moves the process from RUNNING, as the restart left it, not from the FAILED
    it would have read before waiting (counting it out of FAILED twice and never out of RUNNING)."""
    first, second = stores(), stores()
    process, job = first.create_process(None, [("a", {}), ("b", {})], "alice", "r1")
    first.finish_attempt(job, "FAILED", error={"type": "E", "message": "no"}, runner_id="r1")
    cancelled = []
    with first.atomic():
        first.restart_failed_step(job.step_id, {}, "alice", None, lambda _type: True)
        cancel = lambda: cancelled.append(second.cancel_process(process["id"], None, "bob"))  # noqa: E731
        cancelling = threading.Thread(target=cancel)
        cancelling.start()
        wait_for(lambda: admin.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0], timeout=5,
                 what="the cancel to wait for the restart's locks")  # fmt: skip
    cancelling.join()
    assert cancelled[0]["status"] == "CANCELLED"
    tallies = admin.execute("SELECT a, sum(n) FROM tally WHERE series = 'processes' GROUP BY a").fetchall()
    assert {status: n for status, n in tallies if n} == {"CANCELLED": 1}


def test_a_repeat_of_an_idempotency_key_on_another_node_waits_for_the_first_answer(stores, admin):
    """idempotency.py looks the key up and stores its answer in one write transaction: on another
    node, the same key's look-up waits for that transaction, then finds the answer (it does not act
    a second time, as it would if it found none)."""
    first, second = stores(), stores()
    seen = []

    def repeat():
        with second.atomic():
            seen.append(second.stored_answer("alice", "key-1"))

    with first.atomic():
        assert first.stored_answer("alice", "key-1") is None
        repeating = threading.Thread(target=repeat)
        repeating.start()
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        wait_for(lambda: seen or admin.execute(waiting).fetchone()[0], timeout=5, what="the repeat to look")
        first.store_answer("alice", "key-1", "fingerprint", 201, "{}")
    repeating.join()
    assert seen[0] is not None and seen[0]["status"] == 201


def test_a_write_alone_takes_no_read_connection(database):
    """A thread that only writes (a runner's link in the node, registering it) holds no read
    connection of the pool for as long as it lives: only the writer's."""
    with database.transaction() as conn:
        conn.execute("SELECT 1")
    assert getattr(database._local, "lease", None) is None


# -- what a step costs the server -----------------------------------------------------------------------------
def test_a_change_logs_its_tally_rows_in_one_statement(database, admin):
    """A new process changes four tallies (a process RUNNING, its steps PENDING, then one STARTED,
    its first attempt): their rows are one INSERT, a round trip to the server, not one each. Rows
    inserted by one statement of a transaction share its command id (cmin)."""
    store = Store(database)
    before = {xmin for (xmin,) in admin.execute("SELECT xmin::text FROM tally")}  # the migration's rows
    store.create_process(None, [("a", {}), ("b", {})], "alice", None)
    rows = [row for row in admin.execute("SELECT xmin::text, cmin::text FROM tally") if row[0] not in before]
    assert len(rows) == 4
    assert len(set(rows)) == 1


def test_an_attempt_begins_and_ends_with_its_steps_compare_and_set_in_one_statement(database, admin):
    """The step's compare-and-set and its attempt's row are one statement on PostgreSQL (a round trip
    less each): the step's new row and the attempt's share a transaction and a command id."""
    store = Store(database)
    step_of = "SELECT xmin::text, cmin::text FROM steps WHERE id = %s"
    attempt_of = "SELECT xmin::text, cmin::text, status FROM attempts WHERE step_id = %s AND attempt = 1"
    _, job = store.create_process(None, [("a", {}), ("b", {})], "alice", "r1")
    begun = admin.execute(attempt_of, (job.step_id,)).fetchone()
    assert admin.execute(step_of, (job.step_id,)).fetchone() == begun[:2]
    store.finish_attempt(job, "COMPLETED", runner_id="r1")
    ended = admin.execute(attempt_of, (job.step_id,)).fetchone()
    assert ended[2] == "COMPLETED" and ended[:2] != begun[:2]
    assert admin.execute(step_of, (job.step_id,)).fetchone() == ended[:2]


def test_a_stale_outcome_neither_moves_the_step_nor_closes_an_attempt(database):
    """The attempt's row is written only when the step's compare-and-set moved it."""
    store = Store(database)
    _, job = store.create_process(None, [("a", {})], "alice", "r1")
    store.fail_step(job.step_id, "stopped from outside")
    assert store.finish_attempt(job, "COMPLETED", runner_id="r1") is None
    step = store.get_step(job.step_id, with_history=True)
    assert step["status"] == "FAILED"
    assert [attempt["status"] for attempt in step["attempt_history"]] == ["FAILED"]
