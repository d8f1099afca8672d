"""Cancel, skip and retention on the real service (SPEC 10): gunicorn with two workers and runner
processes on one file. Concurrent cancels and skips win once; a cancel racing a restart, a skip, a
completion or a retry leaves one consistent state (tests/invariants.py after every round); a
delegate running in a runner process sees ctx.cancelled; old finished processes are deleted by the
runners' housekeeping."""

import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import requests
from helpers import (
    CANCEL,
    COMPLETE,
    RESTART,
    SKIP,
    all_at_once,
    calls,
    db_rows,
    insert_finished_processes,
    ok,
    report_figure,
    wait_for,
)

from stepd.invariants import Acknowledged, check

ROUNDS = 8


def race(server, calls_to_make):
    """POST each (path, body) of `calls_to_make` from its own thread and connection, released
    together; their responses, in order."""
    headers = server.headers()
    return all_at_once(
        len(calls_to_make),
        lambda n: requests.post(
            server.url + calls_to_make[n][0], json=calls_to_make[n][1], headers=headers, timeout=30
        ),
    )


def assert_consistent(db, acknowledged):
    report = check(db, acknowledged)
    assert report.problems == [], report.problems[:10]
    assert report.lost == 0
    return report


def failed_process(server, *more_steps):
    """A process whose step 0 (`check`, ok=0) is FAILED, then `more_steps`; (process id, step id)."""
    process = server.start_process(("check", {"ok": 0}), *more_steps)
    step_id = process["steps"][0]["processStepId"]
    server.wait_step(step_id, "FAILED")
    return process["processId"], step_id


# -- one of many wins ------------------------------------------------------------------------------------
def test_of_16_concurrent_cancels_across_workers_one_wins(served):
    server = served
    acknowledged = Acknowledged()
    for _ in range(3):
        process_id, _ = failed_process(server, ("noop", {}))
        answers = race(server, [(CANCEL, {"processId": process_id, "reason": f"r{n}"}) for n in range(16)])
        assert sorted(a.status_code for a in answers) == [200] + [412] * 15
        for answer in answers:
            if answer.status_code == 412:
                assert answer.json()["data"] == {
                    "status": ["Process is CANCELLED; only a RUNNING or FAILED process can be cancelled."]
                }
        acknowledged.cancels.add(process_id)
    assert_consistent(server.env["STEPD_DB"], acknowledged)


def test_of_16_concurrent_skips_across_workers_one_wins_and_the_next_step_runs_once(server_factory, tmp_path):
    server = server_factory(workers=2, runners=2).start()
    counted = tmp_path / "calls.txt"
    acknowledged = Acknowledged()
    for _ in range(3):
        process_id, step_id = failed_process(server, ("count", {"file": str(counted)}))
        answers = race(server, [(SKIP, {"processStepId": step_id})] * 16)
        assert sorted(a.status_code for a in answers) == [200] + [412] * 15
        server.wait_process(process_id, "COMPLETED")
        acknowledged.skips.add(step_id)
    assert Counter(attempt for _, attempt in calls(counted)) == {1: 3}  # each next step called once
    assert_consistent(server.env["STEPD_DB"], acknowledged)


# -- a cancel racing the other changes of state --------------------------------------------------------------
def test_a_cancel_racing_a_restart_or_a_skip_leaves_one_consistent_state(served):
    server = served
    db = server.env["STEPD_DB"]
    acknowledged = Acknowledged()
    outcomes = Counter()
    for round_number in range(ROUNDS):
        other = "restart" if round_number % 2 == 0 else "skip"
        process_id, step_id = failed_process(server, ("check", {"ok": 0}))
        path = RESTART if other == "restart" else SKIP
        cancel, answer = race(server, [(CANCEL, {"processId": process_id}), (path, {"processStepId": step_id})])
        assert cancel.status_code == 200, cancel.text  # FAILED, or RUNNING after the other: cancellable
        assert answer.status_code in (200, 412), answer.text
        outcomes[other, answer.status_code] += 1
        acknowledged.cancels.add(process_id)
        steps = server.process(process_id)["steps"]
        statuses = [s["status"] for s in steps]
        if answer.status_code == 412:  # the cancel was first
            assert statuses == ["CANCELLED", "CANCELLED"]
            assert answer.json()["data"]["status"][0].startswith("Step is CANCELLED")
        elif other == "skip":  # the skip was first: step 1 began, then was cancelled
            acknowledged.skips.add(step_id)
            assert statuses == ["SKIPPED", "CANCELLED"]
        else:  # the restart was first: its attempt was begun, and ended by the cancel
            assert statuses == ["CANCELLED", "CANCELLED"]
            history = server.step(step_id)["attemptHistory"]
            assert [(a["trigger"], a["status"]) for a in history][:1] == [("start", "FAILED")]
            assert len(history) == 2 and history[1]["trigger"] == "restart"
            # The restarted delegate (check ok=0) may have failed before the cancel came.
            assert history[1]["status"] in ("CANCELLED", "FAILED")
        assert_consistent(db, acknowledged)
    report_figure("cancel races", f"restart/skip vs cancel, {ROUNDS} rounds: {dict(outcomes)}")


def test_a_cancel_racing_a_completion_leaves_one_consistent_state(served):
    server = served
    db = server.env["STEPD_DB"]
    acknowledged = Acknowledged()
    for _ in range(ROUNDS):
        process = server.start_process(("external", {}), ("external", {}))
        step_id = process["steps"][0]["processStepId"]
        wait_for(lambda s=step_id: server.step(s)["deferred"], what="the step to be deferred")
        cancel, complete = race(
            server, [(CANCEL, {"processId": process["processId"]}), (COMPLETE, {"processStepId": step_id})]
        )
        assert cancel.status_code == 200 and complete.status_code in (200, 412), (cancel.text, complete.text)
        acknowledged.cancels.add(process["processId"])
        statuses = [s["status"] for s in server.process(process["processId"])["steps"]]
        assert statuses == (["COMPLETED", "CANCELLED"] if complete.status_code == 200 else ["CANCELLED"] * 2)
        assert_consistent(db, acknowledged)


def test_a_cancel_racing_a_delegate_that_completes_leaves_one_consistent_state(served):
    server = served
    db = server.env["STEPD_DB"]
    acknowledged = Acknowledged()
    rng = random.Random(11)
    seen = Counter()
    for _ in range(ROUNDS):
        process = server.start_process(("nap", {"seconds": 0.1}), ("nap", {"seconds": 0.1}), ("noop", {}))
        time.sleep(rng.uniform(0.0, 0.25))  # in a step, between two, or (rarely) after the last
        answer = server.post(CANCEL, {"processId": process["processId"]})
        if answer.status_code == 200:
            acknowledged.cancels.add(process["processId"])
        else:  # it had completed already
            assert answer.json()["data"]["status"][0].startswith("Process is COMPLETED"), answer.text
        seen[tuple(s["status"] for s in server.process(process["processId"])["steps"])] += 1
        assert_consistent(db, acknowledged)
    report_figure("cancel vs running delegates", f"{ROUNDS} rounds, steps ended as {dict(seen)}")


def test_a_cancel_racing_an_automatic_retry_stops_the_retries(served, tmp_path):
    server = served
    db = server.env["STEPD_DB"]
    acknowledged = Acknowledged()
    rng = random.Random(5)
    for round_number in range(ROUNDS):
        counted = tmp_path / f"calls{round_number}.txt"
        process = server.start_process(("retry_soon", {"file": str(counted)}))  # one retry, 0.3-0.6 s after
        step_id = process["steps"][0]["processStepId"]
        wait_for(lambda c=counted: calls(c), what="the first attempt")
        time.sleep(rng.uniform(0.25, 0.65))  # around the time the retry is due
        ok(server.post(CANCEL, {"processId": process["processId"]}))
        acknowledged.cancels.add(process["processId"])
        step = server.step(step_id)
        assert step["status"] == "CANCELLED" and step["nextRetryAt"] is None
        time.sleep(0.7)  # past any retry that could still have been due
        assert len(calls(counted)) <= step["attempts"] <= 2
        assert server.step(step_id)["attempts"] == step["attempts"]  # nothing began after the cancel
        assert_consistent(db, acknowledged)


# -- a running delegate in a runner process -------------------------------------------------------------------
def test_a_delegate_running_in_a_runner_process_sees_ctx_cancelled_within_1_s(server_factory, tmp_path):
    server = server_factory(workers=2, threads=1).start()
    marker, started = tmp_path / "cancelled", tmp_path / "started"
    process = server.start_process(
        ("hang", {"file": str(marker), "started": str(started), "seconds": 60.0}), ("noop", {})
    )
    wait_for(started.exists, what="the delegate to be called")
    began = time.monotonic()
    cancelled = ok(server.post(CANCEL, {"processId": process["processId"], "reason": "taking too long"}))
    assert [s["status"] for s in cancelled["steps"]] == ["CANCELLED", "CANCELLED"]
    wait_for(marker.exists, timeout=2, interval=0.01, what="ctx.cancelled")
    seen_after = time.monotonic() - began
    assert seen_after < 1.0, f"ctx.cancelled was set {seen_after:.2f} s after the cancel"
    # The runner's only place is free for other work at once.
    other = server.start_process(("noop", {}))
    server.wait_process(other["processId"], "COMPLETED", timeout=3)
    step = server.step(process["steps"][0]["processStepId"])
    assert (step["status"], step["error"], step["attemptHistory"][0]["status"]) == ("CANCELLED", None, "CANCELLED")
    assert_consistent(server.env["STEPD_DB"], Acknowledged(cancels={process["processId"]}))
    report_figure("cancel of a running delegate", f"ctx.cancelled seen {1000 * seen_after:.0f} ms after the 200")


# -- retention in the service ----------------------------------------------------------------------------
def test_the_service_deletes_processes_past_retention_soon_after_it_starts(server_factory, tmp_path):
    db = tmp_path / "retained.db"
    server = server_factory(db_path=db, extra_env={"STEPD_RETENTION_DAYS": "7"})
    server.start()  # makes the file; then old rows are put in, as a long-running service would have them
    now = datetime.now(UTC)
    old = set(insert_finished_processes(db, 250, "COMPLETED", now - timedelta(days=8), steps=2))
    old |= set(insert_finished_processes(db, 50, "CANCELLED", now - timedelta(days=30)))
    kept = set(insert_finished_processes(db, 20, "COMPLETED", now - timedelta(days=6)))
    kept |= set(insert_finished_processes(db, 20, "FAILED", now - timedelta(days=365)))
    server.stop()
    began = time.monotonic()
    server = server_factory(db_path=db, extra_env={"STEPD_RETENTION_DAYS": "7"}).start()
    wait_for(
        lambda: not old & {pid for (pid,) in db_rows(db, "SELECT id FROM processes")},
        timeout=20,
        what="the runner to delete the processes past retention",
    )
    took = time.monotonic() - began
    assert {pid for (pid,) in db_rows(db, "SELECT id FROM processes")} == kept
    assert db_rows(db, "SELECT COUNT(*) FROM steps")[0][0] == 40
    # The line is written once the purge's last look finds nothing more: just after the rows are gone.
    wait_for(lambda: "retention: deleted 300 process(es)" in server.output(), timeout=5, what="the purge's log line")
    report_figure("retention", f"300 processes past STEPD_RETENTION_DAYS deleted {took:.1f} s after the start")
