"""The list filters of SPEC 10: processes by name and creation time, steps by process and error type."""

from datetime import UTC, datetime, timedelta

import pytest
from helpers import CANCEL, SKIP, STEPS, P, insert_finished_processes, iso, ok, refused


def ids(page):
    return [item["processId"] for item in page["items"]]


def step_ids(page):
    return [item["processStepId"] for item in page["items"]]


# -- processes: name, createdAfter, createdBefore -------------------------------------------------------
def test_processes_are_found_by_their_exact_name(api):
    first = api.start(("noop", {}), name="invoice 42")
    api.start(("noop", {}), name="invoice 4")  # not a prefix match
    api.start(("noop", {}), name="Invoice 42")  # nor case-blind
    api.start(("noop", {}))
    second = api.start(("check", {"ok": 0}), name="invoice 42")
    assert ids(ok(api.get(P, query_string={"name": "invoice 42"}))) == [second["processId"], first["processId"]]
    api.wait_process(second["processId"], "FAILED")
    both = ok(api.get(P, query_string={"name": "invoice 42", "status": "FAILED"}))
    assert ids(both) == [second["processId"]]
    assert ok(api.get(P, query_string={"name": "nobody"}))["items"] == []


def test_a_name_filter_pages_like_any_list(api):
    made = [api.start(("noop", {}), name="batch")["processId"] for _ in range(5)]
    api.start(("noop", {}), name="other")
    pages = api.walk(P, 2, name="batch")
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [p["processId"] for page in pages for p in page] == made[::-1]


def at(minutes):
    return datetime(2024, 3, 1, 12, 0, tzinfo=UTC) + timedelta(minutes=minutes)


@pytest.fixture
def timed(db_path, app):
    """Processes created at 12:00, 12:10, 12:20 and 12:30 UTC on 2024-03-01: {minutes: id}."""
    return {m: insert_finished_processes(db_path, 1, "COMPLETED", at(m))[0] for m in (0, 10, 20, 30)}


def test_processes_are_found_by_creation_time_strictly_and_newest_first(api, timed):
    def listed(**query):
        return ids(ok(api.get(P, query_string=query)))

    assert listed(createdAfter=iso(at(10))) == [timed[30], timed[20]]
    assert listed(createdBefore=iso(at(20))) == [timed[10], timed[0]]
    assert listed(createdAfter=iso(at(0)), createdBefore=iso(at(30))) == [timed[20], timed[10]]
    assert listed(createdAfter=iso(at(5)), createdBefore=iso(at(25)), status="COMPLETED") == [timed[20], timed[10]]
    assert listed(createdAfter=iso(at(30))) == []
    assert listed(createdAfter=iso(at(20)), createdBefore=iso(at(10))) == []  # an empty window is no error


def test_creation_times_are_read_with_their_offset(api, timed):
    # 14:15 at +02:00 is 12:15 UTC; 07:05 at -05:00 is 12:05 UTC
    page = ok(
        api.get(
            P, query_string={"createdAfter": "2024-03-01T07:05:00-05:00", "createdBefore": "2024-03-01T14:15:00+02:00"}
        )
    )
    assert ids(page) == [timed[10]]


def test_a_time_window_pages_like_any_list(api, db_path):
    made = insert_finished_processes(db_path, 7, "COMPLETED", at(0))
    pages = api.walk(P, 3, createdBefore=iso(at(1)), createdAfter=iso(at(-1)))
    assert [len(page) for page in pages] == [3, 3, 1]
    assert sorted(p["processId"] for page in pages for p in page) == sorted(made)


# -- steps: processId, errorType --------------------------------------------------------------------------
def test_steps_are_found_by_their_process(api):
    mine = api.start(("noop", {}), ("check", {"ok": 0}), ("noop", {}))
    api.start(("noop", {}))
    api.wait_process(mine["processId"], "FAILED")
    listed = ok(api.get(STEPS, query_string={"processId": mine["processId"]}))
    assert step_ids(listed) == [s["processStepId"] for s in mine["steps"]][::-1]  # newest first, as ever
    failed = ok(api.get(STEPS, query_string={"processId": mine["processId"], "status": "FAILED"}))
    assert step_ids(failed) == [mine["steps"][1]["processStepId"]]
    assert ok(api.get(STEPS, query_string={"processId": "NoSuchProcess"}))["items"] == []


def test_steps_are_found_by_their_error_type(api):
    value_error = api.start(("check", {"ok": 0}))
    type_error = api.start(("sleep", {"seconds": "x"}))
    deferred = api.start(("external", {}))
    for process in (value_error, type_error):
        api.wait_process(process["processId"], "FAILED")
    api.wait_deferred(deferred["steps"][0]["processStepId"])
    external = api.post(f"{P}/fail-step", {"processStepId": deferred["steps"][0]["processStepId"]})
    assert external.status_code == 200

    def listed(**query):
        return step_ids(ok(api.get(STEPS, query_string=query)))

    assert listed(errorType="ValueError") == [value_error["steps"][0]["processStepId"]]
    assert listed(errorType="TypeError") == [type_error["steps"][0]["processStepId"]]
    assert listed(errorType="ExternalFailure", status="FAILED") == [deferred["steps"][0]["processStepId"]]
    assert listed(errorType="valueerror") == [] and listed(errorType="Value") == []  # exact


def test_a_skipped_or_cancelled_step_keeps_its_error_type(api):
    skipped = api.start(("check", {"ok": 0}), ("noop", {}))
    cancelled = api.start(("check", {"ok": 0}))
    for process in (skipped, cancelled):
        api.wait_process(process["processId"], "FAILED")
    ok(api.post(SKIP, {"processStepId": skipped["steps"][0]["processStepId"]}))
    ok(api.post(CANCEL, {"processId": cancelled["processId"]}))
    found = ok(api.get(STEPS, query_string={"errorType": "ValueError"}))["items"]
    assert {(s["processStepId"], s["status"]) for s in found} == {
        (skipped["steps"][0]["processStepId"], "SKIPPED"),
        (cancelled["steps"][0]["processStepId"], "CANCELLED"),
    }
    assert ok(api.get(STEPS, query_string={"errorType": "ValueError", "status": "FAILED"}))["items"] == []


# -- what the filters refuse ------------------------------------------------------------------------------
BAD_PROCESS_FILTERS = [
    ({"name": "n" * 1025}, {"name"}),
    ({"createdAfter": "yesterday"}, {"createdAfter"}),
    ({"createdAfter": "2024-03-01T12:00:00"}, {"createdAfter"}),  # no offset
    ({"createdBefore": "2024-13-01T12:00:00Z"}, {"createdBefore"}),
    ({"createdBefore": "0001-01-01T00:00:00+00:01"}, {"createdBefore"}),  # no UTC time
    ({"created_after": "2024-03-01T12:00:00Z"}, {"created_after"}),
    ({"status": "SKIPPED"}, {"status"}),  # a step's status, not a process's
]


@pytest.mark.parametrize(("query", "keys"), BAD_PROCESS_FILTERS, ids=[repr(q)[:40] for q, _ in BAD_PROCESS_FILTERS])
def test_a_bad_process_filter_is_412_naming_it(api, query, keys):
    assert set(refused(api.get(P, query_string=query))) == keys


BAD_STEP_FILTERS = [
    ({"processId": "a b"}, {"processId"}),
    ({"processId": "x" * 65}, {"processId"}),
    ({"errorType": "E" * 257}, {"errorType"}),
    ({"error_type": "E"}, {"error_type"}),
    ({"status": "RUNNING"}, {"status"}),
]


@pytest.mark.parametrize(("query", "keys"), BAD_STEP_FILTERS, ids=[repr(q)[:40] for q, _ in BAD_STEP_FILTERS])
def test_a_bad_step_filter_is_412_naming_it(api, query, keys):
    assert set(refused(api.get(STEPS, query_string=query))) == keys


def test_an_empty_filter_value_means_the_filter_is_absent(api):
    # issue 13: `?name=&createdAfter=` is what a script that fills in some names sends
    assert api.post(P, {"name": "one", "steps": [{"type": "noop"}]}).status_code == 201
    process_ids = [process["processId"] for process in ok(api.get(P))["items"]]
    assert len(process_ids) == 1
    filtered = ok(api.get(P, query_string={"name": "", "createdAfter": "", "createdBefore": ""}))["items"]
    assert [process["processId"] for process in filtered] == process_ids
    step_ids = [step["processStepId"] for step in ok(api.get(STEPS))["items"]]
    assert len(step_ids) == 1
    filtered = ok(api.get(STEPS, query_string={"processId": "", "errorType": ""}))["items"]
    assert [step["processStepId"] for step in filtered] == step_ids  # (its status may move meanwhile)


@pytest.mark.parametrize("status", ["RUNNING", "COMPLETED", "FAILED", "CANCELLED"])
def test_every_process_status_is_a_filter(api, status):
    assert ok(api.get(P, query_string={"status": status}))["items"] == []


@pytest.mark.parametrize("status", ["PENDING", "STARTED", "COMPLETED", "FAILED", "SKIPPED", "CANCELLED"])
def test_every_step_status_is_a_filter(api, status):
    assert ok(api.get(STEPS, query_string={"status": status}))["items"] == []
