"""`make bench-peers` (issue 18, "Peers"): stepd beside two peers, on the same box and in the same
run, on the same two workloads of sequences of no-op steps; prints one markdown table of steps/s
(the median of interleaved rounds), then the issue's goal, MET or NOT MET.

    .venv-peers/bin/python bench/peers.py [--quick] [--rounds 3] [--keep]

The engines, each on a fresh temporary folder for every measurement:

- stepd as `make run` serves it (`python -m stepd serve`, STEPD_SYNC normal and full): a sequence
  is one process of N `noop` steps, POSTed over HTTP; the steps' finishedAt are read from the file.
- huey 3 with SqliteHuey (WAL), its consumer with 4 threads or 2 processes: a sequence is a chain,
  each no-op task enqueueing the next; the driver enqueues every chain's first task in-process.
- DBOS 3 with a SQLite system database: a sequence is one workflow of N no-op @DBOS.step()s, run by
  4 threads in a process of its own.

steps/s = steps completed / (last completion - first submit). Each engine first runs one warm-up
sequence of one step, outside the timing, so start-up is not measured. Every server and consumer
it starts is stopped by its pid on the way out (and through PR_SET_PDEATHSIG if this driver dies).
The work per step differs between the engines: docs/contributing.md#peers-make-bench-peers.
"""

import argparse
import contextlib
import http.client
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

import run  # noqa: E402  (make bench's driver: stepd started as `make run` serves it, and stopped)

WORKLOADS = ((100, 100), (1000, 10))  # (sequences, steps in each), the two
QUICK_WORKLOADS = ((10, 10), (50, 10))
ROUNDS = 3
SUBMITTERS = 4  # HTTP clients POSTing stepd's processes at once, each on a keep-alive connection
HUEY_WORKERS = {"thread": 4, "process": 2}  # the two huey consumers
DBOS_THREADS = 4  # workflows DBOS runs at once: as many as huey's threads and a stepd runner's places
POLL = 0.05  # seconds between two looks at whether an engine is done (the end time is its own)
TIMEOUT = 600  # seconds one measurement may take before it counts as hung
RESULT = "peers-result: "  # the line a DBOS child prints its figures on, among DBOS's own output
GOAL = "ahead of the best peer on every row at the same durability, and >= 2x the best peer at full"


@dataclass(frozen=True)
class Variant:
    """One row of the table."""

    label: str
    durability: str  # "normal" or "full": which rows the goal compares
    engine: str  # "stepd", "huey" or "dbos"
    setting: str  # STEPD_SYNC; huey's synchronous; DBOS's journal and synchronous ("shipped": DBOS's own)
    workers: str = ""  # huey's consumer: "thread" or "process"


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
)


# -- children: huey's consumer and DBOS runs, stopped by their pid ------------------------------
class Child:
    """This script run again as a child (`huey-consumer` or `dbos-run`), its output in `log`."""

    running = []  # started and not yet stopped, for the cleanup on the way out

    def __init__(self, role_args, log):
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *role_args],
                cwd=run.ROOT,
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
    """Call done() every POLL seconds until it returns something other than None; return that."""
    deadline = time.monotonic() + timeout
    while (value := done()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not finish within {timeout}s")
        time.sleep(POLL)
    return value


# -- stepd ---------------------------------------------------------------------------------------
def measure_stepd(variant, sequences, steps, folder):
    """Processes of `steps` noop steps POSTed over HTTP to `stepd serve`; the end is the last step's
    finishedAt in the file."""
    db, token = folder / "stepd.db", "peers_" + secrets.token_urlsafe(24)
    server = run.stepd_server(db, variant.setting, folder, token)
    try:
        post_processes(server, token, "warm-up", 1, 1)
        stepd_finished(db, "warm-up", 1)
        first = time.time()
        post_processes(server, token, "peers", sequences, steps)
        last = stepd_finished(db, "peers", sequences * steps)
    finally:
        server.stop()
    return {"steps": sequences * steps, "seconds": last - first}


def post_processes(server, token, name, sequences, steps):
    """POST /api/v1/processes `sequences` times from SUBMITTERS threads, each on one keep-alive
    connection (as a client that starts many processes would), each answer a 201."""
    body = json.dumps({"name": name, "steps": [{"type": "noop"}] * steps})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    def submit(count):
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

    shares = [len(range(n, sequences, SUBMITTERS)) for n in range(SUBMITTERS)]
    with ThreadPoolExecutor(SUBMITTERS) as pool:
        list(pool.map(submit, [share for share in shares if share]))


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
            if conn.execute("SELECT count(*) FROM steps WHERE status = 'FAILED'").fetchone()[0]:
                raise RuntimeError(f"a noop step FAILED in {db}")
            return datetime.fromisoformat(last).timestamp() if count >= expected else None

        return wait_for(done, f"stepd's {name} processes")


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
    return {"steps": sequences * steps, "seconds": last - first, "pragmas": pragmas}


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
    result = {"steps": args.sequences * args.steps, "seconds": last - first, "pragmas": pragmas}
    print(RESULT + json.dumps(result), flush=True)


def read_pragmas(conn):
    """journal_mode and synchronous of a sqlite3 connection, as words."""
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    return f"{journal}, synchronous {['OFF', 'NORMAL', 'FULL', 'EXTRA'][synchronous]}"


# -- rounds, table, goal -------------------------------------------------------------------------
MEASURE = {"stepd": measure_stepd, "huey": measure_huey, "dbos": measure_dbos}


def run_rounds(workloads, rounds, workdir):
    """Every variant on every workload, round after round, the variants' order turned by one each
    round so that none always runs first or right after another; returns {(label, workload):
    [steps/s of each round]} and {label: pragmas read back}."""
    rates, pragmas = {}, {}
    for number in range(rounds):
        order = VARIANTS[number % len(VARIANTS) :] + VARIANTS[: number % len(VARIANTS)]
        for workload in workloads:
            for variant in order:
                folder = Path(tempfile.mkdtemp(prefix=f"{variant.engine}-", dir=workdir))
                result = MEASURE[variant.engine](variant, *workload, folder)
                rate = result["steps"] / result["seconds"]
                rates.setdefault((variant.label, workload), []).append(rate)
                if "pragmas" in result:
                    pragmas[variant.label] = result["pragmas"]
                print(f"round {number + 1}, {size(workload)}: {variant.label}: {rate:,.0f} steps/s", file=sys.stderr)
    return rates, pragmas


def size(workload):
    return f"{workload[0]:,} × {workload[1]:,}"


def table(rates, workloads):
    medians = {key: statistics.median(values) for key, values in rates.items()}
    lines = ["| | " + " | ".join(size(w) for w in workloads) + " |", "|---|" + "---:|" * len(workloads)]
    for variant in VARIANTS:
        cells = " | ".join(f"{medians[variant.label, w]:,.0f}" for w in workloads)
        lines.append(f"| {variant.label} | {cells} |")
    return "\n".join(lines), medians


def goal(medians, workloads):
    """(lines, met) of the issue's goal: ahead of the best peer on every workload at the same
    durability, and at least twice the best peer at full."""
    lines, met = [], True
    for durability, factor in (("normal", 1), ("full", 2)):
        stepd = next(v for v in VARIANTS if v.engine == "stepd" and v.durability == durability)
        peers = [v for v in VARIANTS if v.engine != "stepd" and v.durability == durability]
        for workload in workloads:
            best = max(peers, key=lambda v: medians[v.label, workload])
            ours, theirs = medians[stepd.label, workload], medians[best.label, workload]
            ok = ours > theirs if factor == 1 else ours >= factor * theirs
            met = met and ok
            aim = "ahead of" if factor == 1 else f">= {factor}x"
            lines.append(
                f"- {durability}, {size(workload)}: stepd {ours:,.0f} against {best.label} {theirs:,.0f}"
                f" ({ours / theirs:.2f}x; goal {aim} the best peer): {'MET' if ok else 'NOT MET'}"
            )
    return lines, met


def versions():
    from importlib.metadata import version

    names = ("stepd", "huey", "dbos", "SQLAlchemy")
    return ", ".join(f"{name} {version(name)}" for name in names) + (
        f"; Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; {os.cpu_count()} CPUs"
    )


def report(rates, pragmas, workloads, rounds):
    text, medians = table(rates, workloads)
    print(f"steps/s, medians of {rounds} interleaved round{'s' * (rounds > 1)}:\n")
    print(text)
    print(f"\n{versions()}")
    print("\nEach round (steps/s):\n")
    for variant in VARIANTS:
        each = "; ".join(f"{size(w)}: " + ", ".join(f"{r:,.0f}" for r in rates[variant.label, w]) for w in workloads)
        read = f" (read back: {pragmas[variant.label]})" if variant.label in pragmas else ""
        print(f"- {variant.label}{read}: {each}")
    print(
        "\nhuey's SqliteHuey offers synchronous FULL (fsync=True) or OFF (fsync=False), not NORMAL:"
        " its NORMAL rows set it with a subclass of SqliteStorage. DBOS sets neither journal mode nor"
        " synchronous on SQLite: its WAL rows set both on each connection of its engine."
    )
    lines, met = goal(medians, workloads)
    print(f"\nIssue 18's goal: {GOAL}\n")
    print("\n".join(lines))
    print(f"\nGoal: {'MET' if met else 'NOT MET'}")


# -- command line --------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 x 10 and 50 x 10, one round")
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {ROUNDS}; 1 with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (databases, logs)")
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
    args = parser.parse_args(argv)
    args.workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    args.rounds = args.rounds or (1 if args.quick else ROUNDS)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.role == "huey-consumer":
        return huey_consumer(args)
    if args.role == "dbos-run":
        return dbos_run(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    workdir = Path(tempfile.mkdtemp(prefix="stepd-peers-"))
    print(f"workdir {workdir}; workloads {', '.join(map(size, args.workloads))}", file=sys.stderr)
    try:
        rates, pragmas = run_rounds(args.workloads, args.rounds, workdir)
        report(rates, pragmas, args.workloads, args.rounds)
    finally:
        stop_all()  # the peers' consumers first; finish() stops stepd's servers and the folder
        run.finish(workdir, args.keep)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every server and consumer it started is stopped")
