"""POST /api/v1/processes/restart-failed-steps: many FAILED steps, listed or matched by a filter,
each restarted in its own compare-and-set exactly as restart-failed-step does."""

import base64
import fcntl
import os
from datetime import UTC, datetime, timedelta

import pytest
from helpers import (
    BULK,
    all_at_once,
    calls,
    db_rows,
    insert_failed_steps,
    iso,
    ok,
    out,
    parse_time,
    refused,
    typed,
    wait_for,
)

from stepd import db as db_module
from stepd import schemas

RESULT_KEYS = {"restarted", "skipped", "nextCursor"}


def failed(api, step_type="check", **params):
    """Start a process whose first step fails; returns (processId, processStepId) once it has."""
    process = api.start((step_type, params), ("noop", {}))
    step = api.wait_process(process["processId"], "FAILED")["steps"][0]
    return process["processId"], step["processStepId"]


def restarted_ids(data):
    return [r["processStepId"] for r in data["restarted"]]


# -- by ids -----------------------------------------------------------------------------------------
def test_listed_steps_are_restarted_and_the_rest_skipped_with_a_reason(api):
    first_process, first = failed(api, ok=0, tag="a")
    second_process, second = failed(api, ok=0, tag="b")
    done = api.start(("noop", {}))
    done_step = api.wait_process(done["processId"], "COMPLETED")["steps"][0]["processStepId"]
    waiting = api.start(("external", {}))["steps"][0]["processStepId"]

    body = {"processStepIds": [first, "NoSuchStep", done_step, second, waiting], "params": typed(ok=1)}
    response = api.post(BULK, body)
    data = ok(response)
    assert response.json["message"] == "2 step(s) restarted, 3 skipped."
    assert set(data) == RESULT_KEYS
    assert data["nextCursor"] is None
    assert data["restarted"] == [
        {
            "processId": first_process,
            "processStepId": first,
            "params": {"ok": out("LONG", 1), "tag": out("STRING", "a")},
        },
        {
            "processId": second_process,
            "processStepId": second,
            "params": {"ok": out("LONG", 1), "tag": out("STRING", "b")},
        },
    ]
    skipped = {s["processStepId"]: s["reason"] for s in data["skipped"]}
    assert [s["processStepId"] for s in data["skipped"]] == ["NoSuchStep", done_step, waiting]
    assert skipped["NoSuchStep"] == "No step has this id."
    assert skipped[done_step] == "Step is COMPLETED; only a FAILED step can be restarted."
    assert skipped[waiting] == "Step is STARTED; only a FAILED step can be restarted."
    for process_id, step_id in ((first_process, first), (second_process, second)):
        api.wait_process(process_id, "COMPLETED")
        history = api.step(step_id)["attemptHistory"]
        assert [(a["trigger"], a["principal"], a["status"]) for a in history] == [
            ("start", "ops", "FAILED"),
            ("restart", "ops", "COMPLETED"),
        ]
        assert history[1]["params"]["ok"] == out("LONG", 1)


def test_without_params_each_step_runs_again_with_its_own_params(api, tmp_path):
    counted = tmp_path / "calls.txt"
    ids = [failed(api, "count", file=str(counted), fail=1, n=n)[1] for n in range(3)]
    data = ok(api.post(BULK, {"processStepIds": ids}))
    assert restarted_ids(data) == ids
    assert [r["params"]["n"] for r in data["restarted"]] == [out("LONG", n) for n in range(3)]
    wait_for(lambda: len(calls(counted)) == 6, what="three more calls")
    assert sorted(calls(counted)) == sorted([(i, 1) for i in ids] + [(i, 2) for i in ids])


def test_a_step_whose_delegate_is_gone_is_skipped(app, api):
    _, gone = failed(api, ok=0)
    _, other = failed(api, "fail")
    app.extensions["stepd"].registry.remove("check")
    data = ok(api.post(BULK, {"processStepIds": [gone, other]}))
    assert restarted_ids(data) == [other]
    assert data["skipped"] == [{"processStepId": gone, "reason": "No delegate is registered for step type 'check'."}]
    assert api.step(gone)["status"] == "FAILED" and api.step(gone)["attempts"] == 1


def test_too_many_merged_params_skip_that_step_only(api, store):
    [big] = insert_failed_steps(store, 1, params={f"p{n}": ("LONG", n) for n in range(200)})
    [small] = insert_failed_steps(store, 1, start=datetime(2021, 1, 1, tzinfo=UTC))
    overlay = {f"q{n}": {"type": "LONG", "longValue": n} for n in range(100)}
    data = ok(api.post(BULK, {"processStepIds": [big, small], "params": overlay}))
    assert restarted_ids(data) == [small]
    assert data["skipped"] == [
        {"processStepId": big, "reason": "The merged params have 300 names; at most 256 are allowed."}
    ]
    assert len(data["restarted"][0]["params"]) == 101


BAD_BODIES = [
    ("neither", {}, {"_schema"}),
    ("both", {"processStepIds": ["a"], "filter": {}}, {"_schema"}),
    ("empty-list", {"processStepIds": []}, {"processStepIds"}),
    ("too-many", {"processStepIds": [f"s{n}" for n in range(1001)]}, {"processStepIds"}),
    ("duplicates", {"processStepIds": ["a", "b", "a"]}, {"processStepIds"}),
    ("bad-id", {"processStepIds": ["ok", "../x"]}, {"processStepIds"}),
    ("id-not-string", {"processStepIds": [5]}, {"processStepIds"}),
    ("ids-null", {"processStepIds": None}, {"_schema"}),  # null: not given
    (
        "cursor-without-filter",
        {"processStepIds": ["a"], "cursor": schemas.encode_failure_cursor(("x", 1, "y"))},
        {"cursor"},
    ),
    ("bad-cursor", {"filter": {}, "cursor": "bm9wZQ"}, {"cursor"}),
    ("unknown-field", {"processStepIds": ["a"], "force": True}, {"force"}),
    ("unknown-filter-field", {"filter": {"status": "FAILED"}}, {"filter"}),
    ("filter-not-object", {"filter": "check"}, {"filter"}),
    ("bad-process-id", {"filter": {"processId": "a/b"}}, {"filter"}),
    ("empty-type", {"filter": {"type": ""}}, {"filter"}),
    ("naive-time", {"filter": {"failedBefore": "2024-01-01T00:00:00"}}, {"filter"}),
    ("not-a-time", {"filter": {"failedAfter": "yesterday"}}, {"filter"}),
    ("bad-params", {"processStepIds": ["a"], "params": {"x": {"type": "LONG", "longValue": "1"}}}, {"params"}),
    (
        "params-too-many",
        {"processStepIds": ["a"], "params": {f"n{i}": typed(v=1)["v"] for i in range(257)}},
        {"params"},
    ),
]


@pytest.mark.parametrize(("body", "keys"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_a_bad_bulk_body_is_412_naming_the_field_and_changes_nothing(api, db_path, body, keys):
    _, step_id = failed(api, ok=0)
    if body.get("processStepIds"):  # the test's FAILED step in place of "a"
        body = {**body, "processStepIds": [step_id if i == "a" else i for i in body["processStepIds"]]}
    data = refused(api.post(BULK, body))
    assert set(data) == keys, data
    if "filter" in keys:
        assert isinstance(data["filter"], dict)
    step = api.step(step_id)
    assert step["status"] == "FAILED" and step["attempts"] == 1


def test_exactly_1000_ids_are_accepted(api, store):
    ids = insert_failed_steps(store, 3, step_type="no_such_type") + [f"unknown{n}" for n in range(997)]
    data = ok(api.post(BULK, {"processStepIds": ids}))
    assert data["restarted"] == [] and len(data["skipped"]) == 1000
    assert [s["processStepId"] for s in data["skipped"]] == ids


def test_concurrent_bulk_restarts_restart_each_step_once(app, api, gate):
    ids = [failed(api, "wait", file=str(gate), seconds=0)[1] for _ in range(6)]

    def bulk(n):  # half of them walk the list backwards
        body = {"processStepIds": ids if n % 2 else ids[::-1], "params": typed(seconds=30.0)}
        return app.test_client().post(BULK, json=body, headers=api.headers)

    answers = all_at_once(8, bulk)
    assert [r.status_code for r in answers] == [200] * 8
    won = [step for r in answers for step in restarted_ids(r.json["data"])]
    assert sorted(won) == sorted(ids)  # each step restarted by exactly one request
    for response in answers:
        for skipped in response.json["data"]["skipped"]:
            assert skipped["reason"] == "Step is STARTED; only a FAILED step can be restarted."
    for step_id in ids:
        step = api.step(step_id)
        assert step["attempts"] == 2 and [a["trigger"] for a in step["attemptHistory"]] == ["start", "restart"]


def test_a_step_the_database_is_too_busy_for_is_skipped_with_a_reason(api, store, db_path, monkeypatch):
    ids = insert_failed_steps(store, 2)
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 150)
    holder = os.open(str(db_path) + ".lock", os.O_RDWR)  # another writer holds the lock file
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        data = ok(api.post(BULK, {"processStepIds": ids}))
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    assert data["restarted"] == []
    assert [s["processStepId"] for s in data["skipped"]] == ids
    assert all("busy" in s["reason"] for s in data["skipped"])
    assert all(api.step(i)["status"] == "FAILED" and api.step(i)["attempts"] == 1 for i in ids)


# -- by filter -----------------------------------------------------------------------------------
def test_a_filter_matches_failed_steps_by_type_and_process(api):
    _, check_a = failed(api, ok=0)
    fail_process, fail_a = failed(api, "fail")
    _, check_b = failed(api, ok=0)
    by_type = ok(api.post(f"{BULK}?dryRun=true", {"filter": {"type": "check"}}))
    assert restarted_ids(by_type) == [check_a, check_b] and by_type["skipped"] == []
    by_process = ok(api.post(f"{BULK}?dryRun=true", {"filter": {"processId": fail_process}}))
    assert restarted_ids(by_process) == [fail_a]
    both = ok(api.post(f"{BULK}?dryRun=true", {"filter": {"processId": fail_process, "type": "check"}}))
    assert both == {"restarted": [], "skipped": [], "nextCursor": None}
    everything = ok(api.post(BULK, {"filter": {}, "params": typed(ok=1)}))
    assert restarted_ids(everything) == [check_a, fail_a, check_b]  # oldest failure first
    assert ok(api.post(BULK, {"filter": {"type": "noop"}})) == {"restarted": [], "skipped": [], "nextCursor": None}


def test_filter_times_are_strict_and_read_with_their_offset(api, store):
    base = datetime(2023, 6, 1, 12, 0, tzinfo=UTC)
    ids = insert_failed_steps(store, 5, start=base)  # failed at 12:00:00.000, .001, … .004 UTC
    at = [iso(base + timedelta(milliseconds=n)) for n in range(5)]

    def matched(**where):
        return restarted_ids(ok(api.post(f"{BULK}?dryRun=true", {"filter": where})))

    assert matched(failedBefore=at[2]) == ids[:2]  # strictly earlier
    assert matched(failedAfter=at[2]) == ids[3:]  # strictly later
    assert matched(failedAfter=at[0], failedBefore=at[4]) == ids[1:4]
    assert matched(failedAfter=at[2], failedBefore=at[3]) == []
    # the same instants written with an offset
    assert matched(failedBefore="2023-06-01T14:00:00.002+02:00") == ids[:2]
    assert matched(failedAfter="2023-06-01T07:00:00.002-05:00") == ids[3:]
    assert matched(failedAfter="2023-06-01T12:00:00.002Z") == ids[3:]


def test_steps_failing_at_the_same_time_are_taken_in_creation_order(api, store):
    ids = insert_failed_steps(store, 4)
    with store.db.transaction() as db:  # all four failed at one instant; created in list order
        db.execute("UPDATE steps SET finished_at = '2020-01-01T00:00:00.000Z'")
    older = insert_failed_steps(store, 1, start=datetime(2019, 1, 1, tzinfo=UTC))
    data = ok(api.post(f"{BULK}?dryRun=true", {"filter": {}}))
    assert restarted_ids(data) == older + ids


def test_a_filter_over_1000_steps_restarts_the_oldest_1000_and_the_cursor_the_rest_once(api, store, app):
    ids = insert_failed_steps(store, 1005)  # `fail` steps: each restart fails again at once
    first = api.post(BULK, {"filter": {"type": "fail"}})
    data = ok(first)
    assert restarted_ids(data) == ids[:1000] and data["skipped"] == []
    assert data["nextCursor"]
    assert "More than 1000 steps match" in first.json["message"]
    # Every restarted step has failed again (with a newer failure time) before the script goes on.
    db = app.config["STEPD_DB"]
    wait_for(
        lambda: db_rows(db, "SELECT COUNT(*) FROM steps WHERE status = 'FAILED' AND attempts = 2")[0][0] == 1000,
        timeout=60,
        what="the restarted steps to fail again",
    )
    last = api.post(BULK, {"filter": {"type": "fail"}, "cursor": data["nextCursor"]})
    second = ok(last)
    assert restarted_ids(second) == ids[1000:] and "More than" not in last.json["message"]
    assert second["nextCursor"] is None
    wait_for(
        lambda: db_rows(db, "SELECT COUNT(*) FROM steps WHERE status = 'FAILED' AND attempts = 2")[0][0] == 1005,
        timeout=20,
        what="the last five to fail again",
    )
    # nothing was restarted twice: every step has exactly its start and one restart
    assert db_rows(db, "SELECT attempts, COUNT(*) FROM steps GROUP BY attempts") == [(2, 1005)]
    assert db_rows(db, "SELECT trigger, COUNT(*) FROM attempts GROUP BY trigger ORDER BY trigger") == [
        ("restart", 1005),
        ("start", 1005),
    ]


def test_a_cursor_is_refused_when_it_is_not_ours(api):
    two_parts = base64.urlsafe_b64encode(b"f:2020-01-01T00:00:00.000Z|5").decode().rstrip("=")
    list_cursor = base64.urlsafe_b64encode(b"s:5").decode().rstrip("=")
    huge_seq = base64.urlsafe_b64encode(b"f:x|" + b"9" * 5000 + b"|y").decode().rstrip("=")  # int() refuses it
    for cursor in (
        "",
        "x",
        "Zjo",
        "!!!!",
        two_parts,
        list_cursor,
        huge_seq,
        schemas.encode_failure_cursor(("x", 1, "y")) + "=",
    ):
        refused(api.post(BULK, {"filter": {}, "cursor": cursor}))


# Cursors that encode back to themselves but that no walk can have made: each part is checked
# as strictly as a list cursor's number (the times are stepd's own, the walk began in the past,
# the last step it took failed before the walk began).
FORGED_CURSORS = [
    ("finished-not-a-time", ("x", 5, "2020-01-01T00:00:00.000Z")),
    ("until-not-a-time", ("2020-01-01T00:00:00.000Z", 5, "y")),
    ("finished-empty", ("", 5, "2020-01-01T00:00:00.000Z")),
    ("until-empty", ("2020-01-01T00:00:00.000Z", 5, "")),
    ("no-milliseconds", ("2020-01-01T00:00:00Z", 5, "2021-01-01T00:00:00.000Z")),
    ("an-offset", ("2020-01-01T00:00:00.000+00:00", 5, "2021-01-01T00:00:00.000Z")),
    ("not-a-day", ("2020-02-30T00:00:00.000Z", 5, "2021-01-01T00:00:00.000Z")),
    ("seq-0", ("2020-01-01T00:00:00.000Z", 0, "2021-01-01T00:00:00.000Z")),
    ("failed-after-the-walk-began", ("2021-01-01T00:00:00.001Z", 5, "2021-01-01T00:00:00.000Z")),
    ("walk-begins-in-the-future", ("2020-01-01T00:00:00.000Z", 5, "2999-01-01T00:00:00.000Z")),
]


@pytest.mark.parametrize("position", [p for _, p in FORGED_CURSORS], ids=[i for i, _ in FORGED_CURSORS])
def test_a_forged_filter_cursor_is_refused(api, store, position):
    insert_failed_steps(store, 3)
    cursor = schemas.encode_failure_cursor(position)
    assert set(refused(api.post(f"{BULK}?dryRun=true", {"filter": {}, "cursor": cursor}))) == {"cursor"}


def test_an_honest_filter_cursor_of_the_past_is_accepted(api, store):
    insert_failed_steps(store, 3, start=datetime(2020, 1, 1, tzinfo=UTC))
    cursor = schemas.encode_failure_cursor(("2020-01-01T00:00:00.000Z", 1, "2021-01-01T00:00:00.000Z"))
    assert len(ok(api.post(f"{BULK}?dryRun=true", {"filter": {}, "cursor": cursor}))["restarted"]) == 2


@pytest.mark.parametrize(
    "where",
    [{"failedAfter": "0001-01-01T00:00:00+00:01"}, {"failedBefore": "9999-12-31T23:59:59-01:00"}],
)
def test_a_time_with_no_utc_equivalent_is_412_not_500(api, where):
    assert set(refused(api.post(BULK, {"filter": where}))) == {"filter"}


def test_failure_times_in_the_answer_order_are_ascending(api, store):
    ids = insert_failed_steps(store, 3, start=datetime(2022, 1, 1, tzinfo=UTC))
    insert_failed_steps(store, 2, start=datetime(2021, 1, 1, tzinfo=UTC))
    data = ok(api.post(f"{BULK}?dryRun=true", {"filter": {}}))
    times = [parse_time(api.step(s)["finishedAt"]) for s in restarted_ids(data)]
    assert times == sorted(times)
    assert restarted_ids(data)[2:] == ids


def test_a_reader_may_not_bulk_restart(reader_api, api):
    _, step_id = failed(api, ok=0)
    assert reader_api.post(BULK, {"processStepIds": [step_id]}).status_code == 403
    assert api.step(step_id)["status"] == "FAILED"


def test_get_on_the_bulk_path_is_405(api):
    response = api.get(BULK)
    assert response.status_code == 405 and response.json["message"] == "Method not allowed"
