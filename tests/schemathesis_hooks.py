"""Checks schemathesis runs on every response, on top of its own (tests/schemathesis.toml loads this)."""

import json
import os
import re
import time
import uuid

import requests
import schemathesis
from hypothesis import strategies as st

ENVELOPE_KEYS = {"message", "timestamp", "data", "version"}
ERROR_ID = re.compile(r"[0-9a-f]{32}")
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _header(response, name):
    values = response.headers.get(name.lower()) or []
    return values[0] if values else None


@schemathesis.check
def security_headers(ctx, response, case):
    """Every answer forbids MIME sniffing and caching (it may hold process data)."""
    if _header(response, "X-Content-Type-Options") != "nosniff":
        raise AssertionError("X-Content-Type-Options: nosniff is missing")
    if _header(response, "Cache-Control") != "no-store":
        raise AssertionError("Cache-Control: no-store is missing")


@schemathesis.check
def envelope_and_bare_500(ctx, response, case):
    """Every answer but the document itself is the envelope; a 500 holds only an error id."""
    if case.path == "/api/v1/openapi.json" and response.status_code == 200:
        return
    if case.method.upper() == "HEAD":
        return  # a HEAD answer has no body by definition
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} answer is not JSON: {response.content[:200]!r}") from None
    if set(body) != ENVELOPE_KEYS:
        raise AssertionError(f"not the envelope: {sorted(body)}")
    if response.status_code == 500 and not ERROR_ID.fullmatch(str(body["data"])):
        raise AssertionError("a 500 must hold only an error id")
    if response.status_code == 503 and not _header(response, "Retry-After"):
        raise AssertionError("a 503 must say Retry-After")


# -- test data: what the document cannot say, supplied, so valid requests also reach success -------------
# What the API refuses besides the document's rules is a matter of state (README, "What the OpenAPI
# document cannot say"): an id of no process or step, or of one in another status; a step type with no
# delegate; an Idempotency-Key already used for another request. A run that sent only random data would
# have every valid request of six operations refused for that alone, and schemathesis would warn that
# they "mostly rejected generated data". So the test supplies that state, and only where the generated
# value is well-formed (an invalid one may be what makes a negative case invalid):
# - GET paths may name the ids of the processes and steps the test made (STEPD_TEST_IDS);
# - just before a valid (positive) request is sent (before_call), its body's id becomes that of a
#   process or step in the status the action needs (found on the service, or made there), and a new
#   process's step types become types that have a delegate (and harm nothing);
# - a valid Idempotency-Key is made unique.
SAFE_TYPES = ("noop", "check", "external", "results")  # tests/plugins and stepd's own; "check" fails, "external" defers
BODY_IDS = {"cancel": "processId", "restart-failed-step": "processStepId", "skip-step": "processStepId",
            "complete-step": "processStepId", "fail-step": "processStepId"}  # fmt: skip
KEY = re.compile(r"[ -~]{1,255}")


def _known_ids():
    return json.loads(os.environ.get("STEPD_TEST_IDS", "{}"))


def _with_known(value, key):
    """A strategy: the generated dict as is, or with `key` set to one of the known ids."""
    known = _known_ids().get(key, [])
    if not isinstance(value, dict) or not isinstance(value.get(key), str) or not ID.fullmatch(value[key]) or not known:
        return st.just(value)
    return st.one_of(st.just(value), st.sampled_from(known).map(lambda known_id: {**value, key: known_id}))


@schemathesis.hook
def flatmap_path_parameters(ctx, path_parameters):
    for key in ("processId", "processStepId"):
        if isinstance(path_parameters, dict) and key in path_parameters:
            return _with_known(path_parameters, key)
    return st.just(path_parameters)


def _well_formed_steps(body):
    steps = body.get("steps") if isinstance(body, dict) else None
    return (
        isinstance(steps, list)
        and steps
        and all(isinstance(step, dict) and isinstance(step.get("type"), str) and 1 <= len(step["type"]) <= 128
                for step in steps)
    )  # fmt: skip


class Service:
    """The service under test, asked for (or made to have) a process or step in a given status."""

    BATCH = 5  # processes made at once when none is in the status wanted

    def __init__(self):
        self.url = os.environ["STEPD_TEST_URL"].rstrip("/") + "/api/v1/processes"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {os.environ['STEPD_TEST_TOKEN']}"

    def items(self, path, **query):
        return self.session.get(f"{self.url}{path}", params=query, timeout=10).json()["data"]["items"]

    def find(self, found, kind, what):
        """What `found()` returns, making BATCH processes of one step of `kind` first if it returns nothing."""
        item = found()
        if item:
            return item
        for _ in range(self.BATCH):
            self.session.post(self.url, json={"steps": [{"type": kind}]}, timeout=10)
        deadline = time.monotonic() + 10
        while not (item := found()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} on the service after 10 s")
            time.sleep(0.02)
        return item

    def failed_step(self):
        found = lambda: self.items("/steps", status="FAILED", type="check", limit=1)  # noqa: E731
        return self.find(found, "check", "FAILED step")[0]["processStepId"]

    def deferred_step(self):
        def found():
            steps = self.items("/steps", status="STARTED", type="external", limit=20)
            return [step for step in steps if step["phase"] == "DEFERRED"]

        return self.find(found, "external", "deferred step")[0]["processStepId"]

    def open_process(self):
        found = lambda: self.items("", status="FAILED", limit=1)  # noqa: E731
        return self.find(found, "check", "FAILED process")[0]["processId"]

    def live_id(self, action):
        if action == "cancel":
            return self.open_process()
        if action in ("complete-step", "fail-step"):
            return self.deferred_step()
        return self.failed_step()


_service = []


def _positive(case):
    return case.meta is not None and case.meta.generation.mode.value == "positive"


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """The state a valid request needs (never in place: hypothesis may draw the same body again)."""
    body = case.body
    if _positive(case) and isinstance(body, dict):
        key = BODY_IDS.get(case.path.rsplit("/", 1)[-1])
        if key is not None and isinstance(body.get(key), str) and ID.fullmatch(body[key]):
            if not _service:
                _service.append(Service())
            case.body = {**body, key: _service[0].live_id(case.path.rsplit("/", 1)[-1])}
        elif case.path.endswith("/processes") and _well_formed_steps(body):
            steps = [{**step, "type": SAFE_TYPES[i % len(SAFE_TYPES)]} for i, step in enumerate(body["steps"])]
            case.body = {**body, "steps": steps}
    if case.headers is not None:
        key = case.headers.get("Idempotency-Key")
        if isinstance(key, str) and KEY.fullmatch(key):  # a key used before, for another request, is refused
            case.headers = {**case.headers, "Idempotency-Key": uuid.uuid4().hex}


# -- what a valid request was refused for, should schemathesis warn of it -------------------------------
@schemathesis.hook
def after_call(ctx, case, response):
    """Each valid (positive) request answered 412, with the answer's field errors, one JSON line each in
    the file STEPD_SCHEMATHESIS_REFUSED names: the test shows them if schemathesis warns."""
    where = os.environ.get("STEPD_SCHEMATHESIS_REFUSED")
    meta = case.meta
    if not where or response.status_code != 412 or meta is None or meta.generation.mode.value != "positive":
        return
    try:
        data = json.loads(response.content)["data"]
    except (ValueError, KeyError, TypeError):
        data = None
    line = {"operation": f"{case.method.upper()} {case.path}", "phase": str(meta.phase.name), "data": data}
    with open(where, "a") as out:
        out.write(json.dumps(line) + "\n")
