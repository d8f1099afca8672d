"""GET /metrics through the test client (SPEC 11, issue 19): credentials, every series, and that each
moves by exactly what was done; the shipped dashboard and alert rules name only series it serves."""

import json
import re
import shutil
import sqlite3
import subprocess
import time

import pytest
import yaml
from helpers import (
    CANCEL,
    ERROR_MESSAGES,
    METRICS,
    OPERATOR_SECRET,
    READER_SECRET,
    ROOT,
    SKIP,
    STEPS,
    basic,
    insert_finished_processes,
    metric,
    metric_families,
    metric_samples,
    wait_for,
)

from stepd.app import stop_background
from stepd.retention import purge

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
RULES = ROOT / "deploy" / "prometheus-rules.yml"
SPEC_SERIES = {
    "stepd_steps": "gauge",
    "stepd_processes": "gauge",
    "stepd_step_attempts": "counter",
    "stepd_step_outcomes": "counter",
    "stepd_step_duration_seconds": "histogram",
    "stepd_step_queue_seconds": "histogram",
    "stepd_runners_alive": "gauge",
    "stepd_http_requests": "counter",
    "stepd_http_request_duration_seconds": "histogram",
    "stepd_build_info": "gauge",
}


def scrape(client, headers=None):
    response = client.get(METRICS, headers=headers or {"Authorization": basic("viewer", READER_SECRET)})
    assert response.status_code == 200, response.data[:500]
    return metric_samples(response.get_data(as_text=True))


def db_counts(db_path, table):
    conn = sqlite3.connect(db_path)
    try:
        return dict(conn.execute(f"SELECT status, COUNT(*) FROM {table} GROUP BY status").fetchall())
    finally:
        conn.close()


# -- credentials and format --------------------------------------------------------------------------
def test_a_reader_scrapes_with_http_basic_in_the_text_format(client):
    response = client.get(METRICS, headers={"Authorization": basic("viewer", READER_SECRET)})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = metric_families(response.get_data(as_text=True))
    for name, kind in SPEC_SERIES.items():
        if kind != "histogram" and name != "stepd_http_requests":  # those appear once something was observed
            assert families.get(name) == kind, (name, families)


def test_an_operator_scrapes_with_a_bearer_token(api):
    assert api.get(METRICS).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": basic("viewer", "wrong")}, {"Authorization": "Bearer nope"}],
    ids=["none", "wrong-basic", "wrong-bearer"],
)
def test_without_a_good_credential_it_is_a_401_in_the_envelope(client, headers):
    response = client.get(METRICS, headers=headers)
    assert response.status_code == 401
    assert response.json["message"] == ERROR_MESSAGES[401]
    assert "Basic" in response.headers["WWW-Authenticate"]
    assert b"stepd_" not in response.data


def test_build_info_says_the_version(client):
    from stepd.model import VERSION

    assert metric(scrape(client), "stepd_build_info", version=VERSION) == 1


# -- counts read from the database ---------------------------------------------------------------------
def test_steps_and_processes_by_status_are_what_the_file_holds(api, client, db_path, failed_step, deferred_step):
    done = api.start(("noop", {}), ("noop", {}))
    api.wait_process(done["processId"], "COMPLETED")
    cancelled = api.start(("check", {"ok": 0}), ("noop", {}))
    api.wait_process(cancelled["processId"], "FAILED")
    assert api.post(CANCEL, {"processId": cancelled["processId"]}).status_code == 200
    skipped = api.start(("check", {"ok": 0}))
    step_id = api.wait_process(skipped["processId"], "FAILED")["steps"][0]["processStepId"]
    assert api.post(SKIP, {"processStepId": step_id}).status_code == 200
    insert_finished_processes(db_path, 3, status="CANCELLED", steps=2)  # written by another program

    samples = scrape(client)
    for table, series, statuses in (
        ("steps", "stepd_steps", ("PENDING", "STARTED", "COMPLETED", "FAILED", "SKIPPED", "CANCELLED")),
        ("processes", "stepd_processes", ("RUNNING", "COMPLETED", "FAILED", "CANCELLED")),
    ):
        counts = db_counts(db_path, table)
        assert {s: metric(samples, series, status=s) for s in statuses} == {s: counts.get(s, 0) for s in statuses}
    assert metric(samples, "stepd_steps", status="SKIPPED") == 1
    assert metric(samples, "stepd_processes", status="CANCELLED") == 4


def test_the_counts_follow_retention_deleting_processes(app, client, db_path):
    insert_finished_processes(db_path, 5, steps=3)
    before = scrape(client)
    assert metric(before, "stepd_steps", status="COMPLETED") == 15
    purge(app.extensions["stepd"].store, 30)
    after = scrape(client)
    assert metric(after, "stepd_steps", status="COMPLETED") == 0
    assert metric(after, "stepd_processes", status="COMPLETED") == 0
    # ... and the counters of what was done stay: deleting attempts takes nothing off them
    assert metric(after, "stepd_step_attempts_total", type="noop", trigger="start") == 15


def test_a_scrape_does_not_wait_for_the_write_lock(client, db_path):
    holder = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        holder.execute("UPDATE processes SET name = name")
        started = time.monotonic()
        samples = scrape(client)
        assert time.monotonic() - started < 1.0
        assert metric(samples, "stepd_runners_alive") == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_queued_attempts_and_the_oldest_age(app, api, client):
    stop_background(app, grace=0.2)  # no runner: what starts now waits in the queue
    first = scrape(client)
    assert metric(first, "stepd_queued_attempts") == 0 and metric(first, "stepd_queue_oldest_seconds") == 0
    assert metric(first, "stepd_runners_alive") == 0
    api.start(("noop", {}))
    time.sleep(0.05)
    api.start(("noop", {}))
    time.sleep(0.2)
    samples = scrape(client)
    assert metric(samples, "stepd_queued_attempts") == 2
    assert 0.2 <= metric(samples, "stepd_queue_oldest_seconds") < 10


# -- counters: attempts and outcomes ---------------------------------------------------------------------
def test_a_restart_of_a_failing_step_counts_one_attempt_and_one_failure(api, client, failed_step):
    before = scrape(client)
    step_id = failed_step["processStepId"]
    assert api.restart(step_id).status_code == 200
    wait_for(lambda: api.step(step_id)["attempts"] == 2 and api.step(step_id)["status"] == "FAILED")
    after = scrape(client)

    def moved(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("stepd_step_attempts_total", type="check", trigger="restart") == 1
    assert moved("stepd_step_attempts_total", type="check", trigger="start") == 0
    assert moved("stepd_step_outcomes_total", type="check", outcome="failed") == 1
    assert moved("stepd_step_outcomes_total", type="check", outcome="completed") == 0
    assert moved("stepd_step_duration_seconds_count", type="check", outcome="failed") == 1
    assert moved("stepd_step_queue_seconds_count", type="check") == 1
    assert moved("stepd_steps", status="FAILED") == 0  # FAILED again, the same one


def test_automatic_retries_count_with_their_trigger(api, client, counted):
    before = scrape(client)
    process = api.start(("retry_count", {"file": str(counted), "pass_at": 3}))
    api.wait_process(process["processId"], "COMPLETED")
    after = scrape(client)
    moved = {
        (trigger, outcome): (
            metric(after, "stepd_step_attempts_total", type="retry_count", trigger=trigger)
            - metric(before, "stepd_step_attempts_total", type="retry_count", trigger=trigger),
            metric(after, "stepd_step_outcomes_total", type="retry_count", outcome=outcome)
            - metric(before, "stepd_step_outcomes_total", type="retry_count", outcome=outcome),
        )
        for trigger, outcome in (("start", "failed"), ("retry", "completed"))
    }
    assert moved == {("start", "failed"): (1, 2), ("retry", "completed"): (2, 1)}


def test_a_timeout_is_its_own_outcome(api, client, tmp_path):
    before = scrape(client)
    process = api.start(("linger", {"file": str(tmp_path / "cancelled"), "seconds": 5.0}))
    step = api.wait_process(process["processId"], "FAILED")["steps"][0]
    assert step["error"]["type"] == "Timeout"
    after = scrape(client)
    assert (
        metric(after, "stepd_step_outcomes_total", type="linger", outcome="timeout")
        - metric(before, "stepd_step_outcomes_total", type="linger", outcome="timeout")
        == 1
    )
    assert metric(after, "stepd_step_outcomes_total", type="linger", outcome="failed") == metric(
        before, "stepd_step_outcomes_total", type="linger", outcome="failed"
    )
    timed = metric(after, "stepd_step_duration_seconds_count", type="linger", outcome="timeout") - metric(
        before, "stepd_step_duration_seconds_count", type="linger", outcome="timeout"
    )
    assert timed == 1
    # it ran about its timeout (0.5 s): counted in the bucket up to 1 s, not in the one up to 0.25 s
    for le, expected in (("0.25", 0), ("1.0", 1)):
        bucket = "stepd_step_duration_seconds_bucket"
        labels = {"type": "linger", "outcome": "timeout", "le": le}
        assert metric(after, bucket, **labels) - metric(before, bucket, **labels) == expected


def test_a_step_whose_runner_stops_is_counted_interrupted(app, api, client, tmp_path):
    before = scrape(client)
    started = tmp_path / "started"
    process = api.start(("hang", {"file": str(tmp_path / "x"), "seconds": 30.0, "started": str(started)}))
    step_id = process["steps"][0]["processStepId"]
    # Its delegate called, not only claimed: one claimed but not begun is queued again at the stop.
    wait_for(started.exists, what="the delegate to run")
    stop_background(app, grace=0.1)
    step = api.wait_step(step_id, "FAILED")  # its end is recorded by the stop, or just after under load
    assert step["error"]["type"] == "Interrupted"
    interrupted = {"type": "hang", "outcome": "interrupted"}
    counted = metric(before, "stepd_step_duration_seconds_count", **interrupted)
    after = wait_for(
        lambda: (s := scrape(client)) and metric(s, "stepd_step_duration_seconds_count", **interrupted) > counted and s,
        what="the interrupted attempt's duration",
    )
    for name in ("stepd_step_outcomes_total", "stepd_step_duration_seconds_count"):
        moved = metric(after, name, type="hang", outcome="interrupted") - metric(
            before, name, type="hang", outcome="interrupted"
        )
        assert moved == 1, name
    assert metric(after, "stepd_runners_alive") == 0


def test_fail_step_and_complete_step_from_outside_are_outcomes(api, client, deferred_step):
    before = scrape(client)
    step_id = deferred_step["processStepId"]
    assert api.post("/api/v1/processes/complete-step", {"processStepId": step_id}).status_code == 200
    after = scrape(client)
    moved = metric(after, "stepd_step_outcomes_total", type="external", outcome="completed") - metric(
        before, "stepd_step_outcomes_total", type="external", outcome="completed"
    )
    assert moved == 1


# -- HTTP ---------------------------------------------------------------------------------------------
def test_requests_are_counted_by_route_template_not_by_path(api, client, scenario):
    route = "/api/v1/processes/steps/<id:step_id>"
    before = scrape(client)
    for step_id in (scenario["done_step"], scenario["failed_step"]):
        assert api.get(f"{STEPS}/{step_id}").status_code == 200
    assert api.get(f"{STEPS}/nosuchstep").status_code == 404
    assert api.get("/no/such/path/here").status_code == 404
    response = client.get(METRICS, headers={"Authorization": basic("ops", OPERATOR_SECRET)})
    text = response.get_data(as_text=True)
    after = metric_samples(text)

    def moved(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("stepd_http_requests_total", method="GET", route=route, status="200") == 2
    assert moved("stepd_http_requests_total", method="GET", route=route, status="404") == 1
    assert moved("stepd_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert moved("stepd_http_request_duration_seconds_count", method="GET", route=route) == 3
    assert moved("stepd_http_requests_total", method="GET", route="/metrics", status="200") == 1  # the one before
    assert scenario["done_step"] not in text and "nosuchstep" not in text and "/no/such" not in text


def test_the_histograms_have_the_buckets_of_the_work(api, client):
    api.wait_process(api.start(("noop", {}))["processId"], "COMPLETED")
    samples = scrape(client)
    buckets = {
        name: sorted(float(dict(labels)["le"]) for (sample, labels) in samples if sample == name)
        for name in ("stepd_step_duration_seconds_bucket", "stepd_step_queue_seconds_bucket")
    }
    duration = sorted({le for le in buckets["stepd_step_duration_seconds_bucket"]})
    queue = sorted({le for le in buckets["stepd_step_queue_seconds_bucket"]})
    assert (duration[0], duration[-2], duration[-1]) == (0.001, 3600, float("inf"))
    assert (queue[0], queue[-2], queue[-1]) == (0.0001, 60, float("inf"))


# -- the tallies behind the counts ------------------------------------------------------------------
def test_the_tallies_of_a_migrated_file_start_from_what_it_holds(tmp_path):
    from stepd.db import Database, statements
    from stepd.migrations import MIGRATIONS
    from stepd.store import Store

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:5], start=1):
        for statement in statements(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.close()
    insert_finished_processes(path, 4, steps=2)
    insert_finished_processes(path, 1, status="FAILED")
    Database(path).prepare()
    tallies = Store(Database(path)).metric_tallies()
    assert dict(tallies["steps"])["COMPLETED"] == 8 and dict(tallies["steps"])["FAILED"] == 1
    assert dict(tallies["processes"]) == {"RUNNING": 0, "COMPLETED": 4, "FAILED": 1, "CANCELLED": 0}
    assert tallies["attempts"] == [("noop", "start", 9)]
    assert tallies["outcomes"] == [("noop", "completed", 8), ("noop", "failed", 1)]


# -- the shipped dashboard and alert rules ---------------------------------------------------------------
def expressions():
    """Every PromQL expression of deploy/: (where, expression)."""
    rules = yaml.safe_load(RULES.read_text())
    found = [(f"rule {r['alert']}", r["expr"]) for group in rules["groups"] for r in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    found += [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    return found


def test_the_dashboard_and_the_rules_name_only_series_that_metrics_serves(api, client, tmp_path):
    # some work first, so that every labelled series has a sample: a completion, a failure, a timeout
    api.wait_process(api.start(("noop", {}))["processId"], "COMPLETED")
    api.wait_process(api.start(("check", {"ok": 0}))["processId"], "FAILED")
    served = {name for name, _labels in scrape(client)}
    found = expressions()
    assert len(found) >= 4 + 10
    for where, expr in found:
        names = set(re.findall(r"\bstepd_[a-z_]+\b", expr))
        assert names, f"{where} names no stepd series: {expr}"
        assert names <= served, f"{where} names {sorted(names - served)}, which /metrics does not serve"
    rules = {r["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]}
    assert rules == {"StepdFailedStepsRising", "StepdNoLiveRunner", "StepdQueueGrowing", "StepdStepP95High"}


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package): `promtool check rules` not run")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_observing_a_list_at_once_counts_as_observing_each_amount():
    """metrics._observe_all (one write per bucket a call) leaves a histogram as Histogram.observe,
    amount by amount, leaves it: amounts on a bucket's bound, between bounds, past the last one."""
    from prometheus_client import CollectorRegistry, Histogram

    from stepd import metrics

    amounts = [0.0, 0.0001, 0.00010001, 0.003, 0.003, 0.005, 59.9, 60, 61, 1e6]
    one_by_one, at_once = (
        Histogram(f"h_{n}", "h", ["type"], buckets=metrics.QUEUE_BUCKETS, registry=CollectorRegistry()).labels("t")
        for n in range(2)
    )
    for amount in amounts:
        one_by_one.observe(amount)
    metrics._observe_all({at_once: amounts})

    def samples(histogram):
        return [(sample.name, sample.labels, sample.value) for sample in histogram._child_samples()]

    assert samples(at_once) == samples(one_by_one)
    assert samples(at_once)[0] == ("_bucket", {"le": "0.0001"}, 2.0)
