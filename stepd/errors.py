"""Every error's answer, in one place: what each status means (STATUSES), how each error is
answered (ERRORS), and the one handler that reads them (`answer`).

A module of its own, beside envelope.py, because five readers need the same table: the app's
error handler, auth's refusals (401, 403), gunicorn's own refusals written in the envelope
(front.py), idempotency.py (which answers an Idempotency-Key keeps) and the OpenAPI document
(openapi.py), which describes each status as STATUSES says and lists Retry-After and
Idempotent-Replayed where the rows say so. envelope.py frames every answer; this module decides
which answer an error gets. The domain's errors (model.py) know nothing of HTTP: this
table gives them their statuses.

model.Unusable and model.Conflict have no row: they are the command's errors (a file this stepd
cannot use, a token name taken) and never reach a request; if one ever did, it would be an
unexpected error like any other (500).
"""

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from flask import request
from gunicorn.http.errors import NoMoreData, ParseException
from marshmallow import ValidationError
from werkzeug import exceptions as http

from stepd import model
from stepd import schemas as s
from stepd.envelope import MAX_BODY_BYTES, document, envelope

log = logging.getLogger("stepd")


@dataclass(frozen=True)
class Status:
    """What every error answer of one status shares."""

    message: str  # the envelope's `message`, fixed by the status
    description: str  # what the OpenAPI document says of it
    schema: type  # the envelope its `data` fits, for the document


STATUSES = {
    401: Status(
        "Unauthorized request",
        "Missing or invalid credentials (a WWW-Authenticate header says how to send them).",
        s.TextErrorEnvelope,
    ),
    403: Status(
        "Forbidden", "The token's role may not call this endpoint (a reader calling a POST).", s.TextErrorEnvelope
    ),
    404: Status("Not found", "Nothing has this id.", s.TextErrorEnvelope),
    405: Status(
        "Method not allowed",
        "The id is an action's name (e.g. restart-failed-step), whose path takes only POST.",
        s.TextErrorEnvelope,
    ),
    412: Status(
        "Precondition failed",
        "A precondition failed: the body, query or state is not acceptable; data names each field.",
        s.FieldErrorsEnvelope,
    ),
    413: Status("Payload too large", "The body is over 1 MiB.", s.TextErrorEnvelope),
    500: Status(
        "Internal Server Error",
        "An unexpected error; data is an error id that is also in the server log.",
        s.ServerErrorEnvelope,
    ),
    503: Status(
        "Service unavailable", "The database is busy or does not answer; retry (see Retry-After).", s.TextErrorEnvelope
    ),
}


@dataclass(frozen=True)
class Answer:
    """How one kind of error is answered: its status, its `data`, its headers, its log line."""

    status: int
    data: object  # the `data` as it is, or a function making it from the error
    retry_after: int | None = None  # seconds, sent as Retry-After
    log_level: int | None = None  # None: not logged (the client's doing, or an everyday answer)
    # %-style, with method, path, error (the error's text) and data (what the answer carries)
    log_line: str = ""
    traceback: bool = False  # the log line holds the error's traceback
    headers: Callable[[Exception], dict] | None = None  # more headers, made from the error
    # An Idempotency-Key keeps the answer (idempotency.py): it decided something, as a check of
    # the state does. Input that could not be read, or a server's fault, decided nothing.
    kept: bool = False

    def data_of(self, exc):
        return self.data(exc) if callable(self.data) else self.data


# -- what an answer's data says, where it comes from the error -----------------------------------
# The domain names a field by its Python name; the wire by the schemas' data_key.
WIRE_NAMES = {"step_id": "processStepId", "process_id": "processId"}


def _wire_field_errors(exc):
    return {WIRE_NAMES.get(field, field): messages for field, messages in exc.errors.items()}


def _field_errors(exc):
    return exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}


def _unreadable_chunks(exc):
    """A malformed chunked body (an invalid, negative or unterminated chunk: InvalidChunkSize and
    the like), which gunicorn's reader raises when the app reads the body."""
    return {"_schema": [f"The body's chunked encoding cannot be read: {type(exc).__name__}: {exc}"[:300]]}


def _method_not_accepted(_exc):
    return f"This path does not accept {request.method}."


def _allowed_methods(exc):
    return {"Allow": ", ".join(sorted(exc.valid_methods or ()))}


def _client_error(exc):
    return {"_schema": [exc.description]}


def _error_id(_exc):
    """A fresh id, in the answer and in the log line with the traceback (never the traceback itself)."""
    return uuid.uuid4().hex


_SHORT_BODY = {"_schema": ["The body ended before it was complete."]}

# A refusal is the client's doing: logged at DEBUG only, with its reason (and, as every line written
# while serving a request, its request id).
REFUSED = "refused %(method)s %(path)s: %(data)s"

# -- the table: each error's answer. The handler takes the row of the error's nearest class. --------
ERRORS = {
    # the domain's (model.py)
    model.PreconditionFailed: Answer(412, _wire_field_errors, kept=True, log_level=logging.DEBUG, log_line=REFUSED),
    model.NotFound: Answer(404, str),
    model.Busy: Answer(
        503,
        "The database is busy; retry shortly.",
        retry_after=1,
        log_level=logging.INFO,
        log_line="database busy on %(method)s %(path)s: %(error)s",
    ),
    # A full disk: reads go on, and writes work again once space is freed.
    model.Unwritable: Answer(
        503,
        "The database cannot be written now (disk full or read-only); retry later.",
        retry_after=5,
        log_level=logging.ERROR,
        log_line="database cannot be written on %(method)s %(path)s: %(error)s",
    ),
    model.Unavailable: Answer(
        503,
        "The database does not answer.",
        log_level=logging.WARNING,
        log_line="database does not answer on %(method)s %(path)s: %(error)s",
    ),
    model.NoRunner: Answer(503, str, log_level=logging.WARNING, log_line="health check: %(error)s"),
    # input that cannot be read: the client's fault, a 412 like any other bad input
    ValidationError: Answer(412, _field_errors, log_level=logging.DEBUG, log_line=REFUSED),
    ParseException: Answer(412, _unreadable_chunks),  # raised by gunicorn's reader of the body
    NoMoreData: Answer(412, _SHORT_BODY),  # gunicorn's short read
    http.ClientDisconnected: Answer(412, _SHORT_BODY),  # Werkzeug's short read
    # the HTTP layer's own refusals (auth.py answers its 401 and 403 through this table too)
    http.Unauthorized: Answer(
        401, "Missing or invalid credentials: send 'Authorization: Bearer <secret>' or Basic name:secret."
    ),
    http.Forbidden: Answer(403, "This token's role may not call this endpoint."),
    http.NotFound: Answer(404, "No endpoint at this path."),
    http.MethodNotAllowed: Answer(405, _method_not_accepted, headers=_allowed_methods),
    http.RequestEntityTooLarge: Answer(413, f"The body is over {MAX_BODY_BYTES} bytes."),
    http.HTTPException: Answer(412, _client_error),  # any other client error is bad input
    Exception: Answer(
        500,
        _error_id,
        log_level=logging.ERROR,
        log_line="unexpected error %(data)s on %(method)s %(path)s",
        traceback=True,
    ),
}


def answer_for(exc):
    """`exc`'s row: that of its nearest class in ERRORS. A server error Werkzeug raised (5xx) is
    as unexpected as any other exception."""
    if isinstance(exc, http.HTTPException) and exc.code >= 500:
        return ERRORS[Exception]
    return next(ERRORS[cls] for cls in type(exc).__mro__ if cls in ERRORS)


# -- the answer ----------------------------------------------------------------------------------
def error(status, data):
    """An error response; the message is fixed by the status."""
    return envelope(data, STATUSES[status].message, status)


def unparsed_status(status):
    """The status stepd answers a request gunicorn could not parse with, for gunicorn's own: the
    client's fault is a 412 like any other bad input, 403 and 500 stay (front.py, httplogs.py)."""
    return status if status in (403, 500) else 412


def error_document(status, data):
    """An error's envelope as a dict, for answers written outside Flask (gunicorn's own)."""
    return document(data, STATUSES[status].message)


def answer(exc):
    """The app's one error handler: answer `exc` as its row in ERRORS says."""
    row = answer_for(exc)
    data = row.data_of(exc)
    if row.log_level is not None:
        fields = {"method": request.method, "path": request.path, "error": exc, "data": data}
        log.log(row.log_level, row.log_line, fields, exc_info=exc if row.traceback else None)
    response = error(row.status, data)
    if row.retry_after is not None:
        response.headers["Retry-After"] = str(row.retry_after)
    if row.headers is not None:
        response.headers.update(row.headers(exc))
    return response


def init_app(app):
    """Answer every error of `app` with `answer`. Each class of the table is registered (Flask
    looks a handler up by the error's classes and, for an HTTP error, by its code first)."""
    for error_class in ERRORS:
        app.register_error_handler(error_class, answer)
