"""SPEC section 1: the four-key envelope on every response, exact error messages, X-Request-Id, 404/405/500/503."""

import logging
import re
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from helpers import COMPLETE, DELEGATES, ENV_HEADERS, ENVELOPE_KEYS, ERROR_MESSAGES, FAIL, OPENAPI, RESTART, STEPS, P
from marshmallow import Schema, fields, post_dump

from stepd import db as db_module
from stepd import httplogs, model, schemas
from stepd.app import create_app
from stepd.envelope import load_query
from stepd.schemas import ProcessListQuery

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
PRINTABLE_ASCII = re.compile(r"^[ -~]{1,128}$")
MIB = 1024 * 1024


def assert_envelope(response, status):
    """The response has `status` and is exactly the four-key envelope; returns the body."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict)
    assert set(body) == ENVELOPE_KEYS
    assert TIMESTAMP.match(body["timestamp"]), body["timestamp"]
    assert body["version"] == model.VERSION
    assert isinstance(body["message"], str) and body["message"]
    if status >= 400:
        assert body["message"] == ERROR_MESSAGES[status]
    request_id = response.headers.get("X-Request-Id")
    assert request_id and PRINTABLE_ASCII.match(request_id)
    return body


def credentials(api, reader_api, who):
    return {"op": api.headers, "reader": reader_api.headers, None: {}}[who]


def call(client, method, path, headers, body=None, raw=None, content_type="application/json"):
    kwargs = {"headers": headers}
    if raw is not None:
        kwargs.update(data=raw, content_type=content_type)
    elif body is not None:
        kwargs["json"] = body
    return client.open(path, method=method, **kwargs)


NOOP = {"steps": [{"type": "noop"}]}
PADDED_OVER_1MIB = b'{"steps": [{"type": "noop"}]}' + b" " * MIB

# (who, method, path, json body or None, raw body or None, status, what `data` is on success)
CASES = [
    (None, "GET", "/healthz", None, None, 200, dict),
    ("op", "GET", DELEGATES, None, None, 200, list),
    ("reader", "GET", P, None, None, 200, dict),
    ("reader", "GET", STEPS, None, None, 200, dict),
    ("op", "POST", P, NOOP, None, 201, dict),
    (None, "GET", P, None, None, 401, str),
    (None, "POST", P, NOOP, None, 401, str),
    (None, "GET", DELEGATES, None, None, 401, str),
    ("reader", "POST", P, NOOP, None, 403, str),
    ("reader", "POST", FAIL, {"processStepId": "x"}, None, 403, str),
    (None, "GET", "/nowhere", None, None, 404, str),
    ("op", "GET", "/api/v1/nowhere", None, None, 404, str),
    ("op", "GET", f"{P}/no-such-process", None, None, 404, str),
    ("op", "GET", f"{STEPS}/no-such-step", None, None, 404, str),
    ("op", "GET", f"{P}/" + "a" * 65, None, None, 404, str),
    ("op", "DELETE", P, None, None, 405, str),
    ("op", "PUT", f"{P}/abc", None, None, 405, str),
    ("op", "POST", DELEGATES, {}, None, 405, str),
    (None, "POST", "/healthz", {}, None, 405, str),
    ("op", "GET", RESTART, None, None, 405, str),
    ("op", "GET", FAIL, None, None, 405, str),
    ("op", "GET", COMPLETE, None, None, 405, str),
    ("op", "POST", P, {}, None, 412, dict),
    ("op", "GET", f"{P}?limit=0", None, None, 412, dict),
    ("op", "POST", RESTART, {"processStepId": "nope"}, None, 412, dict),
    ("op", "POST", P, None, PADDED_OVER_1MIB, 413, str),
]


@pytest.mark.parametrize(
    ("who", "method", "path", "body", "raw", "status", "data_type"),
    CASES,
    ids=[f"{c[5]}-{c[1]}-{c[2][:48]}" for c in CASES],
)
def test_every_status_comes_in_the_envelope(client, api, reader_api, who, method, path, body, raw, status, data_type):
    response = call(client, method, path, credentials(api, reader_api, who), body, raw)
    envelope = assert_envelope(response, status)
    assert isinstance(envelope["data"], data_type)
    if status < 400:
        assert envelope["message"] not in ERROR_MESSAGES.values()
    elif data_type is str:
        assert envelope["data"].strip(), "an error's data says what was wrong"


@pytest.mark.parametrize(
    "path", ["restart-failed-step", "restart-failed-steps", "fail-step", "complete-step", "cancel", "skip-step"]
)
def test_get_on_a_post_only_action_is_405_and_says_allow_post(api, path):
    response = api.get(f"{P}/{path}")
    assert_envelope(response, 405)
    assert "POST" in response.headers.get("Allow", "")


def test_options_is_answered_in_the_envelope(api):
    """SPEC 1: every response under /api/v1 is the envelope; OPTIONS included."""
    response = api.client.options(P, headers=api.headers)
    assert_envelope(response, response.status_code)


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        (P, "GET, HEAD, OPTIONS, POST"),
        (RESTART, "OPTIONS, POST"),
        ("/healthz", "GET, HEAD, OPTIONS"),
    ],
)
def test_options_answers_in_the_envelope(client, path, allowed):
    response = client.options(path)
    assert response.status_code == 200
    assert set(response.json) == ENVELOPE_KEYS
    assert response.headers["Allow"] == allowed
    assert response.json["data"]["allow"] == allowed.split(", ")


def test_unknown_method_is_405_in_the_envelope(client):
    response = client.open(P, method="PATCH")
    assert response.status_code == 405
    assert response.json["message"] == "Method not allowed"
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("path", ["/api/v1//processes", "//api/v1/processes", f"{P}/"])
def test_odd_slashes_are_404_in_the_envelope_not_redirects(api, path):
    response = api.get(path)
    assert response.status_code == 404
    assert response.json["message"] == "Not found"


def test_timestamp_is_the_response_time_in_utc_milliseconds(api):
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    body = assert_envelope(api.get(DELEGATES), 200)
    after = datetime.now(UTC) + timedelta(milliseconds=1)
    stamp = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z")
    assert before <= stamp <= after


def test_version_is_the_one_defined_in_schemas_everywhere(api, client):
    assert re.fullmatch(r"\d+\.\d+\.\d+", model.VERSION)
    assert api.get(DELEGATES).json["version"] == model.VERSION
    assert client.get("/healthz").json["version"] == model.VERSION
    assert client.get(OPENAPI).json["info"]["version"] == model.VERSION


# -- X-Request-Id ----------------------------------------------------------------------------
VALID_IDS = ["abc", "a" * 128, "with spaces and punctuation !#$%&()*+,-./:;<=>?@[]^_`{|}~", "~", " x"]
INVALID_IDS = ["a" * 129, "x\x01y", "tab\there", "\x7f", "caf\xe9", ""]


@pytest.mark.parametrize("request_id", VALID_IDS, ids=lambda v: f"len{len(v)}-{v[:8]}")
@pytest.mark.parametrize(
    ("who", "path", "status"),
    [
        ("op", DELEGATES, 200),
        (None, DELEGATES, 401),
        ("op", "/nowhere", 404),
        (None, "/healthz", 200),
    ],
)
def test_a_valid_request_id_is_echoed(client, api, reader_api, request_id, who, path, status):
    headers = {**credentials(api, reader_api, who), "X-Request-Id": request_id}
    response = client.get(path, headers=headers)
    assert_envelope(response, status)
    assert response.headers["X-Request-Id"] == request_id


@pytest.mark.parametrize("request_id", INVALID_IDS, ids=lambda v: f"len{len(v)}-{v[:8]!r}")
def test_an_invalid_request_id_is_replaced_by_a_fresh_one(client, request_id):
    response = client.get("/healthz", headers={"X-Request-Id": request_id})
    assert_envelope(response, 200)
    fresh = response.headers["X-Request-Id"]
    assert fresh != request_id
    assert PRINTABLE_ASCII.match(fresh)


def test_without_a_request_id_each_response_gets_a_fresh_one(client):
    ids = {client.get("/healthz").headers["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5
    assert all(PRINTABLE_ASCII.match(i) for i in ids)


# -- 500: an unexpected exception ---------------------------------------------------------------
SENSITIVE = "SELECT secret_hash FROM tokens WHERE name = 'x' -- /srv/stepd/private/stepd.db"


def test_an_unexpected_exception_is_a_500_with_only_an_error_id(fresh_app, caplog):
    def explode():
        raise RuntimeError(SENSITIVE)

    fresh_app.add_url_rule("/api/v1/explode", "explode", explode)
    caplog.handler.addFilter(httplogs.ContextFilter())
    with caplog.at_level(logging.ERROR):
        response = fresh_app.test_client().get("/api/v1/explode", headers={"X-Request-Id": "trace-500"})
    body = assert_envelope(response, 500)
    error_id = body["data"]
    assert isinstance(error_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{8,64}", error_id)
    text = response.get_data(as_text=True)
    for leak in ("Traceback", "RuntimeError", "SELECT", "secret_hash", "/srv/stepd", ".py", 'File "'):
        assert leak not in text
    assert response.headers["X-Request-Id"] == "trace-500"
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged, "the error id must be in the log"
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in logged), "the log line holds the traceback"
    assert all(r.request_id == "trace-500" for r in logged), "log lines carry the request id"


def test_each_500_has_its_own_error_id(fresh_app):
    def explode():
        raise KeyError("boom")

    fresh_app.add_url_rule("/api/v1/explode", "explode", explode)
    client = fresh_app.test_client()
    ids = {assert_envelope(client.get("/api/v1/explode"), 500)["data"] for _ in range(3)}
    assert len(ids) == 3


def test_a_real_database_fault_is_an_enveloped_error_without_paths(fresh_app, tmp_path, caplog):
    """No mock: the database's folder disappears under a running app."""
    folder = tmp_path / "fresh"
    fresh_app.extensions["stepd"].store.db.close()
    shutil.rmtree(folder)
    with caplog.at_level(logging.ERROR):
        response = fresh_app.test_client().get(P, headers=ENV_HEADERS)
    assert response.status_code in (500, 503)
    body = assert_envelope(response, response.status_code)
    text = response.get_data(as_text=True)
    assert str(folder) not in text and "stepd.db" not in text and "sqlite" not in text.lower()
    if response.status_code == 500:
        assert any(body["data"] in r.getMessage() for r in caplog.records)


# -- 503 ---------------------------------------------------------------------------------------
def test_healthz_is_200_when_the_database_answers(client):
    body = assert_envelope(client.get("/healthz"), 200)
    assert body["data"] == {"database": "ok", "runners": 1}  # the app fixture's runner


def test_healthz_is_503_when_the_database_does_not_answer(fresh_app, tmp_path):
    fresh_app.extensions["stepd"].store.db.close()
    shutil.rmtree(tmp_path / "fresh")
    response = fresh_app.test_client().get("/healthz")
    body = assert_envelope(response, 503)
    assert isinstance(body["data"], str) and body["data"]
    assert str(tmp_path) not in response.get_data(as_text=True)


def test_healthz_is_503_when_the_file_is_not_a_database(fresh_app, tmp_path):
    db = tmp_path / "fresh" / "stepd.db"
    fresh_app.extensions["stepd"].store.db.close()
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database file at all " * 200)
    assert_envelope(fresh_app.test_client().get("/healthz"), 503)


def test_a_busy_database_is_a_503(tmp_path, monkeypatch):
    """A real write lock held by another connection, with a short busy timeout so the test is fast."""
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 100)
    db = tmp_path / "busy.db"
    busy_app = create_app({"STEPD_DB": str(db), "STEPD_TOKEN": "busy-env-token"})
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        response = busy_app.test_client().post(P, json=NOOP, headers={"Authorization": "Bearer busy-env-token"})
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        busy_app.extensions["stepd"].store.db.close()
    assert_envelope(response, 503)
    assert response.headers.get("Retry-After")


def test_an_empty_query_loads_its_defaults_afresh_each_time(app):
    """An empty query string loads to the schema's defaults, kept once: each caller gets its own copy."""
    with app.test_request_context("/api/v1/processes"):
        first = load_query(ProcessListQuery)
        assert first["limit"] == 50 and first["cursor"] is None
        first["limit"] = 1
        assert load_query(ProcessListQuery)["limit"] == 50


def test_whether_a_view_or_hook_is_async_is_looked_up_once_per_function(app, api, monkeypatch):
    """app.App.ensure_sync keeps Flask's answer per function: a plain function is itself, asked of
    `inspect` once however many requests call it; an async one still gets Flask's own handling
    (here, without Flask's async extra, its refusal), every time."""
    import flask.app

    asked = []

    def counting(func):
        asked.append(func)
        return original(func)

    original = flask.app.iscoroutinefunction
    monkeypatch.setattr(flask.app, "iscoroutinefunction", counting)

    def plain():
        return "plain"

    async def not_plain():
        return "async"

    assert app.ensure_sync(plain) is plain
    assert app.ensure_sync(plain) is plain
    assert asked.count(plain) == 1
    for _ in range(2):
        with pytest.raises(RuntimeError, match="async"):
            app.ensure_sync(not_plain)
    assert asked.count(not_plain) == 2
    for _ in range(3):  # requests ask nothing new of inspect once each view and hook was seen
        assert api.get("/healthz").status_code == 200
    seen = len(asked)
    assert api.get("/healthz").status_code == 200
    assert len(asked) == seen


def test_the_compiled_dump_leaves_to_marshmallow_what_it_does_not_know():
    """schemas.dumper keeps marshmallow's work once per schema; a schema with dump hooks, and an
    object that is not a dict, are dumped by marshmallow itself; a key the object lacks is left out,
    as marshmallow leaves it out. (conftest.py holds every in-process answer to marshmallow's dump.)"""

    class Hooked(Schema):
        name = fields.String()

        @post_dump
        def shout(self, data, **kwargs):
            return {key: value.upper() for key, value in data.items()}

    assert schemas.dumper(Hooked)({"name": "a"}) == {"name": "A"}
    step = {"id": "s1", "process_id": "p1", "position": 2, "type": "noop", "status": "PENDING"}
    as_object = SimpleNamespace(**step, params={}, attempts=0, deferred=0)
    dump = schemas.dumper(schemas.StepSchema)
    assert dump(as_object) == schemas.one(schemas.StepSchema).dump(as_object)
    assert dump(step) == schemas.one(schemas.StepSchema).dump(step)
    assert list(dump(step)) == ["processStepId", "processId", "position", "type", "status"]
    assert schemas.dumper(schemas.StepSchema, many=True)([step, step]) == [dump(step), dump(step)]
