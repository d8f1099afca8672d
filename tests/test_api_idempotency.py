"""Idempotency-Key on every POST: a repeat by the same principal with the same request within 24 hours
gets the first answer again (fresh timestamp) and does nothing; another request under the key is 412."""

import time

import pytest
from helpers import (
    BULK,
    COMPLETE,
    FAIL,
    RESTART,
    P,
    all_at_once,
    calls,
    db_rows,
    db_write,
    ok,
    parse_time,
    refused,
    typed,
    wait_for,
)

from stepd import schemas
from stepd import store as store_module

KEY = "Idempotency-Key"


def with_key(key, **headers):
    return {KEY: key, **headers}


def same_but_timestamp(first, second):
    a, b = dict(first.json), dict(second.json)
    assert a.pop("timestamp") and b.pop("timestamp")
    return a == b


def count_processes(db_path):
    return db_rows(db_path, "SELECT COUNT(*) FROM processes")[0][0]


def stored_keys(db_path):
    return db_rows(db_path, "SELECT principal, key, status FROM idempotent_requests ORDER BY principal, key")


def failed_count_step(api, counted):
    process = api.start(("count", {"file": str(counted), "fail": 1}), ("noop", {}))
    step = api.wait_process(process["processId"], "FAILED")["steps"][0]
    return process["processId"], step["processStepId"]


START = {"name": "once", "steps": [{"type": "noop", "params": typed(a=1, b="x")}]}


# -- replays -----------------------------------------------------------------------------------
def test_a_repeated_start_returns_the_first_answer_and_starts_nothing(api, db_path):
    first = api.post(P, START, headers=with_key("start-1"))
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    time.sleep(0.01)
    again = api.post(P, START, headers=with_key("start-1"))
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.mimetype == "application/json"
    assert same_but_timestamp(first, again)
    assert parse_time(again.json["timestamp"]) > parse_time(first.json["timestamp"])
    # byte for byte the first answer but for the timestamp, so scripts comparing bytes are served too
    stamps = [b'"timestamp":"' + answer.json["timestamp"].encode() + b'"' for answer in (first, again)]
    assert again.get_data() == first.get_data().replace(*stamps)  # (createdAt may hold the same time)
    assert again.headers["X-Request-Id"] and again.headers["X-Request-Id"] != first.headers["X-Request-Id"]
    assert count_processes(db_path) == 1
    # the replay is the first answer even though the process has moved on since
    process_id = first.json["data"]["processId"]
    api.wait_process(process_id, "COMPLETED")
    assert api.post(P, START, headers=with_key("start-1")).json["data"]["status"] == "RUNNING"
    assert stored_keys(db_path) == [("ops", "start-1", 201)]


def test_key_order_and_whitespace_of_the_body_do_not_matter(api, db_path):
    first = api.post_raw(P, b'{"name": "once", "steps": [{"type": "noop"}]}', headers=with_key("k"))
    again = api.post_raw(P, b'{\n  "steps":[ {"type":"noop"} ],\n  "name":"once"\n}', headers=with_key("k"))
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert same_but_timestamp(first, again)
    assert count_processes(db_path) == 1


@pytest.mark.parametrize(
    "other",
    [
        {"name": "twice", "steps": START["steps"]},
        {"name": "once", "steps": [{"type": "noop", "params": typed(a=2, b="x")}]},
        {"steps": START["steps"]},
    ],
    ids=["name", "param-value", "missing-field"],
)
def test_the_same_key_with_another_body_is_412_naming_the_key_and_does_nothing(api, db_path, other):
    first = api.post(P, START, headers=with_key("my-key"))
    assert first.status_code == 201
    data = refused(api.post(P, other, headers=with_key("my-key")))
    assert set(data) == {KEY}
    assert "'my-key'" in data[KEY][0]
    assert count_processes(db_path) == 1
    # the key still answers with its first response
    again = api.post(P, START, headers=with_key("my-key"))
    assert again.status_code == 201 and same_but_timestamp(first, again)


def test_the_same_key_on_another_path_or_query_is_412(api, db_path, tmp_path):
    _, step_id = failed_count_step(api, tmp_path / "calls.txt")
    ok(api.post(f"{RESTART}?dryRun=true", {"processStepId": step_id}, headers=with_key("k2")))
    data = refused(api.post(RESTART, {"processStepId": step_id}, headers=with_key("k2")))
    assert set(data) == {KEY}
    assert api.step(step_id)["status"] == "FAILED"  # the dry run's answer is not a real restart's
    data = refused(api.post(FAIL, {"processStepId": step_id}, headers=with_key("k2")))
    assert set(data) == {KEY}


def test_another_principal_has_its_own_keys(api, db_path, second_operator):
    mine = api.post(P, START, headers=with_key("shared"))
    theirs = api.post(P, START, headers=with_key("shared", **second_operator))
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert "Idempotent-Replayed" not in theirs.headers
    assert mine.json["data"]["processId"] != theirs.json["data"]["processId"]
    assert count_processes(db_path) == 2
    # within one principal, another body under its key is still a conflict
    assert api.post(P, {"steps": [{"type": "noop"}]}, headers=with_key("shared", **second_operator)).status_code == 412
    assert stored_keys(db_path) == [("ops", "shared", 201), ("ops2", "shared", 201)]


def test_a_412_is_stored_and_replayed_even_when_the_state_has_changed(api, db_path, tmp_path):
    counted = tmp_path / "calls.txt"
    process = api.start(("count", {"file": str(counted), "fail": 0}), ("external", {}))
    step_id = api.wait_process(process["processId"], "RUNNING")["steps"][0]["processStepId"]
    api.wait_step(step_id, "COMPLETED")
    first = api.post(RESTART, {"processStepId": step_id}, headers=with_key("r"))
    assert first.status_code == 412 and "status" in first.json["data"]
    # the step is FAILED now (made so straight in the file): a fresh request would restart it
    db_write(db_path, "UPDATE steps SET status = 'FAILED' WHERE id = ?", step_id)
    again = api.post(RESTART, {"processStepId": step_id}, headers=with_key("r"))
    assert again.status_code == 412
    assert again.headers["Idempotent-Replayed"] == "true"
    assert same_but_timestamp(first, again)
    assert api.step(step_id)["attempts"] == 1
    assert calls(counted) == [(step_id, 1)]


@pytest.mark.parametrize("action", ["restart", "bulk", "fail", "complete"])
def test_every_action_replays_and_does_nothing_again(api, db_path, tmp_path, action):
    counted = tmp_path / "calls.txt"
    if action in ("restart", "bulk"):
        _, step_id = failed_count_step(api, counted)
        path, body = (
            (RESTART, {"processStepId": step_id})
            if action == "restart"
            else (BULK, {"processStepIds": [step_id, "Unknown"]})
        )
    else:
        process = api.start(("external", {}), ("count", {"file": str(counted), "fail": 0}))
        step_id = process["steps"][0]["processStepId"]
        api.wait_deferred(step_id)
        path, body = (FAIL, {"processStepId": step_id}) if action == "fail" else (COMPLETE, {"processStepId": step_id})
    first = api.post(path, body, headers=with_key(f"{action}-once"))
    assert first.status_code == 200, first.json
    if action in ("restart", "bulk"):
        wait_for(lambda: len(calls(counted)) == 2 and api.step(step_id)["status"] == "FAILED", what="the restart")
    if action == "complete":
        wait_for(lambda: len(calls(counted)) == 1, what="the next step")
    before = api.step(step_id)
    again = api.post(path, body, headers=with_key(f"{action}-once"))
    assert again.status_code == 200, again.json  # a fresh call would be 412 (or restart again)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert same_but_timestamp(first, again)
    time.sleep(0.1)
    assert api.step(step_id) == before
    assert len(calls(counted)) == (2 if action in ("restart", "bulk") else 1 if action == "complete" else 0)


# -- the key itself ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key",
    ["", "x" * 256, "tab\there", "caf\u00e9", "del\x7f", "nul\x00"],
    ids=["empty", "256", "tab", "e", "del", "nul"],
)
def test_a_bad_key_is_412_and_nothing_is_done(api, db_path, key):
    response = api.client.post(P, json=START, headers={**api.headers, KEY: key})
    data = refused(response)
    assert set(data) == {KEY}
    assert count_processes(db_path) == 0
    assert stored_keys(db_path) == []


@pytest.mark.parametrize("key", ["a", "x" * 255, " !~ key with spaces and {}[] ~"], ids=["1", "255", "printable"])
def test_keys_of_1_to_255_printable_characters_are_accepted(api, db_path, key):
    first = api.post(P, START, headers=with_key(key))
    again = api.post(P, START, headers=with_key(key))
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert count_processes(db_path) == 1


def test_get_ignores_the_header(api):
    response = api.get(P, headers=with_key(""))
    assert response.status_code == 200
    assert "Idempotent-Replayed" not in response.headers


def test_without_a_key_every_post_does_its_work(api, db_path):
    assert api.post(P, START).status_code == 201
    assert api.post(P, START).status_code == 201
    assert count_processes(db_path) == 2
    assert stored_keys(db_path) == []


def test_401_and_403_are_not_stored(client, api, reader_api, db_path):
    assert client.post(P, json=START, headers=with_key("k")).status_code == 401
    assert reader_api.post(P, START, headers=with_key("k")).status_code == 403
    assert stored_keys(db_path) == []
    assert api.post(P, START, headers=with_key("k")).status_code == 201


def test_a_5xx_is_not_stored_and_what_it_did_is_undone(api, db_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug after the change")

    monkeypatch.setattr(schemas.ProcessSchema, "dump", broken)
    response = api.post(P, START, headers=with_key("k500"))
    assert response.status_code == 500
    assert count_processes(db_path) == 0  # the process it inserted was rolled back with the answer
    assert stored_keys(db_path) == []
    monkeypatch.undo()
    again = api.post(P, START, headers=with_key("k500"))
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    assert count_processes(db_path) == 1
    api.wait_process(again.json["data"]["processId"], "COMPLETED")


def test_an_answer_expires_after_the_window(api, db_path, monkeypatch):
    first = api.post(P, START, headers=with_key("old"))
    monkeypatch.setattr(store_module, "ANSWER_KEPT_SECONDS", 0.3)
    assert api.post(P, START, headers=with_key("old")).headers.get("Idempotent-Replayed") == "true"
    time.sleep(0.4)
    fresh = api.post(P, START, headers=with_key("old"))
    assert fresh.status_code == 201 and "Idempotent-Replayed" not in fresh.headers
    assert fresh.json["data"]["processId"] != first.json["data"]["processId"]
    assert count_processes(db_path) == 2
    # the new answer replaces the old one
    replay = api.post(P, START, headers=with_key("old"))
    assert replay.json["data"]["processId"] == fresh.json["data"]["processId"]


def test_24_hours_is_the_window(api, db_path):
    assert store_module.ANSWER_KEPT_SECONDS == 24 * 3600
    api.post(P, START, headers=with_key("day-old"))
    api.post(P, START, headers=with_key("almost-a-day"))
    now = time.time()
    db_write(db_path, "UPDATE idempotent_requests SET created_at = ? WHERE key = 'day-old'", now - 24 * 3600 - 5)
    db_write(db_path, "UPDATE idempotent_requests SET created_at = ? WHERE key = 'almost-a-day'", now - 24 * 3600 + 60)
    assert api.post(P, START, headers=with_key("almost-a-day")).headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in api.post(P, START, headers=with_key("day-old")).headers
    assert count_processes(db_path) == 3


def test_old_answers_are_purged(api, store, db_path):
    api.post(P, START, headers=with_key("keep"))
    api.post(P, START, headers=with_key("purge"))
    db_write(db_path, "UPDATE idempotent_requests SET created_at = created_at - 90000 WHERE key = 'purge'")
    assert store.forget_answers() == 1
    assert [key for _, key, _ in stored_keys(db_path)] == ["keep"]
    assert store.forget_answers() == 0


# -- concurrent repeats ------------------------------------------------------------------------------
def race(app, count, path, body, headers):
    return all_at_once(count, lambda _: app.test_client().post(path, json=body, headers=headers))


def test_16_concurrent_repeats_of_a_restart_restart_once(app, api, db_path, tmp_path):
    counted = tmp_path / "calls.txt"
    process_id, step_id = failed_count_step(api, counted)
    answers = race(app, 16, RESTART, {"processStepId": step_id}, with_key("race", **api.headers))
    assert [a.status_code for a in answers] == [200] * 16
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 15
    assert all(same_but_timestamp(answers[0], a) for a in answers)
    assert answers[0].json["data"]["processStepId"] == step_id
    step = api.wait_step(step_id, "FAILED")
    wait_for(lambda: len(calls(counted)) == 2, what="the one restart's call")
    time.sleep(0.2)
    assert calls(counted) == [(step_id, 1), (step_id, 2)]
    step = api.step(step_id)
    assert step["attempts"] == 2
    assert [a["trigger"] for a in step["attemptHistory"]] == ["start", "restart"]
    assert db_rows(db_path, "SELECT COUNT(*) FROM attempts WHERE step_id = ?", step_id) == [(2,)]


def test_16_concurrent_repeats_of_a_start_start_one_process(app, api, db_path):
    answers = race(app, 16, P, START, with_key("race-start", **api.headers))
    assert [a.status_code for a in answers] == [201] * 16
    assert all(same_but_timestamp(answers[0], a) for a in answers)
    assert count_processes(db_path) == 1


# -- answers that decided nothing are not kept -------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b'{"steps": [{"type": "noop"}]}', "text/plain"),  # the Content-Type was wrong
        (b'{"steps": []}', "application/json"),  # the body did not validate
        (b"not json", "application/json"),
    ],
)
def test_a_refusal_of_unreadable_input_is_not_kept_so_the_corrected_request_goes_through(
    api, db_path, raw, content_type
):
    first = api.post_raw(P, raw, content_type, headers=with_key("fix"))
    assert first.status_code == 412 and "Idempotent-Replayed" not in first.headers
    assert stored_keys(db_path) == []
    corrected = api.post(P, START, headers=with_key("fix"))
    assert corrected.status_code == 201 and "Idempotent-Replayed" not in corrected.headers
    assert count_processes(db_path) == 1
    assert api.post(P, START, headers=with_key("fix")).headers["Idempotent-Replayed"] == "true"


def test_a_413_is_not_kept(api, db_path):
    huge = b'{"name": "' + b"x" * (1024 * 1024) + b'", "steps": [{"type": "noop"}]}'
    first = api.post_raw(P, huge, headers=with_key("big"))
    assert first.status_code == 413
    assert stored_keys(db_path) == []


def test_a_full_disk_under_a_key_is_503_like_without_one(api, store, db_path):
    # SQLite rolls the whole transaction back on a full disk, savepoints included; the error the
    # client sees must still be the full disk's 503, not a 500 about a missing savepoint.
    conn = store.db.write_connection()  # every write of this process runs on it
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 5}")
    big = {"steps": [{"type": "noop", "params": typed(blob="x" * 60000)}]}
    try:
        with_key_answer = api.post(P, big, headers=with_key("full"))
        without_key = api.post(P, big)
    finally:
        conn.execute("PRAGMA max_page_count = 1073741823")
    assert (with_key_answer.status_code, without_key.status_code) == (503, 503)
    assert with_key_answer.headers["Retry-After"] and without_key.headers["Retry-After"]
    assert stored_keys(db_path) == [] and count_processes(db_path) == 0
    assert api.post(P, big, headers=with_key("full")).status_code == 201  # space again: it goes through
