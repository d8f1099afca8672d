"""Issue 18's other HTTP front, measured beside the one stepd ships: a prototype, not the product.

Since `0170929` the product is this design (stepd/handoff.py): `node:` rows run `stepd serve`, whose
front hands its writes to the node; `hop:` rows run the prototype that measured it first, kept for
BENCHMARKS.md's record. Run from two checkouts, `node:` rows are the interleaved A/B of make bench's.

stepd serves HTTP from the node itself (gevent, no hand-off). The other front the issue names:
HOP_WORKERS HTTP processes (stepd's app, reads on their own connections) that hand their writes to
the node over a socket (rpc.py), the node (node.py) doing only the writes, the dispatch and the
chores. Rows, each on a fresh file, in the order given:

    .venv/bin/python bench/front_hop/compare.py node:engine hop:engine node:defer hop:defer baseline1 baseline2

`engine` is make bench's engine row (10 s of POST processes of 10 noop steps, then the drain),
`defer` its deferred-restart row (counts the 200s), `fail` its failing cycle (restart, the delegate
fails, FAILED again: counted to the last FAILED), `baselineN` the bare Flask app on N workers.
Environment: SYNC (normal), ROUNDS (1), HOP_WORKERS (1).
"""

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

import run  # noqa: E402
from run import BENCH, Server  # noqa: E402

sync = os.environ.get("SYNC", "normal")
rounds = int(os.environ.get("ROUNDS", "1"))
workers = int(os.environ.get("HOP_WORKERS", "1"))
work = Path(tempfile.mkdtemp(prefix="hop-"))
token = secrets.token_hex(16)
env_common = {"STEPD_TOKEN": token, "STEPD_DELEGATES_PATH": str(BENCH / "delegates"), "STEPD_SYNC": sync}


def node_server(db):
    return run.stepd_server(db, sync, work, token)


def hop_server(db, tag):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPD_")}
    env.update(env_common, STEPD_DB=str(db), HOP_TAG=tag, STEPD_LOG_LEVEL="WARNING", HOP_WORKERS=str(workers))
    with open(work / "node.log", "ab") as log:
        node = subprocess.Popen([sys.executable, str(HERE / "node.py")], env=env, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(2.5)  # the node's socket is bound (the HTTP processes connect to it as they start)
    run.HTTP_WORKERS = workers
    s = Server(
        [str(run.GUNICORN), "-c", str(HERE / "gunicorn.conf.py")],
        work / "hop.log",
        **env_common,
        STEPD_DB=str(db),
        HOP_TAG=tag,
        STEPD_LOG_LEVEL="WARNING",
        HOP_WORKERS=str(workers),
    )
    try:
        s.start("/healthz")
    finally:
        run.HTTP_WORKERS = 1
    s.node = node
    return s


def stop(s):
    s.stop()
    if getattr(s, "node", None):
        s.node.terminate()
        s.node.wait(20)


def engine(kind, n):
    db = work / f"e-{kind}-{n}.db"
    s = node_server(db) if kind == "node" else hop_server(db, f"e{n}")
    try:
        run.wrk(s, "create3", 3, None, token)
        r = run.run_engine([s], db, sync, 10, token)
    finally:
        stop(s)
    posts = r["counted"] / r["seconds"]
    return f"{kind:5} engine: {r['steps_per_s']:,.0f} steps/s, backlog {r['backlog_s']:.1f} s, POSTs {posts:,.0f}/s"


def defer(kind, n):
    db = work / f"d-{kind}-{n}.db"
    ids = run.write_ids(work / f"d-{kind}-{n}.ids", run.seed_file(db, defer=run.DEFER_POOL)["defer"])
    s = node_server(db) if kind == "node" else hop_server(db, f"d{n}")
    try:
        run.wrk(s, "get-step", 3, ids, token)
        r = run.wrk(s, "restart-defer", 10, ids, token)
    finally:
        stop(s)
    return f"{kind:5} restart-defer: {r['rps']:,.0f} 200s/s p99 {r['p99']} ms statuses {r['statuses']}"


def fail(kind, n):
    """make bench's failing cycle (restart, delegate fails, FAILED again), counted to the last FAILED."""
    db = work / f"f-{kind}-{n}.db"
    pools = run.seed_file(db, fail=run.FAIL_POOL, read=run.READ_POOL)
    ids = run.write_ids(work / f"f-{kind}-{n}.ids", pools["fail"])
    read = run.write_ids(work / f"r-{kind}-{n}.ids", pools["read"])
    s = node_server(db) if kind == "node" else hop_server(db, f"f{n}")
    try:
        run.wrk(s, "get-step", 3, read, token)
        r = run.run_fail_cycle(s, db, sync, 10, ids, token, run.FAIL_POOL)
    finally:
        stop(s)
    return f"{kind:5} restart-fail: {r['rps']:,.0f} cycles/s ({r['note'][:90]})"


def baseline(workers_n):
    run.HTTP_WORKERS = workers_n
    os.environ["BASELINE_WORKERS"] = str(workers_n)
    s = Server(
        [str(run.GUNICORN), "-c", str(HERE / "gunicorn_baseline.conf.py")],
        work / "base.log",
        BASELINE_WORKERS=str(workers_n),
    ).start("/echo")
    run.HTTP_WORKERS = 1
    try:
        run.wrk(s, "baseline", 3)
        r = run.wrk(s, "baseline", 10)
    finally:
        s.stop()
    return f"baseline {workers_n} worker(s): {r['rps']:,.0f}/s p99 {r['p99']} ms"


try:
    for n in range(rounds):
        for what in sys.argv[1:]:
            if what.startswith("baseline"):
                print(baseline(int(what[-1])), flush=True)
            else:
                kind, row = what.split(":")
                print({"engine": engine, "defer": defer, "fail": fail}[row](kind, n), flush=True)
finally:
    run.stop_all()
    print(work, file=sys.stderr)
