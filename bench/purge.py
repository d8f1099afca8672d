"""Retention under load: purge 100,000 finished processes while writes go on.

    .venv/bin/python bench/purge.py [--processes 100000] [--steps 3] [--writers 2] [--interval 0.05]

Seeds a fresh file with PROCESSES processes that COMPLETED 40 days ago (STEPS steps and attempts
each) and 10,000 FAILED ones (never deleted), starts stepd as `make run` does, and lets WRITERS
threads each start a one-step process every INTERVAL seconds. After a few seconds of that alone,
it runs `stepd purge --older-than 30` beside the running service, as an operator would.
Prints the purge's rows/s, the longest write (POST /api/v1/processes) during the purge against
the longest before it, and the file's size before, after, and after as many processes are
written again (freed pages are reused: the file does not grow). Not part of `make test`.
"""

import argparse
import http.client
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import seed  # noqa: E402  (needs the paths above)
from run import Server  # noqa: E402

from stepd.db import Database  # noqa: E402
from stepd.model import iso  # noqa: E402
from stepd.retention import BATCH_ROWS  # noqa: E402

TOKEN = "purge-bench-token"
KEPT_FAILED = 10_000
WARM_UP_SECONDS = 5.0  # the service's first seconds run slower: not measured
QUIET_SECONDS = 5.0  # then writes alone, before the purge: what "normal" looks like


class Writers:
    """Threads that each start a one-step process every `interval` seconds, timing every answer."""

    def __init__(self, server, count, interval):
        self.server, self.interval = server, interval
        self.writes = []  # (time.monotonic() it was sent, seconds it took, HTTP status)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, daemon=True) for _ in range(count)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _write(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        body = json.dumps({"steps": [{"type": "noop"}]})
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        while not self._stop.is_set():
            began = time.monotonic()
            conn.request("POST", "/api/v1/processes", body, headers)
            response = conn.getresponse()
            response.read()
            took = time.monotonic() - began
            with self._lock:
                self.writes.append((began, took, response.status))
            self._stop.wait(max(0.0, self.interval - took))

    def between(self, start, end):
        with self._lock:
            return [(took, status) for began, took, status in self.writes if start <= began < end]


class LockProbe:
    """A writer of its own (db.Database, as a worker has one) that takes the write lock every
    10 ms and lets go at once: how long it waits is how long any request's write would."""

    def __init__(self, db):
        self.database = Database(db)
        self.waits = []  # (time.monotonic() it asked, seconds until it had the lock and let go)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def _probe(self):
        while not self._stop.wait(0.01):
            began = time.monotonic()
            with self.database.transaction():
                pass
            self.waits.append((began, time.monotonic() - began))

    def between(self, start, end):
        return [(took, None) for began, took in self.waits if start <= began < end]


def file_size(db):
    """The database file's size and its free pages (read-only, beside a running service or not)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        conn.close()
    return os.path.getsize(db), free * page_size


def mib(size):
    return f"{size / 2**20:.1f} MiB"


def seed_file(db, processes, steps):
    conn = seed.open_db(db)
    old = iso(datetime.now(UTC) - timedelta(days=40))
    seed.completed_processes(conn, processes, steps_per_process=steps, finished=old)
    seed.failed_steps(conn, "fail", KEPT_FAILED, {}, "StepFailure", "kept")
    seed.close_db(conn)


def summary(writes, what="writes"):
    waits = sorted(1000 * took for took, _ in writes)
    if not waits:
        return f"no {what}"
    p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))]
    statuses = sorted({status for _, status in writes if status is not None})
    over = ", ".join(f"{sum(wait > limit for wait in waits)} over {limit} ms" for limit in (10, 50))
    text = f"{len(waits)} {what}, p50 {statistics.median(waits):.1f} ms, p99 {p99:.1f} ms, max {waits[-1]:.1f} ms"
    return f"{text} ({over})" + (f", statuses {statuses}" if statuses else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=3, help="steps (and attempts) per seeded process")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between one writer's writes")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stepd-purge-"))
    db = workdir / "purge.db"
    began = time.monotonic()
    seed_file(db, args.processes, args.steps)
    rows = args.processes * (1 + 2 * args.steps)
    size_before, free_before = file_size(db)
    print(f"seeded {args.processes:,} completed processes ({rows:,} rows) in {time.monotonic() - began:.1f} s")

    settings = {"STEPD_DB": str(db), "STEPD_TOKEN": TOKEN, "STEPD_DELEGATES_PATH": str(BENCH / "delegates")}
    server = Server([sys.executable, "-m", "stepd", "serve"], workdir / "stepd.log", **settings).start("/healthz")
    try:
        with Writers(server, args.writers, args.interval) as writers, LockProbe(db) as probe:
            time.sleep(WARM_UP_SECONDS + QUIET_SECONDS)
            purge_began = time.monotonic()
            env = {**server.env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            done = subprocess.run(
                [sys.executable, "-m", "stepd", "purge", "--older-than", "30"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            purge_ended = time.monotonic()
            time.sleep(1.0)
        quiet = writers.between(purge_began - QUIET_SECONDS, purge_began)
        during = writers.between(purge_began, purge_ended)
        lock_quiet = probe.between(purge_began - QUIET_SECONDS, purge_began)
        lock_during = probe.between(purge_began, purge_ended)
        written = len(writers.writes)
    finally:
        server.stop()
    took = purge_ended - purge_began
    size_after, free_after = file_size(db)

    # As many processes again, written after the purge: they fill the freed pages first.
    conn = seed.open_db(db)
    seed.completed_processes(conn, args.processes, steps_per_process=args.steps)
    seed.close_db(conn)
    size_again, free_again = file_size(db)

    print(done.stdout.strip().splitlines()[-1])
    print(
        f"purge of {args.processes:,} processes ({rows:,} rows) beside the running service: {took:.1f} s,"
        f" {rows / took:,.0f} rows/s ({args.processes / took:,.0f} processes/s), batches of at most {BATCH_ROWS} rows"
    )
    print(f"writes before the purge ({QUIET_SECONDS:g} s): {summary(quiet)}")
    print(f"writes during the purge ({took:.1f} s): {summary(during)}")
    print(f"write lock, a probe writer every 10 ms, before the purge: {summary(lock_quiet, 'waits')}")
    print(f"write lock, a probe writer every 10 ms, during the purge: {summary(lock_during, 'waits')}")
    print(
        f"file: before {mib(size_before)} ({mib(free_before)} free); after the purge {mib(size_after)}"
        f" ({mib(free_after)} free); after {args.processes:,} processes written again {mib(size_again)}"
        f" ({mib(free_again)} free); {written:,} processes written by the load meanwhile"
    )
    print(f"(workdir {workdir}, pid {os.getpid()})")


if __name__ == "__main__":
    main()
