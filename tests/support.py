"""Helpers shared by the tests of retry policies, bulk restart, Idempotency-Key and dry run."""

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from model import new_id, params_to_json

P = "/api/v1/processes"
STEPS = f"{P}/steps"
RESTART = f"{P}/restart-failed-step"
BULK = f"{P}/restart-failed-steps"
FAIL = f"{P}/fail-step"
COMPLETE = f"{P}/complete-step"
ERROR_MESSAGES = {
    "Unauthorized request", "Forbidden", "Not found", "Method not allowed", "Precondition failed",
    "Payload too large", "Internal Server Error", "Service unavailable",
}  # fmt: skip


def ok(response, status=200):
    assert response.status_code == status, response.get_data(as_text=True)[:800]
    assert response.json["message"] not in ERROR_MESSAGES
    return response.json["data"]


def refused(response, status=412):
    assert response.status_code == status, response.get_data(as_text=True)[:800]
    if status == 412:
        assert response.json["message"] == "Precondition failed"
        assert isinstance(response.json["data"], dict) and response.json["data"]
    return response.json["data"]


def out(kind, value):
    form = {"strValue": None, "longValue": None, "doubleValue": None, "type": kind}
    form[{"STRING": "strValue", "LONG": "longValue", "DOUBLE": "doubleValue"}[kind]] = value
    return form


def parse_time(text):
    assert text.endswith("Z") and len(text) == 24, text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")


def iso(moment):
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def calls(path):
    """The (step id, attempt) of every delegate call counted in `path`."""
    if not Path(path).exists():
        return []
    return [(step, int(attempt)) for step, attempt in (line.split() for line in Path(path).read_text().splitlines())]


def db_rows(db_path, sql, *args):
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def db_write(db_path, sql, *args):
    """One committed change straight in the file, as another program could make it."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        with conn:
            return conn.execute(sql, args).rowcount
    finally:
        conn.close()


def db_dump(db_path, skip=("runners",)):
    """Every row of every table (but `skip`: heartbeats move by themselves), to compare states."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            table: sorted(map(repr, conn.execute(f"SELECT * FROM {table}").fetchall()))
            for table in tables
            if table not in skip
        }
    finally:
        conn.close()


def insert_failed_steps(store, count, step_type="fail", start=None, params=None, process_id=None):
    """`count` FAILED one-step processes written straight into the file (much faster than running them);
    failure times are 1 ms apart from `start`, oldest first. Returns the step ids in that order."""
    start = start or datetime(2020, 1, 1, tzinfo=UTC)
    params = params or {"message": ("STRING", "inserted")}
    step_ids = []
    with store.db.transaction() as db:
        for n in range(count):
            finished = iso(start + timedelta(milliseconds=n))
            pid, sid = process_id or new_id(), new_id()
            if process_id is None:
                db.execute(
                    "INSERT INTO processes (id, name, status, principal, created_at, updated_at)"
                    " VALUES (?, NULL, 'FAILED', 'ops', ?, ?)",
                    (pid, finished, finished),
                )
            position = db.execute("SELECT COUNT(*) FROM steps WHERE process_id = ?", (pid,)).fetchone()[0]
            db.execute(
                "INSERT INTO steps (id, process_id, position, type, status, params, attempts, error_type,"
                " error_message, created_at, started_at, finished_at)"
                " VALUES (?, ?, ?, ?, 'FAILED', ?, 1, 'StepFailure', 'inserted', ?, ?, ?)",
                (sid, pid, position, step_type, params_to_json(params), finished, finished, finished),
            )
            db.execute(
                "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, error_type,"
                " error_message, started_at, finished_at)"
                " VALUES (?, 1, 'start', 'ops', ?, 'FAILED', 'StepFailure', 'inserted', ?, ?)",
                (sid, params_to_json(params), finished, finished),
            )
            step_ids.append(sid)
    return step_ids
