"""POST /api/v1/processes and GET /api/v1/processes[/{id}] (SPEC sections 3 and 4), black-box
through HTTP: starting a process, its status as its steps run, the listing and its paging."""

import base64

import pytest
from helpers import (
    ID,
    PROCESS_KEYS,
    RESTART,
    STEPS,
    SUMMARY_KEYS,
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


# -- POST /api/v1/processes ------------------------------------------------------------------------
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


# -- GET /api/v1/processes/{id} --------------------------------------------------------------------
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


# -- process status --------------------------------------------------------------------------------
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


# -- GET /api/v1/processes -------------------------------------------------------------------------
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


# An empty value (`limit=`) is not here: it means the parameter is absent (test_api_errors.py).
BAD_LIST_QUERIES = [
    ("limit=0", {"limit"}),
    ("limit=501", {"limit"}),
    ("limit=-1", {"limit"}),
    ("limit=abc", {"limit"}),
    ("limit=1.5", {"limit"}),
    ("limit=1e2", {"limit"}),
    ("limit=1_0", {"limit"}),  # int() reads 10; not a limit a client writes
    ("limit=%D9%A3", {"limit"}),  # ARABIC-INDIC DIGIT THREE; int() reads 3
    ("limit=5%0A", {"limit"}),  # trailing newline
    (f"cursor={b64('p:1')}!", {"cursor"}),  # a character outside the cursor alphabet
    (f"cursor={b64('p:1')}%0A", {"cursor"}),
    ("cursor=zzz", {"cursor"}),
    ("cursor=!!!", {"cursor"}),
    (f"cursor={b64('p:0')}", {"cursor"}),
    (f"cursor={b64('p:-1')}", {"cursor"}),
    (f"cursor={b64('p:abc')}", {"cursor"}),
    (f"cursor={b64('s:5')}", {"cursor"}),
    ("status=DONE", {"status"}),
    ("status=running", {"status"}),
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


@pytest.mark.parametrize("number", [2**63, 10**20])
def test_a_cursor_past_64_bits_is_412(api, number):
    import base64

    cursor = base64.urlsafe_b64encode(f"p:{number}".encode()).decode().rstrip("=")
    response = api.get(f"{P}?cursor={cursor}")
    assert response.status_code == 412
    assert response.json["data"] == {"cursor": ["Not a valid cursor."]}


def test_a_cursor_from_one_listing_is_refused_by_the_other(api):
    for _ in range(3):
        api.start(("noop", {}))
    process_cursor = ok(api.get(f"{P}?limit=1"))["nextCursor"]
    step_cursor = ok(api.get(f"{STEPS}?limit=1"))["nextCursor"]
    assert set(refused(api.get(f"{STEPS}?cursor={process_cursor}"))) == {"cursor"}
    assert set(refused(api.get(f"{P}?cursor={step_cursor}"))) == {"cursor"}
