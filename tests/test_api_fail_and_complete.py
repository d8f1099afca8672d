"""POST /api/v1/processes/fail-step and complete-step (SPEC sections 3 and 4): a deferred step finished
from outside, what both refuse, and the late return of a delegate whose attempt lost."""

import pytest
from helpers import COMPLETE, FAIL, RESTART, STEPS, assert_step_shape, ok, out, refused, typed, wait_for


# -- fail-step and complete-step -------------------------------------------------------------------
def test_a_deferred_step_shows_deferred_true_and_stays_started(api, deferred_step):
    assert deferred_step["status"] == "STARTED" and deferred_step["deferred"] is True
    assert deferred_step["finishedAt"] is None
    assert api.process(deferred_step["processId"])["status"] == "RUNNING"
    listed = ok(api.get(f"{STEPS}?status=STARTED"))["items"]
    assert [(s["processStepId"], s["deferred"]) for s in listed] == [(deferred_step["processStepId"], True)]


def test_fail_step_fails_a_started_step_with_external_failure(api, deferred_step):
    body = {"processStepId": deferred_step["processStepId"], "error": {"message": "the bank said no"}}
    step = ok(api.post(FAIL, body))
    assert_step_shape(step)
    assert step["processStepId"] == deferred_step["processStepId"]
    assert step["status"] == "FAILED" and step["deferred"] is False and step["finishedAt"] is not None
    assert step["error"] == {"type": "ExternalFailure", "message": "the bank said no"}
    assert step["attempts"] == 1
    process = api.process(deferred_step["processId"])
    assert process["status"] == "FAILED"
    assert [s["status"] for s in process["steps"]] == ["FAILED", "PENDING"]
    history = api.step(step["processStepId"])["attemptHistory"]
    assert [(a["status"], a["error"]) for a in history] == [("FAILED", step["error"])]


def test_fail_step_without_an_error_still_records_external_failure(api, deferred_step):
    step = ok(api.post(FAIL, {"processStepId": deferred_step["processStepId"]}))
    assert step["error"]["type"] == "ExternalFailure"
    assert isinstance(step["error"]["message"], str) and step["error"]["message"]


def test_a_step_failed_from_outside_can_be_restarted(api, deferred_step):
    ok(api.post(FAIL, {"processStepId": deferred_step["processStepId"]}))
    ok(api.post(RESTART, {"processStepId": deferred_step["processStepId"]}))
    again = api.wait_deferred(deferred_step["processStepId"])
    assert again["attempts"] == 2 and again["status"] == "STARTED"
    assert api.process(deferred_step["processId"])["status"] == "RUNNING"


def test_complete_step_completes_with_a_result_and_the_process_carries_on(api, deferred_step):
    result = typed(receipt="r-9", amount=1250, rate=0.25)
    step = ok(api.post(COMPLETE, {"processStepId": deferred_step["processStepId"], "result": result}))
    assert_step_shape(step)
    assert step["status"] == "COMPLETED" and step["deferred"] is False and step["error"] is None
    assert step["result"] == {
        "receipt": out("STRING", "r-9"),
        "amount": out("LONG", 1250),
        "rate": out("DOUBLE", 0.25),
    }
    done = api.wait_process(deferred_step["processId"], "COMPLETED")
    assert [s["status"] for s in done["steps"]] == ["COMPLETED", "COMPLETED"]
    assert done["steps"][0]["result"] == step["result"]


def test_complete_step_without_a_result_has_result_null(api):
    process = api.start(("external", {}))
    step_id = api.wait_deferred(process["steps"][0]["processStepId"])["processStepId"]
    step = ok(api.post(COMPLETE, {"processStepId": step_id}))
    assert step["result"] is None
    assert api.wait_process(process["processId"], "COMPLETED")["steps"][0]["status"] == "COMPLETED"


def test_complete_step_with_a_bad_result_is_412_and_changes_nothing(api, deferred_step):
    body = {"processStepId": deferred_step["processStepId"], "result": {"x": {"type": "LONG", "longValue": "1"}}}
    data = refused(api.post(COMPLETE, body))
    assert set(data) == {"result"} and set(data["result"]["x"]["value"]) == {"longValue"}
    assert api.step(deferred_step["processStepId"])["status"] == "STARTED"


@pytest.mark.parametrize("error", [{"message": 5}, {}, {"message": "x", "code": 1}, "just text", ["x"]], ids=repr)
def test_fail_step_with_a_bad_error_is_412(api, deferred_step, error):
    data = refused(api.post(FAIL, {"processStepId": deferred_step["processStepId"], "error": error}))
    assert set(data) == {"error"}
    assert api.step(deferred_step["processStepId"])["status"] == "STARTED"


@pytest.mark.parametrize("path", [FAIL, COMPLETE])
def test_fail_or_complete_of_an_unknown_step_is_412(api, path):
    assert set(refused(api.post(path, {"processStepId": "NoSuchStep"}))) == {"processStepId"}


@pytest.mark.parametrize("path", [FAIL, COMPLETE])
def test_fail_or_complete_of_a_step_that_is_not_started_is_412(api, path):
    done = api.start(("noop", {}))
    completed = api.wait_process(done["processId"], "COMPLETED")["steps"][0]
    halted = api.start(("fail", {}), ("noop", {}))
    failed, pending = api.wait_process(halted["processId"], "FAILED")["steps"]
    for step in (completed, failed, pending):
        before = api.step(step["processStepId"])
        data = refused(api.post(path, {"processStepId": step["processStepId"]}))
        assert set(data) == {"status"} and step["status"] in data["status"][0]
        assert api.step(step["processStepId"]) == before


def test_a_step_can_be_completed_or_failed_only_once(api, deferred_step):
    ok(api.post(COMPLETE, {"processStepId": deferred_step["processStepId"]}))
    for path in (COMPLETE, FAIL):
        assert set(refused(api.post(path, {"processStepId": deferred_step["processStepId"]}))) == {"status"}


# -- a delegate that returns after its attempt lost ------------------------------------------------
def test_fail_step_on_a_running_delegate_wins_and_its_late_return_is_ignored(app, api, gate):
    runner = app.extensions["stepd"].runner
    process = api.start(("wait", {"file": str(gate)}), ("noop", {}))
    step_id = process["steps"][0]["processStepId"]
    wait_for(lambda: runner._busy == 1, what="the delegate to run")
    failed = ok(api.post(FAIL, {"processStepId": step_id, "error": {"message": "operator abort"}}))
    assert failed["status"] == "FAILED"
    gate.touch()
    wait_for(lambda: runner._busy == 0, what="the delegate to return")
    after = api.process(process["processId"])
    assert after["status"] == "FAILED"
    assert [s["status"] for s in after["steps"]] == ["FAILED", "PENDING"]
    assert after["steps"][0]["error"] == {"type": "ExternalFailure", "message": "operator abort"}


def test_a_late_return_of_an_old_attempt_does_not_complete_the_new_one(app, api, tmp_path, gate):
    runner = app.extensions["stepd"].runner
    old_gate, old_started = tmp_path / "old-gate", tmp_path / "old-started"
    process = api.start(("wait", {"file": str(old_gate), "started": str(old_started)}))
    step_id = process["steps"][0]["processStepId"]
    wait_for(old_started.exists, what="attempt 1's delegate to be called")  # else fail-step may come first
    ok(api.post(FAIL, {"processStepId": step_id}))
    ok(api.post(RESTART, {"processStepId": step_id, "params": typed(file=str(gate), started=str(tmp_path / "s2"))}))
    wait_for(lambda: runner._busy == 2, what="both attempts to run")
    old_gate.touch()  # attempt 1 returns now; attempt 2 still waits for `gate`
    wait_for(lambda: runner._busy == 1, what="attempt 1 to return")
    step = api.step(step_id)
    assert step["status"] == "STARTED" and step["attempts"] == 2
    assert [a["status"] for a in step["attemptHistory"]] == ["FAILED", "STARTED"]
    gate.touch()
    assert api.wait_step(step_id, "COMPLETED")["attempts"] == 2
