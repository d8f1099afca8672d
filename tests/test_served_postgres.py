"""`stepd serve` on PostgreSQL (SPEC 12, issue 20): one real node, its runner processes and its
gevent worker, on a fresh database of the test run's own PostgreSQL 15. The README's walkthrough
runs as written; a runner SIGKILLed has its running step Interrupted, never run again; many
requests at once neither stall the node nor take more connections than its pool; `stepd check`
finds every invariant holding afterwards."""

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import psycopg
import pytest
from helpers import (
    CANCEL,
    RESTART,
    STEPD,
    MixedLoad,
    P,
    all_at_once,
    metric,
    metric_samples,
    ok,
    refused,
    report_figure,
    typed,
    wait_for,
    walk_readme,
)
from helpers import (
    calls as delegate_calls,
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


def assert_walked(done, server):
    """The README's walkthrough ran to its end: the process COMPLETED, its step's two attempts shown."""
    assert done.returncode == 0, done.stderr + server.output()[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1].endswith("COMPLETED")
    assert '[1,"start","env","FAILED"]' in lines and '[2,"restart","env","COMPLETED"]' in lines


@pytest.mark.timeout(90)
def test_the_readme_walkthrough_runs_on_postgres(pg_server, postgres_url):
    server = pg_server().start()
    assert_walked(walk_readme(server, server.token), server)
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
    than a few seconds, while the service holds at most its HTTP front's read connections (16), and
    the node's (4) plus its writer, its heartbeat's and its LISTEN's: one connection a request's
    greenlet would be 64."""
    from stepd.node_process import NODE_READ_CONNECTIONS
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
    assert most[0] <= READ_CONNECTIONS + NODE_READ_CONNECTIONS + 3, f"{most[0]} connections at once"
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
    """psycopg waits for the server through gevent (postgres.wait_through_gevent): a write group
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


def two_nodes(pg_server, runners=1, **kwargs):
    """Two nodes on one database, started at once (so their chores run side by side), each with a
    log of its own (node0.log, node1.log)."""
    nodes = [pg_server(runners=runners, **kwargs) for _ in range(2)]
    for number, node in enumerate(nodes):
        node.log_path = node.cwd / f"node{number}.log"
        node.start(wait=False)
    for node in nodes:
        node.wait_started(runners_in_all=2 * runners)  # /healthz counts every node's runners
    return nodes


@pytest.mark.timeout(120)
def test_a_node_sigkilled_has_its_running_step_interrupted_by_the_other_within_10_s(pg_server, postgres_url, tmp_path):
    """SPEC 12: the other node sees the dead one's heartbeat stop and Interrupts its running attempt
    (by a compare-and-set naming the dead node), never runs it again, and leaves queued work for
    itself. Both nodes are on this host, so only the node's heartbeat can tell: a node judges by pid
    only its own runners."""
    first, second = two_nodes(pg_server, threads=2)
    beats = "SELECT id, pid, heartbeat_at FROM nodes ORDER BY pid"
    wait_for(lambda: len(pg_rows(postgres_url, beats)) == 2, what="both nodes' rows")
    calls, gate = tmp_path / "calls.txt", tmp_path / "never"
    process = first.start_process(("retry_gate", {"file": str(calls), "gate": str(gate)}))
    step_id = process["steps"][0]["processStepId"]
    wait_for(calls.exists, what="the delegate to be called")
    _, holder_pid = node_of_step(postgres_url, step_id)
    dying, living = (first, second) if holder_pid in first.node_pids() else (second, first)
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
    nodes = two_nodes(pg_server, threads=2)
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


# The attempts running on a node's runners (claimed by them, not deferred, no retry pending).
RUNNING_ON_NODE = (
    "SELECT s.id, s.attempts FROM steps s JOIN runners r ON r.id = s.runner_id JOIN nodes n ON n.id = r.node_id"
    " WHERE n.pid = %s AND s.status = 'STARTED' AND s.deferred = 0 AND s.next_retry_at IS NULL"
)
# How these attempts ((step id, attempt) pairs, as two arrays) ended: their rows' status and error type.
ENDS_OF_ATTEMPTS = (
    "SELECT a.status, a.error_type FROM attempts a"
    " JOIN unnest(%s::text[], %s::integer[]) AS k (step_id, attempt) USING (step_id, attempt)"
)
KILL_ROUNDS = 4


def attempt_ends(url, attempts):
    return pg_rows(url, ENDS_OF_ATTEMPTS, [step for step, _ in attempts], [number for _, number in attempts])


def kill_under_load(url, nodes, dying):
    """SIGKILL node `dying` (its supervisor, gunicorn, the node, its runners) and wait until the other
    has ended every attempt that was running on it; returns (those attempts, seconds it took). The
    clients go on meanwhile (on the other node): they may restart, skip or cancel what has ended."""
    (node_pid,) = nodes[dying].node_pids()
    nodes[dying].kill()
    killed = time.monotonic()
    running = pg_rows(url, RUNNING_ON_NODE, node_pid)  # frozen: its node is gone, and no other may end them yet
    wait_for(lambda: ("STARTED", None) not in attempt_ends(url, running), timeout=15, interval=0.1,
             what="the dead node's attempts to end")  # fmt: skip
    return running, time.monotonic() - killed


@pytest.mark.timeout(180)
def test_a_node_sigkilled_under_load_four_times_loses_nothing_and_runs_nothing_twice(pg_server, postgres_url, tmp_path):
    """SPEC 12, issue 20's kill rounds: clients start processes, restart, skip and cancel on both nodes;
    a whole node is SIGKILLed mid-load and started again, 4 times, each node in turn. After each kill
    the other node ends the dead one's running attempts within 10 s; every answer the clients got is
    in the database (stepd's invariant checker, with what they were told), no attempt's delegate was
    called twice, and `stepd check` passes at the end."""
    from stepd.invariants import Acknowledged, check

    nodes = two_nodes(pg_server, runners=1, threads=4)
    acknowledged, calls, took, ran_at_kill, answered = Acknowledged(), tmp_path / "calls.txt", [], 0, 0
    for round_number in range(KILL_ROUNDS):
        dying = round_number % 2
        with MixedLoad(nodes, acknowledged, calls=calls) as load:
            wait_for(lambda load=load: load.statuses[201] >= 10, timeout=20, what="the load to get going")
            running, seconds = kill_under_load(postgres_url, nodes, dying)
        assert load.statuses[500] == 0 and set(load.statuses) <= {200, 201, 412, 503}, load.statuses
        assert seconds < 10.0, f"round {round_number}: the dead node's attempts ended {seconds:.1f} s after the kill"
        ends = set(attempt_ends(postgres_url, running))  # Interrupted, or cancelled by a client first
        assert ends <= {("FAILED", "Interrupted"), ("CANCELLED", None)}, ends
        took.append(seconds)
        ran_at_kill, answered = ran_at_kill + len(running), answered + load.requests
        nodes[dying] = pg_server(runners=1, threads=4).start(wait=False).wait_started(runners_in_all=2)
        report = check(postgres_url, acknowledged)
        assert report.problems == [] and report.lost == 0, f"round {round_number}: {report.problems[:10]}"
        assert [c for c, n in Counter(delegate_calls(calls)).items() if n > 1] == [], "a delegate called twice"
    assert ran_at_kill > 0, "no kill landed while a delegate ran"
    for node in nodes:
        assert node.stop() == 0
    checked = stepd_check(postgres_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report_figure(
        "node kill rounds (PostgreSQL)",
        f"{KILL_ROUNDS} rounds, {answered} requests, {len(acknowledged.processes)} starts + "
        f"{len(acknowledged.restarts)} restarts acknowledged, {ran_at_kill} attempts running at the kills, "
        f"Interrupted after {', '.join(f'{s:.1f}' for s in took)} s; lost 0, run twice 0",
    )


RACES = 20


@pytest.mark.timeout(120)
def test_a_cancel_racing_a_restart_on_the_other_node_takes_effect_in_one_order(pg_server, postgres_url):
    """SPEC 4 and 10 across nodes: a restart of a process's FAILED step and a cancel of that process,
    sent at once to different nodes, 20 times. The process is FAILED or RUNNING whichever goes first,
    so the cancel always wins its compare-and-set (200). The restart gets 200 if it went first (its
    attempt began, then was cancelled, or completed just before), else 412 naming the CANCELLED step."""
    nodes = two_nodes(pg_server, threads=2)
    orders = Counter()
    for race in range(RACES):
        process = nodes[race % 2].start_process(("check", {"ok": 0}), ("external", {}))  # external: stays RUNNING
        step_id = process["steps"][0]["processStepId"]
        nodes[race % 2].wait_step(step_id, "FAILED")
        restart = {"processStepId": step_id, "params": typed(ok=1)}
        posts = [(RESTART, restart), (CANCEL, {"processId": process["processId"]})]
        restarted, cancelled = all_at_once(2, lambda n, race=race, posts=posts: nodes[(n + race) % 2].post(*posts[n]))
        assert cancelled.status_code == 200, cancelled.text
        final = nodes[race % 2].process(process["processId"])
        assert final["status"] == "CANCELLED"
        step = final["steps"][0]
        if restarted.status_code == 200:
            assert step["attempts"] == 2 and step["status"] in ("CANCELLED", "COMPLETED"), step
        else:
            assert refused(restarted) == {"status": ["Step is CANCELLED; only a FAILED step can be restarted."]}
            assert step["attempts"] == 1 and step["status"] == "CANCELLED", step
        orders["restart first" if restarted.status_code == 200 else "cancel first"] += 1
    for node in nodes:
        assert node.stop() == 0
    checked = stepd_check(postgres_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report_figure("cancel racing a restart (PostgreSQL)", f"{RACES} races over two nodes: {dict(orders)}")


def insert_old_processes(url, prefix, count, status, age):
    """`count` one-step processes (noop) that finished `age` ago (a PostgreSQL interval), COMPLETED or
    FAILED, written straight into the database as the service leaves them, tallies included."""
    outcome = {"COMPLETED": "completed", "FAILED": "failed"}[status]
    error = None if status == "COMPLETED" else "RuntimeError"
    values = {"prefix": prefix, "count": count, "status": status, "error": error, "age": age}
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO processes (id, name, status, principal, created_at, updated_at)"
            " SELECT %(prefix)s || g, 'old', %(status)s, 'ops', now() - %(age)s::interval, now() - %(age)s::interval"
            " FROM generate_series(1, %(count)s) g",
            values,
        )
        conn.execute(
            "INSERT INTO steps (id, process_id, position, type, status, params, attempts, error_type, created_at,"
            " started_at, finished_at) SELECT id || '-s', id, 0, 'noop', status, '{}', 1, %(error)s, created_at,"
            " created_at, created_at FROM processes WHERE id LIKE %(prefix)s || '%%'",
            values,
        )
        conn.execute(
            "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, error_type, started_at,"
            " finished_at) SELECT id, 1, 'start', 'ops', '{}', status, error_type, started_at, finished_at"
            " FROM steps WHERE process_id LIKE %(prefix)s || '%%'",
            values,
        )
        tallies = [("processes", status, ""), ("steps", status, ""), ("attempts", "noop", "start")]
        for key in [*tallies, ("outcomes", "noop", outcome)]:
            conn.execute("INSERT INTO tally (series, a, b, n) VALUES (%s, %s, %s, %s)", (*key, count))


def deleted_by_retention(node):
    """How many processes the node's retention says it deleted (the sum of its log's lines)."""
    return sum(int(n) for n in re.findall(r"retention: deleted (\d+) process", node.output()))


@pytest.mark.timeout(120)
def test_retention_on_two_nodes_deletes_each_old_process_once_and_nothing_else(pg_server, postgres_url):
    """SPEC 10 and 12: both nodes run the retention chore at once (at their start, then twice a
    minute). Every old finished process is deleted, by one node or the other (their logs' counts add
    up to exactly that many), nothing else is: not a FAILED one, not one finished too lately, not a
    running one. The tallies stay right (`stepd check`), and neither node logs an error."""
    from stepd.postgres import PostgresDatabase

    PostgresDatabase(postgres_url).migrate()
    insert_old_processes(postgres_url, "old-done-", 2000, "COMPLETED", "30 days")
    insert_old_processes(postgres_url, "old-failed-", 50, "FAILED", "30 days")
    insert_old_processes(postgres_url, "lately-", 50, "COMPLETED", "12 hours")
    nodes = two_nodes(pg_server, extra_env={"STEPD_RETENTION_DAYS": "1"})
    running = nodes[0].start_process(("external", {}))["processId"]
    left = "SELECT count(*) FROM processes WHERE id LIKE %s"
    wait_for(lambda: pg_rows(postgres_url, left, "old-done-%")[0][0] == 0, timeout=60, interval=0.2,
             what="the old processes to be deleted")  # fmt: skip
    assert [pg_rows(postgres_url, left, like)[0][0] for like in ("old-failed-%", "lately-%")] == [50, 50]
    assert nodes[1].process(running)["status"] == "RUNNING"
    counted = lambda: [deleted_by_retention(node) for node in nodes]  # noqa: E731 - each says so once its purge ends
    by_node = wait_for(lambda: sum(n := counted()) >= 2000 and n, timeout=10, what="both purges to end")
    assert sum(by_node) == 2000, by_node
    for node in nodes:
        assert node.stop() == 0
        assert not re.search(r"ERROR|Traceback", node.output()), node.output()[-3000:]
    checked = stepd_check(postgres_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report_figure("retention on two nodes (PostgreSQL)", f"2,000 old processes deleted once: {by_node} by node")


@pytest.mark.timeout(90)
def test_a_runner_killed_on_one_node_interrupts_its_steps_only(pg_server, postgres_url, tmp_path):
    """SPEC 9 on several nodes: four waiting steps fill both nodes' places (two each); one node's runner
    is SIGKILLed. Its two steps are Interrupted within 2 s by its own node; the other node's two, busy
    meanwhile, run on and complete once let go."""
    nodes = two_nodes(pg_server, threads=2)
    gate = tmp_path / "gate"
    steps = [nodes[n % 2].start_process(("wait", {"file": str(gate)}))["steps"][0]["processStepId"] for n in range(4)]
    holders = wait_for(lambda: all(h := [node_of_step(postgres_url, s) for s in steps]) and h, what="four claims")
    (victim_node,) = nodes[0].node_pids()
    victims = [step for step, (_, pid) in zip(steps, holders, strict=True) if pid == victim_node]
    others = [step for step in steps if step not in victims]
    assert len(victims) == len(others) == 2, holders
    os.kill(nodes[0].runner_pids()[0], signal.SIGKILL)
    killed = time.monotonic()
    for step_id in victims:
        failed = wait_for(lambda s=step_id: (step := nodes[1].step(s))["status"] == "FAILED" and step, timeout=5)
        assert failed["error"]["type"] == "Interrupted" and failed["attempts"] == 1
    took = time.monotonic() - killed
    assert took < 2.0, f"Interrupted {took:.1f} s after the runner died"
    assert [nodes[0].step(step_id)["phase"] for step_id in others] == ["RUNNING", "RUNNING"]
    gate.touch()
    for step_id in others:
        assert nodes[0].wait_step(step_id, "COMPLETED")["attempts"] == 1
    for node in nodes:
        assert node.stop() == 0
    checked = stepd_check(postgres_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr


class RoundRobin:
    """A TCP proxy on loopback that hands each new connection to the next of `servers` in turn: a load
    balancer with nothing sticky. `counts` says how many connections each server got."""

    def __init__(self, servers):
        self.ports = [server.port for server in servers]
        self.counts = [0] * len(servers)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        for turn in itertools.count():
            try:
                client, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.counts[turn % len(self.ports)] += 1
            upstream = socket.create_connection(("127.0.0.1", self.ports[turn % len(self.ports)]))
            threading.Thread(target=self._serve, args=(client, upstream), daemon=True).start()

    def _serve(self, client, upstream):
        """Both ways at once until each side has said all it has to say; then both are closed."""
        answers = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
        answers.start()
        self._pipe(client, upstream)
        answers.join()
        client.close()
        upstream.close()

    @staticmethod
    def _pipe(source, sink):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


@NEEDS_CURL_AND_JQ
@pytest.mark.timeout(90)
def test_the_readme_walkthrough_runs_with_its_requests_alternating_between_two_nodes(pg_server, postgres_url):
    """SPEC 12: any node answers any request. Each curl of the walkthrough is a new connection, which
    a round-robin balancer hands to the other node than the last one."""
    nodes = two_nodes(pg_server)
    balancer = RoundRobin(nodes)
    try:
        assert_walked(walk_readme(balancer, nodes[0].token), nodes[0])
    finally:
        balancer.close()
    assert min(balancer.counts) >= 3, balancer.counts  # 7 requests at least: 4 and 3
    for node in nodes:
        assert node.stop() == 0
    checked = stepd_check(postgres_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.timeout(90)
def test_a_node_taken_for_dead_while_only_stopped_comes_back_and_runs_work_again(pg_server, postgres_url, tmp_path):
    """A node whose heartbeat stopped for longer than the limit (here: SIGSTOPped, as a paused VM) is
    taken for dead by the other: its running attempt Interrupted, its rows deleted. Once it goes on it
    writes its rows again and the attempts it claims from then on run to their end; without its
    runners' rows, every node's orphan sweep would take each of its claims for an orphan."""
    nodes = two_nodes(pg_server, threads=2)
    calls, gate = tmp_path / "calls.txt", tmp_path / "never"
    held = nodes[0].start_process(("retry_gate", {"file": str(calls), "gate": str(gate)}))["steps"][0]["processStepId"]
    _, paused = wait_for(lambda: node_of_step(postgres_url, held), what="a claim")
    stopped, other = nodes if nodes[0].node_pids() == [paused] else reversed(nodes)
    os.kill(paused, signal.SIGSTOP)
    try:
        other.wait_step(held, "FAILED", timeout=15)
    finally:
        os.kill(paused, signal.SIGCONT)
    assert other.step(held)["error"]["type"] == "Interrupted"
    rows_of = "SELECT count(*) FROM runners r JOIN nodes n ON n.id = r.node_id WHERE n.pid = %s"
    wait_for(lambda: pg_rows(postgres_url, rows_of, paused)[0][0] == 1, timeout=5, what="its runner's row again")
    processes = [stopped.start_process(("nap", {"seconds": 1.0}))["processId"] for _ in range(4)]
    done = [stopped.wait_process(process_id, "COMPLETED", timeout=15) for process_id in processes]
    assert [process["steps"][0]["attempts"] for process in done] == [1, 1, 1, 1]
    assert_called_once_never_retried(stopped, held, calls)
