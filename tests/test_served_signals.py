"""SIGHUP to `stepd serve` (SPEC 9, reload): the delegate modules are loaded again and the runners
and HTTP workers replaced without refusing a request; new attempts run the new code; what the old
runners still run after their grace is Interrupted; deferred and queued attempts are untouched.
A reload whose delegates do not load keeps the old ones and says why, naming the file."""

import os
import signal
import threading
import time

from helpers import P, wait_for

VERSION_MODULE = """\
from stepd import delegate


@delegate("version")
def version(ctx):
    \"\"\"Say which code ran.\"\"\"
    return {"code": "%s"}
"""
HUNG = """\
import time

from stepd import delegate


@delegate("hung")
def hung(ctx):
    \"\"\"Run for a minute, whatever happens (no timeout).\"\"\"
    time.sleep(60)


@delegate("waits")
def waits(ctx):
    \"\"\"Leave the step for complete-step.\"\"\"
    return ctx.defer()
"""


def code_of(server, process):
    done = server.wait_process(process["processId"], "COMPLETED", timeout=15)
    return done["steps"][0]["result"]["code"]["strValue"]


def test_sighup_reloads_the_delegates_without_refusing_a_request(server_factory, tmp_path):
    folder = tmp_path / "delegates"
    folder.mkdir()
    (folder / "versions.py").write_text(VERSION_MODULE % "first")
    (folder / "slow.py").write_text(HUNG)
    server = server_factory(db_path=tmp_path / "hup.db", delegates=folder, workers=2, runners=1).start()
    assert code_of(server, server.start_process(("version", {}))) == "first"
    hung = server.start_process(("hung", {}))["steps"][0]["processStepId"]
    waiting = server.start_process(("waits", {}))["steps"][0]["processStepId"]
    wait_for(lambda: server.step(hung)["phase"] == "RUNNING", what="the hung delegate to run")
    wait_for(lambda: server.step(waiting)["phase"] == "DEFERRED", what="the deferred step")
    old_runners = set(server.runner_pids())

    answers, stop = [], threading.Event()

    def keep_asking():  # the API under load through the reload: every request answered
        while not stop.is_set():
            answers.append(server.get(f"{P}?limit=1", timeout=5).status_code)

    probe = threading.Thread(target=keep_asking)
    probe.start()
    try:
        (folder / "versions.py").write_text(VERSION_MODULE % "second, after the reload")  # another size
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reloaded: delegates" in server.output(), what="the reload line")
        assert code_of(server, server.start_process(("version", {}))) == "second, after the reload"
        began = time.monotonic()
        wait_for(lambda: server.step(hung)["status"] == "FAILED", timeout=15, what="the hung step to end")
        assert time.monotonic() - began < 10
    finally:
        stop.set()
        probe.join(10)
    assert answers and set(answers) == {200}, answers
    ended = server.step(hung)
    assert ended["error"]["type"] == "Interrupted"
    assert server.step(waiting)["phase"] == "DEFERRED"  # untouched: it still waits for complete-step
    wait_for(lambda: not old_runners & set(server.runner_pids()), what="the old runners to exit")
    assert len(server.runner_pids()) == 1


def test_a_reload_whose_delegates_do_not_load_keeps_the_old_ones(server_factory, tmp_path):
    folder = tmp_path / "delegates"
    folder.mkdir()
    (folder / "versions.py").write_text(VERSION_MODULE % "kept")
    server = server_factory(db_path=tmp_path / "broken.db", delegates=folder).start()
    runners = set(server.runner_pids())
    (folder / "broken.py").write_text("raise RuntimeError('not today')\n")
    os.killpg(server.proc.pid, signal.SIGHUP)  # the whole group, as a closing terminal sends it
    wait_for(lambda: "reload refused" in server.output(), what="the refusal")
    line = next(line for line in server.output().splitlines() if "reload refused" in line)
    assert str(folder / "broken.py") in line or str(folder / "broken.py") in server.output()
    assert server.proc.poll() is None and set(server.runner_pids()) == runners
    assert code_of(server, server.start_process(("version", {}))) == "kept"
