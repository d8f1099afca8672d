"""Retries and Idempotency-Key under real gunicorn: two worker processes on one file, and a retry
schedule that outlives a stop (SIGTERM) or a crash (SIGKILL) of the whole service."""

import time
from collections import Counter
from datetime import UTC, datetime

import pytest
import requests
from helpers import BULK, RESTART, P, all_at_once, calls, db_rows, ok, parse_time, wait_for

pytestmark = pytest.mark.slow


def race(server, count, path, body, key):
    headers = {**server.headers(), "Idempotency-Key": key}
    return all_at_once(count, lambda _: requests.post(server.url + path, json=body, headers=headers, timeout=30))


def without_timestamp(response):
    body = response.json()
    assert body.pop("timestamp")
    return body


def test_idempotent_repeats_across_two_workers_do_the_work_once(server_factory, tmp_path):
    server = server_factory(workers=2).start()
    db = server.env["STEPD_DB"]
    counted = tmp_path / "calls.txt"

    started = race(server, 16, P, {"steps": [{"type": "noop"}]}, "start-once")
    assert [r.status_code for r in started] == [201] * 16
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in started) == 15
    assert len({str(without_timestamp(r)) for r in started}) == 1
    assert db_rows(db, "SELECT COUNT(*) FROM processes") == [(1,)]

    process = server.start_process(("count", {"file": str(counted), "fail": 1}))
    step_id = server.wait_step(process["steps"][0]["processStepId"], "FAILED")["processStepId"]
    for round_number in range(3):  # each round its own key: one restart per round, whatever the repeats
        restarted = race(server, 16, RESTART, {"processStepId": step_id}, f"restart-{round_number}")
        assert [r.status_code for r in restarted] == [200] * 16
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in restarted) == 15
        assert len({str(without_timestamp(r)) for r in restarted}) == 1
        wait_for(lambda n=round_number: len(calls(counted)) == n + 2, what="the round's one call")
        server.wait_step(step_id, "FAILED")
    time.sleep(0.3)
    assert calls(counted) == [(step_id, n) for n in (1, 2, 3, 4)]
    history = server.step(step_id)["attemptHistory"]
    assert [(a["trigger"], a["principal"]) for a in history] == [("start", "env")] + [("restart", "env")] * 3
    # the first answer is there for any worker later on
    again = server.post(RESTART, {"processStepId": step_id}, headers={"Idempotency-Key": "restart-0"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"


def test_an_idempotent_answer_outlives_a_restart_of_the_service(server_factory, tmp_path):
    db = tmp_path / "served.db"
    first = server_factory(db_path=db).start()
    body = {"name": "once", "steps": [{"type": "noop"}]}
    key = {"Idempotency-Key": "across-restarts"}
    answer = first.post(P, body, headers=key)
    assert answer.status_code == 201
    first.stop()
    second = server_factory(db_path=db).start()
    replay = second.post(P, body, headers=key)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert without_timestamp(replay) == without_timestamp(answer)
    other = second.post(P, {"steps": [{"type": "noop"}]}, headers=key)
    assert other.status_code == 412 and set(other.json()["data"]) == {"Idempotency-Key"}
    assert db_rows(db, "SELECT COUNT(*) FROM processes") == [(1,)]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_retry_schedule_survives_a_stop_of_the_service_and_runs_once(server_factory, tmp_path, how):
    db = tmp_path / "served.db"
    counted = tmp_path / "calls.txt"
    first = server_factory(db_path=db, workers=2).start()
    # retry_later: one retry, 1-2 s after the failure; attempt 2 succeeds
    process = first.start_process(("retry_later", {"file": str(counted), "pass_at": 2}), ("noop", {}))
    step_id = process["steps"][0]["processStepId"]
    waiting = wait_for(
        lambda: (s := first.step(step_id))["nextRetryAt"] and s, interval=0.02, what="the retry to be scheduled"
    )
    first.kill() if how == "SIGKILL" else first.stop()
    stopped_at = datetime.now(UTC)
    rows = db_rows(db, "SELECT status, attempts, next_retry_at, runner_id FROM steps WHERE id = ?", step_id)
    assert rows == [("STARTED", 1, waiting["nextRetryAt"], None)]  # still waiting in the file
    assert calls(counted) == [(step_id, 1)]

    second = server_factory(db_path=db, workers=2)
    second.start()
    done = second.wait_process(process["processId"], "COMPLETED", timeout=15)
    assert [s["status"] for s in done["steps"]] == ["COMPLETED", "COMPLETED"]
    time.sleep(0.5)
    assert calls(counted) == [(step_id, 1), (step_id, 2)]  # retried once, by one worker
    step = second.step(step_id)
    assert [(a["attempt"], a["trigger"], a["principal"], a["status"]) for a in step["attemptHistory"]] == [
        (1, "start", "env", "FAILED"),
        (2, "retry", "env", "COMPLETED"),
    ]
    retry_began = parse_time(step["attemptHistory"][1]["startedAt"])
    assert retry_began >= parse_time(waiting["nextRetryAt"])
    assert retry_began > stopped_at  # by the new service, not the old one


def test_retries_run_exactly_once_with_two_workers(server_factory, tmp_path):
    server = server_factory(workers=2, threads=4).start()
    counted = tmp_path / "calls.txt"
    step_ids = []
    for _ in range(20):  # retry_count: 3 retries after 0.05-0.1, 0.1-0.2 and 0.15-0.3 s; always fails
        step_ids.append(server.start_process(("retry_count", {"file": str(counted)}))["steps"][0]["processStepId"])
    wait_for(
        lambda: db_rows(server.env["STEPD_DB"], "SELECT COUNT(*) FROM steps WHERE status = 'FAILED'") == [(20,)],
        timeout=30,
        what="every step to spend its retries",
    )
    time.sleep(0.5)
    seen = Counter(calls(counted))
    assert [pair for pair, n in seen.items() if n > 1] == []  # no attempt called twice
    assert sorted(seen) == sorted((step_id, n) for step_id in step_ids for n in (1, 2, 3, 4))
    for step_id in step_ids[:3]:
        step = server.step(step_id)
        assert [a["trigger"] for a in step["attemptHistory"]] == ["start", "retry", "retry", "retry"]


def test_bulk_restart_and_dry_run_answer_under_gunicorn(server_factory, tmp_path):
    server = server_factory(workers=2).start()
    process = server.start_process(("check", {"ok": 0}))
    step_id = server.wait_step(process["steps"][0]["processStepId"], "FAILED")["processStepId"]
    dry = ok(server.post(f"{BULK}?dryRun=true", {"filter": {"type": "check"}}))
    assert [r["processStepId"] for r in dry["restarted"]] == [step_id]
    assert server.step(step_id)["attempts"] == 1
    real = server.post(BULK, {"processStepIds": [step_id], "params": {"ok": {"type": "LONG", "longValue": 1}}})
    assert [r["processStepId"] for r in ok(real)["restarted"]] == [step_id]
    server.wait_process(process["processId"], "COMPLETED")
