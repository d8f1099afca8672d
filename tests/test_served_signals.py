"""SIGHUP to `stepd serve` (a `kill -HUP`, or the whole process group's when a terminal closes):
reloading is not built yet, so the service says so in one line and goes on serving with the same
runners, where the signal's default action would have stopped it."""

import os
import signal

from helpers import wait_for


def test_sighup_is_said_and_changes_nothing(server_factory, tmp_path):
    server = server_factory(db_path=tmp_path / "hup.db").start()
    runners, workers = server.runner_pids(), server.worker_pids()
    os.killpg(server.proc.pid, signal.SIGHUP)  # the whole group, as a closing terminal sends it
    wait_for(lambda: "SIGHUP: reloading is not supported yet" in server.output(), what="the SIGHUP line")
    process = server.start_process(("noop", {}))
    assert server.wait_process(process["processId"], "COMPLETED")["status"] == "COMPLETED"
    assert server.proc.poll() is None and server.runner_pids() == runners
    # gunicorn replaces its workers on HUP (gracefully): as many as before serve again
    wait_for(lambda: len(server.worker_pids()) == len(workers), what="gunicorn's workers after its HUP")
