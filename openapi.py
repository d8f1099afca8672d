"""The OpenAPI 3 document, built with apispec from the app's routes and their marshmallow schemas.

Each view carries `view.openapi` (set by `envelope.endpoint`): its body, query and data
schemas, its success status and the errors it can answer; `view.role` (set by `auth.reads` /
`auth.writes`: no role, no credentials) and `view.idempotent` (set by `idempotency.idempotent`).
Nothing here is written by hand twice.
"""

import re

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import fields

import schemas as s
from auth import OPERATOR
from envelope import ERROR_DESCRIPTIONS
from model import ID_PATTERN, VERSION

PATH_NAMES = {"process_id": "processId", "step_id": "processStepId"}
ERROR_SCHEMAS = {
    401: s.TextErrorEnvelope,
    403: s.TextErrorEnvelope,
    404: s.TextErrorEnvelope,
    405: s.TextErrorEnvelope,
    412: s.FieldErrorsEnvelope,
    413: s.TextErrorEnvelope,
    500: s.ServerErrorEnvelope,
    503: s.TextErrorEnvelope,
}
IDEMPOTENCY_PARAMETER = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "description": "Send a POST again with the same key (and body) within 24 hours: the first answer"
    " comes back and nothing is done twice.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
}
RETRY_AFTER_HEADER = {"description": "Seconds to wait before sending again.", "schema": {"type": "integer"}}
REPLAYED_HEADER = {
    "description": "`true` when this is the kept answer to an earlier request with the same Idempotency-Key.",
    "schema": {"type": "string", "enum": ["true"]},
}
_envelopes = {}  # one envelope class per data schema, so apispec names each once


def _envelope_for(data_schema, many):
    key = (data_schema, many)
    if key not in _envelopes:
        name = data_schema.__name__.removesuffix("Schema") + ("List" if many else "") + "Envelope"
        _envelopes[key] = s.envelope_schema(name, fields.Nested(data_schema, many=many, required=True))
    return _envelopes[key]


def _json(schema):
    return {"application/json": {"schema": schema}}


def _operation(view):
    meta = view.openapi
    role = getattr(view, "role", None)
    idempotent = getattr(view, "idempotent", False)
    responses = {
        str(meta["status"]): {
            "description": "Success.",
            "content": _json(_envelope_for(meta["data"], meta["many"])),
        }
    }
    errors = set(meta["errors"]) | {412, 500, 503}  # 412: every endpoint refuses unknown query parameters
    if role is not None:
        errors |= {401, 403} if role == OPERATOR else {401}
    if meta["body"] is not None:
        errors |= {412, 413}
    for status in sorted(errors):
        responses[str(status)] = {"description": ERROR_DESCRIPTIONS[status], "content": _json(ERROR_SCHEMAS[status])}
    responses["503"]["headers"] = {"Retry-After": RETRY_AFTER_HEADER}
    if idempotent:  # the answers an Idempotency-Key keeps, and so may replay
        for status in (str(meta["status"]), "412"):
            responses[status]["headers"] = {"Idempotent-Replayed": REPLAYED_HEADER}
    operation = {
        "operationId": view.__name__,
        "summary": (view.__doc__ or "").strip().splitlines()[0],
        "responses": responses,
        "parameters": [{"in": "query", "schema": meta["query"]}],
    }
    if idempotent:
        operation["parameters"].append(IDEMPOTENCY_PARAMETER)
    if meta["body"] is not None:
        operation["requestBody"] = {"required": True, "content": _json(meta["body"])}
    operation["security"] = [{"bearer": []}, {"basic": []}] if role is not None else []
    return operation


def _path_parameters(rule):
    return [
        {
            "in": "path",
            "name": PATH_NAMES.get(arg, arg),
            "required": True,
            "schema": {"type": "string", "pattern": ID_PATTERN},
        }
        for arg in sorted(rule.arguments)
    ]


def _openapi_path(rule):
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: "{" + PATH_NAMES.get(m.group(1), m.group(1)) + "}", rule.rule)


def build_spec(app):
    """The whole API as an OpenAPI 3.0 document (a dict)."""
    spec = APISpec(
        title="stepd",
        version=VERSION,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Runs processes of ordered steps whose results flow forward; restart or skip a failed"
            " step and the process carries on, or cancel the process."
        },
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("basic", {"type": "http", "scheme": "basic"})
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        if not hasattr(view, "openapi"):
            continue
        operations = {method.lower(): _operation(view) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})}
        spec.path(path=_openapi_path(rule), operations=operations, parameters=_path_parameters(rule))
    _add_document_path(spec)
    return spec.to_dict()


def _add_document_path(spec):
    spec.path(
        path="/api/v1/openapi.json",
        operations={
            "get": {
                "operationId": "openapi_document",
                "summary": "This OpenAPI document (not in the envelope, so tools can read it).",
                "security": [],
                "responses": {
                    "200": {"description": "The document.", "content": _json({"type": "object"})},
                    "412": {"description": ERROR_DESCRIPTIONS[412], "content": _json(s.FieldErrorsEnvelope)},
                    "500": {"description": ERROR_DESCRIPTIONS[500], "content": _json(s.ServerErrorEnvelope)},
                },
            }
        },
    )
