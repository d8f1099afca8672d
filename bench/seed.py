"""Seed a stepd SQLite file directly, before the service starts: the API is far too slow for
10^6 steps. Rows are written as the service writes them (store.py): a step that failed has its
attempt row, and its process is FAILED; a completed process has every step and attempt
COMPLETED. `run.py` checks a seeded row against one the service made, and restarts one."""

import sqlite3
from collections import Counter

from stepd.db import Database
from stepd.model import new_id, now_iso, params_to_json
from stepd.store import add_to_tally, outcome_name

PRINCIPAL = "env"  # the name of the STEPD_TOKEN operator, which the benchmark uses
BATCH = 20_000  # processes per transaction
REQUEST_ID = "bench-seed"  # the X-Request-Id the seeded attempts were begun by (one made-up request)


def open_db(path):
    """Migrate with the service's own schema, then a connection for bulk inserts."""
    Database(path).prepare()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")  # seeding only: the file is checkpointed and closed after
    return db


def close_db(db):
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def failed_steps(db, step_type, count, params, error_type, error_message):
    """`count` processes of one step that ran once and failed, as after a delegate raised.
    Returns the step ids."""
    runner_id = new_id()  # the (long gone) runner that ran them
    params_json = params_to_json(params)
    ids = []
    for start in range(0, count, BATCH):
        now = now_iso()
        processes, steps, attempts = [], [], []
        for _ in range(min(BATCH, count - start)):
            process_id, step_id = new_id(), new_id()
            processes.append((process_id, "bench", "FAILED", PRINCIPAL, now, now))
            steps.append(
                (step_id, process_id, 0, step_type, "FAILED", params_json, None, 1, error_type, error_message, 0)
                + (runner_id, now, now, now)
            )
            attempts.append(
                (step_id, 1, "start", PRINCIPAL, params_json, "FAILED", error_type, error_message, now, now)
            )
            ids.append(step_id)
        _insert(db, processes, steps, attempts)
    return ids


def completed_processes(db, count, steps_per_process=10, finished=None):
    """`count` processes of `noop` steps that all completed, as the engine leaves them; at the
    time `finished` (stepd's UTC text), or now."""
    runner_id = new_id()
    params_json = params_to_json({})
    for start in range(0, count, BATCH):
        now = finished or now_iso()
        processes, steps, attempts = [], [], []
        for _ in range(min(BATCH, count - start)):
            process_id = new_id()
            processes.append((process_id, "filler", "COMPLETED", PRINCIPAL, now, now))
            for position in range(steps_per_process):
                step_id = new_id()
                steps.append(
                    (step_id, process_id, position, "noop", "COMPLETED", params_json, None, 1, None, None, 0)
                    + (runner_id, now, now, now)
                )
                attempts.append((step_id, 1, "start", PRINCIPAL, params_json, "COMPLETED", None, None, now, now))
        _insert(db, processes, steps, attempts)


def _insert(db, processes, steps, attempts):
    db.execute("BEGIN IMMEDIATE")
    db.executemany(
        "INSERT INTO processes (id, name, status, principal, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        processes,
    )
    db.executemany(
        "INSERT INTO steps (id, process_id, position, type, status, params, result, attempts, error_type,"
        " error_message, deferred, runner_id, created_at, started_at, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        steps,
    )
    db.executemany(
        "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, error_type, error_message,"
        " started_at, finished_at, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(*attempt, REQUEST_ID) for attempt in attempts],
    )
    add_to_tally(db, _tallies(processes, steps, attempts))
    db.execute("COMMIT")


def _tallies(processes, steps, attempts):
    """What these rows add to the tallies GET /metrics reads, as the store counts its own writes."""
    counts = Counter(("processes", process[2], "") for process in processes)
    counts.update(("steps", step[4], "") for step in steps)
    type_of = {step[0]: step[3] for step in steps}
    for step_id, _attempt, trigger, _principal, _params, status, error_type, error_message, *_ in attempts:
        counts[("attempts", type_of[step_id], trigger)] += 1
        if status in ("COMPLETED", "FAILED"):
            error = error_type and {"type": error_type, "message": error_message}
            counts[("outcomes", type_of[step_id], outcome_name(status, error))] += 1
    return counts
