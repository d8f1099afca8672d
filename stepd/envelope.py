"""The frame of every answer: the envelope, the request id, how a view's input is loaded and its
data dumped (`@endpoint`), and every error's status, message and text.

A view decorated with `@endpoint(data=..., body=..., query=...)` names each of its schemas
once: they load its input (412 on any fault), dump its answer, and are recorded on the view
for the OpenAPI document (openapi.py), so the document cannot drift from validation.
"""

import functools
import json
import logging
import math
import uuid

from flask import current_app, g, jsonify, request
from gunicorn.http.errors import NoMoreData, ParseException
from marshmallow import ValidationError
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from stepd.model import VERSION, Busy, NoRunner, NotFound, PreconditionFailed, Unavailable, Unwritable, now_iso
from stepd.schemas import NoQuerySchema, one

MAX_BODY_BYTES = 1024 * 1024
REQUEST_ID_HEADER = "X-Request-Id"

# -- the error vocabulary: each status's message (SPEC section 1), its default text in `data`,
# and what the OpenAPI document says of it --------------------------------------------------
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
ERROR_TEXT = {
    401: "Missing or invalid credentials: send 'Authorization: Bearer <secret>' or Basic name:secret.",
    403: "This token's role may not call this endpoint.",
    404: "No endpoint at this path.",
    413: f"The body is over {MAX_BODY_BYTES} bytes.",
}
BUSY_TEXT = "The database is busy; retry shortly."
UNWRITABLE_TEXT = "The database cannot be written now (disk full or read-only); retry later."
UNAVAILABLE_TEXT = "The database does not answer."
ERROR_DESCRIPTIONS = {
    401: "Missing or invalid credentials (a WWW-Authenticate header says how to send them).",
    403: "The token's role may not call this endpoint (a reader calling a POST).",
    404: "Nothing has this id.",
    405: "The id is an action's name (e.g. restart-failed-step), whose path takes only POST.",
    412: "A precondition failed: the body, query or state is not acceptable; data names each field.",
    413: "The body is over 1 MiB.",
    500: "An unexpected error; data is an error id that is also in the server log.",
    503: "The database is busy or does not answer; retry (see Retry-After).",
}
# The domain names a field by its Python name; the wire by the schemas' data_key.
WIRE_NAMES = {"step_id": "processStepId", "process_id": "processId"}

log = logging.getLogger("stepd")


# -- the envelope ---------------------------------------------------------------------------
def document(data, message="OK"):
    """The envelope's four keys."""
    return {"message": message, "timestamp": now_iso(), "data": data, "version": VERSION}


def envelope(data, message="OK", status=200):
    """A JSON response in the envelope."""
    response = jsonify(document(data, message))
    response.status_code = status
    return response


def error(status, data):
    """An error response; the message is fixed by the status code."""
    return envelope(data, ERROR_MESSAGES.get(status, "Error"), status)


def unparsed_status(status):
    """The status stepd answers a request gunicorn could not parse with, for gunicorn's own: the
    client's fault is a 412 like any other bad input, 403 and 500 stay (front.py, httplogs.py)."""
    return status if status in (403, 500) else 412


def error_document(status, data):
    """An error's envelope as a dict, for answers written outside Flask (gunicorn's own)."""
    return document(data, ERROR_MESSAGES[status])


# -- a view's input and output --------------------------------------------------------------
def endpoint(data, *, tag, body=None, query=NoQuerySchema, status=200, many=False, errors=()):
    """Load the view's query (and body) with their schemas, pass them as `query=` (and `body=`),
    and answer what it returns, its data or (data, message), dumped with `data` in the envelope.

    For the document: `tag`, the group it is listed under (openapi.TAGS); `errors`, the statuses
    it can answer besides those every endpoint can.
    """

    def wrap(view):
        @functools.wraps(view)
        def run(**path_args):
            loaded = {}
            query_values = load_query(query)
            if query is not NoQuerySchema:
                loaded["query"] = query_values
            if body is not None:
                loaded["body"] = load_body(body)
            answer = view(**path_args, **loaded)
            payload, message = answer if isinstance(answer, tuple) else (answer, "OK")
            return envelope(one(data, many).dump(payload), message, status)

        run.openapi = {
            "body": body,
            "query": query,
            "data": data,
            "status": status,
            "errors": errors,
            "many": many,
            "tag": tag,
        }
        return run

    return wrap


def _refuse_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text} is out of range")
    return number


def load_body(schema_class):
    """Parse the request body as strict JSON and load it with the schema (412 on any fault)."""
    if request.mimetype != "application/json":
        raise ValidationError({"_schema": ["Content-Type must be application/json."]})
    raw = request.get_data(cache=True)  # a Content-Length over MAX_CONTENT_LENGTH raises 413
    if request.content_length is None and len(raw) >= MAX_BODY_BYTES:
        raise RequestEntityTooLarge()  # a chunked body is cut at the limit, not refused: refuse it here
    if not raw.strip():
        raise ValidationError({"_schema": ["The body is empty; a JSON object is required."]})
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise ValidationError({"_schema": [f"The body is not valid JSON: {exc}"[:300]]}) from None
    return one(schema_class).load(body)


def load_query(schema_class):
    """Load the query string; unknown and repeated parameters are refused.

    An empty value of a known parameter (`?cursor=`) means it is absent, so a script may write
    every name and fill in only some (`?status=$s&cursor=$c`). An unknown name is refused even
    when empty: it is a typo to report, not a value to ignore.
    """
    schema = one(schema_class)
    known = {field.data_key or name for name, field in schema.fields.items()}
    given, repeated = {}, {}
    for key in request.args:
        values = [v for v in request.args.getlist(key) if v != "" or key not in known]
        if len(values) > 1:
            repeated[key] = ["Given more than once."]
        elif values:
            given[key] = values[0]
    if repeated:
        raise ValidationError(repeated)
    return schema.load(given)


# -- errors ---------------------------------------------------------------------------------
def on_validation_error(exc):
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    return error(412, messages)


def on_unreadable_body(exc):
    """A body gunicorn cannot read when the app reads it: a malformed chunked body (an invalid,
    negative or unterminated chunk: InvalidChunkSize and the like), or one that ended before it
    was complete. The client's fault, so a 412 like any other body that cannot be read."""
    if isinstance(exc, NoMoreData | ClientDisconnected):  # gunicorn's, or Werkzeug's for a short read
        text = "The body ended before it was complete."
    else:
        text = f"The body's chunked encoding cannot be read: {type(exc).__name__}: {exc}"
    return error(412, {"_schema": [text[:300]]})


def on_precondition_failed(exc):
    return error(412, {WIRE_NAMES.get(field, field): messages for field, messages in exc.errors.items()})


def on_not_found(exc):
    return error(404, str(exc))


def on_busy(exc):
    response = error(503, BUSY_TEXT)
    response.headers["Retry-After"] = "1"
    return response


def on_unwritable(exc):
    """A full disk: reads go on, and writes work again once space is freed."""
    log.error("database cannot be written on %s %s: %s", request.method, request.path, exc)
    response = error(503, UNWRITABLE_TEXT)
    response.headers["Retry-After"] = "5"
    return response


def on_unavailable(exc):
    log.warning("database does not answer on %s %s: %s", request.method, request.path, exc)
    return error(503, UNAVAILABLE_TEXT)


def on_no_runner(exc):
    log.warning("health check: %s", exc)
    return error(503, str(exc))


def on_http_error(exc):
    if exc.code == 405:
        response = error(405, f"This path does not accept {request.method}.")
        response.headers["Allow"] = ", ".join(sorted(exc.valid_methods or ()))
        return response
    if exc.code in ERROR_TEXT:
        return error(exc.code, ERROR_TEXT[exc.code])
    if exc.code < 500:  # any other client error is bad input: a 412 like the rest
        return error(412, {"_schema": [exc.description]})
    return on_unexpected_error(exc)


def on_unexpected_error(exc):
    error_id = uuid.uuid4().hex
    log.error("unexpected error %s on %s %s", error_id, request.method, request.path, exc_info=exc)
    return error(500, error_id)


# -- the request id, and the headers of every answer -------------------------------------------
def _valid_request_id(value):
    return value and len(value) <= 128 and all(" " <= ch <= "~" for ch in value)


def assign_request_id():
    given = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = given if _valid_request_id(given) else uuid.uuid4().hex
    if request.method == "OPTIONS" and request.url_rule is not None:
        return answer_options()
    return None


def answer_options():
    """Flask's automatic OPTIONS answer is an empty body; ours is the envelope like every other.

    It needs no credentials (as Flask-HTTPAuth lets OPTIONS through for CORS preflights):
    it tells only the allowed methods, which the OpenAPI document publishes anyway.
    """
    path = request.url_rule.rule
    allowed = sorted(
        {method for rule in current_app.url_map.iter_rules() if rule.rule == path for method in rule.methods}
    )
    response = envelope({"allow": allowed})
    response.headers["Allow"] = ", ".join(allowed)
    return response


def finish_response(response):
    response.headers[REQUEST_ID_HEADER] = g.get("request_id") or uuid.uuid4().hex
    # For the access line (logs.GunicornLogger), which gunicorn writes from the same environ.
    request.environ["stepd.route"] = request.url_rule.rule if request.url_rule is not None else None
    request.environ["stepd.principal"] = g.get("principal")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app):
    """Frame every answer of `app`: body limit, request ids, headers, and every error's handler."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.before_request(assign_request_id)
    app.after_request(finish_response)
    for exception, handler in (
        (ValidationError, on_validation_error),
        (ParseException, on_unreadable_body),  # raised by gunicorn's reader of the request body
        (NoMoreData, on_unreadable_body),
        (ClientDisconnected, on_unreadable_body),
        (PreconditionFailed, on_precondition_failed),
        (NotFound, on_not_found),
        (Busy, on_busy),
        (Unwritable, on_unwritable),
        (Unavailable, on_unavailable),
        (NoRunner, on_no_runner),
        (HTTPException, on_http_error),
        (Exception, on_unexpected_error),
    ):
        app.register_error_handler(exception, handler)
