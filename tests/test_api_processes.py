"""SPEC sections 3 and 4: every endpoint, every status code, the state rules, black-box through HTTP."""

import base64
import re

import pytest
from helpers import (
    COMPLETE,
    DELEGATES,
    FAIL,
    OPENAPI,
    RESTART,
    STEPS,
    P,
    all_at_once,
    ok,
    out,
    parse_time,
    refused,
    typed,
    wait_for,
)

ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PROCESS_KEYS = {"processId", "name", "status", "steps", "createdAt", "updatedAt"}
SUMMARY_KEYS = PROCESS_KEYS - {"steps"}
STEP_KEYS = {
    "processStepId", "processId", "position", "type", "status", "params", "result",
    "attempts", "error", "createdAt", "startedAt", "finishedAt", "deferred", "nextRetryAt",
}  # fmt: skip
ATTEMPT_KEYS = {"attempt", "trigger", "principal", "params", "status", "error", "startedAt", "finishedAt"}


def assert_step_shape(step):
    assert set(step) == STEP_KEYS
    assert ID.match(step["processStepId"]) and ID.match(step["processId"])
    assert step["status"] in ("PENDING", "STARTED", "COMPLETED", "FAILED")
    parse_time(step["createdAt"])
    for key in ("startedAt", "finishedAt"):
        assert step[key] is None or parse_time(step[key])
    assert isinstance(step["deferred"], bool)


# -- POST /api/v1/processes --------------------------------------------------------------------
def test_start_process_answers_201_with_the_process_and_step_0_started(api):
    body = {
        "name": "nightly import",
        "steps": [
            {"type": "external", "params": typed(batch=7)},
            {"type": "noop"},
            {"type": "noop", "params": {}},
        ],
    }
    process = ok(api.post(P, body), 201)
    assert set(process) == PROCESS_KEYS
    assert ID.match(process["processId"])
    assert process["name"] == "nightly import"
    assert process["status"] == "RUNNING"
    assert parse_time(process["createdAt"]) <= parse_time(process["updatedAt"])
    steps = process["steps"]
    assert [s["position"] for s in steps] == [0, 1, 2]
    assert [s["type"] for s in steps] == ["external", "noop", "noop"]
    for step in steps:
        assert_step_shape(step)
        assert step["processId"] == process["processId"]
        assert step["result"] is None and step["error"] is None
    assert len({s["processStepId"] for s in steps}) == 3
    first, *rest = steps
    assert first["status"] == "STARTED" and first["attempts"] == 1 and first["startedAt"] is not None
    assert first["params"] == {"batch": out("LONG", 7)}
    for step in rest:
        assert step["status"] == "PENDING" and step["attempts"] == 0 and step["startedAt"] is None
        assert step["params"] == {}
    assert api.process(process["processId"])["processId"] == process["processId"]


def test_a_process_without_a_name_has_name_null(api):
    assert ok(api.post(P, {"steps": [{"type": "noop"}]}), 201)["name"] is None


@pytest.mark.parametrize("count", [1, 100])
def test_1_to_100_steps_are_accepted_and_run_in_order(api, count):
    process = ok(api.post(P, {"steps": [{"type": "noop"}] * count}), 201)
    assert len(process["steps"]) == count
    done = api.wait_process(process["processId"], "COMPLETED")
    assert all(s["status"] == "COMPLETED" and s["attempts"] == 1 for s in done["steps"])
    for before, after in zip(done["steps"], done["steps"][1:], strict=False):
        assert parse_time(before["finishedAt"]) <= parse_time(after["startedAt"])


@pytest.mark.parametrize("count", [0, 101])
def test_0_or_101_steps_are_412(api, count):
    data = refused(api.post(P, {"steps": [{"type": "noop"}] * count}))
    assert set(data) == {"steps"}
    assert isinstance(data["steps"], list)
    assert api.process_count() == 0


def test_an_unknown_step_type_is_412_naming_steps_n_type(api):
    body = {"steps": [{"type": "noop"}, {"type": "no.such.type"}, {"type": "noop"}, {"type": "nope"}]}
    data = refused(api.post(P, body))
    assert set(data) == {"steps"}
    assert set(data["steps"]) == {"1", "3"}
    assert set(data["steps"]["1"]) == {"type"} and set(data["steps"]["3"]) == {"type"}
    assert "no.such.type" in data["steps"]["1"]["type"][0]
    assert api.process_count() == 0


START_FAULTS = [
    ("not-json", b"steps=noop", {"_schema"}),
    ("array", b'[{"type": "noop"}]', {"_schema"}),
    ("string", b'"noop"', {"_schema"}),
    ("null", b"null", {"_schema"}),
    ("empty", b"", {"_schema"}),
    ("whitespace", b"  \n ", {"_schema"}),
    ("truncated", b'{"steps": [{"type": "no', {"_schema"}),
    ("trailing-garbage", b'{"steps": [{"type": "noop"}]} x', {"_schema"}),
    ("invalid-utf8", b'{"steps": [{"type": "noop\xff"}]}', {"_schema"}),
    ("deeply-nested", b"[" * 100_000, {"_schema"}),
    ("missing-steps", b'{"name": "x"}', {"steps"}),
    ("steps-null", b'{"steps": null}', {"steps"}),
    ("steps-object", b'{"steps": {"type": "noop"}}', {"steps"}),
    ("step-not-object", b'{"steps": ["noop"]}', {"steps"}),
    ("step-missing-type", b'{"steps": [{"params": {}}]}', {"steps"}),
    ("step-type-empty", b'{"steps": [{"type": ""}]}', {"steps"}),
    ("step-type-number", b'{"steps": [{"type": 5}]}', {"steps"}),
    ("step-unknown-field", b'{"steps": [{"type": "noop", "retries": 3}]}', {"steps"}),
    ("unknown-field", b'{"steps": [{"type": "noop"}], "priority": 1}', {"priority"}),
    ("name-number", b'{"steps": [{"type": "noop"}], "name": 5}', {"name"}),
]


@pytest.mark.parametrize(("raw", "keys"), [c[1:] for c in START_FAULTS], ids=[c[0] for c in START_FAULTS])
def test_a_bad_start_body_is_412_with_field_errors(api, raw, keys):
    data = refused(api.post_raw(P, raw))
    assert set(data) == keys
    assert api.process_count() == 0


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx", "text/json", None]
)
def test_a_body_that_is_not_declared_json_is_412(api, content_type):
    headers = dict(api.headers)
    if content_type:
        headers["Content-Type"] = content_type
    response = api.client.post(P, data=b'{"steps": [{"type": "noop"}]}', headers=headers)
    refused(response)
    assert api.process_count() == 0


def test_json_with_a_charset_is_json(api):
    ok(api.post_raw(P, b'{"steps": [{"type": "noop"}]}', "application/json; charset=utf-8"), 201)


def test_a_body_over_1_mib_is_413_and_exactly_1_mib_is_accepted(api):
    body = b'{"steps": [{"type": "noop"}]}'
    exact = body + b" " * (1024 * 1024 - len(body))
    response = api.post_raw(P, exact + b" ")
    assert response.status_code == 413
    assert response.json["message"] == "Payload too large"
    assert api.process_count() == 0
    ok(api.post_raw(P, exact), 201)


@pytest.mark.parametrize("path", [P, RESTART, FAIL, COMPLETE])
def test_every_post_refuses_a_body_over_1_mib(api, path):
    raw = b'{"processStepId": "' + b"a" * (1024 * 1024) + b'"}'
    assert api.post_raw(path, raw).status_code == 413


# -- GET /api/v1/processes/{id} ------------------------------------------------------------------
def test_get_process_answers_200_with_steps_and_404_for_an_unknown_id(api):
    process = api.start(("noop", {}), ("results", {}))
    done = api.wait_process(process["processId"], "COMPLETED")
    assert set(done) == PROCESS_KEYS
    assert [s["processStepId"] for s in done["steps"]] == [s["processStepId"] for s in process["steps"]]
    for step in done["steps"]:
        assert_step_shape(step)
        assert step["finishedAt"] is not None
    missing = api.get(f"{P}/NoSuchProcess_123")
    assert missing.status_code == 404
    assert missing.json["message"] == "Not found" and isinstance(missing.json["data"], str)


# -- process status ------------------------------------------------------------------------------
def test_a_failed_step_makes_the_process_failed_and_halts_it(api):
    process = api.start(("noop", {}), ("check", {"ok": 0}), ("noop", {}))
    failed = api.wait_process(process["processId"], "FAILED")
    assert [s["status"] for s in failed["steps"]] == ["COMPLETED", "FAILED", "PENDING"]
    assert failed["steps"][1]["error"] == {"type": "ValueError", "message": "ok is 0, not 1"}
    assert failed["steps"][1]["finishedAt"] is not None
    assert failed["steps"][2]["attempts"] == 0


def test_a_process_is_running_until_its_last_step_completes(api, gate):
    process = api.start(("noop", {}), ("wait", {"file": str(gate)}), ("noop", {}))
    waiting = wait_for(
        lambda: (p := api.process(process["processId"]))["steps"][1]["status"] == "STARTED" and p, what="step 1"
    )
    assert waiting["status"] == "RUNNING"
    assert [s["status"] for s in waiting["steps"]] == ["COMPLETED", "STARTED", "PENDING"]
    gate.touch()
    done = api.wait_process(process["processId"], "COMPLETED")
    assert [s["status"] for s in done["steps"]] == ["COMPLETED"] * 3


def test_a_restarted_process_leaves_failed_at_once_and_carries_on(api, gate):
    process = api.start(("wait", {"file": str(gate), "seconds": 0}), ("noop", {}))
    step = api.wait_process(process["processId"], "FAILED")["steps"][0]
    assert step["error"]["type"] == "TimeoutError"
    ok(api.post(RESTART, {"processStepId": step["processStepId"], "params": typed(seconds=30.0)}))
    running = api.process(process["processId"])
    assert running["status"] == "RUNNING"
    assert running["steps"][0]["status"] == "STARTED" and running["steps"][0]["attempts"] == 2
    assert running["steps"][0]["error"] is None and running["steps"][0]["finishedAt"] is None
    gate.touch()
    done = api.wait_process(process["processId"], "COMPLETED")
    assert [s["status"] for s in done["steps"]] == ["COMPLETED", "COMPLETED"]


# -- GET /api/v1/processes -----------------------------------------------------------------------
def test_processes_are_listed_newest_first_without_steps(api):
    ids = [api.start(("noop", {}), name=f"p{i}")["processId"] for i in range(4)]
    page = ok(api.get(P))
    assert [p["processId"] for p in page["items"]] == ids[::-1]
    assert page["nextCursor"] is None
    for item in page["items"]:
        assert set(item) == SUMMARY_KEYS
    assert [p["name"] for p in page["items"]] == ["p3", "p2", "p1", "p0"]


def test_processes_are_filtered_by_status(api, gate):
    done = api.start(("noop", {}))["processId"]
    failed = api.start(("fail", {}))["processId"]
    running = api.start(("wait", {"file": str(gate)}))["processId"]
    api.wait_process(done, "COMPLETED")
    api.wait_process(failed, "FAILED")
    for status, expected in [("COMPLETED", [done]), ("FAILED", [failed]), ("RUNNING", [running])]:
        items = ok(api.get(f"{P}?status={status}"))["items"]
        assert [p["processId"] for p in items] == expected
        assert all(p["status"] == status for p in items)


def test_the_default_limit_is_50(api):
    for _ in range(51):
        ok(api.post(P, {"steps": [{"type": "noop"}]}), 201)
    page = ok(api.get(P))
    assert len(page["items"]) == 50 and page["nextCursor"] is not None
    rest = ok(api.get(P, query_string={"cursor": page["nextCursor"]}))
    assert len(rest["items"]) == 1 and rest["nextCursor"] is None


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8, 500])
def test_paging_walks_every_process_exactly_once(api, limit):
    ids = [api.start(("noop", {}))["processId"] for _ in range(7)]
    pages = api.walk(P, limit)
    seen = [p["processId"] for page in pages for p in page]
    assert seen == ids[::-1]
    assert all(pages), "no empty page"
    assert len(pages) == max(1, -(-7 // limit))


def test_paging_with_a_status_filter(api):
    completed = []
    for i in range(6):
        pid = api.start(("noop", {}) if i % 2 else ("fail", {}))["processId"]
        if i % 2:
            completed.append(pid)
    for pid in completed:
        api.wait_process(pid, "COMPLETED")
    pages = api.walk(P, 2, status="COMPLETED")
    assert [p["processId"] for page in pages for p in page] == completed[::-1]


def test_processes_started_while_paging_do_not_disturb_the_walk(api):
    ids = [api.start(("noop", {}))["processId"] for _ in range(5)]
    first = ok(api.get(f"{P}?limit=2"))
    newer = [api.start(("noop", {}))["processId"] for _ in range(3)]
    rest = api.walk(P, 2, cursor=first["nextCursor"])
    seen = [p["processId"] for page in [first["items"], *rest] for p in page]
    assert seen == ids[::-1]
    assert not set(newer) & set(seen)


def b64(text):
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


BAD_LIST_QUERIES = [
    ("limit=0", {"limit"}),
    ("limit=501", {"limit"}),
    ("limit=-1", {"limit"}),
    ("limit=abc", {"limit"}),
    ("limit=1.5", {"limit"}),
    ("limit=", {"limit"}),
    ("limit=1e2", {"limit"}),
    ("limit=1_0", {"limit"}),  # int() reads 10; not a limit a client writes
    ("limit=%D9%A3", {"limit"}),  # ARABIC-INDIC DIGIT THREE; int() reads 3
    ("limit=5%0A", {"limit"}),  # trailing newline
    (f"cursor={b64('p:1')}!", {"cursor"}),  # a character outside the cursor alphabet
    (f"cursor={b64('p:1')}%0A", {"cursor"}),
    ("cursor=zzz", {"cursor"}),
    ("cursor=!!!", {"cursor"}),
    ("cursor=", {"cursor"}),
    (f"cursor={b64('p:0')}", {"cursor"}),
    (f"cursor={b64('p:-1')}", {"cursor"}),
    (f"cursor={b64('p:abc')}", {"cursor"}),
    (f"cursor={b64('s:5')}", {"cursor"}),
    ("status=DONE", {"status"}),
    ("status=running", {"status"}),
    ("status=", {"status"}),
    ("foo=1", {"foo"}),
    ("Limit=5", {"Limit"}),
    ("limit=5&limit=5", {"limit"}),
    ("status=FAILED&status=RUNNING", {"status"}),
]


@pytest.mark.parametrize(("query", "keys"), BAD_LIST_QUERIES, ids=[q for q, _ in BAD_LIST_QUERIES])
def test_a_bad_process_list_query_is_412_naming_the_parameter(api, query, keys):
    api.start(("noop", {}))
    data = refused(api.get(f"{P}?{query}"))
    assert set(data) == keys
    assert all(isinstance(m, list) and m for m in data.values())


def test_a_cursor_of_thousands_of_digits_is_412_not_500(api):
    huge = base64.urlsafe_b64encode(b"p:" + b"9" * 5000).decode().rstrip("=")
    assert set(refused(api.get(f"{P}?cursor={huge}"))) == {"cursor"}


def test_a_cursor_from_one_listing_is_refused_by_the_other(api):
    for _ in range(3):
        api.start(("noop", {}))
    process_cursor = ok(api.get(f"{P}?limit=1"))["nextCursor"]
    step_cursor = ok(api.get(f"{STEPS}?limit=1"))["nextCursor"]
    assert set(refused(api.get(f"{STEPS}?cursor={process_cursor}"))) == {"cursor"}
    assert set(refused(api.get(f"{P}?cursor={step_cursor}"))) == {"cursor"}


# -- GET /api/v1/processes/steps ------------------------------------------------------------------
def test_steps_are_listed_across_processes_newest_first(api):
    a = api.start(("noop", {}), ("noop", {}))
    b = api.start(("noop", {}))
    items = ok(api.get(STEPS))["items"]
    expected = [s["processStepId"] for s in b["steps"][::-1] + a["steps"][::-1]]
    assert [s["processStepId"] for s in items] == expected
    for step in items:
        assert_step_shape(step)


def test_steps_are_filtered_by_status_and_type(api):
    failing = [api.start(("noop", {}), ("check", {"ok": 0}))["processId"] for _ in range(2)]
    failing.append(api.start(("fail", {}))["processId"])
    done = api.start(("check", {"ok": 1}))["processId"]
    failed_ids = [api.wait_process(pid, "FAILED")["steps"][-1]["processStepId"] for pid in failing]
    api.wait_process(done, "COMPLETED")

    failed = ok(api.get(f"{STEPS}?status=FAILED"))["items"]
    assert [s["processStepId"] for s in failed] == failed_ids[::-1]
    assert all(s["status"] == "FAILED" for s in failed)

    checks = ok(api.get(f"{STEPS}?type=check"))["items"]
    assert len(checks) == 3 and all(s["type"] == "check" for s in checks)

    failed_checks = ok(api.get(f"{STEPS}?type=check&status=FAILED"))["items"]
    assert [s["processStepId"] for s in failed_checks] == failed_ids[1::-1]

    assert ok(api.get(f"{STEPS}?type=no.such.type"))["items"] == []
    assert ok(api.get(f"{STEPS}?status=PENDING"))["items"] == []


@pytest.mark.parametrize("limit", [1, 3, 4])
def test_paging_walks_every_step_exactly_once(api, limit):
    processes = [api.start(("noop", {}), ("fail", {}), ("noop", {})) for _ in range(3)]
    for process in processes:
        api.wait_process(process["processId"], "FAILED")  # nothing moves while we page
    expected = [s["processStepId"] for p in processes[::-1] for s in p["steps"][::-1]]
    pages = api.walk(STEPS, limit)
    assert [s["processStepId"] for page in pages for s in page] == expected
    assert all(pages) and len(pages) == -(-9 // limit)
    completed = api.walk(STEPS, limit, type="noop", status="COMPLETED")
    assert [s["processStepId"] for page in completed for s in page] == [
        p["steps"][0]["processStepId"] for p in processes[::-1]
    ]


BAD_STEP_QUERIES = [
    ("status=RUNNING", {"status"}),
    ("status=failed", {"status"}),
    ("type=", {"type"}),
    (f"type={'t' * 129}", {"type"}),
    ("limit=0", {"limit"}),
    ("limit=501", {"limit"}),
    ("limit=x", {"limit"}),
    ("cursor=zzz", {"cursor"}),
    (f"cursor={b64('p:3')}", {"cursor"}),
    ("processId=abc", {"processId"}),
    ("type=a&type=b", {"type"}),
]


@pytest.mark.parametrize(("query", "keys"), BAD_STEP_QUERIES, ids=[q[:40] for q, _ in BAD_STEP_QUERIES])
def test_a_bad_step_list_query_is_412_naming_the_parameter(api, query, keys):
    assert set(refused(api.get(f"{STEPS}?{query}"))) == keys


# -- GET /api/v1/processes/steps/{id} ----------------------------------------------------------------
def test_step_detail_has_the_attempt_history(api, second_operator_basic):
    process = api.start(("check", {"ok": 0, "tag": "a"}), ("noop", {}))
    step_id = api.wait_process(process["processId"], "FAILED")["steps"][0]["processStepId"]
    restart = api.post(RESTART, {"processStepId": step_id, "params": typed(ok=1)}, headers=second_operator_basic)
    ok(restart)
    done = api.wait_process(process["processId"], "COMPLETED")

    detail = api.step(step_id)
    assert set(detail) == STEP_KEYS | {"attemptHistory"}
    assert detail["attempts"] == 2 and detail["status"] == "COMPLETED"
    assert detail["params"] == {"ok": out("LONG", 1), "tag": out("STRING", "a")}
    assert detail["result"] == {"checked": out("LONG", 1)}
    first, second = detail["attemptHistory"]
    for attempt in (first, second):
        assert set(attempt) == ATTEMPT_KEYS
        assert parse_time(attempt["startedAt"]) <= parse_time(attempt["finishedAt"])
    assert first["attempt"] == 1 and first["trigger"] == "start" and first["principal"] == "ops"
    assert first["params"] == {"ok": out("LONG", 0), "tag": out("STRING", "a")}
    assert first["status"] == "FAILED"
    assert first["error"] == {"type": "ValueError", "message": "ok is 0, not 1"}
    assert second["attempt"] == 2 and second["trigger"] == "restart" and second["principal"] == "ops2"
    assert second["params"] == detail["params"]
    assert second["status"] == "COMPLETED" and second["error"] is None
    assert parse_time(first["finishedAt"]) <= parse_time(second["startedAt"])

    # The next step started automatically: its principal is the one who started the process.
    next_step = api.step(done["steps"][1]["processStepId"])
    assert [(a["attempt"], a["trigger"], a["principal"], a["status"]) for a in next_step["attemptHistory"]] == [
        (1, "start", "ops", "COMPLETED")
    ]


def test_a_pending_step_has_no_attempts(api, gate):
    process = api.start(("wait", {"file": str(gate)}), ("noop", {}))
    pending = api.step(process["steps"][1]["processStepId"])
    assert pending["status"] == "PENDING" and pending["attempts"] == 0 and pending["attemptHistory"] == []
    running = api.step(process["steps"][0]["processStepId"])
    assert [(a["status"], a["finishedAt"]) for a in running["attemptHistory"]] == [("STARTED", None)]


def test_step_detail_of_an_unknown_id_is_404(api):
    response = api.get(f"{STEPS}/NoSuchStep_0123")
    assert response.status_code == 404 and response.json["message"] == "Not found"


# -- POST /api/v1/processes/restart-failed-step --------------------------------------------------------
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


# Bodies every action endpoint must refuse with 412: (id, raw body, keys of data or None to skip).
ACTION_FAULTS = [
    ("not-json", b"processStepId=abc", {"_schema"}),
    ("array", b'["abc"]', {"_schema"}),
    ("string", b'"abc"', {"_schema"}),
    ("number", b"5", {"_schema"}),
    ("null", b"null", {"_schema"}),
    ("empty", b"", {"_schema"}),
    ("truncated", b'{"processStepId": "STEP', {"_schema"}),
    ("two-objects", b'{"processStepId": "STEP"}{}', {"_schema"}),
    ("nan", b'{"processStepId": "STEP", "x": NaN}', {"_schema"}),
    ("empty-object", b"{}", {"processStepId"}),
    ("unknown-field", b'{"processStepId": "STEP", "force": true}', {"force"}),
    ("id-null", b'{"processStepId": null}', {"processStepId"}),
    ("id-number", b'{"processStepId": 5}', {"processStepId"}),
    ("id-list", b'{"processStepId": ["STEP"]}', {"processStepId"}),
    ("id-empty", b'{"processStepId": ""}', {"processStepId"}),
    ("id-bad-characters", b'{"processStepId": "../STEP"}', {"processStepId"}),
    ("id-too-long", b'{"processStepId": "' + b"a" * 65 + b'"}', {"processStepId"}),
    ("id-wrong-case-key", b'{"processstepid": "STEP"}', {"processstepid", "processStepId"}),
]


@pytest.mark.parametrize(("raw", "keys"), [c[1:] for c in ACTION_FAULTS], ids=[c[0] for c in ACTION_FAULTS])
def test_a_bad_action_body_is_412_and_changes_nothing(api, action_step, raw, keys):
    path, step = action_step
    before = api.step(step["processStepId"])
    data = refused(api.post_raw(path, raw.replace(b"STEP", step["processStepId"].encode())))
    assert set(data) == keys
    assert api.step(step["processStepId"]) == before


def test_an_action_body_with_the_wrong_content_type_is_412(api, action_step):
    path, step = action_step
    before = api.step(step["processStepId"])
    raw = b'{"processStepId": "%s"}' % step["processStepId"].encode()
    refused(api.post_raw(path, raw, "text/plain"))
    assert api.step(step["processStepId"]) == before


# -- fail-step and complete-step ----------------------------------------------------------------------
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
    old_gate = tmp_path / "old-gate"
    process = api.start(("wait", {"file": str(old_gate)}))
    step_id = process["steps"][0]["processStepId"]
    ok(api.post(FAIL, {"processStepId": step_id}))
    ok(api.post(RESTART, {"processStepId": step_id, "params": typed(file=str(gate))}))
    wait_for(lambda: runner._busy == 2, what="both attempts to run")
    old_gate.touch()  # attempt 1 returns now; attempt 2 still waits for `gate`
    wait_for(lambda: runner._busy == 1, what="attempt 1 to return")
    step = api.step(step_id)
    assert step["status"] == "STARTED" and step["attempts"] == 2
    assert [a["status"] for a in step["attemptHistory"]] == ["FAILED", "STARTED"]
    gate.touch()
    assert api.wait_step(step_id, "COMPLETED")["attempts"] == 2


# -- delegates and results ---------------------------------------------------------------------------
def test_delegates_lists_every_type_with_the_first_docstring_line(app, api):
    def multi(ctx):
        """First line only.

        Not this one.
        """

    app.extensions["stepd"].registry.add("multi.line", multi, "test")
    listed = ok(api.get(DELEGATES))
    assert all(set(d) == {"type", "description", "retry"} for d in listed)
    assert all(set(d["retry"]) == {"retries", "backoff", "delay", "maxDelay"} for d in listed)
    by_type = {d["type"]: d["description"] for d in listed}
    assert len(by_type) == len(listed)
    assert by_type["noop"] == "Do nothing and complete."
    assert by_type["sleep"] == "Sleep for param `seconds` (DOUBLE), then complete."
    assert by_type["fail"] == "Fail with param `message` (STRING)."
    assert by_type["check"] == "Fail unless param `ok` is 1; the fix a restart can bring."
    assert by_type["multi.line"] == "First line only."
    registry = app.extensions["stepd"].registry
    assert set(by_type) == {d.type for d in registry.all()}
    registry.remove("multi.line")
    assert "multi.line" not in {d["type"] for d in ok(api.get(DELEGATES))}


def test_results_are_typed_from_python_types(api):
    process = api.start(("results", {}))
    step = api.wait_process(process["processId"], "COMPLETED")["steps"][0]
    assert step["result"] == {
        "text": out("STRING", "héllo"),
        "count": out("LONG", 2**63 - 1),
        "ratio": out("DOUBLE", 0.5),
    }


def test_a_delegate_sees_its_context(api):
    process = api.start(("echo", {"b": 1, "a": "x"}))
    step = api.wait_process(process["processId"], "COMPLETED")["steps"][0]
    assert step["result"] == {
        "process": out("STRING", process["processId"]),
        "step": out("STRING", step["processStepId"]),
        "attempt": out("LONG", 1),
        "names": out("STRING", "a,b"),
    }


def test_a_delegate_returning_a_non_dict_fails_the_step_with_type_error(api):
    response = api.post(P, {"steps": [{"type": "bad_result"}, {"type": "noop"}]})
    process = ok(response, 201)
    failed = api.wait_process(process["processId"], "FAILED")
    assert failed["steps"][0]["error"]["type"] == "TypeError"
    assert failed["steps"][0]["result"] is None
    assert failed["steps"][1]["status"] == "PENDING"


@pytest.mark.parametrize(
    ("step_type", "params", "error"),
    [
        ("fail", {"message": "card declined"}, {"type": "StepFailure", "message": "card declined"}),
        ("check", {"ok": 2}, {"type": "ValueError", "message": "ok is 2, not 1"}),
        ("sleep", {}, {"type": "ValueError", "message": "param 'seconds' (DOUBLE) is required"}),
        ("count", {}, {"type": "KeyError", "message": "'file'"}),
    ],
)
def test_a_delegate_exception_is_a_failed_step_never_an_http_error(api, step_type, params, error):
    response = api.post(P, {"steps": [{"type": step_type, "params": typed(**params)}]})
    process = ok(response, 201)
    failed = api.wait_process(process["processId"], "FAILED")
    assert failed["steps"][0]["error"] == error
    assert ok(api.post(RESTART, {"processStepId": failed["steps"][0]["processStepId"]}))["params"] is not None


def test_sleep_completes_with_how_long_it_slept(api):
    process = api.start(("sleep", {"seconds": 0.05}))
    step = api.wait_process(process["processId"], "COMPLETED")["steps"][0]
    assert step["result"] == {"slept": out("DOUBLE", 0.05)}
    elapsed = parse_time(step["finishedAt"]) - parse_time(step["startedAt"])
    assert elapsed.total_seconds() >= 0.04


def test_fail_without_a_message_still_fails(api):
    process = api.start(("fail", {}))
    error = api.wait_process(process["processId"], "FAILED")["steps"][0]["error"]
    assert error["type"] == "StepFailure" and error["message"]


# -- query parameters on every endpoint ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", DELEGATES),
        ("GET", f"{P}/SomeId"),
        ("GET", f"{STEPS}/SomeId"),
        ("GET", "/healthz"),
        ("GET", OPENAPI),
        ("POST", P),
        ("POST", RESTART),
        ("POST", FAIL),
        ("POST", COMPLETE),
    ],
)
def test_an_unknown_query_parameter_is_412_on_every_endpoint(api, method, path):
    body = {"steps": [{"type": "noop"}]} if path == P else {"processStepId": "SomeId"}
    response = api.client.open(
        f"{path}?verbose=1", method=method, headers=api.headers, json=body if method == "POST" else None
    )
    assert response.status_code == 412, response.get_data(as_text=True)[:300]
    assert "verbose" in response.json["data"]
    assert api.process_count() == 0
