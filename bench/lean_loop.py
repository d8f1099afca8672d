"""An upper bound for the node's step path: one plain loop, no writer, no dispatcher, no chores.

    .venv/bin/python bench/lean_loop.py [--places 4] [--processes 3000] [--gevent] [--lock-and-metrics]

Not a design and not part of make bench: a measurement of what the node's step path costs when
nothing but the store's own change code stands between the runner's socket and the database
(BENCHMARKS.md, "The step path as one plain loop"). It
- creates `--processes` processes of 10 noop steps, queued (no runner yet), in a fresh file;
- listens where a node of that file listens, and starts one real `stepd runner` with `--places`
  threads, which attaches there and speaks the channel protocol (stepd/channel.py);
- then loops: reads all the runner has sent (`Channel.receive_all`, as the node reads), records
  the outcomes with `Store.outcomes_job` in one transaction (tallies included), claims queued steps
  for the places left free in the same transaction, commits, and sends the next attempts;
- prints the drain's steps/s, the loop's CPU a step, and the steps a group.

`--gevent` runs it under gevent's monkey patch, as the node runs; `--lock-and-metrics` adds what
the node does around each group that the loop leaves out: the file lock, and the metrics' `sent`
and `ended` hooks (run with PROMETHEUS_MULTIPROC_DIR set for the service's multiprocess values).
"""

import sys

if "--gevent" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402 - after the patch, as the node does
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepd import metrics  # noqa: E402
from stepd.channel import Channel, node_address  # noqa: E402
from stepd.db import Database  # noqa: E402
from stepd.liveness import HOST  # noqa: E402
from stepd.model import new_id  # noqa: E402
from stepd.store import CLAIM_QUEUED, QUEUED_STEPS, Store, _queued_job  # noqa: E402


def start_runner(path, places):
    env = {key: value for key, value in os.environ.items() if not key.startswith("STEPD_")}
    env |= {"STEPD_DB": path, "STEPD_THREADS": str(places), "STEPD_DELEGATES_PATH": str(ROOT / "bench/delegates")}
    return subprocess.Popen([sys.executable, "-m", "stepd", "runner"], env=env, cwd=ROOT)


def claim(conn, runner_id, wanted):
    """Store.claim_queued's statements on the loop's own connection. Only first steps are ever
    queued here (the others begin with their predecessor's outcome), so each Job's ctx.results is
    known without a read ({})."""
    claimed = []
    for row in conn.execute(QUEUED_STEPS, (wanted,)).fetchall():
        if conn.execute(CLAIM_QUEUED, (runner_id, row["id"], row["attempts"])).rowcount == 1:
            claimed.append(_queued_job(row))
    return claimed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--places", type=int, default=4, help="the runner's STEPD_THREADS (default 4)")
    parser.add_argument("--processes", type=int, default=3000, help="processes of 10 noop steps (default 3000)")
    parser.add_argument("--gevent", action="store_true", help="under gevent's monkey patch, as the node runs")
    parser.add_argument("--lock-and-metrics", action="store_true", help="the file lock and the metrics' hooks too")
    args = parser.parse_args()
    extra = args.lock_and_metrics

    path = str(Path(tempfile.mkdtemp(prefix="stepd-lean-")) / "lean.db")
    db = Database(path, sync="normal")
    db.prepare()
    store = Store(db)
    for _ in range(args.processes):
        store.create_process("engine", [("noop", {})] * 10, "bench", None)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(node_address(path))
    listener.listen(1)
    runner = start_runner(path, args.places)
    try:
        sock, _ = listener.accept()
        link = Channel(sock)  # the node's own: all that has come in one read (receive_all), sends as it sends
        hello = link.receive()[1]
        runner_id = new_id()
        store.heartbeat({"id": runner_id, "host": HOST, "pid": hello["pid"], "pid_started": None})
        db.close()  # the writer's thread made the rows above; from here on this loop writes
        conn = db._connect(shared=True)  # noqa: SLF001 - the loop owns the write connection, as the writer does
        total, done, groups, in_runner = args.processes * 10, 0, 0, 0
        started, cpu = time.perf_counter(), time.process_time()
        conn.execute("BEGIN IMMEDIATE")
        jobs = claim(conn, runner_id, hello["places"])
        conn.execute("COMMIT")
        in_runner = len(jobs)
        link.send("run", jobs)
        while done < total:
            messages = link.receive_all()
            if messages is None:
                raise SystemExit("the runner closed its connection before the steps were drained")
            outcomes = [outcome for kind, payload in messages if kind == "outcomes" for outcome in payload]
            if extra:
                db._take_lock()  # noqa: SLF001
            conn.execute("BEGIN IMMEDIATE")
            begun = store.outcomes_job(outcomes, runner_id)(conn)
            free = hello["places"] - (in_runner - len(outcomes)) - len(begun)
            jobs = begun + (claim(conn, runner_id, free) if free > 0 else [])
            conn.execute("COMMIT")
            if extra:
                db._drop_lock()  # noqa: SLF001
                metrics.ended(outcomes)
                metrics.sent(jobs)
            groups, done, in_runner = groups + 1, done + len(outcomes), in_runner + len(jobs) - len(outcomes)
            if jobs:
                link.send("run", jobs)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(
            f"the loop, {args.places} places{', gevent' if args.gevent else ''}"
            f"{', file lock and metrics' if extra else ''}: {done / seconds:,.0f} steps/s; "
            f"{1e6 * cpu / done:.0f} us of CPU a step ({100 * cpu / seconds:.0f}% busy); "
            f"{done / groups:.2f} steps a group"
        )
    finally:
        runner.terminate()
        runner.wait()
        shutil.rmtree(Path(path).parent, ignore_errors=True)


if __name__ == "__main__":
    main()
