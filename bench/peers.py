"""`make bench-peers` (issue 18, "Peers"; issue 20, "Peer in the same run"): stepd beside its peers,
on the same box and in the same run, on the same two workloads of sequences of no-op steps; prints
one markdown table of steps/s (the median of interleaved rounds), then the issues' goals, MET or NOT
MET.

    .venv-peers/bin/python bench/peers.py [--quick] [--rounds 3] [--keep] [--engines ...] [--workloads ...]

The engines, each on a fresh temporary folder for every measurement:

- stepd as `make run` serves it (`python -m stepd serve`, STEPD_SYNC normal and full): a sequence
  is one process of N `noop` steps, POSTed over HTTP; the steps' finishedAt are read from the file.
- huey 3 with SqliteHuey (WAL), its consumer with 4 threads or 2 processes: a sequence is a chain,
  each no-op task enqueueing the next; the driver enqueues every chain's first task in-process.
- DBOS 3 with a SQLite system database: a sequence is one workflow of N no-op @DBOS.step()s, run by
  4 threads in a process of its own.
- procrastinate 3 on a PostgreSQL 15 cluster this driver starts for the run (bench/pgcluster.py,
  PostgreSQL's default durability), a fresh database for every measurement: a sequence is a chain,
  each no-op job deferring the next, as huey's; 1 or 2 worker processes of 4 concurrent jobs each.
  Without PostgreSQL these rows are left out, saying why, and the rest runs.
- stepd on the same cluster (issue 20): one node and two, each `stepd serve` as `make run` serves
  it, on a fresh database; a sequence is one process of N `noop` steps, POSTed over the nodes in turn.

steps/s = steps completed / (last completion - first submit). Each engine first runs one warm-up
sequence of one step, outside the timing, so start-up is not measured. Every server, consumer and
worker it starts is stopped by its pid on the way out (and through PR_SET_PDEATHSIG if this driver
dies); the PostgreSQL cluster by `pg_ctl stop`, also on an error or Ctrl-C (and by its watchdog if
this driver is killed).
The work per step differs between the engines: docs/contributing.md#peers-make-bench-peers.
"""

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import platform
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import pgcluster  # noqa: E402  (the PostgreSQL cluster of the tests too)
import run  # noqa: E402  (make bench's driver: stepd started as `make run` serves it, and stopped)

WORKLOADS = ((100, 100), (1000, 10))  # (sequences, steps in each), the two
QUICK_WORKLOADS = ((10, 10), (50, 10))
ROUNDS = 3
SUBMITTERS = 4  # HTTP clients POSTing stepd's processes at once, each on a keep-alive connection
HUEY_WORKERS = {"thread": 4, "process": 2}  # the two huey consumers
DBOS_THREADS = 4  # workflows DBOS runs at once: as many as huey's threads and a stepd runner's places
# Jobs each procrastinate worker runs at once (its own default is 1): as many as huey's threads, DBOS's
# and a stepd runner's places. Its jobs are async no-ops, so the 4 share one event loop.
PROCRASTINATE_CONCURRENCY = 4
DATABASE_URL = "PEERS_DATABASE_URL"  # the variable a procrastinate worker gets its database's URL in
POLL = 0.05  # seconds between two looks at whether an engine is done (the end time is its own)
TIMEOUT = 600  # seconds one measurement may take before it counts as hung
RESULT = "peers-result: "  # the line a DBOS child prints its figures on, among DBOS's own output
GOAL = "ahead of the best peer on every row at the same durability, and >= 2x the best peer at full"
GOAL_20 = "stepd's two nodes >= 2x procrastinate's two workers, on the same PostgreSQL"
ON_POSTGRES = ("stepd-pg", "procrastinate")  # the engines measured on the run's PostgreSQL cluster


@dataclass(frozen=True)
class Variant:
    """One row of the table."""

    label: str
    durability: str  # "normal" or "full": which rows issue 18's goal compares; "postgresql": issue 20's
    engine: str  # "stepd", "huey", "dbos", "procrastinate" or "stepd-pg" (stepd on PostgreSQL)
    setting: str  # STEPD_SYNC; huey's synchronous; DBOS's journal and synchronous ("shipped": DBOS's own);
    # PostgreSQL's synchronous_commit (its default, "on")
    workers: str = ""  # huey's consumer: "thread" or "process"
    processes: int = 1  # procrastinate's worker processes; stepd's nodes on PostgreSQL


VARIANTS = (
    Variant("stepd `normal`", "normal", "stepd", "normal"),
    Variant("huey NORMAL, chains, 4 threads", "normal", "huey", "normal", "thread"),
    Variant("huey NORMAL, chains, 2 processes", "normal", "huey", "normal", "process"),
    Variant("DBOS, WAL + NORMAL", "normal", "dbos", "wal-normal"),
    Variant("stepd `full`", "full", "stepd", "full"),
    Variant("huey FULL, chains, 4 threads", "full", "huey", "full", "thread"),
    Variant("huey FULL, chains, 2 processes", "full", "huey", "full", "process"),
    Variant("DBOS, as shipped", "full", "dbos", "shipped"),
    Variant("DBOS, WAL + FULL", "full", "dbos", "wal-full"),
    Variant("stepd on PostgreSQL, 1 node", "postgresql", "stepd-pg", "on", processes=1),
    Variant("stepd on PostgreSQL, 2 nodes", "postgresql", "stepd-pg", "on", processes=2),
    Variant("procrastinate, 1 worker", "postgresql", "procrastinate", "on", processes=1),
    Variant("procrastinate, 2 workers", "postgresql", "procrastinate", "on", processes=2),
)


# -- children: huey's consumer, DBOS runs, procrastinate's workers, stopped by their pid ---------
class Child:
    """This script run again as a child (`huey-consumer`, `dbos-run` or `procrastinate-worker`), its
    output in `log`; `env` adds variables (a database's URL, kept off the command line: ps shows it)."""

    running = []  # started and not yet stopped, for the cleanup on the way out

    def __init__(self, role_args, log, env=None):
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *role_args],
                cwd=run.ROOT,
                env={**os.environ, **(env or {})},
                stdout=out,
                stderr=out,
                preexec_fn=run._die_with_parent,
            )
        self.log = log
        Child.running.append(self)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self):
        """SIGTERM (huey's consumer stops its workers on it), then SIGKILL to what is left: the
        process's children first, as they do not get the parent's death signal."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                for pid in [*run.Server._children(self.proc.pid), self.proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        if self in Child.running:
            Child.running.remove(self)


def stop_all():
    for child in list(Child.running):
        child.stop()
    run.stop_all()


def wait_for(done, what, timeout=TIMEOUT):
    """run.wait_for, every POLL seconds, TIMEOUT at most unless said."""
    return run.wait_for(done, what, timeout, POLL)


# -- stepd ---------------------------------------------------------------------------------------
def measure_stepd(variant, sequences, steps, folder):
    """Processes of `steps` noop steps POSTed over HTTP to `stepd serve`; the end is the last step's
    finishedAt in the file."""
    db, token = folder / "stepd.db", "peers_" + secrets.token_urlsafe(24)
    server = run.stepd_server(db, variant.setting, folder, token)
    try:
        post_processes([server], token, "warm-up", 1, 1)
        stepd_finished(db, "warm-up", 1)
        first = time.time()
        post_processes([server], token, "peers", sequences, steps)
        last = stepd_finished(db, "peers", sequences * steps)
    finally:
        server.stop()
    return {"steps": sequences * steps, "seconds": last - first}


def post_processes(servers, token, name, sequences, steps):
    """POST /api/v1/processes `sequences` times from SUBMITTERS threads, each on one keep-alive
    connection (as a client that starts many processes would), each answer a 201. The threads are
    spread over `servers` in turn (several nodes of one database: as a load balancer would)."""
    body = json.dumps({"name": name, "steps": [{"type": "noop"}] * steps})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    def submit(count, server):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            for _ in range(count):
                conn.request("POST", "/api/v1/processes", body, headers)
                response = conn.getresponse()
                answer = response.read()
                if response.status != 201:
                    raise RuntimeError(f"POST /api/v1/processes answered {response.status}: {answer[:300]!r}")
        finally:
            conn.close()

    shares = [(len(range(n, sequences, SUBMITTERS)), servers[n % len(servers)]) for n in range(SUBMITTERS)]
    with ThreadPoolExecutor(SUBMITTERS) as pool:
        list(pool.map(lambda share: submit(*share), [share for share in shares if share[0]]))


# How many steps are FAILED, from the store's tallies: read every POLL seconds on the cores being
# measured, where a count over the rows would read all of them (the status index holds no COMPLETED
# step since schema 10, and SQLite proves no partial index's WHERE from `status = 'FAILED'`).
FAILED_STEPS = "SELECT n FROM tally WHERE series = 'steps' AND a = 'FAILED' AND b = ''"


def stepd_finished(db, name, expected):
    """Once `expected` steps of the processes called `name` are COMPLETED: the last one's
    finishedAt, in seconds since the epoch. A FAILED step stops the run."""
    done_sql = (
        "SELECT count(*), max(s.finished_at) FROM steps s JOIN processes p ON p.id = s.process_id"
        " WHERE p.name = ? AND s.status = 'COMPLETED'"
    )
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:

        def done():
            count, last = conn.execute(done_sql, (name,)).fetchone()
            if conn.execute(FAILED_STEPS).fetchone()[0]:
                raise RuntimeError(f"a noop step FAILED in {db}")
            return datetime.fromisoformat(last).timestamp() if count >= expected else None

        return wait_for(done, f"stepd's {name} processes")


# -- stepd on PostgreSQL (issue 20) ---------------------------------------------------------------
def measure_stepd_postgres(variant, sequences, steps, folder, url):
    """`variant.processes` nodes, each `stepd serve` as make run serves it, on one fresh database
    of the run's cluster; the processes are POSTed over all of them in turn (as a load balancer
    would spread them); the end is the last step's finishedAt in the database."""
    token = "peers_" + secrets.token_urlsafe(24)
    nodes = []
    try:
        for number in range(variant.processes):
            nodes.append(run.stepd_node(url, folder, f"node-{number}", token))
        post_processes(nodes, token, "warm-up", len(nodes), 1)
        stepd_finished_postgres(url, "warm-up", len(nodes))
        first = time.time()
        post_processes(nodes, token, "peers", sequences, steps)
        last = stepd_finished_postgres(url, "peers", sequences * steps)
    finally:
        for node in nodes:
            node.stop()
    return {"steps": sequences * steps, "seconds": last - first, "read_back": postgres_settings(url)}


def stepd_finished_postgres(url, name, expected):
    """stepd_finished, on a PostgreSQL database of stepd's schema (stepd/postgres.py)."""
    import psycopg

    done_sql = (
        "SELECT count(*), extract(epoch FROM max(s.finished_at))::float FROM steps s"
        " JOIN processes p ON p.id = s.process_id WHERE p.name = %s AND s.status = 'COMPLETED'"
    )
    with psycopg.connect(url, autocommit=True) as conn:

        def done():
            count, last = conn.execute(done_sql, (name,)).fetchone()
            if conn.execute("SELECT count(*) FROM steps WHERE status = 'FAILED'").fetchone()[0]:
                raise RuntimeError("a noop step FAILED on PostgreSQL")
            return last if count >= expected else None

        return wait_for(done, f"stepd's {name} processes on PostgreSQL")


def postgres_settings(url):
    """The durability a PostgreSQL database really ran with, read back from the server, as words."""
    import psycopg

    with psycopg.connect(url) as conn:
        read = [f"{name} {conn.execute(f'SHOW {name}').fetchone()[0]}" for name in POSTGRES_DURABILITY]
    return ", ".join(read)


POSTGRES_DURABILITY = ("synchronous_commit", "fsync", "full_page_writes")


def postgres_version(url):
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


# -- huey ----------------------------------------------------------------------------------------
def huey_app(db, sync):
    """A SqliteHuey on `db` with SQLite's synchronous at `sync`, and its one task: step(sequence,
    position, steps) enqueues the sequence's next step, and the last one puts the time it ended
    under done-<sequence> (huey's result store), which is how the driver sees a chain finish.

    huey's own option, fsync, sets synchronous to FULL (True) or OFF (False): FULL uses it, and
    NORMAL, which it cannot set, comes from a subclass of its storage that sets it on each of its
    connections. The journal is huey's default, WAL."""
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class NormalSyncStorage(SqliteStorage):
        def _create_connection(self):
            conn = super()._create_connection()
            conn.execute("PRAGMA synchronous = NORMAL")
            return conn

    options = {"storage_class": NormalSyncStorage} if sync == "normal" else {"fsync": True}
    huey = SqliteHuey("peers", filename=str(db), **options)

    def step(sequence, position, steps):
        if position + 1 < steps:
            task(sequence, position + 1, steps)
        else:
            huey.put(f"done-{sequence}", time.time())

    # huey finds a task by module and name: the same in the driver and in the consumer, however
    # each was started.
    step.__module__ = "peers"
    task = huey.task(name="step")(step)
    return huey, task


def measure_huey(variant, sequences, steps, folder):
    """Chains enqueued in-process by this driver, run by a consumer of its own; the end is the last
    chain's done- time."""
    db = folder / "huey.db"
    huey, task = huey_app(db, variant.setting)
    pragmas = read_pragmas(huey.storage.conn)  # the driver's connection: set as the consumer's are
    workers = HUEY_WORKERS[variant.workers]
    consumer = Child(["huey-consumer", str(db), variant.setting, variant.workers, str(workers)], folder / "huey.log")

    def finished(count):
        """True once `count` chains put their done- key (None before); the consumer must live."""
        if consumer.proc.poll() is not None:
            raise RuntimeError(f"huey's consumer exited with {consumer.proc.returncode}; see {consumer.log}")
        return True if huey.result_count() >= count else None

    try:
        task(-1, 0, 1)  # warm-up: the consumer's workers are up once it is done
        wait_for(lambda: finished(1), "huey's warm-up", timeout=60)
        first = time.time()
        for sequence in range(sequences):
            task(sequence, 0, steps)
        wait_for(lambda: finished(sequences + 1), "huey's chains")
        last = max(huey.get(f"done-{sequence}", peek=True) for sequence in range(sequences))
    finally:
        consumer.stop()
        huey.storage.close()
    return {"steps": sequences * steps, "seconds": last - first, "read_back": pragmas}


def huey_consumer(args):
    """The child: huey's consumer, as `huey_consumer -w N -k thread|process` runs it. Polling starts
    at 10 ms and backs off to 100 ms at most (huey's defaults: 100 ms up to 10 s), so that an
    empty look at the queue does not add idle time to a short run: in huey's favour."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    huey, _ = huey_app(args.db, args.sync)
    consumer = huey.create_consumer(
        workers=args.workers, worker_type=args.worker_type, periodic=False, initial_delay=0.01, max_delay=0.1
    )
    consumer.run()


# -- DBOS ----------------------------------------------------------------------------------------
def measure_dbos(variant, sequences, steps, folder):
    """A child process that launches DBOS on a fresh SQLite file and runs the workflows (DBOS runs
    them in the process that calls them); it prints its figures on one line."""
    log = folder / "dbos.log"
    child = Child(["dbos-run", str(folder / "dbos.sqlite"), variant.setting, str(sequences), str(steps)], log)
    code = child.wait(TIMEOUT)
    lines = [line for line in log.read_text().splitlines() if line.startswith(RESULT)]
    if code != 0 or not lines:
        raise RuntimeError(f"the DBOS run ended with {code}; see {log}")
    return json.loads(lines[-1].removeprefix(RESULT))


def dbos_run(args):
    """The child: DBOS with its system database in a SQLite file. As shipped, DBOS sets no journal
    mode nor synchronous (SQLite's defaults: a rollback journal, FULL); the WAL variants add both
    on every connection its engine opens."""
    import sqlalchemy
    from dbos import DBOS

    if args.mode != "shipped":
        synchronous = args.mode.removeprefix("wal-").upper()

        @sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "connect")
        def wal(dbapi_conn, _record):
            dbapi_conn.execute("PRAGMA busy_timeout = 30000")  # as DBOS sets it, before the switch
            dbapi_conn.execute("PRAGMA journal_mode = WAL")
            dbapi_conn.execute(f"PRAGMA synchronous = {synchronous}")

    dbos = DBOS(config={"name": "peers", "system_database_url": f"sqlite:///{args.db}", "log_level": "WARNING"})

    @DBOS.step()
    def noop(position):
        return None

    @DBOS.workflow()
    def sequence(steps):
        for position in range(steps):
            noop(position)

    def one(_):
        sequence(args.steps)
        return time.time()  # the workflow's end is recorded once the call returns

    DBOS.launch()
    try:
        sequence(1)  # warm-up
        first = time.time()
        with ThreadPoolExecutor(DBOS_THREADS) as pool:
            last = max(pool.map(one, range(args.sequences)))
        with dbos._sys_db.engine.connect() as conn:  # DBOS's own engine: the pragmas it really ran with
            pragmas = read_pragmas(conn.connection.dbapi_connection)
    finally:
        DBOS.destroy()
    result = {"steps": args.sequences * args.steps, "seconds": last - first, "read_back": pragmas}
    print(RESULT + json.dumps(result), flush=True)


# -- procrastinate ---------------------------------------------------------------------------------
def procrastinate_app(url):
    """procrastinate's App on `url` (its PsycopgConnector, with psycopg's pool as procrastinate
    ships it) and its one task: step(sequence, position, steps), an async no-op that defers the
    next step of its sequence before it returns, as huey's chains do. Each job is a row of
    procrastinate_jobs; the worker marks it succeeded after the task returns."""
    import logging

    import procrastinate

    # Its warning that the App is made in __main__ (this script) is about finding tasks by their
    # module; here the one task is registered by name in the driver and in every worker alike.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="step")
    async def step(sequence, position, steps):
        if position + 1 < steps:
            await step.defer_async(sequence=sequence, position=position + 1, steps=steps)

    return app, step


def measure_procrastinate(variant, sequences, steps, folder, url):
    """Chains deferred in-process by this driver (as huey's are enqueued), run by `variant.processes`
    worker processes of their own; the end is the last `succeeded` event's time, which procrastinate
    records in the transaction that marks a job done."""
    import psycopg

    app, step = procrastinate_app(url)
    with app.open(), psycopg.connect(url, autocommit=True) as conn:
        app.schema_manager.apply_schema()
        role = ["procrastinate-worker", str(PROCRASTINATE_CONCURRENCY)]
        workers = [Child(role, folder / f"worker-{n}.log", {DATABASE_URL: url}) for n in range(variant.processes)]
        try:
            # every worker registered, then a warm-up job done: start-up is not measured
            wait_for(lambda: procrastinate_workers(conn, workers), "procrastinate's workers", timeout=60)
            step.defer(sequence=-1, position=0, steps=1)
            wait_for(lambda: procrastinate_done(conn, workers, 1), "procrastinate's warm-up", timeout=60)
            first = time.time()
            for sequence in range(sequences):
                step.defer(sequence=sequence, position=0, steps=steps)
            last = wait_for(lambda: procrastinate_done(conn, workers, 1 + sequences * steps), "procrastinate's chains")
        finally:
            for worker in workers:
                worker.stop()
    return {"steps": sequences * steps, "seconds": last - first, "read_back": postgres_settings(url)}


def procrastinate_alive(workers):
    """Raise if a worker process has exited: a run would otherwise wait out its timeout."""
    for worker in workers:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"a procrastinate worker exited with {worker.proc.returncode}; see {worker.log}")


def procrastinate_workers(conn, workers):
    """True once every worker process has registered itself in procrastinate_workers (None before)."""
    procrastinate_alive(workers)
    return True if conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0] >= len(workers) else None


def procrastinate_done(conn, workers, expected):
    """Once `expected` jobs have succeeded: the last one's end, in seconds since the epoch (None
    before). A job that failed, or was cancelled or aborted, stops the run."""
    procrastinate_alive(workers)
    succeeded, other = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status NOT IN"
        " ('todo', 'doing', 'succeeded')) FROM procrastinate_jobs"
    ).fetchone()
    if other:
        raise RuntimeError(f"{other} procrastinate job(s) failed; see the workers' logs")
    if succeeded < expected:
        return None
    return conn.execute(
        "SELECT extract(epoch FROM max(at))::float FROM procrastinate_events WHERE type = 'succeeded'"
    ).fetchone()[0]


def procrastinate_worker(args):
    """The child: one procrastinate worker, as `procrastinate worker` runs it (App.run_worker), with
    PROCRASTINATE_CONCURRENCY jobs at once and its other settings as shipped (LISTEN/NOTIFY, a poll
    every 5 s); SIGTERM stops it gracefully."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app, _ = procrastinate_app(os.environ[DATABASE_URL])
    app.run_worker(concurrency=args.concurrency)


def read_pragmas(conn):
    """journal_mode and synchronous of a sqlite3 connection, as words."""
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    return f"{journal}, synchronous {['OFF', 'NORMAL', 'FULL', 'EXTRA'][synchronous]}"


# -- rounds, table, goals ------------------------------------------------------------------------
MEASURE = {
    "stepd": measure_stepd,
    "huey": measure_huey,
    "dbos": measure_dbos,
    "procrastinate": measure_procrastinate,
    "stepd-pg": measure_stepd_postgres,
}
ENGINES = tuple(MEASURE)


def left_out(engines):
    """{engine: why its rows are not measured} for the engines asked for, before any cluster starts:
    procrastinate not installed (outside .venv-peers/)."""
    why_not = {}
    if "procrastinate" in engines and importlib.util.find_spec("procrastinate") is None:
        why_not["procrastinate"] = "procrastinate is not installed: make bench-peers installs it in .venv-peers/"
    return why_not


def start_cluster():
    """(the run's PostgreSQL cluster, None), or (None, why not): pgcluster.start_or_say_why. PostgreSQL's
    default durability (bench/pgcluster.py's LOOPBACK_SETTINGS: synchronous_commit, fsync and
    full_page_writes on)."""
    return pgcluster.start_or_say_why("stepd-pg-peers-")


def measure(variant, workload, folder, cluster):
    """One measurement on fresh storage: `folder`, and for an engine ON_POSTGRES a fresh database of
    the run's cluster, dropped afterwards (as every other engine gets a fresh file)."""
    if variant.engine not in ON_POSTGRES:
        return MEASURE[variant.engine](variant, *workload, folder)
    url = cluster.new_database("peers")
    try:
        return MEASURE[variant.engine](variant, *workload, folder, url)
    finally:
        cluster.drop_database(url)


def run_rounds(variants, workloads, rounds, workdir, cluster=None):
    """Every variant on every workload, round after round, the variants' order turned by one each
    round so that none always runs first or right after another; returns {(label, workload):
    [steps/s of each round]} and {label: the durability settings read back}."""
    rates, read_back = {}, {}
    for number in range(rounds):
        order = variants[number % len(variants) :] + variants[: number % len(variants)]
        for workload in workloads:
            for variant in order:
                folder = Path(tempfile.mkdtemp(prefix=f"{variant.engine}-", dir=workdir))
                result = measure(variant, workload, folder, cluster)
                rate = result["steps"] / result["seconds"]
                rates.setdefault((variant.label, workload), []).append(rate)
                if "read_back" in result:
                    read_back[variant.label] = result["read_back"]
                print(f"round {number + 1}, {size(workload)}: {variant.label}: {rate:,.0f} steps/s", file=sys.stderr)
    return rates, read_back


def size(workload):
    return f"{workload[0]:,} × {workload[1]:,}"


def table(rates, workloads):
    """The markdown table: a row per variant measured (in VARIANTS' order), a column per workload."""
    medians = {key: statistics.median(values) for key, values in rates.items()}
    lines = ["| | " + " | ".join(size(w) for w in workloads) + " |", "|---|" + "---:|" * len(workloads)]
    for variant in VARIANTS:
        if (variant.label, workloads[0]) in medians:
            cells = " | ".join(f"{medians[variant.label, w]:,.0f}" for w in workloads)
            lines.append(f"| {variant.label} | {cells} |")
    return "\n".join(lines), medians


def not_measured(why_not):
    """A line per reason, naming the rows it leaves out."""
    lines = []
    for why in dict.fromkeys(why_not.values()):
        labels = [v.label for v in VARIANTS if why_not.get(v.engine) == why]
        lines.append(f"{why} (not measured: {'; '.join(labels)})")
    return lines


def compare(medians, workload, ours, theirs, factor, whom=""):
    """(line, verdict) of one comparison: `ours` >= factor x the best of `theirs` (ahead of it for a
    factor of 1; `whom` names that best in the goal's words); verdict True, False, or None where a
    row was not measured."""
    best = max(theirs, key=lambda v: medians.get((v.label, workload), -1))
    if (ours.label, workload) not in medians or (best.label, workload) not in medians:
        return f"{size(workload)}: {ours.label} against {best.label}: not measured", None
    mine, other = medians[ours.label, workload], medians[best.label, workload]
    ok = mine > other if factor == 1 else mine >= factor * other
    aim = ("ahead of" if factor == 1 else f">= {factor}x") + (f" {whom}" if whom else "")
    line = f"{size(workload)}: {ours.label} {mine:,.0f} against {best.label} {other:,.0f}"
    return f"{line} ({mine / other:.2f}x; goal {aim}): {'MET' if ok else 'NOT MET'}", ok


def overall(verdicts):
    """False if any comparison failed, else None if any was not measured, else True."""
    return False if False in verdicts else None if None in verdicts else True


def goal(medians, workloads):
    """(lines, met) of issue 18's goal: stepd ahead of the best peer on every workload at the same
    durability, and at least twice the best peer at full; met is None where rows were not measured."""
    lines, verdicts = [], []
    for durability, factor in (("normal", 1), ("full", 2)):
        stepd = next(v for v in VARIANTS if v.engine == "stepd" and v.durability == durability)
        peers = [v for v in VARIANTS if v.engine != "stepd" and v.durability == durability]
        for workload in workloads:
            line, ok = compare(medians, workload, stepd, peers, factor, "the best peer")
            lines.append(f"- {durability}, {line}")
            verdicts.append(ok)
    return lines, overall(verdicts)


def goal_20(medians, workloads, why_not):
    """(lines, met) of issue 20's peer goal: stepd's two nodes >= 2x procrastinate's two workers on
    every workload; a row left out is said with its reason, and met is then None."""
    ours = next(v for v in VARIANTS if v.engine == "stepd-pg" and v.processes == 2)
    theirs = next(v for v in VARIANTS if v.engine == "procrastinate" and v.processes == 2)
    lines, verdicts = [], []
    for workload in workloads:
        line, ok = compare(medians, workload, ours, [theirs], 2)
        missing = [v for v in (ours, theirs) if (v.label, workload) not in medians]
        reasons = [why_not[v.engine] for v in missing if v.engine in why_not]
        lines.append(f"- {line}" + (f" ({'; '.join(dict.fromkeys(reasons))})" if reasons else ""))
        verdicts.append(ok)
    return lines, overall(verdicts)


def versions():
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("stepd", "huey", "dbos", "SQLAlchemy", "procrastinate", "psycopg"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return ", ".join(found) + (
        f"; Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; {os.cpu_count()} CPUs"
    )


def verdict(met):
    return {True: "MET", False: "NOT MET", None: "not measured in full"}[met]


def report(rates, read_back, workloads, rounds, why_not=None, cluster=None):
    why_not = why_not or {}
    text, medians = table(rates, workloads)
    run.say_if_altered()
    print(f"steps/s, medians of {rounds} interleaved round{'s' * (rounds > 1)}:\n")
    print(text)
    for line in not_measured(why_not):
        print(f"\n{line}")
    server = f"; PostgreSQL {postgres_version(cluster.url())}" if cluster is not None else ""
    print(f"\n{versions()}{server}")
    print("\nEach round (steps/s):\n")
    for variant in VARIANTS:
        if (variant.label, workloads[0]) not in rates:
            continue
        each = "; ".join(f"{size(w)}: " + ", ".join(f"{r:,.0f}" for r in rates[variant.label, w]) for w in workloads)
        read = f" (read back: {read_back[variant.label]})" if variant.label in read_back else ""
        print(f"- {variant.label}{read}: {each}")
    print(
        "\nhuey's SqliteHuey offers synchronous FULL (fsync=True) or OFF (fsync=False), not NORMAL:"
        " its NORMAL rows set it with a subclass of SqliteStorage. DBOS sets neither journal mode nor"
        " synchronous on SQLite: its WAL rows set both on each connection of its engine. procrastinate"
        f" runs on a PostgreSQL cluster of the run's own at PostgreSQL's default durability"
        f" (synchronous_commit on), {PROCRASTINATE_CONCURRENCY} concurrent jobs a worker process (its own"
        " default is 1: huey's thread consumer's 4 here), async no-op jobs, each deferring the next."
    )
    lines, met = goal(medians, workloads)
    print(f"\nIssue 18's goal: {GOAL}\n")
    print("\n".join(lines))
    print(f"\nGoal: {verdict(met)}")
    lines, met = goal_20(medians, workloads, why_not)
    print(f"\nIssue 20's goal: {GOAL_20}\n")
    print("\n".join(lines))
    print(f"\nGoal: {verdict(met)}")


# -- command line --------------------------------------------------------------------------------
def workloads_arg(text):
    """--workloads: "100x100,1000x10" -> ((100, 100), (1000, 10))."""
    try:
        pairs = tuple(tuple(int(n) for n in item.lower().split("x")) for item in text.split(","))
    except ValueError:
        pairs = ()
    if not pairs or any(len(pair) != 2 or min(pair) < 1 for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: say SEQUENCESxSTEPS[,SEQUENCESxSTEPS...], e.g. 100x100,1000x10")
    return pairs


def engines_arg(text):
    """--engines: a comma-separated subset of ENGINES, kept in ENGINES' order."""
    asked = {name.strip() for name in text.split(",")}
    if not asked or asked - set(ENGINES):
        raise argparse.ArgumentTypeError(f"{text!r}: say some of {','.join(ENGINES)}")
    return tuple(engine for engine in ENGINES if engine in asked)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 x 10 and 50 x 10, one round")
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {ROUNDS}; 1 with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (databases, logs)")
    parser.add_argument("--engines", type=engines_arg, default=ENGINES, help=f"some of {','.join(ENGINES)} (all)")
    parser.add_argument("--workloads", type=workloads_arg, help="e.g. 3x3,5x2: sequences x steps (the issue's)")
    roles = parser.add_subparsers(dest="role", title="the children this driver starts (not for a person)")
    consumer = roles.add_parser("huey-consumer", help="huey's consumer on a file")
    consumer.add_argument("db")
    consumer.add_argument("sync", choices=("normal", "full"))
    consumer.add_argument("worker_type", choices=tuple(HUEY_WORKERS))
    consumer.add_argument("workers", type=int)
    dbos = roles.add_parser("dbos-run", help="DBOS running the workflows, then its figures on one line")
    dbos.add_argument("db")
    dbos.add_argument("mode", choices=("wal-normal", "shipped", "wal-full"))
    dbos.add_argument("sequences", type=int)
    dbos.add_argument("steps", type=int)
    worker = roles.add_parser("procrastinate-worker", help=f"a procrastinate worker on ${DATABASE_URL}")
    worker.add_argument("concurrency", type=int)
    args = parser.parse_args(argv)
    args.workloads = args.workloads or (QUICK_WORKLOADS if args.quick else WORKLOADS)
    args.rounds = args.rounds or (1 if args.quick else ROUNDS)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.role == "huey-consumer":
        return huey_consumer(args)
    if args.role == "dbos-run":
        return dbos_run(args)
    if args.role == "procrastinate-worker":
        return procrastinate_worker(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    workdir = Path(tempfile.mkdtemp(prefix="stepd-peers-"))
    print(f"workdir {workdir}; workloads {', '.join(map(size, args.workloads))}", file=sys.stderr)
    cluster = None
    try:
        why_not = left_out(args.engines)
        if any(engine in ON_POSTGRES and engine not in why_not for engine in args.engines):
            cluster, missing = start_cluster()
            if cluster is not None:
                print(f"PostgreSQL on 127.0.0.1:{cluster.port}, in {cluster.folder}", file=sys.stderr)
            why_not.update({engine: missing for engine in ON_POSTGRES if missing and engine not in why_not})
        for line in not_measured(why_not):
            print(line, file=sys.stderr)
        variants = [v for v in VARIANTS if v.engine in args.engines and v.engine not in why_not]
        rates, read_back = run_rounds(variants, args.workloads, args.rounds, workdir, cluster)
        report(rates, read_back, args.workloads, args.rounds, why_not, cluster)
    finally:
        stop_all()  # the peers' consumers and workers first; finish() stops stepd's servers and the folder
        try:
            if cluster is not None:
                cluster.stop()  # pg_ctl stop, and its folder removed
        finally:
            run.finish(workdir, args.keep)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every server, consumer, worker and PostgreSQL cluster it started is stopped")
