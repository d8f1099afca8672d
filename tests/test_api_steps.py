"""GET /api/v1/processes/steps and GET /api/v1/processes/steps/{id} (SPEC sections 3 and 4): the step
listing, its filters and paging, and a step's detail with its attempt history."""

import pytest
from helpers import (
    ATTEMPT_KEYS,
    RESTART,
    STEP_KEYS,
    STEPS,
    P,
    assert_step_shape,
    b64,
    ok,
    out,
    parse_time,
    refused,
    typed,
    wait_for,
)


# -- GET /api/v1/processes/steps -------------------------------------------------------------------
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
    pending = api.walk(STEPS, limit, status="PENDING")  # through steps_by_status, where COMPLETED is walked
    assert [s["processStepId"] for page in pending for s in page] == [
        p["steps"][2]["processStepId"] for p in processes[::-1]
    ]


# An empty value (`type=`) is not here: it means the parameter is absent (test_api_errors.py).
BAD_STEP_QUERIES = [
    ("status=RUNNING", {"status"}),
    ("status=failed", {"status"}),
    (f"type={'t' * 129}", {"type"}),
    ("limit=0", {"limit"}),
    ("limit=501", {"limit"}),
    ("limit=x", {"limit"}),
    ("cursor=zzz", {"cursor"}),
    (f"cursor={b64('p:3')}", {"cursor"}),
    ("processid=abc", {"processid"}),  # the filter is processId
    ("type=a&type=b", {"type"}),
]


@pytest.mark.parametrize(("query", "keys"), BAD_STEP_QUERIES, ids=[q[:40] for q, _ in BAD_STEP_QUERIES])
def test_a_bad_step_list_query_is_412_naming_the_parameter(api, query, keys):
    assert set(refused(api.get(f"{STEPS}?{query}"))) == keys


# -- GET /api/v1/processes/steps/{id} --------------------------------------------------------------
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


def test_each_attempt_keeps_the_id_of_the_request_that_began_it(api):
    """Issue 19 part 3: a start, a restart, a complete-step and a skip record their X-Request-Id on
    the attempts they begin; the next step a runner's completion begins keeps its process's."""
    started = api.post(P, {"steps": [{"type": "check", "params": typed(ok=0)}, {"type": "external"}, {"type": "noop"}]},
                       headers={"X-Request-Id": "start-1"})  # fmt: skip
    assert started.status_code == 201 and started.headers["X-Request-Id"] == "start-1"
    process_id = started.json["data"]["processId"]
    first, second, third = (s["processStepId"] for s in started.json["data"]["steps"])
    api.wait_process(process_id, "FAILED")
    ok(api.post(RESTART, {"processStepId": first, "params": typed(ok=1)}, headers={"X-Request-Id": "restart-1"}))
    api.wait_step(second, "STARTED")
    wait_for(lambda: api.step(second)["phase"] == "DEFERRED", what="the external step to defer")
    completed = api.post(f"{P}/complete-step", {"processStepId": second}, headers={"X-Request-Id": "complete-1"})
    ok(completed)
    api.wait_process(process_id, "COMPLETED")

    def ids(step_id):
        return [(a["trigger"], a["requestId"]) for a in api.step(step_id)["attemptHistory"]]

    assert ids(first) == [("start", "start-1"), ("restart", "restart-1")]
    assert ids(second) == [("start", "restart-1")]  # begun by the restarted step's completion
    assert ids(third) == [("start", "complete-1")]  # begun by complete-step
