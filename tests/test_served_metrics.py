"""GET /metrics on a real service (`stepd serve`): a scraper's HTTP Basic, and counters that never go
backwards when a runner process is killed and replaced, nor when a reload replaces the node."""

import os
import signal
from pathlib import Path

import requests
from helpers import METRICS, basic, metric, metric_samples, wait_for


def scrape(server):
    response = requests.get(server.url + METRICS, headers={"Authorization": basic("env", server.token)}, timeout=10)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return metric_samples(response.text)


def kinds(server):
    """{sample name: the family's type} of one scrape, to find every counter's and histogram's samples."""
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(server.url + METRICS, headers=server.headers(), timeout=10)
    return {s.name: f.type for f in text_string_to_metric_families(response.text) for s in f.samples}


def went_back(before, after, types, keep=lambda name: True):
    """Every counter sample, and every histogram bucket, count and sum, that is lower after than before."""
    return {
        key: (value, after.get(key, 0.0))
        for key, value in before.items()
        if types.get(key[0]) in ("counter", "histogram") and keep(key[0]) and after.get(key, 0.0) < value
    }


def test_no_counter_goes_backwards_when_a_runner_is_killed(server_factory, tmp_path):
    server = server_factory(db_path=tmp_path / "metrics.db", runners=1).start()
    for _ in range(3):
        server.wait_process(server.start_process(("noop", {}), ("noop", {}))["processId"], "COMPLETED")
    server.wait_process(server.start_process(("check", {"ok": 0}))["processId"], "FAILED")
    hung = server.start_process(("hang", {"file": str(tmp_path / "x"), "seconds": 30.0}))["steps"][0]["processStepId"]
    wait_for(lambda: server.step(hung)["phase"] == "RUNNING", what="the hang delegate to run")
    before = scrape(server)
    assert metric(before, "stepd_runners_alive") == 1

    (runner,) = server.runner_pids()
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: server.step(hung)["status"] == "FAILED", what="the step to be Interrupted")
    assert server.step(hung)["error"]["type"] == "Interrupted"
    wait_for(lambda: len(server.runner_pids()) == 1 and server.runner_pids() != [runner], what="a new runner")
    wait_for(lambda: metric(scrape(server), "stepd_runners_alive") == 1, what="the new runner to register")
    server.wait_process(server.start_process(("noop", {}))["processId"], "COMPLETED")  # run by the new runner
    after = scrape(server)

    assert not went_back(before, after, kinds(server))
    interrupted = {"type": "hang", "outcome": "interrupted"}
    assert (
        metric(after, "stepd_step_outcomes_total", **interrupted)
        - metric(before, "stepd_step_outcomes_total", **interrupted)
        == 1
    )
    assert metric(after, "stepd_step_duration_seconds_count", **interrupted) == 1
    done = {"type": "noop", "outcome": "completed"}
    assert metric(after, "stepd_step_outcomes_total", **done) == metric(before, "stepd_step_outcomes_total", **done) + 1
    assert metric(after, "stepd_step_duration_seconds_count", **done) == 7  # all 7, by both runners


def test_a_reload_takes_nothing_from_any_counter(server_factory, tmp_path):
    """A reload replaces the HTTP worker and the runners: what the database keeps (attempts,
    outcomes) carries on, and so do the processes' own series (histograms, HTTP), summed over the
    files every process of the run wrote (prometheus-client's multiprocess folder, the service's)."""
    server = server_factory(db_path=tmp_path / "reload.db", runners=1).start()
    server.wait_process(server.start_process(("noop", {}), ("noop", {}))["processId"], "COMPLETED")
    before = scrape(server)
    assert metric(before, "stepd_step_duration_seconds_count", type="noop", outcome="completed") == 2
    (worker,) = server.worker_pids()
    (runner,) = server.runner_pids()
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for(lambda: server.worker_pids() and server.worker_pids() != [worker], timeout=20, what="a new worker")
    wait_for(lambda: server.runner_pids() and runner not in server.runner_pids(), timeout=20, what="a new runner")
    wait_for(lambda: metric(scrape(server), "stepd_runners_alive") == 1, timeout=20, what="its runner")
    server.wait_process(server.start_process(("noop", {}))["processId"], "COMPLETED")  # run by the new runner
    # The old worker has exited (its series, in the run's folder, still count; its exit deletes nothing).
    wait_for(lambda: not Path(f"/proc/{worker}").exists(), timeout=20, what="the old worker to exit")
    after = scrape(server)
    assert not went_back(before, after, kinds(server))
    assert metric(after, "stepd_step_attempts_total", type="noop", trigger="start") == 3
    assert metric(after, "stepd_step_outcomes_total", type="noop", outcome="completed") == 3
    assert metric(after, "stepd_step_duration_seconds_count", type="noop", outcome="completed") == 3  # 2 + 1
    posts = {"method": "POST", "route": "/api/v1/processes", "status": "201"}
    assert (
        metric(after, "stepd_http_requests_total", **posts) == metric(before, "stepd_http_requests_total", **posts) + 1
    )


def test_the_metrics_folder_goes_with_the_service(server_factory, tmp_path):
    """The node writes its series into the folder of the service's run, which a stop deletes; the
    folder a killed service left is deleted by the next start, another live one's is not."""
    temporary = tmp_path / "tmp"  # the service's temporary folder (TMPDIR), where it makes the run's
    killed = temporary / "stepd-metrics-999999999-abc"  # no process has this pid (above pid_max)
    alive = temporary / f"stepd-metrics-{os.getpid()}-abc"
    for folder in (killed, alive):
        folder.mkdir(parents=True)
        (folder / "counter_1.db").write_bytes(b"")
    server = server_factory(db_path=tmp_path / "folder.db", runners=1, extra_env={"TMPDIR": str(temporary)}).start()
    assert not killed.exists() and alive.exists()
    scrape(server)
    # A runner is exec'd by the node with the node's environment, which the service gave it.
    (runner,) = server.runner_pids()
    environment = Path(f"/proc/{runner}/environ").read_bytes().split(b"\0")
    [folder] = [
        entry.split(b"=", 1)[1].decode() for entry in environment if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
    ]
    assert Path(folder).parent == temporary and any(Path(folder).glob("*.db")), "the node wrote no value there"
    assert server.stop() == 0
    assert not Path(folder).exists()
