"""stepd/invariants.py, the checker the fault tests run on a database file (also `stepd check`): it can fail."""

import os
import subprocess

import pytest
from helpers import CANCEL, SKIP, STEPD, db_write

from stepd.invariants import Acknowledged, check


def test_invariants_script_reports_a_broken_file(tmp_path):
    """The checker can fail: a process whose status contradicts its steps is reported."""
    import sqlite3

    from stepd.app import create_app

    db = tmp_path / "broken.db"
    create_app({"STEPD_DB": str(db), "STEPD_TOKEN": "t"})
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(
        "INSERT INTO processes (id, status, principal, created_at, updated_at) VALUES ('p', 'COMPLETED', 'x', 't', 't')"
    )
    conn.execute(
        "INSERT INTO steps (id, process_id, position, type, status, params, created_at)"
        " VALUES ('s', 'p', 0, 'noop', 'PENDING', '{}', 't')"
    )
    conn.close()
    run = subprocess.run([str(STEPD), "check"], env={**os.environ, "STEPD_DB": str(db)}, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert "BROKEN: process p is COMPLETED, its steps ['PENDING'] say RUNNING" in run.stdout
    acknowledged = Acknowledged(processes={"gone"}, restarts={"ack1": "s"})
    report = check(db, acknowledged)
    assert report.lost == 2 and report.acks_checked == 2


# -- SPEC 10: the new statuses -----------------------------------------------------------------------
@pytest.fixture
def lifecycle_file(api, db_path):
    """A file with a completed, a skipped-over, a cancelled-while-deferred and a cancelled-while-failed
    process, made through the API; returns (path, Acknowledged of the cancels and the skip)."""
    api.wait_process(api.start(("noop", {}))["processId"], "COMPLETED")
    skipped = api.start(("check", {"ok": 0}), ("noop", {}))
    skipped_step = api.wait_process(skipped["processId"], "FAILED")["steps"][0]["processStepId"]
    assert api.post(SKIP, {"processStepId": skipped_step}).status_code == 200
    api.wait_process(skipped["processId"], "COMPLETED")
    deferred = api.start(("external", {}), ("noop", {}))
    api.wait_deferred(deferred["steps"][0]["processStepId"])
    failed = api.start(("noop", {}), ("check", {"ok": 0}), ("noop", {}))
    api.wait_process(failed["processId"], "FAILED")
    for process in (deferred, failed):
        assert api.post(CANCEL, {"processId": process["processId"]}).status_code == 200
    return db_path, Acknowledged(cancels={deferred["processId"], failed["processId"]}, skips={skipped_step})


def test_cancelled_and_skipped_states_made_by_the_service_pass(lifecycle_file):
    path, acknowledged = lifecycle_file
    report = check(path, acknowledged)
    assert report.problems == [] and report.lost == 0 and report.acks_checked == 3


BROKEN = [
    (
        "UPDATE steps SET status = 'PENDING', intervened_by = NULL, intervened_at = NULL"
        " WHERE status = 'CANCELLED' AND attempts = 0",
        "is CANCELLED but has steps still to do",
    ),
    ("UPDATE processes SET status = 'RUNNING' WHERE status = 'CANCELLED'", "has CANCELLED steps"),
    ("UPDATE steps SET intervened_by = NULL WHERE status = 'SKIPPED'", "is SKIPPED but intervened_by=None"),
    ("UPDATE processes SET intervened_by = NULL WHERE status = 'CANCELLED'", "is CANCELLED but intervened_by=None"),
    ("UPDATE attempts SET status = 'COMPLETED' WHERE status = 'CANCELLED'", "but its last attempt is COMPLETED"),
    ("UPDATE steps SET status = 'FAILED' WHERE status = 'SKIPPED'", "is FAILED but intervened_by='ops'"),
    # the tallies GET /metrics reads, kept by the store's changes (migration 8)
    ("UPDATE tally SET n = n + 1 WHERE series = 'steps' AND a = 'COMPLETED'", "the tally of steps COMPLETED says"),
    ("UPDATE tally SET n = n - 1 WHERE series = 'processes' AND a = 'CANCELLED'", "the tally of processes CANCELLED"),
    ("UPDATE tally SET n = 0 WHERE series = 'attempts' AND a = 'noop'", "the counter of noop attempts by start says 0"),
]


@pytest.mark.parametrize(("sql", "reported"), BROKEN, ids=[r for _, r in BROKEN])
def test_the_checker_reports_a_broken_cancel_or_skip(lifecycle_file, sql, reported):
    path, _ = lifecycle_file
    assert db_write(path, sql) >= 1
    problems = check(path).problems
    assert any(reported in problem for problem in problems), problems


def test_an_acknowledged_cancel_or_skip_that_is_gone_counts_as_lost(lifecycle_file):
    path, acknowledged = lifecycle_file
    db_write(path, "UPDATE steps SET status = 'FAILED', intervened_by = NULL WHERE status = 'SKIPPED'")
    report = check(path, Acknowledged(cancels=acknowledged.cancels | {"never-made"}, skips=acknowledged.skips))
    assert report.lost == 2
