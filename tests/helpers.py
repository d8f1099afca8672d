"""What the tests share, but fixtures (those are all in conftest.py): paths, secrets, response
checks, polling and racing, database helpers, the Api wrapper of Flask's test client and the Server
class for real gunicorn. No test file imports another test file or conftest.py.

The test files are named by what they touch:
    test_<module>.py        one module alone, no app (test_config, test_delegates, test_runner,
                            test_store, test_invariants)
    test_api_<topic>.py     the app in this process: create_app and Flask's test client (fixture api)
    test_served_<topic>.py  real gunicorn processes on loopback (class Server): a service of the
                            test's own (fixture server_factory), or the session's shared default
                            one (fixture served)
"""

import base64
import collections
import contextlib
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import requests

from stepd.model import new_id, params_to_json
from stepd.store import add_to_tally

# -- paths -----------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
GUNICORN = Path(sys.executable).parent / "gunicorn"
STEPD = Path(sys.executable).parent / "stepd"  # the command, as `make` installs it in .venv/


def run_cli(db_path, *args):
    """`stepd ARGS` in this process (click's runner) with STEPD_DB=db_path: (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from stepd.cli import stepd

    result = CliRunner().invoke(stepd, list(args), env={"STEPD_DB": str(db_path)})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# -- the README's walkthrough ------------------------------------------------------------------------
README = (ROOT / "README.md").read_text()


def readme_block(name, language="bash"):
    """The ```language block between <!-- name:start --> and <!-- name:end --> in the README."""
    marked = README.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]
    return re.search(rf"```{language}\n(.*?)```", marked, re.S).group(1)


def walk_readme(server, token):
    """The README's curl walkthrough, as written, against `server` (a Server) with TOKEN=`token`."""
    script = readme_block("walkthrough").replace("http://127.0.0.1:8080", server.url)
    env = {"PATH": "/usr/bin:/bin", "TOKEN": token}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


# The API's paths, defined here only.
P = "/api/v1/processes"
STEPS = f"{P}/steps"
RESTART = f"{P}/restart-failed-step"
BULK = f"{P}/restart-failed-steps"
FAIL = f"{P}/fail-step"
COMPLETE = f"{P}/complete-step"
CANCEL = f"{P}/cancel"
SKIP = f"{P}/skip-step"
DELEGATES = "/api/v1/delegates"
OPENAPI = "/api/v1/openapi.json"
METRICS = "/metrics"


# -- secrets ---------------------------------------------------------------------------------------
# Secrets of the tokens the fixtures of conftest.py create.
OPERATOR_SECRET = "operator-secret-for-tests"  # the operator 'ops' (fixture api)
READER_SECRET = "reader-secret-for-tests"  # the reader 'viewer' (fixture reader_api)
SECOND_SECRET = "second-operator-secret"  # the operator 'ops2' (fixtures second_operator*)
ENV_SECRET = "env-token-secret-for-tests"  # STEPD_TOKEN of the apps that have one: the principal 'env'
ENV_HEADERS = {"Authorization": f"Bearer {ENV_SECRET}"}


# -- the reliability figures -----------------------------------------------------------------------
# Figures the reliability tests measure; conftest.py prints them at the end of the run.
FIGURES = {}


def report_figure(name, text):
    FIGURES[name] = text


# -- answers ---------------------------------------------------------------------------------------
ENVELOPE_KEYS = {"message", "timestamp", "data", "version"}
ERROR_MESSAGES = {
    401: "Unauthorized request",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    412: "Precondition failed",
    413: "Payload too large",
    500: "Internal Server Error",
    503: "Service unavailable",
}


def _text(response):
    """The body as text, of a Flask test response or a requests response."""
    return response.text if isinstance(response, requests.Response) else response.get_data(as_text=True)


def _json(response):
    return response.json() if isinstance(response, requests.Response) else response.json


def ok(response, status=200):
    """`data` of an answer that must have `status` and a message that is not an error's."""
    assert response.status_code == status, _text(response)[:800]
    body = _json(response)
    assert body["message"] not in ERROR_MESSAGES.values()
    return body["data"]


def refused(response, status=412):
    """`data` of an answer that must have `status`; a 412 must name what was wrong."""
    assert response.status_code == status, _text(response)[:800]
    body = _json(response)
    if status == 412:
        assert body["message"] == "Precondition failed"
        assert isinstance(body["data"], dict) and body["data"]
    return body["data"]


# The shapes of the API's answers (SPEC sections 3 and 4).
ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PROCESS_KEYS = {"processId", "name", "status", "steps", "createdAt", "updatedAt", "variables", "intervention"}
SUMMARY_KEYS = PROCESS_KEYS - {"steps", "variables"}
STEP_KEYS = {
    "processStepId", "processId", "position", "type", "status", "params", "result",
    "attempts", "error", "createdAt", "startedAt", "finishedAt", "deferred", "nextRetryAt", "phase", "intervention",
}  # fmt: skip
INTERVENTION_KEYS = {"action", "principal", "at", "reason"}
ATTEMPT_KEYS = {"attempt", "trigger", "principal", "params", "status", "error", "startedAt", "finishedAt", "requestId"}


def assert_step_shape(step):
    assert set(step) == STEP_KEYS
    assert ID.match(step["processStepId"]) and ID.match(step["processId"])
    assert step["status"] in ("PENDING", "STARTED", "COMPLETED", "FAILED", "SKIPPED", "CANCELLED")
    if step["status"] == "STARTED":
        assert step["phase"] in ("QUEUED", "RUNNING", "DEFERRED", "RETRY_WAIT")
    else:
        assert step["phase"] is None
    parse_time(step["createdAt"])
    for key in ("startedAt", "finishedAt"):
        assert step[key] is None or parse_time(step[key])
    assert isinstance(step["deferred"], bool)
    if step["status"] in ("SKIPPED", "CANCELLED"):
        assert set(step["intervention"]) == INTERVENTION_KEYS
        assert step["intervention"]["action"] == {"SKIPPED": "skip", "CANCELLED": "cancel"}[step["status"]]
        assert step["intervention"]["at"] == step["finishedAt"]
    else:
        assert step["intervention"] is None


# -- values ----------------------------------------------------------------------------------------
def basic(name, secret):
    """An Authorization header value for HTTP Basic."""
    return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()


def typed(**values):
    """Wire-form params from Python values: str -> STRING, int -> LONG, float -> DOUBLE."""
    out = {}
    for name, value in values.items():
        if isinstance(value, str):
            out[name] = {"type": "STRING", "strValue": value}
        elif isinstance(value, int):
            out[name] = {"type": "LONG", "longValue": value}
        else:
            out[name] = {"type": "DOUBLE", "doubleValue": value}
    return out


def out(kind, value):
    form = {"strValue": None, "longValue": None, "doubleValue": None, "type": kind}
    form[{"STRING": "strValue", "LONG": "longValue", "DOUBLE": "doubleValue"}[kind]] = value
    return form


def parse_time(text):
    assert text.endswith("Z") and len(text) == 24, text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")


def iso(moment):
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def b64(text):
    """`text` in unpadded URL-safe base64, as the API's cursors are written."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# -- waiting and racing ----------------------------------------------------------------------------
def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll until predicate() is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def all_at_once(count, call, timeout=60):
    """Run call(0) … call(count - 1) on as many threads, released together by a barrier, so they
    really race; returns their results in order (fails if one did not finish in time)."""
    barrier = threading.Barrier(count)
    results = [None] * count
    finished = [False] * count

    def run(index):
        barrier.wait()
        results[index] = call(index)
        finished[index] = True

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert all(finished), f"{finished.count(False)} of {count} racing calls did not finish"
    return results


# -- files and the database file -------------------------------------------------------------------
class ClientThreads:
    """Client threads running `self._client(n)` until the `with` block ends (a test's load)."""

    def __init__(self, threads):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(threads)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _client(self, number):
        raise NotImplementedError


class MixedLoad(ClientThreads):
    """Client threads that start processes, restart or skip failed steps and cancel processes,
    each request to one of `servers` (Server, or any object with `url` and `headers()`) picked at
    random, recording what was acknowledged. With `calls` (a file), each `nap` step records there
    each call of its delegate (helpers.calls reads them)."""

    def __init__(self, servers, acknowledged, threads=6, calls=None):
        self.servers = servers
        self.acknowledged = acknowledged
        self.calls = {"file": str(calls)} if calls else {}
        self.statuses = collections.Counter()
        self.unanswered = 0  # requests cut off by a kill: never acknowledged, so free to be lost
        self._lock = threading.Lock()
        super().__init__(threads)

    @property
    def requests(self):
        with self._lock:
            return sum(self.statuses.values()) + self.unanswered

    def _client(self, seed):
        rng = random.Random(seed)
        session = requests.Session()
        session.headers.update(self.servers[0].headers())  # one token for every node: one database
        while not self._stop.is_set():
            url = rng.choice(self.servers).url
            try:
                roll = rng.random()
                if roll < 0.45:
                    self._start(session, url, rng)
                elif roll < 0.9:
                    self._act_on_a_failed_step(session, url, rng, "skip" if roll >= 0.78 else "restart")
                else:
                    self._cancel_one(session, url, rng)
            except requests.RequestException:
                with self._lock:
                    self.unanswered += 1
                time.sleep(0.05)  # that service is down: do not spin

    def _post(self, session, url, body):
        response = session.post(url, json=body, timeout=10)
        with self._lock:
            self.statuses[response.status_code] += 1
        return response

    def _start(self, session, url, rng):
        steps = [self._nap(rng, failing=0.5), self._nap(rng, failing=0.3), {"type": "noop"}]
        response = self._post(session, url + P, {"steps": steps})
        if response.status_code == 201:
            with self._lock:
                self.acknowledged.processes.add(response.json()["data"]["processId"])

    def _nap(self, rng, failing):
        """A `nap` step of 0.05-0.3 s that fails with the chance `failing`."""
        params = typed(seconds=rng.uniform(0.05, 0.3), fail=int(rng.random() < failing), **self.calls)
        return {"type": "nap", "params": params}

    def _act_on_a_failed_step(self, session, url, rng, action):
        listed = session.get(f"{url}{STEPS}?status=FAILED&limit=20", timeout=10)
        with self._lock:
            self.statuses[listed.status_code] += 1
        failed = listed.json()["data"]["items"] if listed.status_code == 200 else []
        if not failed:
            return
        step_id = rng.choice(failed)["processStepId"]
        if action == "skip":
            response = self._post(session, url + SKIP, {"processStepId": step_id, "result": typed(skipped=1)})
            if response.status_code == 200:
                with self._lock:
                    self.acknowledged.skips.add(step_id)
            return
        ack = uuid.uuid4().hex  # the attempt row of this restart will hold it in its params
        params = typed(ack=ack, fail=int(rng.random() < 0.3), seconds=rng.uniform(0.05, 0.3))
        response = self._post(session, url + RESTART, {"processStepId": step_id, "params": params})
        if response.status_code == 200:
            with self._lock:
                self.acknowledged.restarts[ack] = step_id

    def _cancel_one(self, session, url, rng):
        """Cancel one of the processes started lately (running, failed, or already completed: 412)."""
        with self._lock:
            started = sorted(self.acknowledged.processes)
        if not started:
            return
        process_id = rng.choice(started)
        response = self._post(session, url + CANCEL, {"processId": process_id, "reason": "load"})
        if response.status_code == 200:
            with self._lock:
                self.acknowledged.cancels.add(process_id)


def make_dry_run(folder, *args, python=sys.executable):
    """`make -n ARGS` in `folder` (a copy of the Makefile and what it reads), with only the system's
    PATH: the commands a target would run, run by none."""
    return subprocess.run(
        ["make", "-n", *args, f"PYTHON={python}"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def write_file(folder, name, source):
    """A file `name` in `folder` holding `source` (dedented); returns its path."""
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def calls(path):
    """The (step id, attempt) of every delegate call counted in `path`."""
    if not Path(path).exists():
        return []
    return [(step, int(attempt)) for step, attempt in (line.split() for line in Path(path).read_text().splitlines())]


def db_rows(db_path, sql, *args):
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def db_write(db_path, sql, *args):
    """One committed change straight in the file, as another program could make it."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        with conn:
            return conn.execute(sql, args).rowcount
    finally:
        conn.close()


def db_dump(db_path, skip=("runners",)):
    """Every row of every table (but `skip`: heartbeats move by themselves), to compare states."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            table: sorted(map(repr, conn.execute(f"SELECT * FROM {table}").fetchall()))
            for table in tables
            if table not in skip
        }
    finally:
        conn.close()


def queued_steps(db_path):
    """How many steps wait for a runner to claim them (STARTED, not deferred, no retry pending)."""
    return db_rows(
        db_path,
        "SELECT COUNT(*) FROM steps"
        " WHERE status = 'STARTED' AND deferred = 0 AND next_retry_at IS NULL AND runner_id IS NULL",
    )[0][0]


# What the rows of these processes add to the tallies GET /metrics reads: the store adds what each of
# its changes writes (store.Change.tally); rows written straight into the file, as the store would
# leave them, are added to the tallies with them here.
TALLIES_OF_PROCESSES = """
    SELECT 'processes', status, '', COUNT(*) FROM processes WHERE id IN ({marks}) GROUP BY status
    UNION ALL SELECT 'steps', status, '', COUNT(*) FROM steps WHERE process_id IN ({marks}) GROUP BY status
    UNION ALL SELECT 'attempts', s.type, a.trigger, COUNT(*) FROM attempts a JOIN steps s ON s.id = a.step_id
        WHERE s.process_id IN ({marks}) GROUP BY s.type, a.trigger
    UNION ALL SELECT 'outcomes', s.type, CASE WHEN a.status = 'COMPLETED' THEN 'completed'
                                         WHEN a.error_type = 'Interrupted' THEN 'interrupted'
                                         WHEN a.error_type = 'Timeout' THEN 'timeout' ELSE 'failed' END, COUNT(*)
        FROM attempts a JOIN steps s ON s.id = a.step_id
        WHERE s.process_id IN ({marks}) AND a.status IN ('COMPLETED', 'FAILED') GROUP BY 2, 3
"""


def add_to_tallies(conn, process_ids):
    """Add the rows of `process_ids` (the processes, their steps and attempts) to the tallies, in
    `conn`'s transaction. A file of a schema before the tallies has none to add to: its migration
    counts what it holds."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tally'").fetchone():
        return
    counts = {}
    for start in range(0, len(process_ids), 300):  # SQLite's limit of parameters, 4 uses each
        chunk = list(process_ids[start : start + 300])
        marks = ",".join("?" * len(chunk))
        for series, a, b, n in conn.execute(TALLIES_OF_PROCESSES.format(marks=marks), chunk * 4).fetchall():
            counts[(series, a, b)] = counts.get((series, a, b), 0) + n
    add_to_tally(conn, counts)


def insert_failed_steps(store, count, step_type="fail", start=None, params=None, process_id=None):
    """`count` FAILED one-step processes written straight into the file (much faster than running them);
    failure times are 1 ms apart from `start`, oldest first. Returns the step ids in that order."""
    start = start or datetime(2020, 1, 1, tzinfo=UTC)
    params = params or {"message": ("STRING", "inserted")}
    step_ids = []
    with store.db.transaction() as db:
        for n in range(count):
            finished = iso(start + timedelta(milliseconds=n))
            pid, sid = process_id or new_id(), new_id()
            if process_id is None:
                db.execute(
                    "INSERT INTO processes (id, name, status, principal, created_at, updated_at)"
                    " VALUES (?, NULL, 'FAILED', 'ops', ?, ?)",
                    (pid, finished, finished),
                )
            position = db.execute("SELECT COUNT(*) FROM steps WHERE process_id = ?", (pid,)).fetchone()[0]
            db.execute(
                "INSERT INTO steps (id, process_id, position, type, status, params, attempts, error_type,"
                " error_message, created_at, started_at, finished_at)"
                " VALUES (?, ?, ?, ?, 'FAILED', ?, 1, 'StepFailure', 'inserted', ?, ?, ?)",
                (sid, pid, position, step_type, params_to_json(params), finished, finished, finished),
            )
            db.execute(
                "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, error_type,"
                " error_message, started_at, finished_at)"
                " VALUES (?, 1, 'start', 'ops', ?, 'FAILED', 'StepFailure', 'inserted', ?, ?)",
                (sid, params_to_json(params), finished, finished),
            )
            step_ids.append(sid)
        # in the tallies, as the store would have counted them: each step FAILED after one attempt
        counts = {("steps", "FAILED", ""): count, ("attempts", step_type, "start"): count}
        counts |= {("outcomes", step_type, "failed"): count, ("processes", "FAILED", ""): 0 if process_id else count}
        add_to_tally(db, counts)
    return step_ids


def insert_finished_processes(db_path, count, status="COMPLETED", finished=None, steps=1):
    """`count` processes that finished (`status` COMPLETED or CANCELLED, or FAILED) at `finished`
    (default: 2020-01-01), each of `steps` steps with one attempt, written straight into the file as
    the service leaves them. Returns their ids."""
    finished = iso(finished or datetime(2020, 1, 1, tzinfo=UTC))
    step_status, attempt_status = {"COMPLETED": ("COMPLETED",) * 2, "CANCELLED": ("CANCELLED",) * 2}.get(
        status, ("FAILED", "FAILED")
    )
    by = "ops" if status == "CANCELLED" else None
    process_ids = [new_id() for _ in range(count)]
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO processes (id, name, status, principal, created_at, updated_at, intervened_by,"
                " intervened_at) VALUES (?, 'old', ?, 'ops', ?, ?, ?, ?)",
                [(pid, status, finished, finished, by, by and finished) for pid in process_ids],
            )
            rows = [(new_id(), pid, position) for pid in process_ids for position in range(steps)]
            conn.executemany(
                "INSERT INTO steps (id, process_id, position, type, status, params, attempts, created_at, started_at,"
                " finished_at, intervened_by, intervened_at) VALUES (?, ?, ?, 'noop', ?, '{}', 1, ?, ?, ?, ?, ?)",
                [(sid, pid, n, step_status, finished, finished, finished, by, by and finished) for sid, pid, n in rows],
            )
            conn.executemany(
                "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, started_at, finished_at)"
                " VALUES (?, 1, 'start', 'ops', '{}', ?, ?, ?)",
                [(sid, attempt_status, finished, finished) for sid, _, _ in rows],
            )
            add_to_tallies(conn, process_ids)
    finally:
        conn.close()
    return process_ids


# -- GET /metrics ------------------------------------------------------------------------------------
def metric_samples(text):
    """A scrape's samples, {(sample name, ((label, value), ...) sorted): value}, parsed by the
    official client's parser; also checks the whole scrape parses."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples, name, **labels):
    """One sample's value (0 when the scrape has no such sample: a counter not yet counted)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metric_families(text):
    """{family name: its type} of a scrape (a counter's family is named without `_total`)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family.type for family in text_string_to_metric_families(text)}


# -- the app in this process: Flask's test client --------------------------------------------------
# Seconds between two reads of a wait on the app in this process (a read takes about a millisecond).
IN_PROCESS_POLL = 0.005


class Api:
    """The Flask test client with credentials, and the calls most tests make."""

    def __init__(self, client, headers):
        self.client = client
        self.headers = headers

    def get(self, path, **kwargs):
        return self.client.get(path, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def post(self, path, body=None, **kwargs):
        return self.client.post(path, json=body, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def start(self, *steps, name=None):
        """Start a process of (type, params-dict) steps; returns its data."""
        body = {"steps": [{"type": t, "params": typed(**p)} for t, p in steps]}
        if name is not None:
            body["name"] = name
        response = self.post(P, body)
        assert response.status_code == 201, response.json
        return response.json["data"]

    def post_raw(self, path, raw, content_type="application/json", **kwargs):
        """POST bytes as they are, with this Content-Type."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.client.post(path, data=raw, content_type=content_type, headers=headers, **kwargs)

    def process(self, process_id):
        return self.get(f"{P}/{process_id}").json["data"]

    def step(self, step_id):
        return self.get(f"{STEPS}/{step_id}").json["data"]

    def process_count(self):
        return len(self.get(f"{P}?limit=500").json["data"]["items"])

    def wait_process(self, process_id, status, timeout=10.0):
        return wait_for(
            lambda: (p := self.process(process_id))["status"] == status and p,
            timeout,
            IN_PROCESS_POLL,
            what=f"process {status}",
        )

    def wait_step(self, step_id, status, timeout=10.0):
        return wait_for(
            lambda: (s := self.step(step_id))["status"] == status and s, timeout, IN_PROCESS_POLL, what=f"step {status}"
        )

    def wait_deferred(self, step_id):
        """The step once its delegate has deferred it (STARTED, waiting for complete-step or fail-step)."""
        return wait_for(
            lambda: (s := self.step(step_id))["deferred"] and s, interval=IN_PROCESS_POLL, what="deferred step"
        )

    def restart(self, step_id, **params):
        body = {"processStepId": step_id}
        if params:
            body["params"] = typed(**params)
        return self.post(RESTART, body)

    def walk(self, path, limit, cursor=None, **query):
        """Every page of a listing from `cursor` on, as lists of items."""
        return walk_pages(lambda params: self.get(path, query_string=params), limit, cursor, query)


def walk_pages(get_page, limit, cursor, query):
    """Every page of a listing, following nextCursor; get_page(params) answers one page."""
    pages = []
    while True:
        params = {**query, "limit": limit, **({"cursor": cursor} if cursor else {})}
        page = ok(get_page(params))
        assert set(page) == {"items", "nextCursor"}
        assert len(page["items"]) <= limit
        pages.append(page["items"])
        cursor = page["nextCursor"]
        if cursor is None:
            return pages
        assert isinstance(cursor, str) and re.fullmatch(r"[A-Za-z0-9_=-]+", cursor)
        assert len(pages) < 100, "paging does not end"


# -- real gunicorn ---------------------------------------------------------------------------------
def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """stepd as `make run` serves it (`stepd serve`: the node and the runner processes it starts,
    gunicorn and its one HTTP worker), on loopback, in a process group of its own."""

    def __init__(
        self,
        db_path,
        token="test-operator-token",
        workers=2,
        threads=4,
        delegates=PLUGINS,
        extra_env=None,
        runners=1,
        folder=None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STEPD_")},
            "STEPD_DB": str(db_path),
            "STEPD_PORT": str(self.port),
            "STEPD_HOST": "127.0.0.1",
            "STEPD_WORKERS": str(workers),
            "STEPD_THREADS": str(threads),
            "STEPD_TOKEN": token or "",
            "STEPD_DELEGATES_PATH": str(delegates) if delegates else "",
            "STEPD_LOG_LEVEL": "INFO",
            "STEPD_RUNNERS": str(runners),
            **(extra_env or {}),
        }
        self.proc = None
        # Any folder: the service never looks at its own files by path. A PostgreSQL URL has none: `folder`.
        self.cwd = Path(folder) if folder else Path(db_path).parent
        self.log_path = self.cwd / "served.log" if folder else Path(db_path).with_suffix(".log")

    def start(self, wait=True):
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop(), it outlives this call
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stepd", "serve"],
            cwd=self.cwd,
            env=self.env,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,  # its own process group, as a service manager would start it
        )
        return self.wait_started() if wait else self

    def wait_started(self, runners_in_all=None):
        """Wait until the service answers, its node has booted and its runners have registered: until
        /healthz counts `runners_in_all` live runners, when other nodes share its database (/healthz
        counts theirs too), else STEPD_RUNNERS."""
        wait_for(self._healthy, timeout=20, interval=0.1, what="the service to answer /healthz")
        wait_for(self._workers_booted, timeout=20, what="workers")
        wanted = int(self.env["STEPD_RUNNERS"]) if runners_in_all is None else runners_in_all
        wait_for(lambda: self._runners_alive(wanted), timeout=20, interval=0.1, what="the runners to register")
        return self

    def _workers_booted(self):
        """The HTTP worker (one, whatever STEPD_WORKERS says) is forked and has booted.
        A worker's SIGTERM handler is only set once it boots: a SIGTERM sent before then is lost,
        and the stop waits out gunicorn's graceful_timeout for it."""
        pids = self.worker_pids()
        return len(pids) == 1 and all(map(_worker_booted, pids))

    def _healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"the service exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a slow first answer
            return False

    def _runners_alive(self, wanted):
        return requests.get(self.url + "/healthz", timeout=5).json()["data"]["runners"] == wanted

    @staticmethod
    def _children(pid):
        try:
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            return []

    def gunicorn_pid(self):
        """The gunicorn master's pid (`python -m stepd http`, a child of `stepd serve`), or None."""
        return next((pid for pid in self._children(self.proc.pid) if _is_http_front(pid)), None)

    def worker_pids(self):
        """The HTTP worker's pid, in a list."""
        master = self.gunicorn_pid()
        return self._children(master) if master else []

    def node_pids(self):
        """The node's pid (`python -m stepd node`, a child of `stepd serve`), in a list: empty while
        none runs (it died, and the supervisor starts another)."""
        return [pid for pid in self._children(self.proc.pid) if _runs_stepd(pid, b"node")]

    def runner_pids(self):
        """The runner processes' pids (the node's children)."""
        return [pid for node in self.node_pids() for pid in self._children(node)]

    def output(self):
        return self.log_path.read_text(errors="replace")

    def kill(self):
        """SIGKILL the whole service at once (supervisor, gunicorn, workers, runners), as a crash
        or power cut would."""
        master = self.gunicorn_pid()
        pids = [
            self.proc.pid,
            *([master] if master else []),
            *self.worker_pids(),
            *self.node_pids(),
            *self.runner_pids(),
        ]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for pid in pids:  # workers are not our children; wait until they are gone
            wait_for(lambda p=pid: is_zombie(p), timeout=10, what="worker exit")

    def stop(self, timeout=30):
        """SIGTERM, as a service manager stops it; returns the service's exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "log", None):
            self.log.close()
        return self.proc.returncode if self.proc else None  # None: never started

    def discard(self):
        """End the service at the end of a test, if the test has not: SIGKILL, as kill() does, which
        takes no time where a SIGTERM stop takes a second or two. (The tests of a stop call stop().)"""
        if self.proc and self.proc.poll() is None:
            self.kill()
        if getattr(self, "log", None):
            self.log.close()

    def headers(self, token=None):
        return {"Authorization": f"Bearer {token or self.token}"}

    def get(self, path, **kwargs):
        kwargs.setdefault("timeout", 10)
        return requests.get(self.url + path, headers={**self.headers(), **kwargs.pop("headers", {})}, **kwargs)

    def post(self, path, body, **kwargs):
        kwargs.setdefault("timeout", 10)
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return requests.post(self.url + path, json=body, headers=headers, **kwargs)

    # -- the calls most tests make, as Api has them -------------------------------------------
    def start_process(self, *steps, name=None):
        """Start a process of (type, params-dict) steps; returns its data."""
        body = {"steps": [{"type": t, "params": typed(**p)} for t, p in steps]}
        if name is not None:
            body["name"] = name
        return ok(self.post(P, body), 201)

    def process(self, process_id):
        return ok(self.get(f"{P}/{process_id}"))

    def step(self, step_id):
        return ok(self.get(f"{STEPS}/{step_id}"))

    def wait_process(self, process_id, status, timeout=10.0):
        return wait_for(
            lambda: (p := self.process(process_id))["status"] == status and p,
            timeout,
            interval=0.05,
            what=f"process {status}",
        )

    def wait_step(self, step_id, status, timeout=10.0):
        return wait_for(
            lambda: (s := self.step(step_id))["status"] == status and s, timeout, interval=0.05, what=f"step {status}"
        )

    def walk(self, path, limit, cursor=None, **query):
        """Every page of a listing from `cursor` on, as lists of items."""
        return walk_pages(lambda params: self.get(path, params=params), limit, cursor, query)


def http_workers_booted(pgid, workers=1):
    """For a service started otherwise than by Server (`make run`, an installed `stepd serve`) in
    the process group `pgid`: True once its gunicorn master (a child of a process of that group;
    the master has a group of its own) has `workers` workers and every one has booted (see
    Server._workers_booted: a SIGTERM that reaches a worker still booting is lost)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
            pid = int(entry.name)
            if _is_http_front(pid) and os.getpgid(_parent(pid)) == pgid:
                pids = Server._children(pid)
                return len(pids) == workers and all(map(_worker_booted, pids))
    return False


def _parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _is_http_front(pid):
    """Whether `pid` is the gunicorn master of a service (`python -m stepd http`)."""
    return _runs_stepd(pid, b"http")


def _runs_stepd(pid, command):
    """Whether `pid` runs `python -m stepd <command>`."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2:] == [command, b""]
    return False


def process_ids(server):
    """The id of every process the service lists, page by page."""
    return {p["processId"] for page in server.walk(P, 500) for p in page}


def _worker_booted(pid):
    """True once a gunicorn worker runs: the heartbeat file gunicorn's master made for it (an
    unlinked wgunicorn-* file) has been touched by the worker, which writes time.monotonic() as its
    mtime, a time long before any real file's. Just after the fork the worker still holds its
    siblings' heartbeat files too: every one it holds must have been touched."""
    touched = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if "/wgunicorn-" in os.readlink(fd):
                    touched.append(os.stat(fd).st_mtime < 1e9)  # before 2001-09-09: a monotonic clock's time
    return bool(touched) and all(touched)


def is_zombie(pid):
    """Whether process `pid` has ended (a zombie not yet reaped, or gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped before the open, or between it and the read
        return True


# A delegate for the exactly-once tests on real gunicorn (fixture gated_delegates). The plain
# `count` delegate fails at once, so a restart that arrives after the winner's attempt has
# already failed again is a *new*, legitimate restart (not a concurrent one) and may win too.
# This one counts its call like `count`, then holds the step STARTED until the test opens the
# gate, so all 16 restarts of a round race against the same FAILED state.
GATED_COUNT = '''
import time
from pathlib import Path

from stepd.delegates import delegate


@delegate("gated_count")
def gated_count(ctx):
    """Append one line per call to param `file`, wait for param `gate` to exist, fail if `fail` is 1."""
    with open(ctx.params["file"], "a") as out:
        out.write(f"{ctx.step_id} {ctx.attempt}\\n")
    deadline = time.monotonic() + 30
    while not Path(ctx.params["gate"]).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    if ctx.params.get("fail") == 1:
        raise RuntimeError("gated_count failed on purpose")
'''


# -- the operator page, /ui/ -----------------------------------------------------------------------
UI = "/ui/"
CHROMIUM = "/usr/bin/chromium"  # Debian's, which Playwright drives (no `playwright install`)


class _Forms(HTMLParser):
    """The forms of a page as a browser would send them: each input's, checked box's, selected
    option's and text area's name and value, and its submit buttons (name, value, text)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.forms = []
        self.form = self.select = self.textarea = self.button = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.form = {"id": a.get("id"), "action": a.get("action"), "method": (a.get("method") or "get").lower()}
            self.form.update(fields=[], buttons=[])
            self.forms.append(self.form)
        elif self.form is None:
            return
        elif tag == "input" and a.get("type") in ("submit", "button"):
            self.form["buttons"].append((a.get("name"), a.get("value"), a.get("value")))
        elif tag == "input" and a.get("type") == "checkbox":
            if "checked" in a:
                self.form["fields"].append((a["name"], a.get("value") or "on"))
        elif tag == "input" and a.get("name"):
            self.form["fields"].append((a["name"], a.get("value") or ""))
        elif tag == "textarea":
            self.textarea = [a["name"], ""]
        elif tag == "select":
            self.select = [a["name"], None]
        elif tag == "option" and self.select is not None and (self.select[1] is None or "selected" in a):
            self.select[1] = a.get("value")
        elif tag == "button":
            self.button = [a.get("name"), a.get("value"), ""]

    def handle_data(self, data):
        if self.textarea is not None:
            self.textarea[1] += data
        if self.button is not None:
            self.button[2] += data

    def handle_endtag(self, tag):
        if tag == "form":
            self.form = None
        elif tag == "textarea" and self.textarea is not None:
            self.form["fields"].append(tuple(self.textarea))
            self.textarea = None
        elif tag == "select" and self.select is not None:
            self.form["fields"].append(tuple(self.select))
            self.select = None
        elif tag == "button" and self.button is not None:
            self.form["buttons"].append((self.button[0], self.button[1], self.button[2].strip()))
            self.button = None


def forms_of(html):
    """Every form of a page: [{id, action, method, fields: [(name, value)], buttons: [(name, value, text)]}]."""
    reader = _Forms()
    reader.feed(html)
    return reader.forms


class Page:
    """The operator page through Flask's test client, as a browser uses it: credentials on every
    request (HTTP Basic, or none once signed in), its cookie, and forms sent with what the page
    put in them."""

    def __init__(self, client, headers=None):
        self.client = client
        self.headers = headers or {}

    def get(self, path, **kwargs):
        return self.client.get(path, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def html(self, path):
        response = self.get(path)
        assert response.status_code == 200, response.get_data(as_text=True)[:800]
        return response.get_data(as_text=True)

    def form(self, path, form_id):
        """(action, {name: value}) of the form `form_id` on the page at `path`."""
        [form] = [f for f in forms_of(self.html(path)) if f["id"] == form_id]
        return form["action"], dict(form["fields"])

    def post(self, path, fields, **kwargs):
        return self.client.post(path, data=fields, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def submit(self, path, form_id, changes=None, intent=None, **kwargs):
        """Send the form `form_id` of the page at `path` with `changes` made to its fields."""
        action, fields = self.form(path, form_id)
        fields.update(changes or {})
        if intent is not None:
            fields["intent"] = intent
        return self.post(action, fields, **kwargs)


def text_of(html):
    """A page's text without its tags (entities decoded), whitespace collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


# -- a PostgreSQL server of the tests' own ---------------------------------------------------------
def _load_pgcluster():
    """bench/pgcluster.py, the cluster class that make bench-peers uses too, loaded by its path: bench/
    is not put on the import path, where bench/delegates/ would shadow the `delegates` that a test
    imports (tests/test_delegates.py). bench/peers.py finds this same module under the same name."""
    import importlib.util

    if "pgcluster" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pgcluster", ROOT / "bench" / "pgcluster.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["pgcluster"] = module
    return sys.modules["pgcluster"]


pgcluster = _load_pgcluster()
POSTGRES_BIN = pgcluster.POSTGRES_BIN
# A throwaway server: PostgreSQL on loopback only, nothing synced to disk (pgcluster says why each).
POSTGRES_SETTINGS = pgcluster.LOOPBACK_SETTINGS + pgcluster.THROWAWAY_SETTINGS
postgres_missing = pgcluster.postgres_missing


class PostgresCluster(pgcluster.PostgresCluster):
    """One PostgreSQL 15 cluster for one test process (bench/pgcluster.py), with POSTGRES_SETTINGS."""

    def __init__(self):
        super().__init__(settings=POSTGRES_SETTINGS)
