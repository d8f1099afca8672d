"""Retry policies as the app runs them: `@delegate("x", retries=…, backoff=…, delay=…, max_delay=…)`.

A failed attempt with retries left closes FAILED and leaves its step STARTED with `nextRetryAt`;
a runner begins the next attempt (trigger `retry`) when it is due. Abort fails at once; a manual
restart starts a fresh budget; fail-step stops the retries; complete-step refuses a waiting step.
(RetryPolicy itself: test_delegates.py.)
"""

import time
from datetime import timedelta

from helpers import (
    COMPLETE,
    DELEGATES,
    FAIL,
    RESTART,
    STEPS,
    calls,
    db_rows,
    iso,
    ok,
    out,
    parse_time,
    refused,
    typed,
    wait_for,
)

from stepd.app import create_app, start_background, stop_background
from stepd.auth import hash_secret
from stepd.delegates import load_registry


def start_one(api, step_type, **params):
    process = api.start((step_type, params), ("noop", {}))
    return process["processId"], process["steps"][0]["processStepId"]


def wait_attempts(api, step_id, attempts, status, timeout=10.0):
    return wait_for(
        lambda: (s := api.step(step_id))["attempts"] == attempts and s["status"] == status and s,
        timeout,
        interval=0.01,
        what=f"attempt {attempts} to be {status}",
    )


def wait_waiting(api, step_id, attempts, timeout=10.0):
    """The step once attempt `attempts` has failed and it waits for its retry."""
    return wait_for(
        lambda: (s := api.step(step_id))["nextRetryAt"] is not None and s["attempts"] == attempts and s,
        timeout,
        interval=0.005,
        what=f"the retry after attempt {attempts} to be scheduled",
    )


def seconds(later, earlier):
    return (parse_time(later) - parse_time(earlier)).total_seconds()


# -- the policies as GET /api/v1/delegates shows them ----------------------------------------------
def test_the_delegates_endpoint_shows_each_policy(api):
    listed = {d["type"]: d["retry"] for d in ok(api.get(DELEGATES))}
    assert listed["retry_count"] == {"retries": 3, "backoff": 2.0, "delay": 0.1, "maxDelay": 0.3}
    assert listed["retry_later"] == {"retries": 1, "backoff": 1.0, "delay": 2.0, "maxDelay": 2.0}
    assert listed["noop"] == {"retries": 0, "backoff": 2.0, "delay": 1.0, "maxDelay": 300.0}
    registry = load_registry()
    assert registry.get("fail").retry.retries == 0


# -- retries as they run ---------------------------------------------------------------------------
def test_a_failing_step_is_retried_until_its_budget_is_spent_then_failed(api, counted):
    process_id, step_id = start_one(api, "retry_count", file=str(counted))
    step = wait_attempts(api, step_id, 4, "FAILED")
    assert step["nextRetryAt"] is None and step["deferred"] is False
    assert step["error"] == {"type": "ConnectionError", "message": "attempt 4 failed"}
    history = step["attemptHistory"]
    assert [(a["attempt"], a["trigger"], a["status"]) for a in history] == [
        (1, "start", "FAILED"),
        (2, "retry", "FAILED"),
        (3, "retry", "FAILED"),
        (4, "retry", "FAILED"),
    ]
    assert [a["error"]["message"] for a in history] == [f"attempt {n} failed" for n in (1, 2, 3, 4)]
    assert all(a["principal"] == "ops" for a in history)
    assert all(a["params"] == {"file": out("STRING", str(counted))} for a in history)
    assert calls(counted) == [(step_id, n) for n in (1, 2, 3, 4)]
    process = api.process(process_id)
    assert process["status"] == "FAILED"
    assert process["steps"][1]["status"] == "PENDING"
    time.sleep(0.5)  # the budget is spent: nothing runs by itself any more
    assert len(calls(counted)) == 4
    assert api.step(step_id)["attempts"] == 4


def test_a_retry_keeps_the_request_id_of_the_attempt_it_retries(api, counted):
    body = {"steps": [{"type": "retry_count", "params": typed(file=str(counted), pass_at=2)}, {"type": "noop"}]}
    started = api.post("/api/v1/processes", body, headers={"X-Request-Id": "begun-by-me"})
    assert started.status_code == 201
    process = api.wait_process(started.json["data"]["processId"], "COMPLETED")
    for step in process["steps"]:  # the retry keeps it, and so does the next step it began
        history = api.step(step["processStepId"])["attemptHistory"]
        assert {a["requestId"] for a in history} == {"begun-by-me"}
    history = api.step(process["steps"][0]["processStepId"])["attemptHistory"]
    assert [a["trigger"] for a in history] == ["start", "retry"]


def test_a_retry_that_succeeds_carries_the_process_on(api, counted):
    process_id, step_id = start_one(api, "retry_count", file=str(counted), pass_at=3)
    done = api.wait_process(process_id, "COMPLETED")
    assert [s["status"] for s in done["steps"]] == ["COMPLETED", "COMPLETED"]
    step = api.step(step_id)
    assert step["attempts"] == 3 and step["error"] is None and step["nextRetryAt"] is None
    assert [(a["trigger"], a["status"]) for a in step["attemptHistory"]] == [
        ("start", "FAILED"),
        ("retry", "FAILED"),
        ("retry", "COMPLETED"),
    ]
    assert calls(counted) == [(step_id, 1), (step_id, 2), (step_id, 3)]


def test_while_it_waits_the_step_is_started_with_next_retry_at_and_the_attempt_error(api, app, counted):
    process_id, step_id = start_one(api, "retry_slow", file=str(counted))
    waiting = wait_waiting(api, step_id, 1)
    assert waiting["status"] == "STARTED"
    assert waiting["deferred"] is False
    assert waiting["finishedAt"] is None
    assert waiting["error"] == {"type": "ConnectionError", "message": "attempt 1 failed"}
    [attempt] = waiting["attemptHistory"]
    assert (attempt["status"], attempt["error"]) == ("FAILED", waiting["error"])
    assert attempt["finishedAt"] is not None
    # retry_slow waits 15-30 s: nextRetryAt is in that window after the failure
    wait = seconds(waiting["nextRetryAt"], attempt["finishedAt"])
    assert 15 - 0.05 <= wait <= 30 + 0.002, wait
    assert api.process(process_id)["status"] == "RUNNING"
    # it is in the step listings as STARTED with the time, and held by no runner
    listed = api.get(f"{STEPS}?status=STARTED").json["data"]["items"]
    assert [(s["processStepId"], s["nextRetryAt"]) for s in listed] == [(step_id, waiting["nextRetryAt"])]
    db = app.config["STEPD_DB"]
    assert db_rows(db, "SELECT runner_id, retries_used FROM steps WHERE id = ?", step_id) == [(None, 0)]
    assert calls(counted) == [(step_id, 1)]


def test_next_retry_at_lies_in_the_jittered_capped_backoff_window(api, counted):
    # retry_window: delay 0.2, backoff 4, max_delay 0.5 -> ceilings 0.2, 0.5 (0.8 capped), 0.5 (3.2 capped)
    _, step_id = start_one(api, "retry_window", file=str(counted))
    seen = {}
    for attempt in (1, 2, 3):
        seen[attempt] = wait_waiting(api, step_id, attempt)["nextRetryAt"]
    final = wait_attempts(api, step_id, 4, "FAILED")
    history = final["attemptHistory"]
    for n, ceiling in enumerate([0.2, 0.5, 0.5]):
        failed, retry = history[n], history[n + 1]
        due = seen[n + 1]
        # The wait is drawn after the delegate raised (after the attempt started) and before the
        # attempt was closed (finishedAt): half to all of the ceiling.
        assert seconds(due, failed["startedAt"]) >= ceiling / 2 - 0.001, (n, due, failed)
        assert seconds(due, failed["finishedAt"]) <= ceiling + 0.002, (n, due, failed)
        assert seconds(due, failed["finishedAt"]) >= ceiling / 2 - 0.05, (n, due, failed)
        # ... and the retry began once due, within a poll or so
        assert retry["trigger"] == "retry"
        late = seconds(retry["startedAt"], due)
        assert -0.001 <= late <= 0.2 + 0.5, (n, late)


def test_retries_of_many_steps_are_spread_by_jitter(api, counted):
    step_ids = [start_one(api, "retry_slow", file=str(counted))[1] for _ in range(8)]
    waits = []
    for step_id in step_ids:
        step = wait_waiting(api, step_id, 1)
        waits.append(seconds(step["nextRetryAt"], step["attemptHistory"][0]["finishedAt"]))
    assert all(15 - 0.05 <= w <= 30.002 for w in waits), waits
    assert max(waits) - min(waits) > 0.5, waits  # 8 draws from 15 s of jitter are not all alike


def test_abort_fails_at_once_whatever_the_policy(api, counted):
    process_id, step_id = start_one(api, "retry_abort", file=str(counted), message="no point")
    step = wait_attempts(api, step_id, 1, "FAILED")
    assert step["error"] == {"type": "Abort", "message": "no point"}
    assert step["nextRetryAt"] is None
    assert [(a["trigger"], a["status"]) for a in step["attemptHistory"]] == [("start", "FAILED")]
    assert api.process(process_id)["status"] == "FAILED"
    time.sleep(0.5)  # retry_abort's policy would have retried after 0.05-0.1 s
    assert calls(counted) == [(step_id, 1)]
    assert api.step(step_id)["attempts"] == 1


def test_a_manual_restart_starts_a_fresh_budget_and_retries_keep_its_principal_and_params(
    app, api, second_operator, counted
):
    _, step_id = start_one(api, "retry_count", file=str(counted), note="first")
    wait_attempts(api, step_id, 4, "FAILED")
    restarted = api.post(RESTART, {"processStepId": step_id, "params": typed(note="second")}, headers=second_operator)
    assert ok(restarted)["params"]["note"] == out("STRING", "second")
    step = wait_attempts(api, step_id, 8, "FAILED")
    history = step["attemptHistory"]
    assert [a["trigger"] for a in history] == ["start", "retry", "retry", "retry", "restart", "retry", "retry", "retry"]
    assert [a["principal"] for a in history] == ["ops"] * 4 + ["ops2"] * 4
    assert [a["params"]["note"]["strValue"] for a in history] == ["first"] * 4 + ["second"] * 4
    assert [a for _, a in calls(counted)] == list(range(1, 9))
    time.sleep(0.5)
    assert len(calls(counted)) == 8
    assert db_rows(app.config["STEPD_DB"], "SELECT retries_used FROM steps WHERE id = ?", step_id) == [(3,)]


def test_a_retrying_step_clears_its_error_and_next_retry_at_while_its_attempt_runs(api, tmp_path, counted):
    gate = tmp_path / "gate"
    _, step_id = start_one(api, "retry_gate", file=str(counted), gate=str(gate))
    wait_for(lambda: len(calls(counted)) == 1, what="attempt 1 to run")
    gate.touch()
    wait_for(lambda: len(calls(counted)) == 2, what="the retry to run")
    gate.unlink()
    wait_for(lambda: len(calls(counted)) == 3, what="the second retry to run")  # it now waits for the gate
    running = api.step(step_id)
    assert (running["status"], running["attempts"], running["error"], running["nextRetryAt"]) == (
        "STARTED",
        3,
        None,
        None,
    )
    assert running["attemptHistory"][-1]["status"] == "STARTED"
    gate.touch()
    wait_attempts(api, step_id, 3, "FAILED")


def test_fail_step_on_a_waiting_step_fails_it_and_stops_the_retries(api, counted):
    process_id, step_id = start_one(api, "retry_soon", file=str(counted))
    wait_waiting(api, step_id, 1)
    failed = ok(api.post(FAIL, {"processStepId": step_id, "error": {"message": "stop it"}}))
    assert failed["status"] == "FAILED" and failed["nextRetryAt"] is None
    assert failed["error"] == {"type": "ExternalFailure", "message": "stop it"}
    time.sleep(0.9)  # the retry was due 0.3-0.6 s after the failure
    assert calls(counted) == [(step_id, 1)]
    after = api.step(step_id)
    assert (after["status"], after["attempts"], after["nextRetryAt"]) == ("FAILED", 1, None)
    # the attempt keeps the delegate's own error
    assert [(a["status"], a["error"]["type"]) for a in after["attemptHistory"]] == [("FAILED", "ConnectionError")]
    assert api.process(process_id)["status"] == "FAILED"
    # and a manual restart works as for any FAILED step, with a fresh budget
    ok(api.post(RESTART, {"processStepId": step_id, "params": typed(pass_at=3)}))
    api.wait_process(process_id, "COMPLETED")
    assert [a for _, a in calls(counted)] == [1, 2, 3]
    assert [a["trigger"] for a in api.step(step_id)["attemptHistory"]] == ["start", "restart", "retry"]


def test_complete_step_on_a_waiting_step_is_412_and_the_retry_still_runs(api, counted):
    process_id, step_id = start_one(api, "retry_soon", file=str(counted), pass_at=2)
    before = wait_waiting(api, step_id, 1)
    data = refused(api.post(COMPLETE, {"processStepId": step_id, "result": typed(x=1)}))
    assert set(data) == {"status"} and "retry" in data["status"][0]
    still = api.step(step_id)
    assert (still["status"], still["nextRetryAt"], still["result"]) == ("STARTED", before["nextRetryAt"], None)
    api.wait_process(process_id, "COMPLETED")
    assert calls(counted) == [(step_id, 1), (step_id, 2)]


def test_restart_of_a_waiting_step_is_412(api, counted):
    _, step_id = start_one(api, "retry_slow", file=str(counted))
    before = wait_waiting(api, step_id, 1)
    data = refused(api.post(RESTART, {"processStepId": step_id}))
    assert "STARTED" in data["status"][0]
    after = api.step(step_id)
    assert after == {**before}


def test_a_waiting_step_is_not_an_orphan(api, store, counted):
    _, step_id = start_one(api, "retry_slow", file=str(counted))
    before = wait_waiting(api, step_id, 1)
    assert store.interrupt_orphans(lambda row: False) == []  # every runner judged gone
    assert store.interrupt_runner("no-such-runner", "stopping") == []
    after = api.step(step_id)
    assert (after["status"], after["nextRetryAt"], after["error"]) == (
        "STARTED",
        before["nextRetryAt"],
        before["error"],
    )


def test_an_interrupted_attempt_is_not_retried_by_itself(app, api, db_path, tmp_path, counted):
    gate = tmp_path / "gate"
    _, step_id = start_one(api, "retry_gate", file=str(counted), gate=str(gate))
    wait_for(lambda: len(calls(counted)) == 1, what="attempt 1 to run")
    # The worker stops while the delegate runs: the attempt is Interrupted, not retried.
    stop_background(app, grace=0.1)
    interrupted = api.step(step_id)
    assert interrupted["status"] == "FAILED" and interrupted["error"]["type"] == "Interrupted"
    assert interrupted["nextRetryAt"] is None
    gate.touch()
    # Another worker on the same file is alive and polling for retries: it finds none.
    other = create_app({"STEPD_DB": str(db_path), "STEPD_DELEGATES_PATH": app.config["STEPD_DELEGATES_PATH"]})
    start_background(other)
    try:
        time.sleep(0.8)
        after = api.step(step_id)
        assert (after["status"], after["attempts"], after["error"]["type"]) == ("FAILED", 1, "Interrupted")
        assert calls(counted) == [(step_id, 1)]
    finally:
        stop_background(other, grace=1)


def test_a_due_retry_is_claimed_once_whatever_the_number_of_claimers(api, app, store, counted):
    _, step_id = start_one(api, "retry_slow", file=str(counted))
    waiting = wait_waiting(api, step_id, 1)
    stop_background(app, grace=0.1)  # so only this test claims
    store.db.connection().execute(  # make it due now
        "UPDATE steps SET next_retry_at = ? WHERE id = ?",
        (iso(parse_time(waiting["nextRetryAt"]) - timedelta(seconds=60)), step_id),
    )
    jobs = [store.claim_due_retries("claimer-a", 10), store.claim_due_retries("claimer-b", 10)]
    assert [len(j) for j in jobs] == [1, 0]
    [job] = jobs[0]
    assert (job.step_id, job.attempt, job.retries_used) == (step_id, 2, 1)
    step = api.step(step_id)
    assert (step["status"], step["attempts"], step["nextRetryAt"], step["error"]) == ("STARTED", 2, None, None)
    assert step["attemptHistory"][-1]["trigger"] == "retry"
    assert step["attemptHistory"][-1]["principal"] == "ops"
    assert db_rows(app.config["STEPD_DB"], "SELECT runner_id FROM steps WHERE id = ?", step_id) == [("claimer-a",)]


def test_a_stop_leaves_a_retry_that_falls_due_in_its_grace_for_the_next_start(app, api, tmp_path, counted):
    gate = tmp_path / "gate"
    api.start(("wait", {"file": str(gate), "seconds": 1.5}))  # keeps the stop in its grace period
    _, step_id = start_one(api, "retry_soon", file=str(counted))
    wait_waiting(api, step_id, 1)
    stop_background(app, grace=1.2)  # the retry falls due (0.3-0.6 s) meanwhile
    after = api.step(step_id)
    assert (after["status"], after["attempts"]) == ("STARTED", 1)
    assert after["nextRetryAt"] is not None and after["error"]["type"] == "ConnectionError"
    assert calls(counted) == [(step_id, 1)]
    gate.touch()


def test_a_due_retry_waits_for_an_idle_thread_so_a_stop_leaves_it_due(db_path, tmp_path, counted):
    # Claimed ahead into a queue, a retry would be Interrupted by a stop before its delegate ran.
    from helpers import PLUGINS, Api

    one_thread = create_app({"STEPD_DB": str(db_path), "STEPD_DELEGATES_PATH": str(PLUGINS), "STEPD_THREADS": 1})
    one_thread.extensions["stepd"].store.add_token("solo", "operator", hash_secret("solo-secret"))
    start_background(one_thread)
    api = Api(one_thread.test_client(), {"Authorization": "Bearer solo-secret"})
    gate = tmp_path / "gate"
    _, step_id = start_one(api, "retry_soon", file=str(counted))
    wait_waiting(api, step_id, 1)
    api.start(("wait", {"file": str(gate), "seconds": 5.0}))  # the one thread is busy from here on
    time.sleep(1.0)  # the retry falls due (0.3-0.6 s) while no thread is idle
    stop_background(one_thread, grace=0.3)
    gate.touch()
    after = api.step(step_id)
    assert (after["status"], after["attempts"]) == ("STARTED", 1), after
    assert after["nextRetryAt"] is not None and len(after["attemptHistory"]) == 1
    assert calls(counted) == [(step_id, 1)]
