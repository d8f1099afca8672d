"""`stepd serve` on PostgreSQL (SPEC 12, issue 20): one real node, its runner processes and its
gevent worker, on a fresh database of the test run's own PostgreSQL 15. The README's walkthrough
runs as written; a runner SIGKILLed has its running step Interrupted, never run again; many
requests at once neither stall the node nor take more connections than its pool; `stepd check`
finds every invariant holding afterwards."""

import os
import shutil
import signal
import subprocess
import threading
import time

import psycopg
import pytest
from helpers import (
    RESTART,
    STEPD,
    P,
    all_at_once,
    metric,
    metric_samples,
    ok,
    report_figure,
    typed,
    wait_for,
    walk_readme,
)

NEEDS_CURL_AND_JQ = pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("jq")), reason="the walkthrough needs curl and jq"
)


def pg_rows(url, sql, *args):
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.fixture
def pg_server(server_factory, postgres_url, tmp_path):
    """Makes a node (not started) serving a fresh PostgreSQL database."""
    return lambda **kwargs: server_factory(db_path=postgres_url, folder=tmp_path, **kwargs)


def stepd_check(url):
    return subprocess.run([str(STEPD), "check"], env={**os.environ, "STEPD_DB": url}, capture_output=True, text=True)


@NEEDS_CURL_AND_JQ
def assert_called_once_never_retried(server, step_id, calls):
    """An Interrupted step of retry_gate (a delegate with retries) keeps its one attempt: its delegate
    was called once, and an Interrupted attempt is not retried."""
    time.sleep(1.0)
    assert server.step(step_id)["attempts"] == 1
    assert calls.read_text().splitlines() == [f"{step_id} 1"], "the delegate was called once"


def assert_carries_on_and_checks(server, postgres_url):
    """The node runs a new process to the end, stops cleanly, and `stepd check` finds the database sound."""
    after = server.start_process(("noop", {}))
    server.wait_process(after["processId"], "COMPLETED")
    assert server.stop() == 0
    checked = stepd_check(postgres_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.timeout(90)
def test_the_readme_walkthrough_runs_on_postgres(pg_server, postgres_url):
    server = pg_server().start()
    done = walk_readme(server, server.token)
    assert done.returncode == 0, done.stderr + server.output()[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1].endswith("COMPLETED")
    assert '[1,"start","env","FAILED"]' in lines and '[2,"restart","env","COMPLETED"]' in lines
    # The rows are in PostgreSQL (not in a file beside it): the failed step's two attempts.
    sleeps = (
        "SELECT a.attempt, a.trigger, a.status FROM attempts a JOIN steps s ON s.id = a.step_id WHERE s.type = 'sleep'"
    )
    assert pg_rows(postgres_url, sleeps + " ORDER BY a.attempt") == [
        (1, "start", "FAILED"),
        (2, "restart", "COMPLETED"),
    ]
    assert server.stop() == 0
    checked = stepd_check(postgres_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.timeout(90)
def test_a_runner_sigkilled_has_its_step_interrupted_within_2_s_and_never_run_again(pg_server, postgres_url, tmp_path):
    server = pg_server(runners=2, threads=2).start()
    calls, gate = tmp_path / "calls.txt", tmp_path / "never"  # retry_gate waits for `gate`: it never comes
    process = server.start_process(("retry_gate", {"file": str(calls), "gate": str(gate)}))
    step_id = process["steps"][0]["processStepId"]
    holder = "SELECT r.pid FROM steps s JOIN runners r ON r.id = s.runner_id WHERE s.id = %s"
    pid = wait_for(lambda: (rows := pg_rows(postgres_url, holder, step_id)) and rows[0][0], what="a runner's claim")
    wait_for(calls.exists, what="the delegate to be called")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    ended = lambda: (s := server.step(step_id))["status"] == "FAILED" and s  # noqa: E731
    failed = wait_for(ended, interval=0.02, what="Interrupted")
    assert time.monotonic() - killed < 2.0
    assert failed["error"]["type"] == "Interrupted" and failed["attempts"] == 1
    assert_called_once_never_retried(server, step_id, calls)
    wait_for(lambda: len(server.runner_pids()) == 2, timeout=10, what="the runner to be started again")
    assert_carries_on_and_checks(server, postgres_url)


@pytest.mark.timeout(90)
def test_many_requests_at_once_share_a_bounded_pool_and_none_stalls(pg_server, postgres_url):
    """64 clients at once, each starting processes and reading them: every answer comes, no slower
    than a few seconds, while the node holds at most its pool's read connections (16) plus its writer
    (and the commands' own one here): one connection a request's greenlet would be 64."""
    from stepd.postgres import READ_CONNECTIONS

    server = pg_server().start()
    answers, slowest, errors = [], [0.0], []

    def client():
        try:
            for _ in range(5):
                began = time.monotonic()
                process = ok(server.post(P, {"steps": [{"type": "noop", "params": {}}]}), 201)
                ok(server.get(f"{P}/{process['processId']}"))
                slowest[0] = max(slowest[0], time.monotonic() - began)
                answers.append(process["processId"])
        except Exception as exc:  # collected, asserted below
            errors.append(repr(exc))

    connections = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    most = [0]

    def watch(stop):
        while not stop.wait(0.05):
            most[0] = max(most[0], pg_rows(postgres_url, connections)[0][0])

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    clients = [threading.Thread(target=client) for _ in range(64)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    stop.set()
    watcher.join()
    assert errors == [], errors[:3]
    assert len(answers) == 320
    assert slowest[0] < 5.0, f"the slowest request took {slowest[0]:.2f} s"
    assert most[0] <= READ_CONNECTIONS + 2, f"{most[0]} connections at once"
    wait_for(lambda: all(server.process(pid)["status"] == "COMPLETED" for pid in answers[-5:]), timeout=20,
             what="the processes to complete")  # fmt: skip
    assert server.stop() == 0
    checked = stepd_check(postgres_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.timeout(60)
def test_the_checkpoint_chore_folds_the_tallies(pg_server, postgres_url):
    """Each change adds its own rows to `tally` (postgres.py, migration 3); the node's checkpoint chore
    folds them into one row a key, every second."""
    server = pg_server().start()
    for process in [server.start_process(("noop", {})) for _ in range(5)]:
        server.wait_process(process["processId"], "COMPLETED")
    keys_and_rows = "SELECT count(DISTINCT (series, a, b)), count(*) FROM tally"
    wait_for(lambda: (lambda keys, rows: keys == rows)(*pg_rows(postgres_url, keys_and_rows)[0]), timeout=5,
             what="the tallies folded")  # fmt: skip
    samples = metric_samples(server.get("/metrics").text)  # the folded sums are what the metrics read
    assert metric(samples, "stepd_processes", status="COMPLETED") == 5
    assert metric(samples, "stepd_steps", status="COMPLETED") == 5


@pytest.mark.timeout(60)
def test_a_write_waiting_on_a_lock_does_not_stall_the_reads(pg_server, postgres_url):
    """psycopg waits for the server through gevent (postgres.refuse_a_blocking_wait): a write group
    waiting on a lock another client holds leaves the node's loop free, so reads answer at once.
    With psycopg's C wait every request would wait with the writer."""
    server = pg_server().start()
    server.start_process(("noop", {}))
    with psycopg.connect(postgres_url) as holder:  # a transaction: the lock is held until it ends
        holder.execute("LOCK TABLE tally IN SHARE MODE")  # every write adds to the tallies: they all wait
        posted = []
        writing = threading.Thread(target=lambda: posted.append(server.post(P, {"steps": [{"type": "noop"}]})))
        writing.start()
        time.sleep(0.5)  # the write's group now waits on the lock
        assert not posted, "the write went through the lock"
        for _ in range(5):
            began = time.monotonic()
            ok(server.get(f"{P}?limit=1", timeout=3))
            assert time.monotonic() - began < 0.5
        holder.rollback()
    writing.join()
    assert posted[0].status_code == 201, posted[0].text


@pytest.mark.timeout(60)
def test_a_psycopg_that_would_block_the_node_is_refused(pg_server):
    """psycopg's C wait (chosen here by its own PSYCOPG_WAIT_FUNC) does not yield to gevent: the node
    refuses to run on it rather than stall every request behind each query."""
    server = pg_server(extra_env={"PSYCOPG_WAIT_FUNC": "wait_c"})
    with pytest.raises(AssertionError, match="imported before gevent patched select"):
        server.start()


# -- two nodes on one database -------------------------------------------------------------------------
def node_of_step(url, step_id):
    """(node id, node pid) of the runner holding the step, or None."""
    rows = pg_rows(
        url,
        "SELECT n.id, n.pid FROM steps s JOIN runners r ON r.id = s.runner_id JOIN nodes n ON n.id = r.node_id"
        " WHERE s.id = %s",
        step_id,
    )
    return rows[0] if rows else None


@pytest.mark.timeout(120)
def test_a_node_sigkilled_has_its_running_step_interrupted_by_the_other_within_10_s(pg_server, postgres_url, tmp_path):
    """SPEC 12: the other node sees the dead one's heartbeat stop and Interrupts its running attempt
    (by a compare-and-set naming the dead node), never runs it again, and leaves queued work for
    itself. Both nodes are on this host, so only the node's heartbeat can tell: a node judges by pid
    only its own runners."""
    first = pg_server(runners=1, threads=2).start()
    second = pg_server(runners=1, threads=2).start()
    beats = "SELECT id, pid, heartbeat_at FROM nodes ORDER BY pid"
    wait_for(lambda: len(pg_rows(postgres_url, beats)) == 2, what="both nodes' rows")
    calls, gate = tmp_path / "calls.txt", tmp_path / "never"
    process = first.start_process(("retry_gate", {"file": str(calls), "gate": str(gate)}))
    step_id = process["steps"][0]["processStepId"]
    wait_for(calls.exists, what="the delegate to be called")
    _, holder_pid = node_of_step(postgres_url, step_id)
    dying, living = (first, second) if holder_pid in first.worker_pids() else (second, first)
    dying.kill()
    killed = time.monotonic()
    ended = lambda: (s := living.step(step_id))["status"] == "FAILED" and s  # noqa: E731
    failed = wait_for(ended, timeout=15, interval=0.1, what="Interrupted by the living node")
    took = time.monotonic() - killed
    report_figure("node death (PostgreSQL)", f"a node SIGKILLed: its running step Interrupted {took:.1f} s later")
    assert took < 10.0, f"Interrupted {took:.1f} s after the node died"
    assert took > 3.0, "only the heartbeat's limit (5 s) may judge a node dead, not its runners' pids"
    assert failed["error"]["type"] == "Interrupted" and "stopped beating" in failed["error"]["message"]
    assert failed["attempts"] == 1
    assert_called_once_never_retried(living, step_id, calls)
    (row,) = pg_rows(postgres_url, beats)  # the dead node's row is forgotten; the living one beats
    beat = row[2]
    wait_for(lambda: pg_rows(postgres_url, beats)[0][2] > beat, timeout=3, what="the living node's next beat")
    assert_carries_on_and_checks(living, postgres_url)


@pytest.mark.timeout(90)
def test_16_restarts_of_one_step_over_two_nodes_one_wins(pg_server, postgres_url):
    """SPEC 12: every compare-and-set holds across nodes. 16 restarts of one failed step at once, half
    to each node: one 200, fifteen 412, one attempt begun, its delegate called once."""
    nodes = [pg_server(runners=1, threads=2).start(), pg_server(runners=1, threads=2).start()]
    step_id = nodes[0].start_process(("check", {"ok": 0}))["steps"][0]["processStepId"]
    nodes[1].wait_step(step_id, "FAILED")
    body = {"processStepId": step_id, "params": typed(ok=1)}
    answers = all_at_once(16, lambda n: nodes[n % 2].post(RESTART, body).status_code)
    assert sorted(answers) == [200] + [412] * 15, answers
    done = nodes[1].wait_step(step_id, "COMPLETED")
    assert done["attempts"] == 2
    assert pg_rows(
        postgres_url, "SELECT attempt, trigger FROM attempts WHERE step_id = %s ORDER BY attempt", step_id
    ) == [
        (1, "start"),
        (2, "restart"),
    ]
    for node in nodes:
        assert node.stop() == 0
    checked = stepd_check(postgres_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
