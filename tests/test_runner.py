"""The runner: typed results, one call per attempt, heartbeats and clean stops."""

import math
import time

import pytest
from helpers import wait_for

from runner import Runner, typed_result


@pytest.mark.parametrize(
    ("outcome", "typed"),
    [
        (None, None),
        ({}, {}),
        ({"s": "x", "l": 5, "d": 0.5}, {"s": ("STRING", "x"), "l": ("LONG", 5), "d": ("DOUBLE", 0.5)}),
        ({"max": 2**63 - 1, "min": -(2**63)}, {"max": ("LONG", 2**63 - 1), "min": ("LONG", -(2**63))}),
    ],
)
def test_typed_result(outcome, typed):
    assert typed_result(outcome) == typed


@pytest.mark.parametrize(
    "outcome",
    [[1], "text", 5, {"b": True}, {"n": None}, {"big": 2**63}, {"nan": math.nan}, {"inf": math.inf}, {1: "x"}],
)
def test_untyped_results_are_refused(outcome):
    with pytest.raises(TypeError):
        typed_result(outcome)


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
    app.extensions["stepd"].runner.stop(grace=5)
    assert api.process(process["processId"])["status"] == "COMPLETED"


def test_a_live_runner_reaps_a_dead_one(app, api, store, tmp_path, monkeypatch):
    import runner as runner_module

    monkeypatch.setattr(runner_module, "STALE_AFTER_SECONDS", 1.0)
    # A second runner on the same file takes a step, then "dies": its heartbeat stops.
    dead = Runner(store, app.extensions["stepd"].registry, 1)
    store.heartbeat(dead.id, 999999)
    process, _job = store.create_process(None, [("wait", {"file": ("STRING", str(tmp_path / "never"))})], "x", dead.id)
    step_id = process["steps"][0]["id"]
    deferred, job = store.create_process(None, [("external", {})], "x", dead.id)
    store.defer_attempt(job)
    step = api.wait_step(step_id, "FAILED", timeout=5)
    assert step["error"]["type"] == "Interrupted"
    assert api.step(job.step_id)["status"] == "STARTED"  # deferred steps are left alone


def test_stop_calls_no_queued_delegate(app, api, tmp_path):
    gate, calls = tmp_path / "gate", tmp_path / "calls.txt"
    busy = [api.start(("wait", {"file": str(gate), "seconds": 10.0})) for _ in range(4)]  # all 4 threads
    wait_for(lambda: app.extensions["stepd"].runner._busy == 4, what="4 delegates running")
    queued = api.start(("count", {"file": str(calls)}))
    app.extensions["stepd"].runner.stop(grace=0.2)
    gate.touch()  # let the blocked delegates return; their outcomes are stale now
    time.sleep(0.3)
    assert not calls.exists(), "a delegate was called after the runner stopped"
    for process in [*busy, queued]:
        step = api.step(process["steps"][0]["processStepId"])
        assert (step["status"], step["error"]["type"]) == ("FAILED", "Interrupted")
