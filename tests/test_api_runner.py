"""The runner as the app runs it: one delegate call per attempt, failures of delegates, a dead
runner's steps reaped, clean stops."""

import subprocess
import sys
import time

import pytest
from helpers import FAIL, wait_for

from app import stop_background
from runner import HOST, process_start_time


def test_bad_result_fails_the_step_not_the_request(api):
    process = api.start(("bad_result", {}))
    failed = api.wait_process(process["processId"], "FAILED")
    assert failed["steps"][0]["error"]["type"] == "TypeError"


def test_one_delegate_call_per_attempt(api, tmp_path):
    calls = tmp_path / "calls.txt"
    process = api.start(("count", {"file": str(calls), "fail": 1}))
    step_id = process["steps"][0]["processStepId"]
    api.wait_step(step_id, "FAILED")
    for attempt in (2, 3):
        assert api.restart(step_id).status_code == 200
        wait_for(lambda a=attempt: api.step(step_id)["attempts"] == a and api.step(step_id)["status"] == "FAILED")
    assert calls.read_text().splitlines() == [f"{step_id} 1", f"{step_id} 2", f"{step_id} 3"]


def test_stop_interrupts_what_is_still_running(app, api, store, tmp_path):
    process = api.start(("wait", {"file": str(tmp_path / "never"), "seconds": 30.0}))
    step_id = process["steps"][0]["processStepId"]
    runner = app.extensions["stepd"].runner
    began = time.monotonic()
    runner.stop(grace=0.3)
    assert time.monotonic() - began < 3
    step = api.step(step_id)
    assert step["status"] == "FAILED" and step["error"]["type"] == "Interrupted"
    assert api.process(process["processId"])["status"] == "FAILED"


def test_stop_waits_for_short_delegates(app, api):
    process = api.start(("sleep", {"seconds": 0.3}))
    stop_background(app, grace=5)
    assert api.process(process["processId"])["status"] == "COMPLETED"


def test_a_live_runner_reaps_a_dead_one(app, api, store, tmp_path):
    # A runner of a process that has exited took two steps; a deferred one is left alone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start_time(dead.pid)
    dead.wait()
    store.heartbeat({"id": "dead-runner", "host": HOST, "pid": dead.pid, "pid_started": started or "1"})
    process, _ = store.create_process(
        None, [("wait", {"file": ("STRING", str(tmp_path / "never"))})], "x", "dead-runner"
    )
    _, deferred = store.create_process(None, [("external", {})], "x", "dead-runner")
    store.defer_attempt(deferred)
    step = api.wait_step(process["steps"][0]["id"], "FAILED", timeout=3)  # within a watch tick or two
    assert step["error"]["type"] == "Interrupted"
    assert api.step(deferred.step_id)["status"] == "STARTED"


@pytest.mark.parametrize(
    ("delegate_source", "error_type"),
    [
        ("import sys\n    sys.exit(3)", "SystemExit"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("raise ValueError('bad \\udc80 bytes')", "ValueError"),
        (
            "class Odd(Exception):\n        def __str__(self):\n            raise RuntimeError('no')\n    raise Odd()",
            "Odd",
        ),
    ],
)
def test_any_raise_fails_the_step_and_the_threads_live_on(tmp_path, db_path, delegate_source, error_type):
    from helpers import Api

    from app import create_app, start_background, stop_background
    from auth import hash_secret

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "odd.py").write_text(
        f"from delegates import delegate\n@delegate('odd')\ndef odd(ctx):\n    {delegate_source}\n"
    )
    app = create_app({"STEPD_DB": str(db_path), "STEPD_DELEGATES_PATH": str(tmp_path / "plugins"), "STEPD_THREADS": 1})
    app.extensions["stepd"].store.add_token("t", "operator", hash_secret("s"))
    start_background(app)
    try:
        api = Api(app.test_client(), {"Authorization": "Bearer s"})
        for _ in range(2):  # one thread only: the second step runs only if the thread survived the first
            process = api.start(("odd", {}), ("noop", {}))
            failed = api.wait_process(process["processId"], "FAILED")
            assert failed["steps"][0]["error"]["type"] == error_type
    finally:
        stop_background(app, grace=1)


def test_a_step_failed_while_queued_is_never_called(app, api, tmp_path):
    gate, calls = tmp_path / "gate", tmp_path / "calls.txt"
    for _ in range(4):  # occupy all 4 threads
        api.start(("wait", {"file": str(gate), "seconds": 10.0}))
    wait_for(lambda: app.extensions["stepd"].runner._busy >= 4, what="4 delegates running")
    queued = api.start(("count", {"file": str(calls)}))
    step_id = queued["steps"][0]["processStepId"]
    assert api.post(FAIL, {"processStepId": step_id}).status_code == 200
    gate.touch()
    wait_for(lambda: app.extensions["stepd"].runner._busy == 0, what="the pool to drain")
    assert not calls.exists()
    assert api.step(step_id)["attempts"] == 1


def test_stop_calls_no_queued_delegate(app, api, tmp_path):
    gate, calls = tmp_path / "gate", tmp_path / "calls.txt"
    busy = [api.start(("wait", {"file": str(gate), "seconds": 10.0})) for _ in range(4)]  # all 4 threads
    wait_for(lambda: app.extensions["stepd"].runner._busy == 4, what="4 delegates running")
    queued = api.start(("count", {"file": str(calls)}))
    stop_background(app, grace=0.2)
    gate.touch()  # let the blocked delegates return; their outcomes are stale now
    time.sleep(0.3)
    assert not calls.exists(), "a delegate was called after the runner stopped"
    for process in [*busy, queued]:
        step = api.step(process["steps"][0]["processStepId"])
        assert (step["status"], step["error"]["type"]) == ("FAILED", "Interrupted")
