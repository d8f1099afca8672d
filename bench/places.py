"""Issue 18's engine row at several numbers of places a runner has (STEPD_THREADS), and the steps'
path alone, to show where the engine's limit is:

    .venv/bin/python bench/places.py [--threads 4,16,64] [--sync normal] [--duration 10]

For each STEPD_THREADS value, each on a fresh file, one after the other:

- **engine**: make bench's engine row (POSTs of 10 noop steps for --duration seconds, then the
  drain), with the node's and the runner's CPU per step and how busy the node was;
- **steps alone**: the same POSTs with no runner (STEPD_RUNNERS=0), then one `stepd runner`
  started and the backlog drained: the steps' path with no HTTP request beside it.

SPEC 8 sets STEPD_THREADS to 4, and a runner takes no more attempts than it has places (SPEC 9).
A runner's outcomes come back to the node in rounds, each round one write group and one message
each way: with 4 places a group holds at most 4 steps (about 3), and the group's fixed part (its
BEGIN and COMMIT, the tallies, waking the runner and being woken by it) is paid every 3 steps.

Not part of make bench (it adds a minute a value); the figures are in BENCHMARKS.md. The whole
benchmark with more places: `BENCH_STEPD_THREADS=16 make bench`.
"""

import argparse
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (bench/ on the path above)


def per_step(seconds, steps):
    """Microseconds of CPU a step."""
    return 1e6 * seconds / steps if steps else 0.0


def runners_alive(server):
    """The live runners /healthz counts (0 while it answers 503: no runner yet, 10 s after the start)."""
    status, body = run.api(server, "GET", "/healthz")
    return body["data"]["runners"] if status == 200 else 0


def engine(workdir, sync, threads, duration, token):
    """make bench's engine row with STEPD_THREADS=`threads`: steps/s, and CPU per step of the node and the runner."""
    db = workdir / f"engine-{threads}.db"
    server = run.stepd_server(db, sync, workdir, token, STEPD_THREADS=str(threads))
    try:
        run.wrk(server, "create3", run.WARM_UP, None, token)
        run.drain(db)
        node, runners = server.node_pids()[0], server.runner_pids()
        node_before, runners_before = run.cpu_of(node), sum(run.cpu_of(pid) for pid in runners)
        started = time.monotonic()
        result = run.run_engine([server], db, sync, duration, token)
        wall = time.monotonic() - started
        steps = result["steps_per_s"] * wall
        node_cpu = run.cpu_of(node) - node_before
        runners_cpu = sum(run.cpu_of(pid) for pid in runners) - runners_before
    finally:
        server.stop()
    return {
        "steps_per_s": result["steps_per_s"], "backlog_s": result["backlog_s"],
        "node_us": per_step(node_cpu, steps), "runner_us": per_step(runners_cpu, steps), "node_busy": node_cpu / wall,
    }  # fmt: skip


def steps_alone(workdir, sync, threads, duration, token):
    """The steps' path with no HTTP beside it: a backlog POSTed with no runner, then drained by one
    `stepd runner` (with STEPD_THREADS=`threads`): steps/s and the node's CPU per step, from the
    moment the runner is registered (its start, importing the delegates, is not the steps' cost)."""
    db = workdir / f"alone-{threads}.db"
    server = run.stepd_server(db, sync, workdir, token, STEPD_THREADS=str(threads), STEPD_RUNNERS="0")
    runner = None
    try:
        run.wrk(server, "create10", duration, None, token)
        node = server.node_pids()[0]
        with open(workdir / f"runner-{threads}.log", "ab") as log:
            command = [sys.executable, "-m", "stepd", "runner"]
            runner = subprocess.Popen(command, cwd=run.ROOT, env=server.env, stdout=log, stderr=log)
        run.wait_for(lambda: True if runners_alive(server) else None, "the runner's registration", 30, 0.01)
        steps, started = run.active_steps(db), time.monotonic()
        node_before, runner_before = run.cpu_of(node), run.cpu_of(runner.pid)
        finished = run.drain(db)
        node_cpu, runner_cpu = run.cpu_of(node) - node_before, run.cpu_of(runner.pid) - runner_before
    finally:
        if runner is not None:
            runner.terminate()
            runner.wait(timeout=20)
        server.stop()
    wall = finished - started
    return {
        "steps_per_s": steps / wall, "node_us": per_step(node_cpu, steps), "runner_us": per_step(runner_cpu, steps),
        "node_busy": node_cpu / wall, "steps": steps,
    }  # fmt: skip


def table(rows):
    """The markdown table of `rows`: (threads, engine's figures, steps alone's figures)."""
    lines = [
        "| places (STEPD_THREADS) | engine, steps/s | node µs CPU a step | runner µs a step | node busy "
        "| steps alone, steps/s | node µs CPU a step | node busy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for threads, with_http, alone in rows:
        lines.append(
            f"| {threads} | {with_http['steps_per_s']:,.0f} (backlog {with_http['backlog_s']:.1f} s) "
            f"| {with_http['node_us']:.0f} | {with_http['runner_us']:.0f} | {with_http['node_busy']:.0%} "
            f"| {alone['steps_per_s']:,.0f} | {alone['node_us']:.0f} | {alone['node_busy']:.0%} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="4,16,64", help="STEPD_THREADS values (default 4,16,64)")
    parser.add_argument("--sync", default="normal", choices=("normal", "full"), help="STEPD_SYNC (default normal)")
    parser.add_argument("--duration", type=int, default=10, help="seconds of POSTs per run (default 10)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="stepd-places-"))
    token = "bench_" + secrets.token_urlsafe(24)
    rows = []
    try:
        for threads in (int(value) for value in args.threads.split(",")):
            print(f"STEPD_THREADS={threads}: the engine row, then the steps alone", file=sys.stderr)
            with_http = engine(workdir, args.sync, threads, args.duration, token)
            rows.append((threads, with_http, steps_alone(workdir, args.sync, threads, args.duration, token)))
    finally:
        run.finish(workdir, keep=False)
    print(f"STEPD_SYNC={args.sync}; 1 runner; {args.duration} s of POSTs of 10 noop steps a run\n")
    print(table(rows))


if __name__ == "__main__":
    main()
