"""The frame of every answer: the envelope, the request id, how a view's input is loaded and its
data dumped (`@endpoint`). Which answer an error gets is errors.py's to say.

A view decorated with `@endpoint(data=..., body=..., query=...)` names each of its schemas
once: they load its input (412 on any fault), dump its answer, and are recorded on the view
for the OpenAPI document (openapi.py), so the document cannot drift from validation.
"""

import functools
import json
import math
import types
import uuid

from flask import current_app, g, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from stepd.model import VERSION, current_request_id, now_iso
from stepd.schemas import NoQuerySchema, dumper, one

MAX_BODY_BYTES = 1024 * 1024
REQUEST_ID_HEADER = "X-Request-Id"


# -- the envelope ---------------------------------------------------------------------------
def document(data, message="OK"):
    """The envelope's four keys."""
    return {"message": message, "timestamp": now_iso(), "data": data, "version": VERSION}


def envelope(data, message="OK", status=200):
    """A JSON response in the envelope."""
    response = jsonify(document(data, message))
    response.status_code = status
    return response


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
            return envelope(dumper(data, many)(payload), message, status)

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
    if not request.args:  # most requests: the schema's defaults, loaded once
        return dict(_empty_query(schema_class))
    schema = one(schema_class)
    known = _query_names(schema_class)
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


@functools.cache
def _query_names(schema_class):
    return frozenset(field.data_key or name for name, field in one(schema_class).fields.items())


@functools.cache
def _empty_query(schema_class):
    """What an empty query string loads to (each parameter's default), kept read-only: every caller
    gets a copy of its own."""
    return types.MappingProxyType(one(schema_class).load({}))


# -- the request id, and the headers of every answer -------------------------------------------
def _valid_request_id(value):
    return value and len(value) <= 128 and all(" " <= ch <= "~" for ch in value)


def assign_request_id():
    given = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = given if _valid_request_id(given) else uuid.uuid4().hex
    current_request_id.set(g.request_id)
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
    """Frame every answer of `app`: body limit, request ids, headers (errors.init_app adds the
    error handler)."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.before_request(assign_request_id)
    # A keep-alive connection's greenlet (or a test's thread) serves its next request, or other
    # work, with no request id left over from this one.
    app.teardown_request(lambda _exc: current_request_id.set(None))
    app.after_request(finish_response)
