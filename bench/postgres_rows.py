"""`make bench`'s PostgreSQL part (issue 20, SPEC 12): stepd nodes, each `stepd serve` as `make run`
serves it, on one PostgreSQL 15 cluster that this part starts for the run and stops (bench/pgcluster.py,
PostgreSQL's default durability: synchronous_commit, fsync and full_page_writes on), a fresh database
for each row. bench/run.py runs it after its SQLite rows (`--only postgres`: it alone).

- engine, one node and two: processes of 10 noop steps POSTed by wrk, measured as the SQLite engine
  row is (run.run_engine: every step COMPLETED, from the first POST to the last completion, the
  backlog after the load), with two nodes wrk's connections split over both ports (nothing sticky);
- a node SIGKILLed under load, KILL_ROUNDS times: how long until the attempts it was running are
  Interrupted by the other node; then whether every process acknowledged (201) is there, whether any
  attempt was run twice (bench.record counts each delegate call in a file), and `stepd check`;
- queued -> running on an idle cluster of two nodes: queued through a node with no runner, so begun
  by the other node; and the same after the LISTEN connections (application_name 'stepd-listen') are
  ended from the server's side, where the build has them.

targets() says issue 20's targets, each MET or NOT MET.
"""

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pgcluster
import queue_latency
import run

SYNC = "(PostgreSQL)"  # the table's STEPD_SYNC column: PostgreSQL's own durability, not STEPD_SYNC's
LISTEN_NAME = "stepd-listen"  # application_name of a node's LISTEN connection, where the build has one
KILL_ROUNDS = 4  # the "over >= 4 kill rounds"
RECORD_MS = 200  # how long each bench.record step of the kill row takes: a kill lands in running steps
KILL_RATE = 16  # one-step processes a second offered during the kill row: about 1.6 running a node
KILL_SUBMITTERS = 4
WAKE_COUNT = 100  # queued -> running samples on the idle cluster
BROKEN_COUNT = 20  # samples with LISTEN broken (each may wait for the poll backstop: up to 2.5 s)
ENGINE_GOAL, INTERRUPT_GOAL_S, IDLE_GOAL_MS, BROKEN_GOAL_MS = 2000, 10.0, 50.0, 2500.0


# -- nodes -----------------------------------------------------------------------------------------
def start_nodes(url, count, workdir, token, prefix):
    return [run.stepd_node(url, workdir, f"{prefix}-node-{n}", token) for n in range(count)]


def stop(nodes):
    for node in nodes:
        node.stop()


def pg(url, sql, *args):
    return run.query(url, sql, args)


# -- engine ----------------------------------------------------------------------------------------
def run_engine(cluster, count, workdir, duration, token):
    """The engine row on `count` nodes of a fresh database: a warm-up of create3 (processes named
    'bench', so the engine row's count of 'engine' processes leaves them out), drained, then
    run.run_engine over every node."""
    url = cluster.new_database("engine")
    nodes = start_nodes(url, count, workdir, token, f"engine-{count}")
    try:
        run.wrk_spread(nodes, "create3", run.WARM_UP, None, token)
        run.drain(url)
        name = f"engine on PostgreSQL, {count} node{'s' * (count > 1)}: POST processes of 10 noop steps"
        server_cpu = run.cpu_seconds(server_processes(cluster))
        result = run.run_engine(nodes, url, SYNC, duration, token, key="pg-engine", name=name)
        server_cpu = run.cpu_seconds(server_processes(cluster)) - server_cpu
    finally:
        stop(nodes)
    cluster.drop_database(url)
    # The table's CPU column is the nodes' (their processes); PostgreSQL's own is said beside it.
    result["note"] += f"; PostgreSQL's CPU meanwhile {1000 * server_cpu / max(1, result['counted']):.1f} ms per 201"
    return result | {"nodes": count}


def server_processes(cluster):
    """The cluster's processes (the postmaster and its children) as run.cpu_seconds reads a server's."""
    pid = cluster.server_pid()
    return SimpleNamespace(all_pids=lambda: [pid, *run.Server._children(pid)])


# -- a node SIGKILLed under load -----------------------------------------------------------------------
class Load:
    """KILL_SUBMITTERS threads POSTing one-step processes of bench.record to the nodes in turn, at
    KILL_RATE a second in all, until stopped. `acknowledged` holds every processId answered 201:
    what must not be lost. A request to a node that was killed fails and is not acknowledged; the
    next goes to the next node. `nodes` is the caller's list: a node replaced there gets the load."""

    def __init__(self, nodes, token, calls_file):
        self.nodes, self.token = nodes, token
        params = {
            "file": {"type": "STRING", "strValue": str(calls_file)},
            "ms": {"type": "LONG", "longValue": RECORD_MS},
        }
        self.body = json.dumps({"name": "kill", "steps": [{"type": "bench.record", "params": params}]})
        self.acknowledged, self.refused = [], Counter()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._submit, args=(n,), daemon=True) for n in range(KILL_SUBMITTERS)]

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def _submit(self, number):
        period = KILL_SUBMITTERS / KILL_RATE
        turn, conns = number, {}
        while not self.stopping.wait(period):
            # A killed node is passed over until its replacement is up: the living one takes the load.
            live = [node for node in self.nodes if node.proc.poll() is None]
            node = live[turn % len(live)]
            turn += 1
            if node.port not in conns:  # one keep-alive connection a node
                conns[node.port] = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
            conn = conns[node.port]
            try:
                self._post(conn)
            except (OSError, http.client.HTTPException) as exc:
                self.refused[type(exc).__name__] += 1
                conns.pop(node.port).close()

    def _post(self, conn):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        conn.request("POST", "/api/v1/processes", self.body, headers)
        response = conn.getresponse()
        answer = response.read()
        if response.status == 201:
            self.acknowledged.append(json.loads(answer)["data"]["processId"])
        else:
            self.refused[response.status] += 1


RUNNING_OF = "SELECT s.id FROM steps s WHERE s.status = 'STARTED' AND s.deferred = 0 AND s.runner_id = ANY(?)"


def runners_of(url, node):
    """The ids of the runners of `node` (a run.Server): its node row is the one with its node process's pid."""
    sql = "SELECT r.id FROM runners r JOIN nodes n ON n.id = r.node_id WHERE n.pid = ANY(?)"
    return [runner for (runner,) in pg(url, sql, node.node_pids())]


def kill_round(url, node):
    """SIGKILL the node once it runs an attempt; returns (seconds until every attempt it was running
    is no longer STARTED, to 0.1 s, those attempts' step ids)."""
    runners = run.wait_for(lambda: runners_of(url, node) or None, "the node's runners", 30)
    run.wait_for(lambda: pg(url, RUNNING_OF, runners) or None, "the node to run an attempt", 30)
    node.kill()
    killed = time.monotonic()
    held = [step for (step,) in pg(url, RUNNING_OF, runners)]
    run.wait_for(lambda: None if pg(url, RUNNING_OF, runners) else True, "its attempts Interrupted", 30, 0.1)
    return time.monotonic() - killed, held


def run_kill(cluster, workdir, token):
    """KILL_ROUNDS rounds on two nodes under Load, each SIGKILLing one node (the two in turn) and
    starting another in its place; then, the load stopped and the work drained, the checks."""
    url = cluster.new_database("kill")
    calls = workdir / "kill-calls.txt"
    nodes = start_nodes(url, 2, workdir, token, "kill")
    load = Load(nodes, token, calls).start()
    rounds = []
    try:
        time.sleep(2)  # both nodes under load before the first kill
        for number in range(KILL_ROUNDS):
            took, held = kill_round(url, nodes[number % 2])
            rounds.append({"seconds": took, "held": held})
            nodes[number % 2] = run.stepd_node(url, workdir, f"kill-node-{number + 2}", token)
        load.stop()
        run.drain(url, timeout=120)
        checked = check_kill(url, load.acknowledged, calls, [step for r in rounds for step in r["held"]])
    finally:
        load.stop()
        stop(nodes)
    cluster.drop_database(url)
    return kill_row(rounds, checked, load.refused)


def check_kill(url, acknowledged, calls_file, held):
    """What the kill rounds left: acknowledged processes missing, attempts called more than once,
    steps with more than one attempt, the held steps' outcomes, and `stepd check`'s verdict."""
    stored = {process for (process,) in pg(url, "SELECT id FROM processes WHERE name = 'kill'")}
    outcomes = Counter(
        f"{status} {error or ''}".strip()
        for status, error in pg(url, "SELECT status, error_type FROM steps WHERE id = ANY(?)", held)
    )
    checked = subprocess.run(
        [sys.executable, "-m", "stepd", "check"],
        cwd=run.ROOT,
        env={**os.environ, "STEPD_DB": url},
        capture_output=True,
        text=True,
    )
    calls = calls_file.read_text() if calls_file.exists() else ""
    return {
        "acknowledged": len(acknowledged),
        "lost": len(set(acknowledged) - stored),
        "twice": twice(calls),
        "calls": len(calls.splitlines()),
        "retried": pg(url, "SELECT count(*) FROM steps WHERE attempts > 1")[0][0],
        "outcomes": dict(outcomes),
        "check": checked.returncode == 0,
        "check_says": (checked.stdout + checked.stderr).strip().splitlines()[-1:] or [""],
    }


def twice(calls_text):
    """The (step, attempt) pairs of bench.record's calls file that were called more than once."""
    counts = Counter(line.split()[0] for line in calls_text.splitlines() if line.strip())
    pairs = Counter(tuple(line.split()) for line in calls_text.splitlines() if line.strip())
    return sorted({pair for pair, n in pairs.items() if n > 1} | {(step, "*") for step, n in counts.items() if n > 1})


def kill_row(rounds, checked, refused):
    times = [r["seconds"] for r in rounds]
    note = (
        f"{len(rounds)} rounds, a node SIGKILLed while it ran attempts (bench.record, {RECORD_MS} ms each;"
        f" {KILL_RATE} one-step processes/s offered over both nodes): its running attempts no longer STARTED"
        f" {', '.join(f'{t:.1f}' for t in times)} s after the kill ({', '.join(str(len(r['held'])) for r in rounds)}"
        f" attempts; their outcome: {checked['outcomes'] or 'none'}); {checked['acknowledged']:,} processes"
        f" acknowledged (201), {checked['lost']} lost; {checked['calls']:,} delegate calls, {len(checked['twice'])}"
        f" attempts called twice, {checked['retried']} steps with a second attempt; stepd check:"
        f" {'passed' if checked['check'] else 'FAILED: ' + checked['check_says'][0]}; requests not acknowledged:"
        f" {dict(refused) or 'none'}"
    )
    result = {"kill_seconds": times, "held": [len(r["held"]) for r in rounds], **checked}
    return run.row("pg-kill", "a node SIGKILLed under load, two nodes on PostgreSQL", SYNC, result, note)


# -- queued -> running ---------------------------------------------------------------------------------
def listen_connections(url):
    """The pids of the database's LISTEN connections (application_name LISTEN_NAME)."""
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = ? AND datname = current_database()"
    return [pid for (pid,) in pg(url, sql, LISTEN_NAME)]


def break_listen(url):
    """End every LISTEN connection of the database from the server's side (as a pooler or a network
    fault would), waiting up to a second for each to be gone; returns how many were ended."""
    sql = (
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 1000)) FROM pg_stat_activity"
        " WHERE application_name = ? AND datname = current_database()"
    )
    return pg(url, sql, LISTEN_NAME)[0][0]


def latencies_ms(front, count, before=lambda: None):
    """queue_latency's measure, `count` times through `front` (each after the last completed):
    queued -> running in ms, sorted. `before()` runs before each."""
    waits = []
    for _ in range(count):
        before()
        waits.append(1000 * queue_latency.one_latency(front))
    return sorted(waits)


def run_wake_up(cluster, workdir, token):
    """queued -> running on an idle cluster of two nodes. The front has no runner (STEPD_RUNNERS=0),
    so the other node begins what is queued through it: it learns of it by LISTEN/NOTIFY where the
    build has it, else by its poll. Then the same with LISTEN broken before each sample (where there
    is a LISTEN to break), and, for scale, queued and begun by the one node."""
    url = cluster.new_database("wake")
    front = run.stepd_node(url, workdir, "wake-front", token, STEPD_RUNNERS="0")
    worker = run.stepd_node(url, workdir, "wake-worker", token)
    try:
        time.sleep(1.5)  # the runner registers (as queue_latency.py waits)
        listening = listen_connections(url)
        wake_up = f"{len(listening)} '{LISTEN_NAME}' connection(s)" if listening else f"no '{LISTEN_NAME}': a poll"
        across = "two nodes (queued through one, begun by the other)"
        rows = [wake_row("pg-idle", f"idle, {across}", latencies_ms(front, WAKE_COUNT), wake_up)]
        if listening:
            ended = []
            waits = latencies_ms(front, BROKEN_COUNT, lambda: ended.append(break_listen(url)))
            broken = f"{wake_up}; {sum(ended)} ended by pg_terminate_backend, those of the moment before each sample"
            rows.append(wake_row("pg-listen-broken", f"LISTEN broken, {across}", waits, broken))
        else:
            note = f"no LISTEN to break: this build has no '{LISTEN_NAME}' connection (its wake-up is a poll)"
            rows.append(run.row("pg-listen-broken", f"queued -> running, LISTEN broken, {across}", SYNC, {}, note))
        local = latencies_ms(worker, WAKE_COUNT // 2)
        rows.append(wake_row("pg-idle-local", "idle, queued and begun by one node (not a target)", local, wake_up))
    finally:
        stop([front, worker])
    cluster.drop_database(url)
    return rows


def wake_row(key, what, waits, wake_up):
    note = (
        f"{len(waits)} one-step processes (bench.clock), one at a time; wake-up: {wake_up}; max {waits[-1]:.1f} ms;"
        " from startedAt (its commit, ms precision) to the delegate's call"
    )
    result = {"p50": run.percentile(waits, 0.5), "p99": run.percentile(waits, 0.99)}
    return run.row(key, f"queued -> running, {what}", SYNC, result, note)


# -- the part, and its targets ---------------------------------------------------------------------------
def run_postgres(workdir, duration, token):
    """Every row of the part, and a line saying what it ran on; no rows, and a line saying why, where
    PostgreSQL is missing or does not start."""
    cluster, why = pgcluster.start_or_say_why("stepd-pg-bench-")
    if cluster is None:
        return [], why
    print(f"PostgreSQL on 127.0.0.1:{cluster.port}, in {cluster.folder}", file=sys.stderr)
    try:
        version = pg(cluster.url(), "SHOW server_version")[0][0]
        rows = []
        for count in (1, 2):
            print(f"PostgreSQL: engine, {count} node(s)", file=sys.stderr)
            rows.append(run_engine(cluster, count, workdir, duration, token))
        print(f"PostgreSQL: {KILL_ROUNDS} node kills under load", file=sys.stderr)
        rows.append(run_kill(cluster, workdir, token))
        print("PostgreSQL: queued -> running", file=sys.stderr)
        rows += run_wake_up(cluster, workdir, token)
    finally:
        run.stop_all()
        cluster.stop()
    return rows, f"PostgreSQL {version} on loopback, its default durability (synchronous_commit, fsync on)"


VERDICT = {True: "MET", False: "NOT MET", None: "not measured"}


def targets(rows, why_not=None):
    """Issue 20's targets, each MET, NOT MET or not measured (saying why), then what this part leaves
    to make bench-peers."""
    lines = [f"- {VERDICT[met]}: {text}" for text, met in measured(rows)]
    if why_not:
        lines.append(f"- not measured: every PostgreSQL target ({why_not})")
    peers = "stepd's two nodes >= 2x procrastinate's two workers: `make bench-peers` measures it"
    return "\n".join([*lines, "", "Not measured by this run:", f"- {peers}"])


def measured(rows):
    """(text, met) of each target a row measured; met None where the row says why it could not."""
    by = {(r["key"], r.get("nodes")): r for r in rows}
    if two := by.get(("pg-engine", 2)):
        yield engine_target(two, by.get(("pg-engine", 1)))
    if kill := by.get(("pg-kill", None)):
        yield from kill_targets(kill)
    for key, goal in (("pg-idle", IDLE_GOAL_MS), ("pg-listen-broken", BROKEN_GOAL_MS)):
        if r := by.get((key, None)):
            yield wake_target(r, goal)


def engine_target(two, one):
    beside = f"; one node: {one['steps_per_s']:,.0f}" if one else ""
    text = (
        f"engine on PostgreSQL, noop steps/s end to end, two nodes: {two['steps_per_s']:,.0f}"
        f" (goal >= {ENGINE_GOAL:,}{beside}; backlog after the load {two['backlog_s']:.1f} s)"
    )
    return text, two["steps_per_s"] >= ENGINE_GOAL


def kill_targets(kill):
    """Interrupted within the goal in every round (and Interrupted it is); none run twice, none lost."""
    rounds, slowest, held = len(kill["kill_seconds"]), max(kill["kill_seconds"]), sum(kill["held"])
    text = (
        f"a node SIGKILLed under load: its running attempts Interrupted {slowest:.1f} s after the kill at most,"
        f" over {rounds} rounds ({held} attempts; goal <= {INTERRUPT_GOAL_S:.0f} s)"
    )
    # Every attempt it held ended Interrupted; a kill that found nothing running proves nothing.
    interrupted = kill["outcomes"].get("FAILED Interrupted", 0) == held
    yield text, slowest <= INTERRUPT_GOAL_S and held > 0 and interrupted
    text = (
        f"over {rounds} kill rounds (goal >= {KILL_ROUNDS}): {len(kill['twice'])} attempts run twice,"
        f" {kill['retried']} steps begun again, {kill['lost']} of {kill['acknowledged']:,} acknowledged processes"
        f" lost, stepd check {'passed' if kill['check'] else 'FAILED'} (goal: none twice, none lost)"
    )
    sound = not (kill["lost"] or kill["twice"] or kill["retried"]) and kill["check"]
    yield text, sound and rounds >= KILL_ROUNDS


def wake_target(r, goal):
    if "p99" not in r:
        return f"{r['row']}: {r['note']}", None
    return f"{r['row']}: p99 {r['p99']:.1f} ms (p50 {r['p50']:.1f} ms; goal <= {goal:,.0f} ms)", r["p99"] <= goal
