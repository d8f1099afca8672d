"""The runner as the app runs it: one delegate call per attempt, failures of delegates, a dead
runner's steps reaped, clean stops."""

import subprocess
import sys
import threading
import time

import pytest
from helpers import FAIL, wait_for

from stepd import config
from stepd import node as node_module
from stepd.app import stop_background
from stepd.delegates import load_registry
from stepd.liveness import HOST, process_start_time
from stepd.node import Chore, Node
from stepd.store import Store


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
    started = tmp_path / "started"
    process = api.start(("wait", {"file": str(tmp_path / "never"), "seconds": 30.0, "started": str(started)}))
    step_id = process["steps"][0]["processStepId"]
    runner = app.extensions["stepd"].runner
    # Its delegate called, not only claimed: an attempt the runner holds but has not begun yet (its
    # threads were slow to take it, on a loaded machine) is given back at the stop and queued again,
    # never Interrupted (SPEC 9), and this test once waited on such a one.
    wait_for(started.exists, what="the delegate to be called")
    began = time.monotonic()
    runner.stop(grace=0.3)
    assert time.monotonic() - began < 3
    step = api.wait_step(step_id, "FAILED", timeout=2)  # SPEC 9: the node sees the runner's end within 2 s
    assert step["error"]["type"] == "Interrupted"
    assert api.process(process["processId"])["status"] == "FAILED"


def test_stop_waits_for_short_delegates(app, api, tmp_path):
    # Wait until the delegate is really called: a claimed attempt is RUNNING in the database a
    # moment before a thread calls it, and a stop gives back an attempt never called (queued again).
    started, done = tmp_path / "started", tmp_path / "done"
    process = api.start(("wait", {"file": str(done), "seconds": 30.0, "started": str(started)}))
    wait_for(started.exists, what="the delegate to be called")
    threading.Timer(0.3, done.touch).start()  # it completes 0.3 s into the stop
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

    from stepd.app import create_app, start_background, stop_background
    from stepd.auth import hash_secret

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "odd.py").write_text(
        f"from stepd import delegate\n@delegate('odd')\ndef odd(ctx):\n    {delegate_source}\n"
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
    started = [tmp_path / f"started-{n}" for n in range(4)]
    busy = [api.start(("wait", {"file": str(gate), "seconds": 10.0, "started": str(s)})) for s in started]
    wait_for(lambda: all(s.exists() for s in started), what="4 delegates called")  # all 4 threads
    queued = api.start(("count", {"file": str(calls)}))
    stop_background(app, grace=0.2)
    gate.touch()  # let the blocked delegates return; their outcomes are stale now
    time.sleep(0.3)
    assert not calls.exists(), "a delegate was called after the runner stopped"
    for process in busy:
        step = api.step(process["steps"][0]["processStepId"])
        assert (step["status"], step["error"]["type"]) == ("FAILED", "Interrupted")
    # SPEC 9: an attempt no runner has claimed was never handed to a delegate: it stays queued
    # for the next runner, and is not Interrupted.
    waiting = api.step(queued["steps"][0]["processStepId"])
    assert (waiting["status"], waiting["phase"], waiting["error"]) == ("STARTED", "QUEUED", None)


# -- SPEC 9: phases, timeouts, ctx.cancelled, places ---------------------------------------------
def test_a_started_step_shows_its_phase(app, api, tmp_path):
    stop_background(app, grace=0.1)  # no runner: what is committed waits QUEUED
    queued = api.start(("noop", {}))["steps"][0]
    assert (queued["status"], queued["phase"]) == ("STARTED", "QUEUED")
    assert api.start(("noop", {}), ("noop", {}))["steps"][1]["phase"] is None  # PENDING


def test_phases_running_deferred_retry_wait_and_none(api, tmp_path, gate):
    running = api.start(("wait", {"file": str(gate)}))["steps"][0]["processStepId"]
    wait_for(lambda: api.step(running)["phase"] == "RUNNING", what="RUNNING")
    deferred = api.start(("external", {}))["steps"][0]["processStepId"]
    wait_for(lambda: api.step(deferred)["phase"] == "DEFERRED", what="DEFERRED")
    waiting = api.start(("retry_slow", {"file": str(tmp_path / "calls")}))["steps"][0]["processStepId"]
    step = wait_for(lambda: (s := api.step(waiting))["phase"] == "RETRY_WAIT" and s, what="RETRY_WAIT")
    assert step["status"] == "STARTED" and step["nextRetryAt"] is not None
    done = api.start(("noop", {}))
    assert api.wait_process(done["processId"], "COMPLETED")["steps"][0]["phase"] is None


def test_a_due_retry_not_yet_claimed_is_queued(app, api, store, tmp_path):
    step_id = api.start(("retry_slow", {"file": str(tmp_path / "calls")}))["steps"][0]["processStepId"]
    wait_for(lambda: api.step(step_id)["phase"] == "RETRY_WAIT", what="RETRY_WAIT")
    stop_background(app, grace=0.1)
    store.db.connection().execute(
        "UPDATE steps SET next_retry_at = '2000-01-01T00:00:00.000Z' WHERE id = ?", (step_id,)
    )
    assert api.step(step_id)["phase"] == "QUEUED"


def test_a_delegate_past_its_timeout_fails_with_timeout_and_is_cancelled(api, tmp_path):
    marker = tmp_path / "cancelled"
    began = time.monotonic()
    process = api.start(("linger", {"file": str(marker)}))  # timeout=0.5
    failed = api.wait_process(process["processId"], "FAILED", timeout=5)["steps"][0]
    assert time.monotonic() - began < 0.5 + 1.5
    assert failed["error"]["type"] == "Timeout" and "0.5 s" in failed["error"]["message"]
    assert api.step(failed["processStepId"])["attemptHistory"][-1]["error"]["type"] == "Timeout"
    wait_for(marker.exists, timeout=2, what="ctx.cancelled to be set")
    time.sleep(0.3)  # the delegate has returned (None: it would complete the step): that is ignored
    assert api.step(failed["processStepId"])["status"] == "FAILED"


def test_step_timeout_setting_applies_to_delegates_without_their_own(app_with, tmp_path):
    _, api = app_with(STEPD_STEP_TIMEOUT=0.3)
    marker = tmp_path / "cancelled"
    process = api.start(("hang", {"file": str(marker)}))
    failed = api.wait_process(process["processId"], "FAILED", timeout=5)["steps"][0]
    assert failed["error"]["type"] == "Timeout"
    wait_for(marker.exists, timeout=2, what="ctx.cancelled to be set")
    _, own = app_with(STEPD_STEP_TIMEOUT=30)
    started = own.start(("linger", {"file": str(tmp_path / "m2")}))  # its own 0.5 s wins over 30 s
    assert own.wait_process(started["processId"], "FAILED", timeout=5)["steps"][0]["error"]["type"] == "Timeout"


def test_a_delegate_that_returns_before_its_timeout_completes(api, tmp_path):
    process = api.start(("linger", {"file": str(tmp_path / "m"), "seconds": 0.0}))  # returns at once: completes
    assert api.wait_process(process["processId"], "COMPLETED")["steps"][0]["error"] is None


def test_fail_step_sets_ctx_cancelled_and_frees_the_place(app_with, tmp_path):
    app, api = app_with(STEPD_THREADS=1)
    marker, started = tmp_path / "cancelled", tmp_path / "started"
    hung = api.start(("hang", {"file": str(marker), "started": str(started), "seconds": 60.0}))
    step_id = hung["steps"][0]["processStepId"]
    wait_for(started.exists, what="the delegate to be called")
    assert api.post(FAIL, {"processStepId": step_id}).status_code == 200
    wait_for(marker.exists, timeout=1.5, what="ctx.cancelled within 1 s of fail-step")
    # The one place is free again although the hung delegate's thread has not returned.
    other = api.start(("noop", {}))
    api.wait_process(other["processId"], "COMPLETED", timeout=3)
    assert app.extensions["stepd"].runner._busy == 0


def test_a_hung_delegate_after_its_timeout_keeps_no_place(app_with, tmp_path):
    app, api = app_with(STEPD_THREADS=1)
    for n in range(3):  # each times out after 0.5 s and never returns (until the test ends)
        api.start(("linger", {"file": str(tmp_path / f"m{n}"), "seconds": 60.0}))
    follower = api.start(("noop", {}))
    api.wait_process(follower["processId"], "COMPLETED", timeout=5)


def test_healthz_counts_live_runners_and_is_503_without_one(app, client, monkeypatch):
    assert client.get("/healthz").json["data"] == {"database": "ok", "runners": 1}
    stop_background(app, grace=0.1)
    assert client.get("/healthz").status_code == 200, "within 10 s of the start a missing runner is forgiven"
    engine = app.extensions["stepd"].engine
    monkeypatch.setattr(engine, "started", engine.started - 11)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json["message"] == "Service unavailable" and "No runner is alive" in response.json["data"]


def test_an_attempt_queued_without_a_wake_up_is_claimed_by_the_poll_within_1_s(app, api, store):
    # Queued straight through the store: no engine, so no runner is poked (a lost wake-up).
    process, job = store.create_process(None, [("noop", {})], "x", None)
    began = time.monotonic()
    api.wait_process(process["id"], "COMPLETED", timeout=1.0)
    assert time.monotonic() - began < 1.0


def test_a_failing_chore_skips_no_other_and_a_slow_one_delays_no_heartbeat(database, monkeypatch):
    """The node's chores (wiring.chores: checkpoint, orphan sweep, answers, retention) each run
    in their own try, on a thread apart from the dispatcher's heartbeat and watch."""
    monkeypatch.setattr(node_module, "CHORE_TICK_SECONDS", 0.01)
    monkeypatch.setattr(node_module, "HEARTBEAT_SECONDS", 0.05)
    counted, slow_started, release = [], threading.Event(), threading.Event()

    def failing():
        raise RuntimeError("this chore always fails")

    def slow():
        slow_started.set()
        release.wait(5)

    chores = [
        Chore("failing", 0.01, failing),
        Chore("counting", 0.01, lambda: counted.append(1)),
        Chore("slow", 60, slow),
    ]
    store = Store(database)
    settings = {**config.from_env({}), "STEPD_DB": database.path, "STEPD_THREADS": 1}
    node = Node(store, load_registry(), settings, chores=chores)
    node.start()
    node.start_runners_here(1)
    try:
        wait_for(slow_started.is_set, what="the slow chore to begin")
        assert counted, "the chore after the failing one ran"
        wait_for(lambda: store.runners(), what="the runner to register")
        beat = store.runners()[0]["heartbeat_at"]
        wait_for(lambda: store.runners()[0]["heartbeat_at"] > beat, what="a heartbeat while the slow chore runs")
        release.set()
        runs = len(counted)
        wait_for(lambda: len(counted) > runs + 2, what="the counting chore again, after the slow one")
    finally:
        release.set()
        node.stop(grace=0)
