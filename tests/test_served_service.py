"""stepd as it runs: real gunicorn processes on loopback, killed, stopped and started again.

These tests hold the service to SPEC sections 5-8: exactly-once restarts across worker
processes, steps interrupted by a crash (of the service or of one worker), a clean stop
that loses nothing, refusals at start, the first token, the settings, and `make run`.
"""

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from helpers import (
    COMPLETE,
    FAIL,
    GUNICORN,
    RESTART,
    ROOT,
    STEPS,
    P,
    all_at_once,
    calls,
    db_rows,
    free_port,
    typed,
    wait_for,
)

import store as store_module

pytestmark = pytest.mark.slow

GRACEFUL_TIMEOUT = 15  # gunicorn.conf.py graceful_timeout
SECRET = re.compile(r"stepd_[A-Za-z0-9_-]{20,}")


# -- 1. exactly once across worker processes ------------------------------------------------
def test_concurrent_restarts_from_many_threads_win_exactly_once(server_factory, tmp_path, gated_delegates):
    server = server_factory(workers=2, delegates=gated_delegates).start()
    assert len(server.worker_pids()) == 2

    call_log = tmp_path / "calls.txt"
    gate = tmp_path / "gate"
    gate.touch()  # the first attempt fails at once
    process = server.start_process(("gated_count", {"file": str(call_log), "gate": str(gate), "fail": 1}), ("noop", {}))
    step_id = process["steps"][0]["processStepId"]
    failed = server.wait_step(step_id, "FAILED")
    assert failed["attempts"] == 1
    assert len(calls(call_log)) == 1

    winners = []  # the worker process whose request won, per round
    for round_number in range(5):
        before = server.step(step_id)
        assert before["status"] == "FAILED"
        gate.unlink()  # the winning attempt will stay STARTED until the gate opens
        responses = race_restarts(server, step_id, 16)

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

    # Both worker processes run a runner on the one file, and each call is one attempt.
    final = server.step(step_id)
    assert final["attempts"] == 6
    attempts_called = sorted(int(line.split()[1]) for line in call_log.read_text().splitlines())
    assert attempts_called == [1, 2, 3, 4, 5, 6]
    runner_pids = {pid for (pid,) in db_rows(server.env["STEPD_DB"], "SELECT pid FROM runners")}
    assert runner_pids == set(server.worker_pids())
    assert set(winners) <= runner_pids
    assert server.process(process["processId"])["status"] == "FAILED"


# -- 2. kill -9 of the whole service ---------------------------------------------------------
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


# -- 3. kill -9 of one worker ----------------------------------------------------------------
def test_kill_of_one_worker_interrupts_only_its_steps(server_factory, tmp_path):
    db = tmp_path / "served.db"
    server = server_factory(db_path=db, workers=2, threads=8).start()
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

    # Start processes from several threads at once until both workers hold some steps.
    for _ in range(40):  # the kernel picks the worker for each connection: keep trying until both hold steps
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
    held = holders()
    assert set(held) == set(steps)
    assert set(held.values()) == set(server.worker_pids()), "both workers should hold steps"
    assert spread(), f"steps did not spread over both workers: {held}"

    victim = next(iter(held.values()))
    victim_steps = {s for s, pid in held.items() if pid == victim}
    survivor_steps = set(held) - victim_steps
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    def victims_failed():
        found = {s: server.step(s) for s in victim_steps}
        return all(s["status"] == "FAILED" for s in found.values()) and found

    failed = wait_for(victims_failed, timeout=10, interval=0.1, what="the killed worker's steps to be Interrupted")
    assert time.monotonic() - killed_at < 10
    for step in failed.values():
        assert step["error"]["type"] == "Interrupted", step
        assert step["attempts"] == 1
    statuses = {s: server.step(s)["status"] for s in survivor_steps}
    assert set(statuses.values()) == {"STARTED"}, statuses

    # The master brings a new worker; the service kept answering throughout.
    wait_for(lambda: len(pids := server.worker_pids()) == 2 and victim not in pids, what="a respawned worker")
    # The dead worker's runner is forgotten; the new worker's runner is known.
    wait_for(
        lambda: {p for (p,) in db_rows(db, "SELECT pid FROM runners")} == set(server.worker_pids()),
        what="the runners table to list the living workers",
    )
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    fresh = server.start_process(("noop", {}))
    server.wait_process(fresh["processId"], "COMPLETED")
    time.sleep(1.5)  # a few more heartbeats: the living worker's steps are still left alone
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


def test_kill_of_the_only_worker_interrupts_its_steps_after_the_respawn(server_factory, tmp_path):
    """With one worker there is no other runner: the respawned worker must reap the dead one's steps."""
    server = server_factory(workers=1).start()
    (victim,) = server.worker_pids()
    process = server.start_process(("wait", {"file": str(tmp_path / "never"), "seconds": 60.0}), ("noop", {}))
    step_id = process["steps"][0]["processStepId"]
    assert runner_pid(server, step_id) == victim
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: server.worker_pids() not in ([], [victim]), what="a respawned worker")
    failed = wait_for(
        lambda: (s := server.step(step_id))["status"] == "FAILED" and s,
        timeout=10 - (time.monotonic() - killed_at),
        interval=0.1,
        what="the dead worker's step to be Interrupted",
    )
    assert time.monotonic() - killed_at < 10
    assert failed["error"]["type"] == "Interrupted"
    assert server.process(process["processId"])["status"] == "FAILED"


# -- 4. SIGTERM and start again --------------------------------------------------------------
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


# -- 5. refusals at start --------------------------------------------------------------------
def test_start_is_refused_when_a_delegate_module_does_not_import(server_factory, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "fine.py").write_text("from delegates import delegate\n\n\n@delegate('fine')\ndef fine(ctx):\n    pass\n")
    (folder / "boom.py").write_text("raise RuntimeError('boom at import time')\n")
    began = time.monotonic()
    server = server_factory(db_path=tmp_path / "broken.db", delegates=folder).start(wait=False)
    code = server.proc.wait(timeout=20)
    output = server.output()
    assert code != 0, output
    assert str(folder / "boom.py") in output
    assert "boom at import time" in output
    assert time.monotonic() - began < 10


def test_start_is_refused_when_two_delegates_claim_one_type(server_factory, tmp_path):
    folder = tmp_path / "twice"
    folder.mkdir()
    for name in ("first.py", "second.py"):
        (folder / name).write_text(
            f"from delegates import delegate\n\n\n@delegate('dup')\ndef {name[:-3]}(ctx):\n    pass\n"
        )
    began = time.monotonic()
    server = server_factory(db_path=tmp_path / "twice.db", delegates=folder).start(wait=False)
    code = server.proc.wait(timeout=20)
    output = server.output()
    assert code != 0, output
    assert str(folder / "first.py") in output and str(folder / "second.py") in output, output
    assert time.monotonic() - began < 10

    # A user's module that claims a built-in type is refused the same way.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "mine.py").write_text("from delegates import delegate\n\n\n@delegate('noop')\ndef mine(ctx):\n    pass\n")
    server = server_factory(db_path=tmp_path / "shadow.db", delegates=shadow).start(wait=False)
    code = server.proc.wait(timeout=20)
    output = server.output()
    assert code != 0, output
    assert str(shadow / "mine.py") in output and str(ROOT / "delegates" / "builtin.py") in output, output


# -- 6. the first token ----------------------------------------------------------------------
def test_first_start_without_token_prints_exactly_one_working_secret(server_factory, tmp_path):
    db = tmp_path / "fresh.db"
    first = server_factory(db_path=db, token=None, workers=2)
    stdout = start_with_split_output(first)
    output = first.output()  # standard error only
    secrets = set(SECRET.findall(output))
    assert len(secrets) == 1, output
    assert output.count("created the operator token") == 1, output
    secret = secrets.pop()
    # The access log goes to standard output (written just after the response, so poll).
    wait_for(lambda: '"GET /healthz HTTP/1.1" 200' in stdout.read_text(), what="the access log on stdout")
    assert "created the operator token" not in stdout.read_text()
    assert secret not in stdout.read_text()

    bearer = {"Authorization": f"Bearer {secret}"}
    assert requests.get(first.url + P, headers=bearer, timeout=10).status_code == 200
    created = requests.post(first.url + P, json={"steps": [{"type": "noop"}]}, headers=bearer, timeout=10)
    assert created.status_code == 201, created.text
    step_id = created.json()["data"]["steps"][0]["processStepId"]
    detail = requests.get(f"{first.url}{STEPS}/{step_id}", auth=("admin", secret), timeout=10)
    assert detail.status_code == 200
    assert detail.json()["data"]["attemptHistory"][0]["principal"] == "admin"
    assert requests.get(first.url + P, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + secret + "x"}
    assert requests.get(first.url + P, headers=wrong, timeout=10).status_code == 401
    assert db_rows(db, "SELECT name, role FROM tokens") == [("admin", "operator")]
    assert first.stop() == 0
    # Stored hashed: the secret is nowhere in the database files.
    for path in tmp_path.glob("fresh.db*"):
        assert secret.encode() not in path.read_bytes(), path

    offset = len(first.output())
    second = server_factory(db_path=db, token=None).start()
    later = second.output()[offset:]
    assert "Booting worker" in later  # this is the second start's output
    assert not SECRET.findall(later), later
    assert "created the operator token" not in later
    assert requests.get(second.url + P, headers=bearer, timeout=10).status_code == 200
    assert db_rows(db, "SELECT name FROM tokens") == [("admin",)]


def test_no_token_is_generated_when_stepd_token_is_set(server_factory, tmp_path):
    db = tmp_path / "env.db"
    server = server_factory(db_path=db, token="env-token-for-this-test").start()
    output = server.output()
    assert not SECRET.findall(output), output
    assert "created the operator token" not in output
    assert db_rows(db, "SELECT COUNT(*) FROM tokens") == [(0,)]
    assert server.get(P).status_code == 200
    assert server.post(P, {"steps": [{"type": "noop"}]}).status_code == 201
    assert requests.get(server.url + P, auth=("env", "env-token-for-this-test"), timeout=10).ok


# -- 7. settings -----------------------------------------------------------------------------
def test_settings_workers_db_path_and_log_level(server_factory, tmp_path):
    nested = tmp_path / "deep" / "er" / "stepd.sqlite"
    assert not nested.parent.exists()
    server = server_factory(
        db_path=tmp_path / "quiet.db",
        workers=3,
        extra_env={"STEPD_DB": str(nested), "STEPD_LOG_LEVEL": "WARNING"},
    ).start()

    pids = server.worker_pids()
    assert len(pids) == 3
    wait_for(lambda: {p for (p,) in db_rows(nested, "SELECT pid FROM runners")} == set(pids), what="3 runners")
    assert nested.is_file()
    assert not (tmp_path / "quiet.db").exists()
    with sqlite3.connect(nested) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store_module.MIGRATIONS)
    conn.close()
    assert listening(server.port) == ["127.0.0.1"]

    # INFO lines of the app (a runner starting, a step failing) are not written at WARNING.
    process = server.start_process(("check", {"ok": 0}))
    server.wait_process(process["processId"], "FAILED")
    response = server.get(P, headers={"X-Request-Id": "quiet-request"})
    assert response.headers["X-Request-Id"] == "quiet-request"
    wait_for(lambda: "rid=quiet-request" in server.output(), what="the access log line")
    output = server.output()
    assert " INFO " not in output and "[INFO]" not in output, output
    assert "started with" not in output and "attempt 1 failed" not in output


def test_log_level_info_and_request_ids(server_factory, tmp_path):
    server = server_factory(db_path=tmp_path / "loud.db").start()
    # The defaults of the other side: INFO lines are written.
    process = server.start_process(("check", {"ok": 0}))
    step_id = process["steps"][0]["processStepId"]
    server.wait_step(step_id, "FAILED")
    wait_for(lambda: "attempt 1 failed" in server.output(), what="the INFO line of the failed step")
    assert "stepd.runner: runner" in server.output()

    cases = [
        ("GET", "/healthz", None, {}, 200),
        ("GET", P, None, server.headers(), 200),
        ("GET", P, None, {}, 401),
        ("GET", "/api/v1/nothing-here", None, server.headers(), 404),
        ("GET", RESTART, None, server.headers(), 405),
        ("POST", RESTART, {"processStepId": "nope"}, server.headers(), 412),
        ("POST", P, {"steps": [{"type": "noop"}]}, server.headers(), 201),
    ]
    seen = []
    for n, (method, path, body, headers, status) in enumerate(cases):
        own = f"test-rid-{n}-{method.lower()}"
        response = requests.request(
            method, server.url + path, json=body, headers={**headers, "X-Request-Id": own}, timeout=10
        )
        assert response.status_code == status, (path, response.text)
        assert response.headers["X-Request-Id"] == own
        fresh = requests.request(method, server.url + path, json=body, headers=headers, timeout=10)
        assert fresh.status_code == status
        assert re.fullmatch(r"[!-~]{8,128}", fresh.headers.get("X-Request-Id", "")), fresh.headers
        seen += [own, fresh.headers["X-Request-Id"]]
    assert len(set(seen)) == len(seen)

    longest = "L" * 128
    assert server.get(P, headers={"X-Request-Id": longest}).headers["X-Request-Id"] == longest
    seen.append(longest)
    too_long = "x" * 129
    response = server.get(P, headers={"X-Request-Id": too_long})
    assert response.headers["X-Request-Id"] not in ("", too_long)
    seen.append(response.headers["X-Request-Id"])

    def logged():
        text = server.output()
        return all(f"rid={rid}" in text for rid in seen)

    wait_for(logged, what="every request id in the access log")
    line = next(x for x in server.output().splitlines() if "rid=test-rid-1-get" in x)
    assert '"GET /api/v1/processes HTTP/1.1" 200' in line


def test_stepd_threads_bounds_the_delegates_running_at_once(server_factory, tmp_path, gated_delegates):
    server = server_factory(workers=1, threads=2, delegates=gated_delegates).start()
    call_log, gate = tmp_path / "calls.txt", tmp_path / "gate"
    processes = [
        server.start_process(("gated_count", {"file": str(call_log), "gate": str(gate), "fail": 0})) for _ in range(3)
    ]
    wait_for(lambda: len(calls(call_log)) == 2, what="two delegates to run")
    time.sleep(1)  # proving that a third one does NOT start while two threads are busy
    assert len(calls(call_log)) == 2
    assert {server.step(p["steps"][0]["processStepId"])["status"] for p in processes} == {"STARTED"}
    gate.touch()
    for process in processes:
        server.wait_process(process["processId"], "COMPLETED")
    assert len(calls(call_log)) == 3


@pytest.mark.parametrize(("key", "value"), [("STEPD_WORKERS", "many"), ("STEPD_SYNC", "off")])
def test_start_is_refused_with_a_bad_setting(server_factory, tmp_path, key, value):
    server = server_factory(db_path=tmp_path / "bad.db", extra_env={key: value}).start(wait=False)
    assert server.proc.wait(timeout=20) != 0
    output = server.output()
    assert f"stepd: cannot start: {key} must be" in output
    assert "Traceback" not in output  # one clear line, not gunicorn's traceback of its config file


# -- 8. make run -----------------------------------------------------------------------------
def test_make_run_serves(tmp_path):
    proc, url, log_path = start_make_run(tmp_path)
    try:

        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"make run exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                return requests.get(url + "/healthz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(healthy, timeout=30, interval=0.1, what="make run to answer /healthz")
        response = requests.get(url + P, headers={"Authorization": "Bearer make-run-token"}, timeout=5)
        assert response.status_code == 200, response.text
        assert response.json()["data"] == {"items": [], "nextCursor": None}
        assert requests.get(url + P, timeout=5).status_code == 401
        assert (tmp_path / "made.db").is_file()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            try:
                wait_for(lambda: not group_alive(proc.pid), timeout=30, what="make run's processes to exit")
            finally:
                if group_alive(proc.pid):
                    os.killpg(proc.pid, signal.SIGKILL)
    assert "gunicorn -c gunicorn.conf.py" in log_path.read_text()


def test_sigkill_of_make_run_stops_the_service_and_frees_the_port(tmp_path):
    proc, url, _log_path = start_make_run(tmp_path)
    headers = {"Authorization": "Bearer make-run-token"}
    try:
        wait_for(lambda: answers(url), timeout=30, interval=0.1, what="make run to answer /healthz")
        body = {"steps": [{"type": "sleep", "params": {"seconds": {"type": "DOUBLE", "doubleValue": 60.0}}}]}
        step_id = requests.post(url + P, json=body, headers=headers, timeout=5).json()["data"]["steps"][0][
            "processStepId"
        ]
        os.kill(proc.pid, signal.SIGKILL)  # only make itself, as a careless supervisor would
        proc.wait(timeout=10)
        wait_for(lambda: not answers(url), timeout=10, what="the service to stop with make")
        wait_for(lambda: not group_alive(proc.pid), timeout=10, what="gunicorn's processes to exit")
        with sqlite3.connect(tmp_path / "made.db") as db:
            row = db.execute("SELECT status, error_type FROM steps WHERE id = ?", (step_id,)).fetchone()
        assert row == ("FAILED", "Interrupted")
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def start_make_run(tmp_path):
    """`make run` in its own process group on a free port; returns (process, url, log path)."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STEPD_") and k not in ("MAKEFLAGS", "MFLAGS")},
        "STEPD_PORT": str(port),
        "STEPD_DB": str(tmp_path / "made.db"),
        "STEPD_TOKEN": "make-run-token",
    }
    log_path = tmp_path / "make.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log_path


def answers(url):
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


# -- helpers ---------------------------------------------------------------------------------
def start_with_split_output(server):
    """Start `server` like Server.start, but with standard output in its own file; returns that file."""
    stdout_path = server.log_path.with_suffix(".stdout")
    server.log = open(server.log_path, "ab")  # noqa: SIM115 - standard error, read by output(), closed by stop()
    with open(stdout_path, "ab") as stdout:
        server.proc = subprocess.Popen(
            [str(GUNICORN), "-c", "gunicorn.conf.py"], cwd=ROOT, env=server.env, stdout=stdout, stderr=server.log
        )
    wait_for(server._healthy, timeout=20, interval=0.1, what="gunicorn to answer /healthz")
    wait_for(lambda: len(server.worker_pids()) == int(server.env["STEPD_WORKERS"]), timeout=20, what="workers")
    return stdout_path


def race_restarts(server, step_id, count):
    """`count` restarts of one step from as many threads, released together; their responses."""
    url, body = server.url + RESTART, {"processStepId": step_id}
    return all_at_once(count, lambda _: requests.post(url, json=body, headers=server.headers(), timeout=30))


def runner_pid(server, step_id):
    """The pid of the worker process whose runner holds the step."""
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


def listening(port):
    """The local addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                if len(address) == 8:
                    addresses.append(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    addresses.append(address)
    return addresses


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for killpg; only live members matter.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                return True
    return False


def test_start_is_refused_when_the_database_is_not_sqlite(server_factory, tmp_path):
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("these are my notes, not a database\n" * 100)
    server = server_factory(db_path=not_a_db)
    server.start(wait=False)
    assert server.proc.wait(timeout=20) != 0
    assert "stepd: cannot start:" in server.output()
    assert not_a_db.read_text().startswith("these are my notes")
