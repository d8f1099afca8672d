"""Prometheus metrics, `GET /metrics` (SPEC 11): every series is defined and collected here; the
other modules call one function each where they see what is measured.

Two kinds of series, by where their truth is kept:

- **From the database, at scrape time** (`collect_from`): `stepd_steps{status}`,
  `stepd_processes{status}`, `stepd_step_attempts_total{type,trigger}`,
  `stepd_step_outcomes_total{type,outcome}`, `stepd_queued_attempts`, `stepd_queue_oldest_seconds`,
  `stepd_runners_alive`. The counts and counters are
  tallies that every write of the store adds to in its own transaction (store.Change.tally; the
  table is migration 7's), so a scrape reads a
  few rows on a read connection, never the write lock, and the counters count the work of every
  process that writes the file, never going backwards when a runner, the node or the whole
  service is replaced (nor when retention deletes what they counted).
- **In the node's memory, kept across its replacement**: the histograms of step durations and queue
  times, which need the node's clock (the database keeps milliseconds; a queue time is often less
  than one), and the HTTP series. The node sends every attempt and receives every outcome, so
  these count every runner's work, and a runner's death takes nothing from them. Under `stepd
  serve` (or `stepd http`) they are prometheus-client's multiprocess values: each node writes
  them to files in a folder that the HTTP front's master makes for the service's run
  (`service.metrics_folder`), and a scrape sums the files of every node the run had. So a reload,
  which replaces the node, takes nothing from them either; a restart of the service starts them
  from zero (a counter reset, which Prometheus's `rate()` and `increase()` take in their stride).
  In a process without that folder (the tests' app) they are this process's own.
"""

import bisect
import collections
import os
import threading
import time
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from stepd.liveness import runner_is_alive
from stepd.model import COMPLETED, FAILED, VERSION

# Whether prometheus-client keeps the values below in its multiprocess files: it decides when it is
# imported, by this variable, which `stepd http` sets for its workers (service.metrics_folder).
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

# The text format's version 0.0.4, which every Prometheus reads (the body is the same in 1.0.0 with these names).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Step durations run from a millisecond to an hour; queue times from a tenth of a millisecond to a minute.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # any other is "other"
UNMATCHED = "unmatched"  # the route of a request no route matched (a 404): never its raw path
# Attempts begun or sent whose end this process has not seen yet (a dry run's begin, rolled back,
# never ends): at most this many are remembered, the oldest forgotten first.
REMEMBERED = 100_000

_disable_created_metrics()  # no `_created` series beside each counter: nothing here reads them
registry = CollectorRegistry(auto_describe=True)
step_duration = Histogram(
    "stepd_step_duration_seconds",
    "How long a step's attempt ran, from its hand-over to a runner to its outcome, by type and outcome.",
    ["type", "outcome"],
    buckets=DURATION_BUCKETS,
    registry=registry,
)
step_queue = Histogram(
    "stepd_step_queue_seconds",
    "How long an attempt waited, from its begin (committed) to its hand-over to a runner, by type.",
    ["type"],
    buckets=QUEUE_BUCKETS,
    registry=registry,
)
http_requests = Counter(
    "stepd_http_requests",
    "HTTP requests answered, by method, route (the route's template, not the path) and status.",
    ["method", "route", "status"],
    registry=registry,
)
http_duration = Histogram(
    "stepd_http_request_duration_seconds",
    "How long an HTTP request took to answer, by method and route.",
    ["method", "route"],
    buckets=HTTP_BUCKETS,
    registry=registry,
)


_children = {}  # (metric, label values) -> its child: found once, not looked up (and checked) on every request


def child(metric, *values):
    """`metric.labels(*values)`, remembered: prometheus-client's lookup costs tens of microseconds,
    paid on every request and every step otherwise. The label values are bounded (routes,
    statuses, step types), so is this."""
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


class _Times:
    """What is known of each attempt, (step id, attempt), since it reached a point (its time.monotonic()
    first), until it is taken."""

    def __init__(self):
        self._times = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, key, moment):
        self.put_all([(key, moment)])

    def take(self, key):
        with self._lock:
            return self._times.pop(key, None)

    def put_all(self, items):
        """Each (key, moment) remembered, under one hold of the lock; the oldest forgotten past REMEMBERED."""
        with self._lock:
            for key, moment in items:
                self._times[key] = moment
                self._times.move_to_end(key)
            while len(self._times) > REMEMBERED:
                self._times.popitem(last=False)

    def take_all(self, keys):
        """[take(key) for each key], under one hold of the lock."""
        with self._lock:
            return [self._times.pop(key, None) for key in keys]


_begun = _Times()  # attempts begun (queued, or begun for a runner), not yet sent
_sent = _Times()  # attempts sent to a runner, not yet ended: (when, step type)


# -- the hooks: one call each, where the node sees the moment --------------------------------------
def begun(key):
    """An attempt was begun (store.Change.begin): its queue time starts now."""
    _begun.put(key, time.monotonic())


def sent(jobs):
    """These attempts were handed to a runner (dispatch): their queue time ends, their run begins."""
    now = time.monotonic()
    waited = collections.defaultdict(list)
    for job, queued in zip(jobs, _begun.take_all([job.key for job in jobs]), strict=True):
        if queued is not None:  # begun by another process (the node a reload replaced): not seen here
            waited[child(step_queue, job.type)].append(now - queued)
    _observe_all(waited)
    _sent.put_all([(job.key, (now, job.type)) for job in jobs])


def ended(outcomes):
    """A runner's outcomes were recorded (dispatch): each attempt's duration, by its outcome."""
    now = time.monotonic()
    durations = collections.defaultdict(list)
    for outcome, taken in zip(outcomes, _sent.take_all([outcome.job.key for outcome in outcomes]), strict=True):
        label = _outcome_label(outcome)
        if taken is not None and label is not None:
            durations[child(step_duration, outcome.job.type, label)].append(now - taken[0])
    _observe_all(durations)


def _observe_all(observed):
    """{histogram child: [amounts]}: each amount observed as prometheus-client's Histogram.observe
    observes it (into the first bucket whose bound is not below it), with one write of each bucket
    and of the sum a call. Each write of a multiprocess value takes a lock and writes its file: a
    group's 30 steps of a type cost 60 writes through observe(), and 2 to 4 here (5% of a step in
    the node, measured). Reads prometheus-client's own fields (_upper_bounds, _buckets, _sum), as
    the version requirements.txt pins has them (tests/test_api_metrics.py compares the two ways).
    A NaN, which observe() puts in no bucket, would land in the first: a difference of two
    time.monotonic() readings is never one."""
    for histogram, amounts in observed.items():
        histogram._sum.inc(sum(amounts))
        for bucket, count in collections.Counter(
            bisect.bisect_left(histogram._upper_bounds, a) for a in amounts
        ).items():
            histogram._buckets[bucket].inc(count)


def lost(keys, interrupted):
    """A runner is gone (dispatch): its attempts in `keys` whose step is in `interrupted` ended Interrupted."""
    now = time.monotonic()
    interrupted = set(interrupted)
    for step_id, attempt in list(keys):
        taken = _sent.take((step_id, attempt))
        if taken is not None and step_id in interrupted:
            child(step_duration, taken[1], "interrupted").observe(now - taken[0])


def let_go(keys):
    """Attempts ended from outside while a runner had them (fail-step, a cancel): no outcome will come."""
    for key in keys:
        _sent.take(key)


def _outcome_label(outcome):
    if outcome.kind == COMPLETED:
        return "completed"
    if outcome.kind == FAILED:
        return "timeout" if (outcome.error or {}).get("type") == "Timeout" else "failed"
    return None  # deferred: its delegate returned, the step waits for complete-step or fail-step


# -- HTTP ---------------------------------------------------------------------------------------
def init_app(app):
    """Count and time every request `app` answers, labelled by its route's template."""
    from flask import g, request  # the HTTP side only: a runner process never loads Flask

    @app.before_request
    def _start_clock():
        g.metrics_started = time.monotonic()

    @app.after_request
    def _count(response):
        if request.environ.get("stepd.forwarded"):  # the front that forwarded it counts it (handoff.py)
            return response
        started = g.get("metrics_started")
        method = request.method if request.method in HTTP_METHODS else "other"
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        child(http_requests, method, route, str(response.status_code)).inc()
        if started is not None:
            child(http_duration, method, route).observe(time.monotonic() - started)
        return response


# -- a scrape -----------------------------------------------------------------------------------
def collect_from(store):
    """The series read from the database now: one snapshot on a read connection."""
    tallies = store.metric_tallies()
    steps = GaugeMetricFamily("stepd_steps", "Steps stored, by status (exact, as of this scrape).", labels=["status"])
    for status, count in tallies["steps"]:
        steps.add_metric([status], count)
    processes = GaugeMetricFamily(
        "stepd_processes", "Processes stored, by status (exact, as of this scrape).", labels=["status"]
    )
    for status, count in tallies["processes"]:
        processes.add_metric([status], count)
    attempts = CounterMetricFamily(
        "stepd_step_attempts",
        "Attempts begun, by step type and trigger (start, restart, retry); kept in the database.",
        labels=["type", "trigger"],
    )
    for step_type, trigger, count in tallies["attempts"]:
        attempts.add_metric([step_type, trigger], count)
    outcomes = CounterMetricFamily(
        "stepd_step_outcomes",
        "Attempts ended, by step type and outcome (completed, failed, interrupted, timeout); kept in the database.",
        labels=["type", "outcome"],
    )
    for step_type, outcome, count in tallies["outcomes"]:
        outcomes.add_metric([step_type, outcome], count)
    queued = GaugeMetricFamily(
        "stepd_queued_attempts",
        "Attempts waiting for a runner now: queued, or a retry that is due.",
        value=tallies["queued"],
    )
    since = tallies["queued_since"]
    oldest = GaugeMetricFamily(
        "stepd_queue_oldest_seconds",
        "How long the attempt waiting longest for a runner has waited (0 when none waits).",
        value=max(0.0, _seconds(tallies["now"]) - _seconds(since)) if since is not None else 0.0,
    )
    alive = sum(1 for row in tallies["runners"] if runner_is_alive(row))
    runners = GaugeMetricFamily("stepd_runners_alive", "Runner processes alive now.", value=alive)
    build = GaugeMetricFamily("stepd_build_info", "The version of stepd serving; always 1.", labels=["version"])
    build.add_metric([VERSION], 1)
    return [steps, processes, attempts, outcomes, queued, oldest, runners, build]


def _seconds(text):
    """stepd's UTC text as seconds since the epoch."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class _Scrape:
    """What one scrape exposes: the database's series, then the node's (summed over the files of
    every node of this run, in the multiprocess folder; else this process's)."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        yield from collect_from(self.store)
        if MULTIPROCESS:
            yield from multiprocess.MultiProcessCollector(CollectorRegistry()).collect()
        else:
            yield from registry.collect()


def exposition(store):
    """The whole scrape, in Prometheus's text format (bytes; its content type is CONTENT_TYPE)."""
    return generate_latest(_Scrape(store))
