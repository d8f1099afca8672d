"""Checks schemathesis runs on every response, on top of its own (tests/schemathesis.toml loads this)."""

import json
import os
import re

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


# -- real ids, so generated requests also reach the success paths ---------------------------
# The test puts the ids of processes and steps it made into STEPD_TEST_IDS; random ids would
# only ever meet 404 and 412 answers.
def _known_ids():
    return json.loads(os.environ.get("STEPD_TEST_IDS", "{}"))


def _with_known(value, key):
    """A strategy: the generated dict as is, or with `key` set to one of the known ids."""
    known = _known_ids().get(key, [])
    # Only a well-formed id is swapped: an invalid one may be what makes a negative case invalid.
    if not isinstance(value, dict) or not isinstance(value.get(key), str) or not ID.fullmatch(value[key]) or not known:
        return st.just(value)
    return st.one_of(st.just(value), st.sampled_from(known).map(lambda known_id: {**value, key: known_id}))


@schemathesis.hook
def flatmap_path_parameters(ctx, path_parameters):
    for key in ("processId", "processStepId"):
        if isinstance(path_parameters, dict) and key in path_parameters:
            return _with_known(path_parameters, key)
    return st.just(path_parameters)


@schemathesis.hook
def flatmap_body(ctx, body):
    # A cancel names a process; every other action a step.
    key = "processId" if isinstance(body, dict) and "processId" in body else "processStepId"
    return _with_known(body, key)
