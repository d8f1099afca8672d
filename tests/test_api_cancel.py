"""POST /api/v1/processes/cancel (SPEC 10): a RUNNING or FAILED process and each of its steps not
yet done become CANCELLED, with who, when and why; a cancelled step is never started, retried,
restarted or interrupted, and a running delegate sees ctx.cancelled."""

import time

import pytest
from helpers import (
    BULK,
    CANCEL,
    COMPLETE,
    FAIL,
    INTERVENTION_KEYS,
    PROCESS_KEYS,
    RESTART,
    SKIP,
    STEPS,
    P,
    all_at_once,
    assert_step_shape,
    calls,
    db_dump,
    ok,
    parse_time,
    refused,
    wait_for,
)

from stepd.app import start_background, stop_background


def cancel(api, process_id, reason=None, **kwargs):
    body = {"processId": process_id} | ({"reason": reason} if reason is not None else {})
    return api.post(CANCEL, body, **kwargs)


# -- what a cancel does -------------------------------------------------------------------------------
def test_cancel_of_a_failed_process_cancels_it_and_each_step_not_done(api):
    process = api.start(("noop", {}), ("check", {"ok": 0}), ("noop", {}))
    api.wait_process(process["processId"], "FAILED")
    response = cancel(api, process["processId"], "the customer left")
    assert response.json["message"] == "Process cancelled."
    cancelled = ok(response)
    assert set(cancelled) == PROCESS_KEYS
    assert cancelled["status"] == "CANCELLED"
    intervention = cancelled["intervention"]
    assert set(intervention) == INTERVENTION_KEYS
    assert (intervention["action"], intervention["principal"], intervention["reason"]) == (
        "cancel",
        "ops",
        "the customer left",
    )
    assert cancelled["updatedAt"] == intervention["at"]
    assert parse_time(intervention["at"]) >= parse_time(cancelled["createdAt"])
    assert [s["status"] for s in cancelled["steps"]] == ["COMPLETED", "CANCELLED", "CANCELLED"]
    for step in cancelled["steps"]:
        assert_step_shape(step)
    assert cancelled["steps"][0]["intervention"] is None  # done before the cancel: left as it was
    assert cancelled["steps"][1]["intervention"] == intervention == cancelled["steps"][2]["intervention"]
    assert cancelled["steps"][1]["error"]["type"] == "ValueError"  # the failure it was given up at stays
    assert api.process(process["processId"]) == cancelled
    detail = api.step(cancelled["steps"][1]["processStepId"])
    assert detail["intervention"] == intervention
    assert [a["status"] for a in detail["attemptHistory"]] == ["FAILED"]  # a cancel begins no attempt


def test_a_cancel_without_a_reason_has_reason_null(api, deferred_step):
    cancelled = ok(cancel(api, deferred_step["processId"]))
    assert cancelled["intervention"]["reason"] is None and cancelled["intervention"]["principal"] == "ops"


def test_the_canceller_is_the_token_that_asked(api, deferred_step, second_operator):
    cancelled = ok(cancel(api, deferred_step["processId"], headers=second_operator))
    assert cancelled["intervention"]["principal"] == "ops2"


def test_a_deferred_step_is_cancelled_and_its_attempt_ends_cancelled(api, deferred_step):
    cancelled = ok(cancel(api, deferred_step["processId"], "not needed"))
    step = cancelled["steps"][0]
    assert (step["status"], step["deferred"], step["phase"], step["attempts"]) == ("CANCELLED", False, None, 1)
    assert step["finishedAt"] == step["intervention"]["at"]
    history = api.step(step["processStepId"])["attemptHistory"]
    assert [(a["status"], a["finishedAt"]) for a in history] == [("CANCELLED", step["finishedAt"])]
    # Whatever the outside work reports later is refused: the step is no longer STARTED.
    for path in (COMPLETE, FAIL):
        data = refused(api.post(path, {"processStepId": step["processStepId"]}))
        assert data["status"][0].startswith("Step is CANCELLED")
    assert api.step(step["processStepId"])["status"] == "CANCELLED"


def test_a_queued_step_that_is_cancelled_is_never_called(app, api, tmp_path):
    stop_background(app, grace=0.1)  # no runner: the attempt waits QUEUED
    counted = tmp_path / "calls.txt"
    process = api.start(("count", {"file": str(counted)}), ("count", {"file": str(counted)}))
    assert process["steps"][0]["phase"] == "QUEUED"
    ok(cancel(api, process["processId"]))
    app.extensions["stepd"].runner = None
    start_background(app)  # a runner again: nothing is left to claim
    time.sleep(0.6)  # two polls of the runner
    assert calls(counted) == []
    steps = api.process(process["processId"])["steps"]
    assert [(s["status"], s["attempts"]) for s in steps] == [("CANCELLED", 1), ("CANCELLED", 0)]


def test_a_running_delegate_sees_ctx_cancelled_within_1_s_and_its_outcome_is_ignored(app_with, tmp_path):
    app, api = app_with(STEPD_THREADS=1)
    marker, started = tmp_path / "cancelled", tmp_path / "started"
    process = api.start(("hang", {"file": str(marker), "started": str(started), "seconds": 60.0}), ("noop", {}))
    wait_for(started.exists, what="the delegate to be called")
    began = time.monotonic()
    ok(cancel(api, process["processId"]))
    wait_for(marker.exists, timeout=1.5, interval=0.01, what="ctx.cancelled within 1 s of the cancel")
    assert time.monotonic() - began < 1.0
    # The delegate returns once it saw ctx.cancelled: its outcome changes nothing.
    time.sleep(0.3)
    steps = api.process(process["processId"])["steps"]
    assert [(s["status"], s["result"], s["error"]) for s in steps] == [("CANCELLED", None, None)] * 2
    # And its place is free for other work.
    other = api.start(("noop", {}))
    api.wait_process(other["processId"], "COMPLETED", timeout=3)


def test_a_step_waiting_for_a_retry_is_never_retried_after_a_cancel(api, tmp_path):
    counted = tmp_path / "calls.txt"
    process = api.start(("retry_later", {"file": str(counted)}))  # its retry is due 1-2 s after the failure
    step_id = process["steps"][0]["processStepId"]
    wait_for(lambda: api.step(step_id)["phase"] == "RETRY_WAIT", what="the retry to be scheduled")
    cancelled = ok(cancel(api, process["processId"]))["steps"][0]
    assert (cancelled["status"], cancelled["nextRetryAt"], cancelled["phase"]) == ("CANCELLED", None, None)
    time.sleep(2.3)  # past the retry's due time
    assert calls(counted) == [(step_id, 1)]
    step = api.step(step_id)
    assert step["status"] == "CANCELLED" and [a["status"] for a in step["attemptHistory"]] == ["FAILED"]


def test_a_cancelled_step_is_never_interrupted_by_an_orphan_sweep(app, api, store, gate):
    process = api.start(("wait", {"file": str(gate), "seconds": 10.0}))
    step_id = process["steps"][0]["processStepId"]
    wait_for(lambda: api.step(step_id)["phase"] == "RUNNING", what="the delegate to run")
    ok(cancel(api, process["processId"]))
    assert store.interrupt_orphans(lambda row: False) == []  # every runner judged gone: still nothing to do
    assert api.step(step_id)["status"] == "CANCELLED" and api.step(step_id)["error"] is None


# -- what a cancel refuses -------------------------------------------------------------------------------
def test_cancel_of_an_unknown_process_is_412_naming_process_id(api):
    assert refused(cancel(api, "NoSuchProcess")) == {"processId": ["No process has this id."]}


def test_cancel_of_a_completed_process_is_412_and_changes_nothing(api, db_path):
    process = api.start(("noop", {}))
    api.wait_process(process["processId"], "COMPLETED")
    before = db_dump(db_path)
    data = refused(cancel(api, process["processId"]))
    assert data == {"status": ["Process is COMPLETED; only a RUNNING or FAILED process can be cancelled."]}
    assert db_dump(db_path) == before


def test_a_second_cancel_is_412(api, deferred_step):
    ok(cancel(api, deferred_step["processId"], "first"))
    data = refused(cancel(api, deferred_step["processId"], "second"))
    assert data == {"status": ["Process is CANCELLED; only a RUNNING or FAILED process can be cancelled."]}
    assert api.process(deferred_step["processId"])["intervention"]["reason"] == "first"


def test_cancelled_steps_cannot_be_restarted_or_skipped(api, failed_step):
    ok(cancel(api, failed_step["processId"]))
    step_id = failed_step["processStepId"]
    assert refused(api.post(RESTART, {"processStepId": step_id})) == {
        "status": ["Step is CANCELLED; only a FAILED step can be restarted."]
    }
    assert refused(api.post(SKIP, {"processStepId": step_id})) == {
        "status": ["Step is CANCELLED; only a FAILED step can be skipped."]
    }
    assert api.step(step_id)["attempts"] == 1


def test_bulk_restart_skips_cancelled_steps_with_the_reason_and_its_filter_does_not_match_them(api):
    given_up = api.start(("check", {"ok": 0}))
    kept = api.start(("check", {"ok": 0}))
    given_up_step = api.wait_process(given_up["processId"], "FAILED")["steps"][0]["processStepId"]
    kept_step = api.wait_process(kept["processId"], "FAILED")["steps"][0]["processStepId"]
    ok(cancel(api, given_up["processId"]))
    by_ids = ok(api.post(BULK, {"processStepIds": [given_up_step], "params": {}}, query_string={"dryRun": "true"}))
    assert by_ids["skipped"] == [
        {"processStepId": given_up_step, "reason": "Step is CANCELLED; only a FAILED step can be restarted."}
    ]
    by_filter = ok(api.post(BULK, {"filter": {}}))  # the documented "restart everything that failed"
    assert [r["processStepId"] for r in by_filter["restarted"]] == [kept_step]
    assert api.step(given_up_step)["status"] == "CANCELLED"


BAD_CANCEL_BODIES = [
    ({}, {"processId"}),
    ({"processId": None}, {"processId"}),
    ({"processId": 5}, {"processId"}),
    ({"processId": "../x"}, {"processId"}),
    ({"processId": "a" * 65}, {"processId"}),
    ({"processId": "PID", "reason": 5}, {"reason"}),
    ({"processId": "PID", "reason": ["x"]}, {"reason"}),
    ({"processId": "PID", "reason": "r" * 1025}, {"reason"}),
    ({"processId": "PID", "force": True}, {"force"}),
    ({"processStepId": "PID"}, {"processId", "processStepId"}),
    (["PID"], {"_schema"}),
    ("PID", {"_schema"}),
]


@pytest.mark.parametrize(("body", "keys"), BAD_CANCEL_BODIES, ids=[repr(b)[:40] for b, _ in BAD_CANCEL_BODIES])
def test_a_bad_cancel_body_is_412_with_field_errors_and_changes_nothing(api, db_path, deferred_step, body, keys):
    before = db_dump(db_path)
    if isinstance(body, dict):
        body = {k: deferred_step["processId"] if v == "PID" else v for k, v in body.items()}
    data = refused(api.post(CANCEL, body))
    assert set(data) == keys
    assert all(isinstance(messages, list) and messages for messages in data.values())
    assert db_dump(db_path) == before


def test_a_reason_of_1024_characters_is_accepted(api, deferred_step):
    assert ok(cancel(api, deferred_step["processId"], "r" * 1024))["intervention"]["reason"] == "r" * 1024


def test_a_reader_may_not_cancel(reader_api, api, deferred_step):
    assert reader_api.post(CANCEL, {"processId": deferred_step["processId"]}).status_code == 403
    assert api.process(deferred_step["processId"])["status"] == "RUNNING"


# -- one of many wins; lists; Idempotency-Key ----------------------------------------------------------------
def test_of_16_concurrent_cancels_one_wins(api, deferred_step):
    answers = all_at_once(16, lambda n: cancel(api, deferred_step["processId"], f"canceller {n}"))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [412] * 15
    winner = next(a for a in answers if a.status_code == 200).json["data"]["intervention"]["reason"]
    assert api.process(deferred_step["processId"])["intervention"]["reason"] == winner


def test_cancelled_processes_and_steps_are_listed_by_status(api, deferred_step):
    ok(cancel(api, deferred_step["processId"]))
    processes = ok(api.get(f"{P}?status=CANCELLED"))["items"]
    assert [p["processId"] for p in processes] == [deferred_step["processId"]]
    assert processes[0]["intervention"]["action"] == "cancel"
    steps = ok(api.get(f"{STEPS}?status=CANCELLED"))["items"]
    assert len(steps) == 2 and {s["processId"] for s in steps} == {deferred_step["processId"]}


def test_a_repeated_cancel_with_its_idempotency_key_replays_the_200(api, deferred_step):
    headers = {"Idempotency-Key": "cancel-once"}
    first = cancel(api, deferred_step["processId"], "once", headers=headers)
    again = cancel(api, deferred_step["processId"], "once", headers=headers)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json["data"] == first.json["data"]
