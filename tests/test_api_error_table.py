"""The one map from errors to HTTP (stepd/errors.py): each error's answer is what its row says and
what it was on the wire before the table, and the OpenAPI document describes what the table says."""

import json
import logging
import re
import socket
from collections import namedtuple

import pytest
from gunicorn import util
from gunicorn.http.errors import InvalidChunkSize, NoMoreData, ParseException
from helpers import ENVELOPE_KEYS, ERROR_MESSAGES, READER_SECRET, P
from marshmallow import ValidationError
from werkzeug import exceptions as http

from stepd import errors, front, model
from stepd.httplogs import ContextFilter

PATH = "/api/v1/raise"
ERROR_ID = re.compile(r"[0-9a-f]{32}")

# Each row of errors.ERRORS: an error of its class, raised by a view on GET PATH, and its answer
# written out: status, data, headers besides the envelope's, the log line's level and text
# ({data}: the answer's data). The texts are those the handlers wrote before the table, so a row
# changed by mistake fails here.
Wire = namedtuple("Wire", "error status data headers log_level log_line", defaults=({}, None, None))
DOMAIN = {
    model.PreconditionFailed: Wire(
        model.PreconditionFailed({"step_id": ["Step is COMPLETED."], "params": ["Too many."]}),
        412,
        {"processStepId": ["Step is COMPLETED."], "params": ["Too many."]},
        {},
        logging.DEBUG,  # a refusal's reason, at DEBUG only (with the request's id, as every line of a request)
        f"refused GET {PATH}: {{data}}",
    ),
    model.NotFound: Wire(model.NotFound("No step has this id."), 404, "No step has this id."),
    model.Busy: Wire(
        model.Busy("database is locked"),
        503,
        "The database is busy; retry shortly.",
        {"Retry-After": "1"},
        logging.INFO,
        f"database busy on GET {PATH}: database is locked",
    ),
    model.Unwritable: Wire(
        model.Unwritable("database or disk is full"),
        503,
        "The database cannot be written now (disk full or read-only); retry later.",
        {"Retry-After": "5"},
        logging.ERROR,
        f"database cannot be written on GET {PATH}: database or disk is full",
    ),
    model.Unavailable: Wire(
        model.Unavailable("unable to open database file"),
        503,
        "The database does not answer.",
        {},
        logging.WARNING,
        f"database does not answer on GET {PATH}: unable to open database file",
    ),
    model.NoRunner: Wire(
        model.NoRunner("No runner is alive."),
        503,
        "No runner is alive.",
        {},
        logging.WARNING,
        "health check: No runner is alive.",
    ),
}
SHORT_BODY = {"_schema": ["The body ended before it was complete."]}
HTTP_LAYER = {
    ValidationError: Wire(
        ValidationError(["Not an object."]),
        412,
        {"_schema": ["Not an object."]},
        {},
        logging.DEBUG,
        f"refused GET {PATH}: {{data}}",
    ),
    ParseException: Wire(
        InvalidChunkSize("zz"),
        412,
        {"_schema": ["The body's chunked encoding cannot be read: InvalidChunkSize: Invalid chunk size: 'zz'"]},
    ),
    NoMoreData: Wire(NoMoreData(b""), 412, SHORT_BODY),
    http.ClientDisconnected: Wire(http.ClientDisconnected(), 412, SHORT_BODY),
    http.Unauthorized: Wire(
        http.Unauthorized(),
        401,
        "Missing or invalid credentials: send 'Authorization: Bearer <secret>' or Basic name:secret.",
    ),
    http.Forbidden: Wire(http.Forbidden(), 403, "This token's role may not call this endpoint."),
    http.NotFound: Wire(http.NotFound(), 404, "No endpoint at this path."),
    http.MethodNotAllowed: Wire(
        http.MethodNotAllowed(valid_methods=["POST", "OPTIONS"]),
        405,
        "This path does not accept GET.",
        {"Allow": "OPTIONS, POST"},
    ),
    http.RequestEntityTooLarge: Wire(http.RequestEntityTooLarge(), 413, "The body is over 1048576 bytes."),
    http.HTTPException: Wire(
        http.UnsupportedMediaType("Not this media type."), 412, {"_schema": ["Not this media type."]}
    ),
    Exception: Wire(RuntimeError("boom"), 500, ERROR_ID, {}, logging.ERROR, "unexpected error {data} on GET " + PATH),
}
WIRE = DOMAIN | HTTP_LAYER


def raise_on_get(app, error):
    def view():
        raise error

    app.add_url_rule(PATH, "raise", view)
    return app


def answer_and_lines(app, caplog):
    """(the answer to GET PATH, the "stepd" logger's lines meanwhile)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="stepd"):
        response = app.test_client().get(PATH)
    return response, [r for r in caplog.records if r.name == "stepd"]


def logged(lines):
    return [(line.levelno, line.getMessage(), bool(line.exc_info)) for line in lines]


def test_every_row_of_the_table_has_its_answer_written_out_here():
    assert set(WIRE) == set(errors.ERRORS)


def test_every_domain_error_has_a_row_or_never_reaches_a_request():
    """A new error in model.py is placed in the table on purpose (or named here as the command's)."""
    domain = {value for value in vars(model).values() if isinstance(value, type) and issubclass(value, Exception)}
    assert domain - set(DOMAIN) == {model.Unusable, model.Conflict}


def test_each_status_has_the_message_of_the_contract():
    assert {status: row.message for status, row in errors.STATUSES.items()} == ERROR_MESSAGES
    assert {row.status for row in errors.ERRORS.values()} <= set(errors.STATUSES)


@pytest.mark.parametrize("error_class", list(WIRE), ids=lambda cls: cls.__name__)
def test_each_error_gets_the_answer_it_got_before_the_table(fresh_app, caplog, error_class):
    wire = WIRE[error_class]
    response, lines = answer_and_lines(raise_on_get(fresh_app, wire.error), caplog)
    body = response.json
    assert response.status_code == wire.status and set(body) == ENVELOPE_KEYS
    assert body["message"] == ERROR_MESSAGES[wire.status]
    if isinstance(wire.data, re.Pattern):
        assert wire.data.fullmatch(body["data"]), body["data"]
    else:
        assert body["data"] == wire.data
    for name in ("Retry-After", "Allow", "WWW-Authenticate"):
        assert response.headers.get(name) == wire.headers.get(name), name
    traceback = error_class is Exception  # only the unexpected error's line holds its traceback
    expected = [] if wire.log_level is None else [(wire.log_level, wire.log_line.format(data=body["data"]), traceback)]
    assert logged(lines) == expected


@pytest.mark.parametrize("error_class", list(WIRE), ids=lambda cls: cls.__name__)
def test_each_error_is_answered_as_its_row_says(fresh_app, caplog, error_class):
    error, row = WIRE[error_class].error, errors.ERRORS[error_class]
    assert errors.answer_for(error) is row
    response, lines = answer_and_lines(raise_on_get(fresh_app, error), caplog)
    data = response.json["data"]
    assert response.status_code == row.status
    assert response.json["message"] == errors.STATUSES[row.status].message
    with fresh_app.test_request_context(PATH):  # what the row's functions read of the request
        if error_class is not Exception:  # the 500's data is a fresh id each time
            assert data == row.data_of(error)
        for name, value in (row.headers(error) if row.headers is not None else {}).items():
            assert response.headers[name] == value
    retry_after = str(row.retry_after) if row.retry_after is not None else None
    assert response.headers.get("Retry-After") == retry_after
    fields = {"method": "GET", "path": PATH, "error": error, "data": data}
    expected = [] if row.log_level is None else [(row.log_level, row.log_line % fields, row.traceback)]
    assert logged(lines) == expected


def test_a_werkzeug_server_error_is_an_unexpected_error(fresh_app, caplog):
    response, lines = answer_and_lines(raise_on_get(fresh_app, http.BadGateway()), caplog)
    assert response.status_code == 500 and ERROR_ID.fullmatch(response.json["data"])
    assert [line.levelno for line in lines] == [logging.ERROR] and response.json["data"] in lines[0].getMessage()


def test_auth_refusals_are_answered_from_the_table(client):
    unknown = client.get(P, headers={"Authorization": "Bearer not-a-token"})
    assert unknown.status_code == 401 and unknown.json["data"] == HTTP_LAYER[http.Unauthorized].data
    assert unknown.headers["WWW-Authenticate"]
    reader = client.post(P, json={"steps": [{"type": "noop"}]}, headers={"Authorization": f"Bearer {READER_SECRET}"})
    assert reader.status_code == 403 and reader.json["data"] == HTTP_LAYER[http.Forbidden].data
    assert "WWW-Authenticate" not in reader.headers


def test_an_unknown_path_and_a_wrong_method_are_answered_from_the_table(client):
    unknown = client.get("/api/v1/nothing-here")
    assert (unknown.status_code, unknown.json["data"]) == (404, "No endpoint at this path.")
    wrong = client.delete(P)
    assert (wrong.status_code, wrong.json["data"]) == (405, "This path does not accept DELETE.")
    assert wrong.headers["Allow"] == "GET, HEAD, OPTIONS, POST"


# -- gunicorn's own refusals (front.py) -----------------------------------------------------------
@pytest.mark.parametrize(
    ("status_int", "status", "reason"),
    [(400, 412, "Precondition failed"), (403, 403, "Forbidden"), (500, 500, "Internal Server Error")],
)
def test_gunicorns_refusals_carry_the_tables_message(monkeypatch, status_int, status, reason):
    monkeypatch.setattr(util, "write_error", util.write_error)  # put back after the test
    front.envelope_gunicorn_errors()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        util.write_error(ours, status_int, "Bad Request", "Invalid header")
        head, _, raw = theirs.recv(65536).partition(b"\r\n\r\n")
    assert head.decode("latin-1").startswith(f"HTTP/1.1 {status} {reason}\r\n")
    assert json.loads(raw)["message"] == ERROR_MESSAGES[status] == errors.STATUSES[status].message


# -- the document reads the table ------------------------------------------------------------------
def documented_errors(spec):
    """(status, response object) of every error response in the document."""
    for operations in spec["paths"].values():
        for operation in operations.values():
            if isinstance(operation, dict) and "responses" in operation:
                for code, response in operation["responses"].items():
                    if int(code) >= 400:
                        yield int(code), response


def test_the_document_describes_each_error_status_as_the_table_does(spec):
    documented = set()
    for status, response in documented_errors(spec):
        documented.add(status)
        described = errors.STATUSES[status]
        assert response["description"] == described.description
        assert response["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{described.schema.__name__}"
        }
        sends_retry_after = any(r.retry_after is not None for r in errors.ERRORS.values() if r.status == status)
        assert ("Retry-After" in response["headers"]) == sends_retry_after, status
    assert documented == set(errors.STATUSES) == {row.status for row in errors.ERRORS.values()}


def test_only_a_check_of_the_state_is_kept_for_an_idempotency_key_and_the_document_says_so(spec):
    assert [cls for cls, row in errors.ERRORS.items() if row.kept] == [model.PreconditionFailed]
    kept = {row.status for row in errors.ERRORS.values() if row.kept}
    replayable = {
        status for status, response in documented_errors(spec) if "Idempotent-Replayed" in response["headers"]
    }
    assert replayable == kept


@pytest.mark.parametrize("error", [RuntimeError("boom"), model.Busy("database is locked"), model.Unavailable("gone")])
def test_a_line_written_while_answering_names_the_request_id(fresh_app, error):
    """Issue 19 part 3: a 500's traceback and a 503's line carry the id of the request they answer
    (the root handler's ContextFilter, as `stepd serve` installs it), as the access line does."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("stepd")
    logger.addHandler(handler)
    try:
        response = raise_on_get(fresh_app, error).test_client().get(PATH, headers={"X-Request-Id": "rid-500"})
    finally:
        logger.removeHandler(handler)
    assert response.status_code in (500, 503) and response.headers["X-Request-Id"] == "rid-500"
    assert records and all(getattr(record, "request_id", None) == "rid-500" for record in records)
