"""?dryRun=true on both restart endpoints: the same checks and the same answer as the real call,
and nothing changes: no row of the file, no delegate call."""

import time

import pytest
from helpers import BULK, RESTART, calls, db_dump, insert_failed_steps, ok, out, refused, typed

from stepd.model import new_id


def failed_count_steps(api, counted, count):
    ids = []
    for n in range(count):
        process = api.start(("count", {"file": str(counted), "fail": 1, "n": n}), ("noop", {}))
        ids.append(api.wait_process(process["processId"], "FAILED")["steps"][0]["processStepId"])
    return ids


def settle():
    time.sleep(0.3)  # long enough for a delegate a dry run might wrongly have queued


def test_a_dry_run_restart_answers_what_the_real_one_does_and_changes_nothing(api, db_path, counted):
    [step_id] = failed_count_steps(api, counted, 1)
    before = db_dump(db_path)
    body = {"processStepId": step_id, "params": typed(fail=0, extra="x")}
    dry = api.post(f"{RESTART}?dryRun=true", body)
    data = ok(dry)
    assert dry.json["message"].startswith("Dry run")
    assert data["processStepId"] == step_id
    assert data["params"] == {
        "file": out("STRING", str(counted)),
        "fail": out("LONG", 0),
        "n": out("LONG", 0),
        "extra": out("STRING", "x"),
    }
    settle()
    assert db_dump(db_path) == before
    assert calls(counted) == [(step_id, 1)]
    step = api.step(step_id)
    assert (step["status"], step["attempts"], len(step["attemptHistory"])) == ("FAILED", 1, 1)

    real = api.post(RESTART, body)
    assert ok(real) == data
    assert real.json["message"] == "Step restarted."
    api.wait_step(step_id, "COMPLETED")
    assert calls(counted) == [(step_id, 1), (step_id, 2)]


def test_dry_run_false_is_a_real_restart(api, counted):
    [step_id] = failed_count_steps(api, counted, 1)
    ok(api.post(f"{RESTART}?dryRun=false", {"processStepId": step_id, "params": typed(fail=0)}))
    api.wait_step(step_id, "COMPLETED")


@pytest.mark.parametrize("value", ["TRUE", "1", "yes", "on", "true "])  # "": absent, a real restart
@pytest.mark.parametrize("path", [RESTART, BULK])
def test_dry_run_takes_only_true_or_false(api, db_path, counted, path, value):
    [step_id] = failed_count_steps(api, counted, 1)
    body = {"processStepId": step_id} if path == RESTART else {"processStepIds": [step_id]}
    before = db_dump(db_path)
    data = refused(api.post(path, body, query_string={"dryRun": value}))
    assert set(data) == {"dryRun"}
    assert db_dump(db_path) == before


@pytest.mark.parametrize("path", [RESTART, BULK])
def test_dry_run_given_twice_or_with_another_parameter_is_412(api, counted, path):
    [step_id] = failed_count_steps(api, counted, 1)
    body = {"processStepId": step_id} if path == RESTART else {"processStepIds": [step_id]}
    assert set(refused(api.post(f"{path}?dryRun=true&dryRun=true", body))) == {"dryRun"}
    assert set(refused(api.post(f"{path}?dryRun=true&force=true", body))) == {"force"}
    assert api.step(step_id)["attempts"] == 1


def test_a_dry_run_fails_the_same_checks_with_the_same_412(app, api, db_path, counted):
    [failed_id] = failed_count_steps(api, counted, 1)
    done = api.start(("noop", {}))
    done_id = api.wait_process(done["processId"], "COMPLETED")["steps"][0]["processStepId"]
    [big] = insert_failed_steps(app.extensions["stepd"].store, 1, params={f"p{n}": ("LONG", n) for n in range(250)})
    too_many = {f"q{n}": {"type": "LONG", "longValue": n} for n in range(10)}
    cases = [
        {"processStepId": "NoSuchStep"},
        {"processStepId": done_id},
        {"processStepId": big, "params": too_many},
        {"processStepId": failed_id, "params": {"x": {"type": "LONG"}}},
        {"processStepId": failed_id, "force": True},
    ]
    before = db_dump(db_path)
    for body in cases:
        dry = api.post(f"{RESTART}?dryRun=true", body)
        assert dry.status_code == 412, body
        assert dry.json["data"] == refused(api.post(RESTART, body)), body
    app.extensions["stepd"].registry.remove("count")
    gone = {"processStepId": failed_id}
    assert api.post(f"{RESTART}?dryRun=true", gone).json["data"] == refused(api.post(RESTART, gone))
    assert set(refused(api.post(f"{RESTART}?dryRun=true", gone))) == {"type"}
    assert db_dump(db_path) == before


def test_a_dry_run_bulk_restart_answers_what_the_real_one_does_and_changes_nothing(api, db_path, counted):
    ids = failed_count_steps(api, counted, 3)
    done = api.start(("noop", {}))
    done_id = api.wait_process(done["processId"], "COMPLETED")["steps"][0]["processStepId"]
    body = {"processStepIds": [ids[0], done_id, "NoSuchStep", ids[1], ids[2]], "params": typed(fail=1, note="n")}
    before = db_dump(db_path)
    dry = api.post(f"{BULK}?dryRun=true", body)
    data = ok(dry)
    assert dry.json["message"] == "Dry run: 3 step(s) would be restarted, 2 skipped; nothing changed."
    assert [r["processStepId"] for r in data["restarted"]] == ids
    assert [s["processStepId"] for s in data["skipped"]] == [done_id, "NoSuchStep"]
    assert all(r["params"]["note"] == out("STRING", "n") for r in data["restarted"])
    settle()
    assert db_dump(db_path) == before
    assert len(calls(counted)) == 3

    assert ok(api.post(BULK, body)) == data
    for step_id in ids:
        api.wait_step(step_id, "FAILED")
    assert sorted(calls(counted)) == sorted([(i, 1) for i in ids] + [(i, 2) for i in ids])


def test_a_dry_run_by_filter_pages_like_the_real_one(api, store, db_path):
    ids = insert_failed_steps(store, 1003, step_type="no_delegate_here")
    before = db_dump(db_path)
    dry = ok(api.post(f"{BULK}?dryRun=true", {"filter": {"type": "no_delegate_here"}}))
    assert dry["restarted"] == []
    assert [s["processStepId"] for s in dry["skipped"]] == ids[:1000]
    assert {s["reason"] for s in dry["skipped"]} == {"No delegate is registered for step type 'no_delegate_here'."}
    assert dry["nextCursor"]
    rest = ok(api.post(f"{BULK}?dryRun=true", {"filter": {"type": "no_delegate_here"}, "cursor": dry["nextCursor"]}))
    assert [s["processStepId"] for s in rest["skipped"]] == ids[1000:]
    assert rest["nextCursor"] is None
    assert db_dump(db_path) == before


def test_a_dry_run_by_filter_of_restartable_steps_changes_nothing(api, store, db_path):
    ids = insert_failed_steps(store, 5)
    before = db_dump(db_path)
    data = ok(api.post(f"{BULK}?dryRun=true", {"filter": {"type": "fail"}, "params": typed(message="again")}))
    assert [r["processStepId"] for r in data["restarted"]] == ids
    assert all(r["params"] == {"message": out("STRING", "again")} for r in data["restarted"])
    settle()
    assert db_dump(db_path) == before


def test_a_dry_run_with_an_idempotency_key_is_replayed_as_a_dry_run(api, db_path, counted):
    [step_id] = failed_count_steps(api, counted, 1)
    headers = {"Idempotency-Key": f"dry-{new_id()}"}
    first = api.post(f"{RESTART}?dryRun=true", {"processStepId": step_id}, headers=headers)
    again = api.post(f"{RESTART}?dryRun=true", {"processStepId": step_id}, headers=headers)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["Idempotent-Replayed"] == "true"
    settle()
    step = api.step(step_id)
    assert (step["status"], step["attempts"]) == ("FAILED", 1)
    assert calls(counted) == [(step_id, 1)]
