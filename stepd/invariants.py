"""Invariants of a stepd database, checked by reading it directly (read-only): an SQLite file, or
a PostgreSQL database (STEPD_DB's URL). `stepd check` prints what it checked and exits 1 if one is
broken; the fault tests run it after each crash, with what their clients were told was done
(`Acknowledged`).
"""

import json
from dataclasses import dataclass, field

from stepd.config import is_postgres
from stepd.db import read_only
from stepd.liveness import runner_is_alive

__all__ = ["Acknowledged", "Report", "check", "read_only"]

DONE = ("COMPLETED", "SKIPPED")  # steps a process has got past
NOT_DONE = ("PENDING", "STARTED", "FAILED")  # steps a cancel of their process cancels
# What the checks read, in this order, in one snapshot.
EVERYTHING = (
    "SELECT * FROM processes",
    "SELECT * FROM steps ORDER BY process_id, position",
    "SELECT * FROM attempts ORDER BY step_id, attempt",
    "SELECT * FROM runners",
)


@dataclass
class Acknowledged:
    """What clients were told was done: processes started (201), restarts, cancels and skips (200).

    A restart is known by a unique value the client put in its params (name `ack`):
    the attempt row it created must hold it. A cancel and a skip are final: their process and
    step must be CANCELLED and SKIPPED for ever (or deleted with their process, by retention).
    """

    processes: set = field(default_factory=set)  # process ids
    restarts: dict = field(default_factory=dict)  # ack value -> step id
    cancels: set = field(default_factory=set)  # process ids
    skips: set = field(default_factory=set)  # step ids


@dataclass
class Report:
    processes: int = 0
    steps: int = 0
    attempts: int = 0
    acks_checked: int = 0
    lost: int = 0
    problems: list = field(default_factory=list)

    def fail(self, text):
        self.problems.append(text)


def check(where, acknowledged=None):
    """Check every invariant in one consistent read of the database (an SQLite file's path, or a
    PostgreSQL URL); returns a Report."""
    report = Report()
    (processes, steps, attempts, runners, tallies), integrity = _read(where)
    processes = {r["id"]: dict(r) for r in processes}
    steps, attempts = [dict(r) for r in steps], [dict(r) for r in attempts]
    report.processes, report.steps, report.attempts = len(processes), len(steps), len(attempts)

    if integrity is not None and [tuple(r) for r in integrity] != [("ok",)]:
        report.fail(f"integrity_check: {[tuple(r) for r in integrity]}")
    by_step = {}
    for row in attempts:
        by_step.setdefault(row["step_id"], []).append(row)
    _check_attempts(report, steps, by_step)
    _check_runners(report, steps, {r["id"] for r in runners if runner_is_alive(r)})
    _check_processes(report, processes, steps)
    if tallies is not None:
        _check_tallies(report, tallies, processes, steps, attempts)
    if acknowledged is not None:
        _check_acknowledged(report, acknowledged, processes, steps, by_step)
    return report


def _read(where):
    """(the rows of EVERYTHING and the tallies, SQLite's integrity_check) in one snapshot. PostgreSQL has no check of
    its files to ask for (its own pages carry checksums, when the cluster has them on): None."""
    if is_postgres(str(where)):
        from stepd import postgres  # psycopg: for PostgreSQL only

        conn, begin, integrity = postgres.read_only(where), postgres.BEGIN_SNAPSHOT, None
    else:
        conn, begin, integrity = read_only(where), "BEGIN", "PRAGMA integrity_check"
    try:
        conn.execute(begin)
        rows = [conn.execute(sql).fetchall() for sql in EVERYTHING]
        rows.append(_tallies(conn, postgres_url=integrity is None))
        checked = conn.execute(integrity).fetchall() if integrity else None
        conn.execute("COMMIT")
    finally:
        conn.close()
    return rows, checked


def _tallies(conn, postgres_url):
    """{(series, a, b): n} of the tallies GET /metrics reads (PostgreSQL's a sum of its log's rows),
    or None in an SQLite file of a schema before them."""
    if not postgres_url and not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tally'").fetchone():
        return None
    rows = conn.execute("SELECT series, a, b, sum(n) FROM tally GROUP BY series, a, b").fetchall()
    return {(series, a, b): int(n) for series, a, b, n in rows}


def _check_tallies(report, tallies, processes, steps, attempts):
    """The counts by status are what the file holds; the counters of attempts and outcomes never
    count fewer than the file holds (retention deletes rows, never a counter's past)."""
    held = {}
    for series, rows in (("processes", processes.values()), ("steps", steps)):
        for row in rows:
            held[(series, row["status"], "")] = held.get((series, row["status"], ""), 0) + 1
    for key in {k for k in tallies if k[0] in ("processes", "steps")} | set(held):
        if tallies.get(key, 0) != held.get(key, 0):
            report.fail(f"the tally of {key[0]} {key[1]} says {tallies.get(key, 0)}; the file holds {held.get(key, 0)}")
    type_of = {step["id"]: step["type"] for step in steps}
    made = {}
    for row in attempts:
        made[("attempts", type_of[row["step_id"]], row["trigger"])] = (
            made.get(("attempts", type_of[row["step_id"]], row["trigger"]), 0) + 1
        )
    for key, count in made.items():
        if tallies.get(key, 0) < count:
            report.fail(
                f"the counter of {key[1]} attempts by {key[2]} says {tallies.get(key, 0)}; the file holds {count}"
            )


def _last_attempt_may_be(step):
    """What the last attempt row of a step in this state may say."""
    if step["status"] == "STARTED":  # running, queued or deferred; or waiting for a retry of a failure
        return ("FAILED",) if step["next_retry_at"] is not None else ("STARTED",)
    if step["status"] == "SKIPPED":  # a skip begins no attempt: the one that failed stays the last
        return ("FAILED",)
    if step["status"] == "CANCELLED":  # cancelled while open, or while FAILED or waiting for a retry
        return ("CANCELLED", "FAILED")
    return (step["status"],)


def _check_attempts(report, steps, by_step):
    """`attempts` equals the number of attempt rows, numbered 1..n; the last one mirrors the step."""
    for step in steps:
        rows = by_step.get(step["id"], [])
        numbers = [r["attempt"] for r in rows]
        if numbers != list(range(1, step["attempts"] + 1)):
            report.fail(f"step {step['id']}: attempts={step['attempts']} but attempt rows {numbers}")
            continue
        if step["status"] == "PENDING" or (step["status"] == "CANCELLED" and not rows):
            continue  # never begun
        if not rows:
            report.fail(f"step {step['id']} is {step['status']} but has no attempt")
            continue
        if any(r["status"] == "STARTED" for r in rows[:-1]):
            report.fail(f"step {step['id']}: an earlier attempt is still STARTED")
        if rows[-1]["status"] not in _last_attempt_may_be(step):
            report.fail(f"step {step['id']} is {step['status']} but its last attempt is {rows[-1]['status']}")
        _check_intervention(report, f"step {step['id']}", step, step["status"] in ("SKIPPED", "CANCELLED"))


def _check_runners(report, steps, live_runners):
    """No step is running under a runner that is gone. Not running: deferred steps (they wait for
    a caller), queued ones (no runner has claimed them yet) and those waiting for a retry."""
    for step in steps:
        running = step["status"] == "STARTED" and not step["deferred"] and step["next_retry_at"] is None
        if running and step["runner_id"] is not None and step["runner_id"] not in live_runners:
            report.fail(f"step {step['id']} is STARTED but its runner {step['runner_id']} is gone")


def _check_intervention(report, what, row, intervened):
    """Who cancelled or skipped is recorded exactly on what was cancelled or skipped."""
    recorded = row["intervened_by"] is not None and row["intervened_at"] is not None
    if recorded != intervened:
        report.fail(f"{what} is {row['status']} but intervened_by={row['intervened_by']!r}")


def _check_processes(report, processes, steps):
    """A process's status follows from its steps (a SKIPPED step counts as done); the steps after
    the current one are PENDING. A CANCELLED process has no step left to do, and the steps of a
    process that is not CANCELLED are not CANCELLED either."""
    by_process = {}
    for step in steps:
        by_process.setdefault(step["process_id"], []).append(step)
    for process_id, process in processes.items():
        statuses = [s["status"] for s in by_process.get(process_id, [])]
        if not statuses:
            report.fail(f"process {process_id} has no steps")
            continue
        _check_intervention(report, f"process {process_id}", process, process["status"] == "CANCELLED")
        if process["status"] == "CANCELLED":
            _check_cancelled(report, process_id, statuses)
            continue
        if "CANCELLED" in statuses:
            report.fail(f"process {process_id} is {process['status']} but has CANCELLED steps: {statuses}")
        expected = "FAILED" if "FAILED" in statuses else "COMPLETED" if statuses[-1] in DONE else "RUNNING"
        if process["status"] != expected:
            report.fail(f"process {process_id} is {process['status']}, its steps {statuses} say {expected}")
        current = next((n for n, status in enumerate(statuses) if status not in DONE), len(statuses))
        if any(status != "PENDING" for status in statuses[current + 1 :]):
            report.fail(f"process {process_id}: steps after the current one are not all PENDING: {statuses}")


def _check_cancelled(report, process_id, statuses):
    """The steps of a CANCELLED process: some done, then (at the one it stopped at) all CANCELLED."""
    if any(status in NOT_DONE for status in statuses):
        report.fail(f"process {process_id} is CANCELLED but has steps still to do: {statuses}")
    first = next((n for n, status in enumerate(statuses) if status == "CANCELLED"), len(statuses))
    if any(status != "CANCELLED" for status in statuses[first:]) or first == len(statuses):
        report.fail(f"process {process_id} is CANCELLED but its steps are {statuses}")


def _check_acknowledged(report, acknowledged, processes, steps, by_step):
    """Every acknowledged start has its process and a first attempt; every acknowledged restart its attempt row."""
    first_steps = {s["process_id"]: s["id"] for s in steps if s["position"] == 0}
    for process_id in acknowledged.processes:
        report.acks_checked += 1
        step_id = first_steps.get(process_id)
        if process_id not in processes or step_id is None or not by_step.get(step_id):
            report.lost += 1
            report.fail(f"acknowledged process {process_id} is missing or never started")
    for ack, step_id in acknowledged.restarts.items():
        report.acks_checked += 1
        holders = [r for r in by_step.get(step_id, []) if r["trigger"] == "restart" and _ack_of(r["params"]) == ack]
        if len(holders) != 1:
            report.lost += len(holders) == 0
            report.fail(f"acknowledged restart {ack} of step {step_id} has {len(holders)} attempt rows")
    for process_id in acknowledged.cancels:
        report.acks_checked += 1
        if processes.get(process_id, {}).get("status") != "CANCELLED":
            report.lost += 1
            report.fail(f"acknowledged cancel of process {process_id}: it is {processes.get(process_id)}")
    status_of = {s["id"]: s["status"] for s in steps}
    for step_id in acknowledged.skips:
        report.acks_checked += 1
        if status_of.get(step_id) != "SKIPPED":
            report.lost += 1
            report.fail(f"acknowledged skip of step {step_id}: it is {status_of.get(step_id)}")


def _ack_of(params_json):
    kind_value = json.loads(params_json).get("ack")
    return kind_value[1] if kind_value else None
