"""stepd as it runs: real gunicorn processes on loopback, killed, stopped and started again.

These tests hold the service to SPEC sections 5-8 (with test_served_startup.py, which starts it:
refusals, the first token, settings, `make run`): exactly-once restarts across worker processes,
steps interrupted by a crash (of the service or of one worker), a clean stop that loses nothing;
retries, Idempotency-Key, bulk restart and dry run with two workers on one file and across a stop.
"""

import os
import signal
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import pytest
import requests
from helpers import (
    BULK,
    COMPLETE,
    DELEGATES,
    FAIL,
    RESTART,
    STEPS,
    P,
    all_at_once,
    calls,
    db_rows,
    ok,
    parse_time,
    typed,
    wait_for,
)

GRACEFUL_TIMEOUT = 15  # gunicorn.conf.py graceful_timeout


def test_gunicorn_serves(served):
    assert served.get(DELEGATES).status_code == 200


# -- exactly once across worker processes ----------------------------------------------------------
def test_concurrent_restarts_from_many_threads_win_exactly_once(server_factory, tmp_path, gated_delegates):
    server = server_factory(workers=2, runners=2, delegates=gated_delegates).start()
    assert len(server.worker_pids()) == 1 and len(server.runner_pids()) == 2  # one HTTP process: the node

    call_log = tmp_path / "calls.txt"
    gate = tmp_path / "gate"
    gate.touch()  # the first attempt fails at once
    process = server.start_process(("gated_count", {"file": str(call_log), "gate": str(gate), "fail": 1}), ("noop", {}))
    step_id = process["steps"][0]["processStepId"]
    failed = server.wait_step(step_id, "FAILED")
    assert failed["attempts"] == 1
    assert len(calls(call_log)) == 1

    winners = []  # the runner process that ran the winning attempt, per round
    for round_number in range(5):
        before = server.step(step_id)
        assert before["status"] == "FAILED"
        gate.unlink()  # the winning attempt will stay STARTED until the gate opens
        responses = race(server, 16, RESTART, {"processStepId": step_id})

        codes = sorted(r.status_code for r in responses)
        assert codes == [200] + [412] * 15, f"round {round_number}: {codes}"
        winner = next(r for r in responses if r.status_code == 200).json()["data"]
        assert winner["processStepId"] == step_id
        assert winner["processId"] == process["processId"]
        assert winner["params"]["fail"] == {"strValue": None, "longValue": 1, "doubleValue": None, "type": "LONG"}
        for response in responses:
            if response.status_code == 412:
                body = response.json()
                assert body["message"] == "Precondition failed"
                assert set(body["data"]) == {"status"}, body
                assert all(isinstance(m, str) for m in body["data"]["status"])
                assert "STARTED" in body["data"]["status"][0], body
            assert response.headers.get("X-Request-Id")

        # The winner's delegate was called once; while the gate is shut nothing else can run.
        expected_calls = before["attempts"] + 1
        wait_for(lambda n=expected_calls: len(calls(call_log)) >= n, what="the winner's delegate call")
        running = server.step(step_id)
        assert running["status"] == "STARTED"
        assert running["attempts"] == before["attempts"] + 1
        assert len(running["attemptHistory"]) == len(before["attemptHistory"]) + 1
        assert running["attemptHistory"][-1]["trigger"] == "restart"
        assert running["attemptHistory"][-1]["principal"] == "env"
        winners.append(runner_pid(server, step_id))

        gate.touch()
        after = server.wait_step(step_id, "FAILED")
        assert after["attempts"] == before["attempts"] + 1
        assert [a["attempt"] for a in after["attemptHistory"]] == list(range(1, after["attempts"] + 1))
        assert after["attemptHistory"][-1]["status"] == "FAILED"
        assert after["error"] == {"type": "RuntimeError", "message": "gated_count failed on purpose"}
        assert len(calls(call_log)) == before["attempts"] + 1 == after["attempts"]

    # Two runner processes claim from the one file, requests come through two workers, and
    # each call is one attempt.
    final = server.step(step_id)
    assert final["attempts"] == 6
    attempts_called = sorted(int(line.split()[1]) for line in call_log.read_text().splitlines())
    assert attempts_called == [1, 2, 3, 4, 5, 6]
    runner_pids = {pid for (pid,) in db_rows(server.env["STEPD_DB"], "SELECT pid FROM runners")}
    assert runner_pids == set(server.runner_pids())
    assert set(winners) <= runner_pids
    assert server.process(process["processId"])["status"] == "FAILED"


# -- kill -9 of the whole service ------------------------------------------------------------------
def test_kill_of_the_service_interrupts_running_steps_but_not_deferred_ones(server_factory, tmp_path, gated_delegates):
    db = tmp_path / "served.db"
    first = server_factory(db_path=db, delegates=gated_delegates).start()
    release = tmp_path / "release"
    running = first.start_process(("wait", {"file": str(release), "seconds": 60.0}), ("noop", {}))
    deferred = first.start_process(("external", {}), ("noop", {}))
    # A second running step whose delegate call is counted: it must not run again by itself.
    call_log, gate = tmp_path / "calls.txt", tmp_path / "gate"
    counted = first.start_process(("gated_count", {"file": str(call_log), "gate": str(gate), "fail": 0}))
    running_step = running["steps"][0]["processStepId"]
    deferred_step = deferred["steps"][0]["processStepId"]
    counted_step = counted["steps"][0]["processStepId"]
    assert first.step(running_step)["status"] == "STARTED"
    wait_for(lambda: first.step(deferred_step)["deferred"], what="the external step to defer")
    wait_for(lambda: len(calls(call_log)) == 1, what="the counted delegate to be running")

    first.kill()
    # What the file says right after the crash: the steps are STARTED, one deferred.
    rows = dict(db_rows(db, "SELECT id, status || ':' || deferred FROM steps WHERE position = 0"))
    assert rows == {running_step: "STARTED:0", deferred_step: "STARTED:1", counted_step: "STARTED:0"}

    second = server_factory(db_path=db, delegates=gated_delegates)
    started_at = time.monotonic()
    second.start()
    interrupted = wait_for(
        lambda: (s := second.step(running_step))["status"] == "FAILED" and s,
        timeout=10 - (time.monotonic() - started_at),
        what="the step of the killed service to be Interrupted",
    )
    took = time.monotonic() - started_at
    assert took < 10, took
    assert interrupted["error"]["type"] == "Interrupted"
    assert interrupted["attempts"] == 1
    assert [(a["attempt"], a["status"], a["error"]["type"]) for a in interrupted["attemptHistory"]] == [
        (1, "FAILED", "Interrupted")
    ]
    assert second.process(running["processId"])["status"] == "FAILED"
    assert second.wait_step(counted_step, "FAILED", timeout=2)["error"]["type"] == "Interrupted"
    assert len(calls(call_log)) == 1  # interrupted, not called again

    # Restart it; this time the file is there, so the process carries on and completes.
    release.touch()
    restarted = second.post(RESTART, {"processStepId": running_step})
    assert restarted.status_code == 200, restarted.text
    done = second.wait_process(running["processId"], "COMPLETED")
    assert [s["status"] for s in done["steps"]] == ["COMPLETED", "COMPLETED"]
    history = second.step(running_step)["attemptHistory"]
    assert [(a["trigger"], a["status"]) for a in history] == [("start", "FAILED"), ("restart", "COMPLETED")]

    gate.touch()
    assert second.post(RESTART, {"processStepId": counted_step}).ok
    second.wait_process(counted["processId"], "COMPLETED")
    assert [line.split() for line in call_log.read_text().splitlines()] == [[counted_step, "1"], [counted_step, "2"]]

    # The deferred step is still waiting well after every orphan would have been reaped.
    remaining = 7.5 - (time.monotonic() - started_at)
    if remaining > 0:
        time.sleep(remaining)  # proving that something did NOT happen
    waiting = second.step(deferred_step)
    assert (waiting["status"], waiting["deferred"], waiting["error"], waiting["attempts"]) == ("STARTED", True, None, 1)
    assert second.process(deferred["processId"])["status"] == "RUNNING"
    completed = second.post(COMPLETE, {"processStepId": deferred_step})
    assert completed.status_code == 200, completed.text
    assert completed.json()["data"]["status"] == "COMPLETED"
    second.wait_process(deferred["processId"], "COMPLETED")


# -- kill -9 of one runner -------------------------------------------------------------------------
def test_kill_of_one_runner_interrupts_only_its_steps(server_factory, tmp_path):
    db = tmp_path / "served.db"
    server = server_factory(db_path=db, workers=2, runners=2, threads=8).start()
    release = tmp_path / "release"
    steps = []  # step ids of the `wait` steps

    def holders():
        rows = db_rows(
            db,
            "SELECT s.id, r.pid FROM steps s JOIN runners r ON r.id = s.runner_id"
            " WHERE s.type = 'wait' AND s.status = 'STARTED'",
        )
        return dict(rows)

    def spread():
        return len(set(holders().values())) == 2 and all(
            list(holders().values()).count(pid) >= 2 for pid in set(holders().values())
        )

    # Start processes from several threads at once until both runners hold some steps.
    for _ in range(40):  # both runners race to claim each: keep trying until both hold steps
        batch = [None] * 4

        def start_one(index, batch=batch):
            batch[index] = server.start_process(("wait", {"file": str(release), "seconds": 60.0}), ("noop", {}))

        threads = [threading.Thread(target=start_one, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        steps += [p["steps"][0]["processStepId"] for p in batch]
        if len(steps) >= 8 and spread():
            break
    # The last batch's steps may still be queued (claimed a moment later): wait for every one.
    wait_for(lambda: set(holders()) == set(steps), what="every started step to be claimed")
    held = holders()
    assert set(held) == set(steps)
    assert set(held.values()) == set(server.runner_pids()), "both runners should hold steps"
    assert spread(), f"steps did not spread over both runners: {held}"

    victim = next(iter(held.values()))
    victim_steps = {s for s, pid in held.items() if pid == victim}
    survivor_steps = set(held) - victim_steps
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    def victims_failed():
        found = {s: server.step(s) for s in victim_steps}
        return all(s["status"] == "FAILED" for s in found.values()) and found

    failed = wait_for(victims_failed, timeout=10, interval=0.1, what="the killed runner's steps to be Interrupted")
    assert time.monotonic() - killed_at < 10
    for step in failed.values():
        assert step["error"]["type"] == "Interrupted", step
        assert step["attempts"] == 1
    statuses = {s: server.step(s)["status"] for s in survivor_steps}
    assert set(statuses.values()) == {"STARTED"}, statuses

    # The supervisor brings a new runner; the service kept answering throughout.
    wait_for(lambda: len(pids := server.runner_pids()) == 2 and victim not in pids, what="a respawned runner")
    # The dead runner is forgotten; the new runner is known.
    wait_for(
        lambda: {p for (p,) in db_rows(db, "SELECT pid FROM runners")} == set(server.runner_pids()),
        what="the runners table to list the living runners",
    )
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    fresh = server.start_process(("noop", {}))
    server.wait_process(fresh["processId"], "COMPLETED")
    time.sleep(1.5)  # a few more heartbeats: the living runner's steps are still left alone
    assert {server.step(s)["status"] for s in survivor_steps} == {"STARTED"}

    # The survivors' delegates were never disturbed: they finish once the file appears;
    # the interrupted steps can be restarted and finish too.
    release.touch()
    for step_id in survivor_steps:
        server.wait_step(step_id, "COMPLETED")
    for step_id in victim_steps:
        response = server.post(RESTART, {"processStepId": step_id})
        assert response.status_code == 200, response.text
    for step_id in victim_steps:
        completed = server.wait_step(step_id, "COMPLETED")
        assert completed["attempts"] == 2
    for step_id in steps:
        server.wait_process(server.step(step_id)["processId"], "COMPLETED")


def test_kill_of_the_only_runner_interrupts_its_steps_after_the_respawn(server_factory, tmp_path):
    """With one runner there is no other: the respawned runner must reap the dead one's steps."""
    server = server_factory(workers=1, runners=1).start()
    (victim,) = server.runner_pids()
    process = server.start_process(("wait", {"file": str(tmp_path / "never"), "seconds": 60.0}), ("noop", {}))
    step_id = process["steps"][0]["processStepId"]
    assert wait_for(lambda: runner_pid(server, step_id), what="the runner to claim it") == victim
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: server.runner_pids() not in ([], [victim]), what="a respawned runner")
    failed = wait_for(
        lambda: (s := server.step(step_id))["status"] == "FAILED" and s,
        timeout=10 - (time.monotonic() - killed_at),
        interval=0.1,
        what="the dead runner's step to be Interrupted",
    )
    assert time.monotonic() - killed_at < 10
    assert failed["error"]["type"] == "Interrupted"
    assert server.process(process["processId"])["status"] == "FAILED"


# -- SIGTERM and start again -----------------------------------------------------------------------
def test_sigterm_and_start_again_keeps_every_process_step_and_attempt(server_factory, tmp_path):
    db = tmp_path / "served.db"
    first = server_factory(db_path=db).start()

    completed = [first.start_process(("noop", {}), ("echo", {"a": "x", "b": 2})) for _ in range(3)]
    completed.append(first.start_process(("results", {}), name="with results"))
    failed = first.start_process(("noop", {}), ("check", {"ok": 0}), ("noop", {}), name="failed")
    restarted = first.start_process(("check", {"ok": 0, "ratio": 0.25}), ("noop", {}), name="restarted")
    failed_twice = first.start_process(("fail", {"message": "no luck"}))
    deferred = first.start_process(("external", {}), ("noop", {}), name="deferred")
    aborted = first.start_process(("external", {}))
    for process in completed:
        first.wait_process(process["processId"], "COMPLETED")
    first.wait_process(failed["processId"], "FAILED")
    step = first.wait_process(restarted["processId"], "FAILED")["steps"][0]["processStepId"]
    assert first.post(RESTART, {"processStepId": step, "params": typed(ok=1)}).ok
    first.wait_process(restarted["processId"], "COMPLETED")
    step = first.wait_process(failed_twice["processId"], "FAILED")["steps"][0]["processStepId"]
    assert first.post(RESTART, {"processStepId": step}).ok
    wait_for(lambda: first.step(step)["attempts"] == 2 and first.step(step)["status"] == "FAILED")
    for process in (deferred, aborted):
        wait_for(lambda p=process: first.step(p["steps"][0]["processStepId"])["deferred"], what="defer")
    aborted_step = aborted["steps"][0]["processStepId"]
    assert first.post(FAIL, {"processStepId": aborted_step}).ok
    first.wait_process(aborted["processId"], "FAILED")

    before = snapshot(first)
    assert len(before["processes"]) == 9
    assert sum(len(s["attemptHistory"]) for s in before["steps"].values()) >= 15

    # A step whose delegate is running when the service is told to stop.
    running = first.start_process(("wait", {"file": str(tmp_path / "never"), "seconds": 60.0}), ("noop", {}))
    running_step = running["steps"][0]["processStepId"]
    assert first.step(running_step)["status"] == "STARTED"

    stopping = time.monotonic()
    code = first.stop(timeout=GRACEFUL_TIMEOUT + 15)
    took = time.monotonic() - stopping
    assert code == 0, first.output()
    assert took < GRACEFUL_TIMEOUT, took
    # The stop itself (not the next start) marked the running step, in the file.
    row = db_rows(db, "SELECT status, error_type, error_message FROM steps WHERE id = ?", running_step)[0]
    assert row[:2] == ("FAILED", "Interrupted"), row
    assert db_rows(db, "SELECT status FROM processes WHERE id = ?", running["processId"]) == [("FAILED",)]

    second = server_factory(db_path=db).start()
    after = snapshot(second, skip_process=running["processId"])
    assert after["processes"] == before["processes"]
    assert after["details"] == before["details"]
    assert after["steps"] == before["steps"]
    assert after["step_pages"] == before["step_pages"]

    interrupted = second.step(running_step)
    assert interrupted["status"] == "FAILED"
    assert interrupted["error"]["type"] == "Interrupted"
    assert [(a["status"], a["error"]["type"]) for a in interrupted["attemptHistory"]] == [("FAILED", "Interrupted")]
    assert second.process(running["processId"])["status"] == "FAILED"
    # The deferred step survived the stop as it was and can still be completed.
    deferred_step = deferred["steps"][0]["processStepId"]
    assert second.post(COMPLETE, {"processStepId": deferred_step}).ok
    second.wait_process(deferred["processId"], "COMPLETED")


# -- retries and Idempotency-Key: two workers on one file, a retry schedule that outlives a stop ------
def test_idempotent_repeats_across_two_workers_do_the_work_once(served, tmp_path):
    server = served
    db = server.env["STEPD_DB"]
    counted = tmp_path / "calls.txt"
    name = f"start-once-{uuid.uuid4().hex}"  # the shared service holds other tests' processes: count by name

    started = race(server, 16, P, {"name": name, "steps": [{"type": "noop"}]}, {"Idempotency-Key": "start-once"})
    assert [r.status_code for r in started] == [201] * 16
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in started) == 15
    assert len({str(without_timestamp(r)) for r in started}) == 1
    assert db_rows(db, "SELECT COUNT(*) FROM processes WHERE name = ?", name) == [(1,)]

    process = server.start_process(("count", {"file": str(counted), "fail": 1}))
    step_id = server.wait_step(process["steps"][0]["processStepId"], "FAILED")["processStepId"]
    for round_number in range(3):  # each round its own key: one restart per round, whatever the repeats
        restarted = race(
            server, 16, RESTART, {"processStepId": step_id}, {"Idempotency-Key": f"restart-{round_number}"}
        )
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
    server = server_factory(workers=2, runners=2, threads=4).start()
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


def test_bulk_restart_and_dry_run_answer_under_gunicorn(served):
    server = served
    process = server.start_process(("check", {"ok": 0}))
    step_id = server.wait_step(process["steps"][0]["processStepId"], "FAILED")["processStepId"]
    # The shared service holds other tests' failed `check` steps: the filter names this process too.
    dry = ok(server.post(f"{BULK}?dryRun=true", {"filter": {"type": "check", "processId": process["processId"]}}))
    assert [r["processStepId"] for r in dry["restarted"]] == [step_id]
    assert server.step(step_id)["attempts"] == 1
    real = server.post(BULK, {"processStepIds": [step_id], "params": {"ok": {"type": "LONG", "longValue": 1}}})
    assert [r["processStepId"] for r in ok(real)["restarted"]] == [step_id]
    server.wait_process(process["processId"], "COMPLETED")


# -- helpers ---------------------------------------------------------------------------------------
def race(server, count, path, body, headers=None):
    """`count` POSTs of one body to `path` from as many threads, released together; their responses."""
    headers = {**server.headers(), **(headers or {})}
    return all_at_once(count, lambda _: requests.post(server.url + path, json=body, headers=headers, timeout=30))


def without_timestamp(response):
    body = response.json()
    assert body.pop("timestamp")
    return body


def runner_pid(server, step_id):
    """The pid of the runner process that holds the step."""
    rows = db_rows(
        server.env["STEPD_DB"], "SELECT r.pid FROM steps s JOIN runners r ON r.id = s.runner_id WHERE s.id = ?", step_id
    )
    return rows[0][0] if rows else None


def snapshot(server, skip_process=None):
    """What the API says about every process and step, leaving out one process."""
    processes = [p for page in server.walk(P, 2) for p in page]
    processes = [p for p in processes if p["processId"] != skip_process]
    details = {p["processId"]: server.process(p["processId"]) for p in processes}
    steps = {s["processStepId"]: server.step(s["processStepId"]) for d in details.values() for s in d["steps"]}
    listed = [s for page in server.walk(STEPS, 3) for s in page]
    step_pages = [s for s in listed if s["processId"] != skip_process]
    return {"processes": processes, "details": details, "steps": steps, "step_pages": step_pages}
