"""Runner processes on real gunicorn (SPEC section 9): a delegate that takes its process down
takes only its runner, which comes back; a delegate holding the GIL does not slow the API;
STEPD_RUNNERS=0 serves the API alone and a runner started apart does the work."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import ClientThreads, P, db_rows, is_zombie, wait_for


def holder_pid(server, step_id):
    rows = db_rows(
        server.env["STEPD_DB"], "SELECT r.pid FROM steps s JOIN runners r ON r.id = s.runner_id WHERE s.id = ?", step_id
    )
    return rows[0][0] if rows else None


def claimer(server, step_id):
    """The id of the runner that claimed the step (kept on the step after that runner dies), or None."""
    return db_rows(server.env["STEPD_DB"], "SELECT runner_id FROM steps WHERE id = ?", step_id)[0][0]


class Prober:
    """GETs the API every 50 ms on a thread and keeps the slowest answer's time and any failure."""

    def __init__(self, server):
        self.server, self.slowest, self.failures = server, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(0.05):
            began = time.monotonic()
            try:
                status = self.server.get(f"{P}?limit=1", timeout=5).status_code
            except Exception as exc:  # collected, asserted by the test
                self.failures.append(repr(exc))
                continue
            self.slowest = max(self.slowest, time.monotonic() - began)
            if status != 200:
                self.failures.append(status)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["exit1", "exit3", "exit4", "sigkill", "segfault"])
def test_a_delegate_that_kills_its_runner_takes_only_that_runner(server_factory, tmp_path, how):
    server = server_factory(runners=2, threads=2).start()
    # One long step on each runner: claim until both hold one.
    holds = {}
    for _ in range(20):
        step_id = server.start_process(("hang", {"file": str(tmp_path / "x"), "seconds": 60.0}))["steps"][0]
        step_id = step_id["processStepId"]
        pid = wait_for(lambda s=step_id: holder_pid(server, s), what="a runner to claim it")
        holds.setdefault(pid, step_id)
        if len(holds) == 2:
            break
    assert len(holds) == 2, holds
    with Prober(server) as prober:
        pids = dict(db_rows(server.env["STEPD_DB"], "SELECT id, pid FROM runners"))  # before a sweep forgets one
        crashing = server.start_process(("crash", {"how": how}))["steps"][0]["processStepId"]
        victim = pids[wait_for(lambda: claimer(server, crashing), what="a runner to claim the crash")]
        killed_at = time.monotonic()
        failed = wait_for(
            lambda: (s := server.step(crashing))["status"] == "FAILED" and s, timeout=10, what="Interrupted"
        )
        assert failed["error"]["type"] == "Interrupted" and failed["attempts"] == 1
        wait_for(lambda: len(server.runner_pids()) == 2 and victim not in server.runner_pids(), timeout=5,
                 what="the runner to be started again")  # fmt: skip
        assert time.monotonic() - killed_at < 10
        wait_for(lambda: server.get("/healthz").json()["data"]["runners"] == 2, timeout=5, what="2 live runners")
        survivor = next(pid for pid in holds if pid != victim)
        assert server.step(holds[survivor])["phase"] == "RUNNING", "the other runner's step is untouched"
        victims_hang = server.step(holds[victim])
        assert (victims_hang["status"], victims_hang["error"]["type"]) == ("FAILED", "Interrupted")
        after = server.start_process(("noop", {}))
        server.wait_process(after["processId"], "COMPLETED")
    assert prober.failures == [], prober.failures
    assert server.proc.poll() is None, "the service is up"
    assert (
        f"exited with code {-9 if how == 'sigkill' else -11 if how == 'segfault' else int(how[4:])}" in server.output()
    )


@pytest.mark.timeout(90)
def test_a_delegate_holding_the_gil_does_not_slow_the_api(served):
    server = served  # one runner
    with Prober(server) as prober:
        process = server.start_process(("hold_gil", {}))
        step_id = process["steps"][0]["processStepId"]
        wait_for(lambda: server.step(step_id)["phase"] == "RUNNING", what="the delegate to run")
        done = server.wait_process(process["processId"], "COMPLETED", timeout=60)
    assert done["steps"][0]["result"]["bits"]["longValue"] > 0
    assert prober.failures == [] and prober.slowest < 0.5, (prober.slowest, prober.failures)
    assert server.get("/healthz").json()["data"]["runners"] == 1, "a busy runner is not taken for a dead one"


@pytest.mark.timeout(90)
def test_no_runners_serves_the_api_and_a_runner_started_apart_does_the_work(server_factory):
    server = server_factory(runners=0).start()
    assert server.runner_pids() == []
    process = server.start_process(("noop", {}))
    time.sleep(0.5)
    assert server.step(process["steps"][0]["processStepId"])["phase"] == "QUEUED"
    runner = subprocess.Popen([sys.executable, "-m", "stepd", "runner"], cwd=server.cwd, env=server.env)
    try:
        server.wait_process(process["processId"], "COMPLETED", timeout=10)
        assert server.get("/healthz").json()["data"]["runners"] == 1
    finally:
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=15) == 0
    assert not os.path.exists(f"/proc/{runner.pid}")


class Load(ClientThreads):
    """Starts processes of three `count` steps on 4 threads until stopped: every delegate call
    appends `step attempt` to one file, so an attempt called twice shows as a repeated line. Keeps
    every answer that is not a 201 (the API must answer throughout)."""

    def __init__(self, server, calls):
        self.server, self.calls, self.bad, self.started = server, calls, [], 0
        super().__init__(4)

    def _client(self, number):
        step = {"type": "count", "params": {"file": {"type": "STRING", "strValue": str(self.calls)}}}
        while not self._stop.is_set():
            try:
                status = self.server.post(P, {"steps": [step] * 3}, timeout=5).status_code
            except Exception as exc:  # collected, asserted by the test
                self.bad.append(repr(exc))
                continue
            if status == 201:
                self.started += 1
            else:
                self.bad.append(status)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["exit1", "exit3", "sigkill", "segfault"])
def test_a_runner_killed_under_load_has_its_steps_interrupted_within_half_a_second(server_factory, tmp_path, how):
    """Issue 18: the node reads the end of a dead runner's connection and Interrupts its running
    steps in its next group, under load as when idle; no attempt is called twice, the API answers
    throughout, and the file's invariants hold afterwards."""
    from stepd.invariants import check

    server = server_factory(runners=2, threads=4).start()
    db, calls = server.env["STEPD_DB"], tmp_path / "calls.txt"
    with Load(server, calls) as load:
        wait_for(lambda: load.started >= 50, what="the load to run")
        pids = dict(db_rows(db, "SELECT id, pid FROM runners"))  # before the dead one's row is forgotten
        crashing = server.start_process(("crash", {"how": how}))["steps"][0]["processStepId"]
        victim = pids[wait_for(lambda: claimer(server, crashing), interval=0.002, what="a runner to claim the crash")]
        wait_for(lambda: is_zombie(victim), interval=0.002, what="death")
        died = time.monotonic()
        wait_for(lambda: server.step(crashing)["status"] == "FAILED", interval=0.005, timeout=5, what="Interrupted")
        seen = time.monotonic() - died
        wait_for(lambda: len(server.runner_pids()) == 2, timeout=10, what="the runner to be started again")
        wait_for(lambda: load.started >= 150, timeout=30, what="the load to go on after the crash")
    assert seen < 0.5, f"Interrupted {seen:.3f} s after the runner died"
    assert server.step(crashing)["error"]["type"] == "Interrupted"
    assert load.bad == [], load.bad[:5]
    lines = calls.read_text().splitlines()
    assert len(lines) == len(set(lines)), "an attempt's delegate was called twice"
    wait_for(lambda: not db_rows(db, "SELECT 1 FROM steps WHERE status = 'STARTED' AND deferred = 0"), timeout=30,
             what="the load's steps to finish")  # fmt: skip
    assert check(db).problems == []
