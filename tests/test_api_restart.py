"""POST /api/v1/processes/restart-failed-step (SPEC sections 3 and 4): the seed flow, what a restart
answers and refuses, and one winner among concurrent restarts of a step."""

from helpers import RESTART, all_at_once, ok, out, refused, typed, wait_for


# -- the seed flow: a step fails, a restart with other params completes the process ----------------
def test_seed_flow(api):
    process = api.start(("noop", {}), ("check", {"ok": 0}), ("noop", {}))
    failed = api.wait_process(process["processId"], "FAILED")
    step = failed["steps"][1]
    assert step["error"] == {"type": "ValueError", "message": "ok is 0, not 1"}
    restarted = api.restart(step["processStepId"], ok=1)
    assert restarted.status_code == 200
    api.wait_process(process["processId"], "COMPLETED")


# -- POST /api/v1/processes/restart-failed-step ----------------------------------------------------
def test_restart_answers_200_with_exactly_process_step_and_params(api, failed_step):
    response = api.post(RESTART, {"processStepId": failed_step["processStepId"], "params": typed(ok=1)})
    data = ok(response)
    assert data == {
        "processId": failed_step["processId"],
        "processStepId": failed_step["processStepId"],
        "params": {"ok": out("LONG", 1)},
    }
    done = api.wait_process(failed_step["processId"], "COMPLETED")
    assert done["steps"][0]["attempts"] == 2


def test_restart_of_an_unknown_step_is_412(api):
    data = refused(api.post(RESTART, {"processStepId": "NoSuchStep"}))
    assert set(data) == {"processStepId"}


def test_restart_of_a_completed_step_is_412_with_the_status(api):
    process = api.start(("noop", {}))
    step = api.wait_process(process["processId"], "COMPLETED")["steps"][0]
    data = refused(api.post(RESTART, {"processStepId": step["processStepId"]}))
    assert data == {"status": ["Step is COMPLETED; only a FAILED step can be restarted."]}
    assert api.step(step["processStepId"])["attempts"] == 1


def test_restart_of_a_started_or_pending_step_is_412_with_the_status(api, deferred_step):
    process = api.process(deferred_step["processId"])
    for step, status in [(process["steps"][0], "STARTED"), (process["steps"][1], "PENDING")]:
        data = refused(api.post(RESTART, {"processStepId": step["processStepId"]}))
        assert set(data) == {"status"}
        assert status in data["status"][0]
    after = api.process(deferred_step["processId"])
    assert [s["status"] for s in after["steps"]] == ["STARTED", "PENDING"]
    assert after["steps"][0]["attempts"] == 1


def test_restart_when_the_delegate_is_gone_is_412_and_changes_nothing(app, api, failed_step):
    app.extensions["stepd"].registry.remove("check")
    data = refused(api.post(RESTART, {"processStepId": failed_step["processStepId"], "params": typed(ok=1)}))
    assert all(isinstance(m, list) and m for m in data.values())
    after = api.step(failed_step["processStepId"])
    assert after["status"] == "FAILED" and after["attempts"] == 1 and len(after["attemptHistory"]) == 1
    assert api.process(failed_step["processId"])["status"] == "FAILED"


def test_restart_of_a_step_that_fails_again_is_still_200(api):
    process = api.start(("fail", {"message": "first"}))
    step = api.wait_process(process["processId"], "FAILED")["steps"][0]
    ok(api.post(RESTART, {"processStepId": step["processStepId"], "params": typed(message="second")}))
    again = wait_for(lambda: (s := api.step(step["processStepId"]))["attempts"] == 2 and s["status"] == "FAILED" and s)
    assert again["error"] == {"type": "StepFailure", "message": "second"}
    assert [a["error"]["message"] for a in again["attemptHistory"]] == ["first", "second"]


def test_concurrent_restarts_of_one_step_exactly_one_wins(app, api, gate):
    process = api.start(("wait", {"file": str(gate), "seconds": 0}))
    step_id = api.wait_process(process["processId"], "FAILED")["steps"][0]["processStepId"]
    body = {"processStepId": step_id, "params": typed(seconds=30.0)}
    answers = all_at_once(8, lambda _: app.test_client().post(RESTART, json=body, headers=api.headers))
    assert sorted(r.status_code for r in answers) == [200] + [412] * 7
    step = api.step(step_id)
    assert step["attempts"] == 2 and len(step["attemptHistory"]) == 2
