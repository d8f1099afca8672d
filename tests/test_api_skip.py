"""POST /api/v1/processes/skip-step (SPEC 10): a FAILED step becomes SKIPPED, with an optional result
that flows forward, and its process carries on (or is COMPLETED if it was the last step)."""

import pytest
from helpers import (
    CANCEL,
    INTERVENTION_KEYS,
    RESTART,
    SKIP,
    STEPS,
    all_at_once,
    assert_step_shape,
    calls,
    db_dump,
    ok,
    out,
    refused,
    typed,
    wait_for,
)


def skip(api, step_id, result=None, reason=None, **kwargs):
    body = {"processStepId": step_id}
    body |= ({"result": result} if result is not None else {}) | ({"reason": reason} if reason is not None else {})
    return api.post(SKIP, body, **kwargs)


def test_a_skipped_step_is_skipped_with_its_result_and_the_process_carries_on(api, tmp_path):
    counted = tmp_path / "calls.txt"
    process = api.start(("check", {"ok": 0}), ("count", {"file": str(counted)}))
    failed = api.wait_process(process["processId"], "FAILED")["steps"][0]
    response = skip(api, failed["processStepId"], typed(checked=1, by="hand"), "checked by hand")
    assert response.json["message"] == "Step skipped."
    step = ok(response)
    assert_step_shape(step)
    assert (step["processStepId"], step["status"], step["attempts"]) == (failed["processStepId"], "SKIPPED", 1)
    assert step["result"] == {"checked": out("LONG", 1), "by": out("STRING", "hand")}
    assert set(step["intervention"]) == INTERVENTION_KEYS
    assert (step["intervention"]["action"], step["intervention"]["principal"], step["intervention"]["reason"]) == (
        "skip",
        "ops",
        "checked by hand",
    )
    assert step["error"] == failed["error"]  # what failed stays readable
    done = api.wait_process(process["processId"], "COMPLETED")
    assert [s["status"] for s in done["steps"]] == ["SKIPPED", "COMPLETED"]
    assert calls(counted) == [(done["steps"][1]["processStepId"], 1)]
    assert done["intervention"] is None  # a skip is on the step, not on the process
    detail = api.step(step["processStepId"])
    assert detail["intervention"] == step["intervention"]
    assert [(a["attempt"], a["status"]) for a in detail["attemptHistory"]] == [(1, "FAILED")]  # no attempt begun
    next_step = api.step(done["steps"][1]["processStepId"])
    assert [(a["trigger"], a["principal"]) for a in next_step["attemptHistory"]] == [("start", "ops")]


def test_skipping_the_last_step_completes_the_process_at_once(api):
    process = api.start(("noop", {}), ("check", {"ok": 0}))
    failed = api.wait_process(process["processId"], "FAILED")["steps"][1]
    step = ok(skip(api, failed["processStepId"]))
    assert step["status"] == "SKIPPED" and step["result"] is None and step["intervention"]["reason"] is None
    process = api.process(process["processId"])
    assert process["status"] == "COMPLETED"
    assert [s["status"] for s in process["steps"]] == ["COMPLETED", "SKIPPED"]


def test_the_skipper_is_the_token_that_asked(api, failed_step, second_operator):
    assert ok(skip(api, failed_step["processStepId"], headers=second_operator))["intervention"]["principal"] == "ops2"


def step_in(api, state):
    """The id of a step in `state` (other than FAILED)."""
    if state in ("STARTED", "PENDING", "CANCELLED"):
        process = api.start(("external", {}), ("noop", {}))
        api.wait_deferred(process["steps"][0]["processStepId"])
        if state == "CANCELLED":
            ok(api.post(CANCEL, {"processId": process["processId"]}))
        return process["steps"][1 if state == "PENDING" else 0]["processStepId"]
    process = api.start(("noop", {}), ("check", {"ok": 0}))
    steps = api.wait_process(process["processId"], "FAILED")["steps"]
    if state == "SKIPPED":
        return ok(skip(api, steps[1]["processStepId"]))["processStepId"]
    return steps[0]["processStepId"]  # COMPLETED


@pytest.mark.parametrize("state", ["STARTED", "PENDING", "COMPLETED", "SKIPPED", "CANCELLED"])
def test_only_a_failed_step_can_be_skipped(api, db_path, state):
    step_id = step_in(api, state)
    before = db_dump(db_path)
    data = refused(skip(api, step_id, typed(x=1)))
    assert data == {"status": [f"Step is {state}; only a FAILED step can be skipped."]}
    assert db_dump(db_path) == before


def test_skip_of_an_unknown_step_is_412_naming_process_step_id(api):
    assert refused(skip(api, "NoSuchStep")) == {"processStepId": ["No step has this id."]}


def test_a_skipped_step_cannot_be_restarted(api, failed_step):
    ok(skip(api, failed_step["processStepId"]))
    assert refused(api.post(RESTART, {"processStepId": failed_step["processStepId"]})) == {
        "status": ["Step is SKIPPED; only a FAILED step can be restarted."]
    }


BAD_SKIP_BODIES = [
    ({}, {"processStepId"}),
    ({"processStepId": None}, {"processStepId"}),
    ({"processStepId": "a b"}, {"processStepId"}),
    ({"processStepId": "SID", "result": {"x": {"type": "LONG", "longValue": "1"}}}, {"result"}),
    ({"processStepId": "SID", "result": {"x": 1}}, {"result"}),
    ({"processStepId": "SID", "result": []}, {"result"}),
    ({"processStepId": "SID", "result": {f"k{i}": {"type": "LONG", "longValue": i} for i in range(257)}}, {"result"}),
    ({"processStepId": "SID", "reason": {"text": "x"}}, {"reason"}),
    ({"processStepId": "SID", "reason": "r" * 1025}, {"reason"}),
    ({"processStepId": "SID", "params": {}}, {"params"}),
]


@pytest.mark.parametrize(("body", "keys"), BAD_SKIP_BODIES, ids=[repr(b)[:50] for b, _ in BAD_SKIP_BODIES])
def test_a_bad_skip_body_is_412_with_field_errors_and_changes_nothing(api, db_path, failed_step, body, keys):
    before = db_dump(db_path)
    body = {k: failed_step["processStepId"] if v == "SID" else v for k, v in body.items()}
    data = refused(api.post(SKIP, body))
    assert set(data) == keys
    assert db_dump(db_path) == before


def test_a_reader_may_not_skip(reader_api, api, failed_step):
    assert reader_api.post(SKIP, {"processStepId": failed_step["processStepId"]}).status_code == 403
    assert api.step(failed_step["processStepId"])["status"] == "FAILED"


def test_of_16_concurrent_skips_one_wins_and_the_next_step_begins_once(api, tmp_path):
    counted = tmp_path / "calls.txt"
    process = api.start(("check", {"ok": 0}), ("count", {"file": str(counted)}))
    failed = api.wait_process(process["processId"], "FAILED")["steps"][0]
    answers = all_at_once(16, lambda n: skip(api, failed["processStepId"], typed(n=n)))
    assert sorted(a.status_code for a in answers) == [200] + [412] * 15
    winner = next(a for a in answers if a.status_code == 200).json["data"]["result"]
    done = api.wait_process(process["processId"], "COMPLETED")
    assert done["steps"][0]["result"] == winner
    assert done["steps"][1]["attempts"] == 1 and len(calls(counted)) == 1


def test_skipped_steps_are_listed_by_status(api, failed_step):
    ok(skip(api, failed_step["processStepId"]))
    listed = ok(api.get(f"{STEPS}?status=SKIPPED"))["items"]
    assert [s["processStepId"] for s in listed] == [failed_step["processStepId"]]


def test_a_repeated_skip_with_its_idempotency_key_replays_the_200_and_skips_once(api, tmp_path):
    counted = tmp_path / "calls.txt"
    process = api.start(("check", {"ok": 0}), ("count", {"file": str(counted)}))
    failed = api.wait_process(process["processId"], "FAILED")["steps"][0]
    headers = {"Idempotency-Key": "skip-once"}
    first = skip(api, failed["processStepId"], headers=headers)
    wait_for(lambda: len(calls(counted)) == 1, what="the next step")
    again = skip(api, failed["processStepId"], headers=headers)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["Idempotent-Replayed"] == "true" and again.json["data"] == first.json["data"]
    assert len(calls(counted)) == 1
