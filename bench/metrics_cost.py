"""What GET /metrics costs (issue 19: a scrape under 20 ms with 10^6 steps stored), and what keeping
its tallies costs the write path.

    .venv/bin/python bench/metrics_cost.py [--scrapes 200] [--steps 1000000] [--transitions 3000]

1. The scrape: seeds a fresh file with STEPS steps (bench/seed.py: processes of 10 COMPLETED steps,
   and 1% of them FAILED one-step processes), starts stepd as `make run` does (`stepd serve`), and
   scrapes /metrics SCRAPES times one after another on one keep-alive connection, with HTTP Basic
   as a scraper sends it. Each scrape's time is the client's, from request to the last byte. Prints
   p50, p99 and max, MET or NOT MET, and beside it what one `count(*) ... GROUP BY status` over the
   same file takes (what the tallies of migration 6 spare a scrape).
2. The write path: in this process, on two fresh files, TRANSITIONS one-step processes started and
   their attempts finished (store.create_process, store.finish_attempt: two write transactions, four
   step transitions each), with the tallies and metrics' hook, and without them (the store's
   `add_to_tally` and the hook no-ops). Rounds alternate between the two; prints CPU microseconds
   per transition, the fastest round of each.
"""

import argparse
import base64
import contextlib
import http.client
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import run  # noqa: E402
import seed  # noqa: E402  (needs the paths above)
from run import Server  # noqa: E402

TOKEN = "metrics-cost-token"
TARGET_MS = 20.0


def percentile(ordered, share):
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def seed_file(db, steps):
    conn = seed.open_db(str(db))
    failed = steps // 100
    seed.failed_steps(conn, "bench.fail", failed, {}, "Abort", "bench.fail fails at once")
    seed.completed_processes(conn, (steps - failed) // 10)
    seed.close_db(conn)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT count(*) FROM steps").fetchone()[0]


def group_by_ms(db, rounds=5):
    """The fastest of `rounds` exact counts by status without the tallies."""
    times = []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for _ in range(rounds):
            started = time.perf_counter()
            conn.execute("SELECT status, count(*) FROM steps GROUP BY status").fetchall()
            times.append(1000 * (time.perf_counter() - started))
    return min(times)


def scrape_times(server, count):
    """Client-side milliseconds of `count` scrapes on one keep-alive connection, after 5 not counted."""
    auth = "Basic " + base64.b64encode(f"env:{TOKEN}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    times, body = [], b""
    try:
        for number in range(count + 5):
            started = time.perf_counter()
            conn.request("GET", "/metrics", headers={"Authorization": auth})
            response = conn.getresponse()
            body = response.read()
            elapsed = 1000 * (time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"GET /metrics answered {response.status}: {body[:300]!r}")
            if number >= 5:
                times.append(elapsed)
    finally:
        conn.close()
    return sorted(times), body


def run_scrape(workdir, steps, scrapes):
    db = workdir / "metrics.db"
    started = time.monotonic()
    count = seed_file(db, steps)
    print(f"  seeded {count:,} steps in {time.monotonic() - started:.1f}s", file=sys.stderr)
    settings = {"STEPD_DB": str(db), "STEPD_TOKEN": TOKEN, "STEPD_DELEGATES_PATH": str(BENCH / "delegates")}
    server = Server([sys.executable, "-m", "stepd", "serve"], workdir / "stepd.log", **settings).start("/healthz")
    try:
        times, body = scrape_times(server, scrapes)
    finally:
        server.stop()
    served = next(line for line in body.decode().splitlines() if line.startswith('stepd_steps{status="COMPLETED"}'))
    return count, times, served, group_by_ms(db)


def transitions(store, count):
    """CPU seconds (every thread of this process: the caller's and the writer's) for `count` one-step
    processes started and finished: 4 step transitions each, in 2 write transactions."""
    from stepd.model import COMPLETED

    started = time.process_time()
    for _ in range(count):
        _process, job = store.create_process("bench", [("noop", {})], "env", "runner")
        store.finish_attempt(job, COMPLETED, runner_id="runner")
    return time.process_time() - started


def run_write_path(workdir, count, rounds=7):
    """CPU microseconds per step transition (PENDING -> STARTED with its attempt row and its process;
    then its end) with the tallies and without, alternating rounds; the fastest round of each (the
    machine's other work only ever adds). CPU time, not wall time: a shared machine moves the latter
    by more than the difference measured."""
    from stepd import metrics
    from stepd import store as store_module
    from stepd.db import Database
    from stepd.store import Store

    stores = {}
    for name in ("with", "without"):
        db = Database(workdir / f"write-{name}.db", sync="normal")
        db.prepare()
        stores[name] = Store(db)
    hook, tally = metrics.begun, store_module.add_to_tally
    results = {"with": [], "without": []}
    try:
        for _ in range(rounds):
            for name, store in stores.items():
                store_module.metrics.begun = hook if name == "with" else (lambda key: None)
                store_module.add_to_tally = tally if name == "with" else (lambda *args: None)
                results[name].append(transitions(store, count) / (count * 4) * 1e6)
    finally:
        store_module.metrics.begun, store_module.add_to_tally = hook, tally
        for store in stores.values():
            store.db.close()
    return {name: min(values) for name, values in results.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--transitions", type=int, default=3000, help="one-step processes per round of part 2")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="stepd-metrics-"))
    try:
        count, times, served, group_by = run_scrape(workdir, args.steps, args.scrapes)
        per = run_write_path(workdir, args.transitions)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    p50, p99 = statistics.median(times), percentile(times, 0.99)
    run.say_if_altered()
    print(
        f"GET /metrics with {count:,} steps stored, {len(times)} scrapes (HTTP Basic, one keep-alive connection):"
        f" p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {times[-1]:.2f} ms; it served {served}"
    )
    print(f"  (one `count(*) ... GROUP BY status` over the same steps, without the tallies: {group_by:.0f} ms)")
    print(f"- {'MET' if p99 < TARGET_MS else 'NOT MET'}: a scrape with 10^6 steps stored, p99 {p99:.2f} ms (< 20 ms)")
    extra = per["with"] - per["without"]
    print(
        f"write path, {args.transitions:,} one-step processes started and finished a round, a commit for every two"
        f" transitions (STEPD_SYNC=normal): {per['with']:.1f} CPU us per step transition with the tallies and"
        f" the hook, {per['without']:.1f} without"
        f" ({extra:+.1f} us, {extra / per['without']:+.1%})"
    )


if __name__ == "__main__":
    main()
