"""The OpenAPI 3 document, built with apispec from the app's routes and their marshmallow schemas.

Each view carries `view.openapi` (set by `envelope.endpoint`): its body, query and data
schemas, its success status, its tag and the errors it can answer; `view.role` (set by
`auth.reads` / `auth.writes`: no role, no credentials) and `view.idempotent` (set by
`idempotency.idempotent`). Nothing here is written by hand twice.

The document is OpenAPI 3.1 (its schemas are JSON Schema 2020-12) and says what validation checks
wherever JSON Schema can (the README lists what it cannot): the limits, patterns and ranges come
from the validators of schemas.py themselves (apispec reads Length, Range, OneOf and Regexp), and
a param name's rules from schemas.ParamName, as `propertyNames`.

The shapes are those a generated client can type (tests/test_served_client.py generates one
with openapi-python-client and checks a script with mypy --strict):
- a nullable reference is `anyOf: [the reference, {"type": "null"}]`, a nullable plain value
  `"type": [its type, "null"]`;
- an enum of the vocabulary (a status, the phase, the trigger) is one component, wherever it is used;
- params are one `Params` component (and a restart's, where null removes a name, `RestartParams`);
- a typed value is a `oneOf` of its three forms discriminated by `type` (the server's rule, in
  schemas.TypedValueSchema, is the same: the field of the type, the two others null or absent,
  which a form says as `{"type": "null"}`: no `not`, which generators cannot draw from);
- a query parameter is a plain optional value: no null, no default of null.
"""

import re

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.openapi import OpenAPIConverter
from marshmallow import fields, validate

from stepd import model
from stepd import schemas as s
from stepd.auth import CHALLENGE, OPERATOR
from stepd.envelope import REQUEST_ID_HEADER
from stepd.errors import ERRORS, STATUSES
from stepd.idempotency import IDEMPOTENCY_HEADER, KEY_PATTERN, MAX_KEY

PATH_NAMES = {"process_id": "processId", "step_id": "processStepId"}
TAGS = {
    "processes": "Start processes, read and find them, cancel them.",
    "steps": "Read steps; restart or skip failed ones; complete or fail the ones waiting on outside work.",
    "service": "The step types, the service's health, this document.",
}
INFO = {
    "description": "Runs processes of ordered steps whose results flow forward; restart or skip a failed step"
    " and the process carries on, or cancel the process.\n\n"
    "Every answer is an envelope of `message`, `timestamp`, `data` and `version`. A query parameter given"
    " with an empty value (`?cursor=`) is absent.",
    "license": {"name": "MIT", "url": "https://opensource.org/licenses/MIT"},
}
SERVERS = [{"url": "/", "description": "The stepd that serves this document (make run: http://127.0.0.1:8080)."}]
ENUMS = {  # a vocabulary's tuple (model.py) -> its component's name
    model.PROCESS_STATUSES: "ProcessStatus",
    model.STEP_STATUSES: "StepStatus",
    model.ATTEMPT_STATUSES: "AttemptStatus",
    model.PHASES: "Phase",
    model.TRIGGERS: "Trigger",
}
VALUE_FORMS = {"STRING": "StringValue", "LONG": "LongValue", "DOUBLE": "DoubleValue"}

IDEMPOTENCY_PARAMETER = {
    "in": "header",
    "name": IDEMPOTENCY_HEADER,
    "required": False,
    "description": "Send a POST again with the same key (and body) within 24 hours: the first answer"
    " comes back and nothing is done twice.",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY, "pattern": KEY_PATTERN},
}
REQUEST_ID_PARAMETER = {
    "in": "header",
    "name": REQUEST_ID_HEADER,
    "required": False,
    "description": "Your id for this request, sent back in the answer's X-Request-Id and written on the"
    " request's log lines: up to 128 printable ASCII characters (any other value is replaced by a fresh id).",
    "schema": {"type": "string"},
}
REQUEST_ID_RESPONSE_HEADER = {
    "description": "The request's id: yours, if you sent a valid one, else a fresh one.",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
}
WWW_AUTHENTICATE_HEADER = {
    "description": "How to send credentials: a Bearer token, or Basic with the token's name and secret.",
    "required": True,
    "schema": {"type": "string", "example": CHALLENGE},
}
RETRY_AFTER_HEADER = {"description": "Seconds to wait before sending again.", "schema": {"type": "integer"}}
REPLAYED_HEADER = {
    "description": "`true` when this is the kept answer to an earlier request with the same Idempotency-Key.",
    "schema": {"type": "string", "enum": ["true"]},
}
# The statuses of the errors answered with a Retry-After (errors.ERRORS): their documents list it.
RETRY_STATUSES = {row.status for row in ERRORS.values() if row.retry_after is not None}
# The error statuses an Idempotency-Key keeps (errors.ERRORS), and so may replay.
KEPT_STATUSES = {row.status for row in ERRORS.values() if row.kept}
_envelopes = {}  # one envelope class per data schema, so apispec names each once


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


NULL = {"type": "null"}


def nullable(reference, description=None):
    """A reference or null."""
    node = {"anyOf": [reference, NULL]}
    return node | ({"description": description} if description else {})


# -- marshmallow fields to schema objects --------------------------------------------------------
class Converter(OpenAPIConverter):
    """apispec's field converter, with the shapes of this module's docstring."""

    def field2property(self, field):
        description = field.metadata.get("description")
        if isinstance(field, s.Params):
            if isinstance(field, s.RestartParams):
                return nullable(ref("RestartParams"), description) if field.allow_none else ref("RestartParams")
            # skip-step's result: Params or null in one schema ("type": ["object", "null"]), not `anyOf`
            # [Params, null], with which schemathesis's fuzzing failed on some seeds ("a `not` whose
            # complement is not spelled out", seed 65754218390759485662110192263885010472). The other
            # nullable Params keep anyOf: a generated client then takes a Params for them, as before.
            if field.allow_none and field.metadata.get("one_nullable_component"):
                return ref("NullableParams")
            return nullable(ref("Params"), description) if field.allow_none else ref("Params")
        if isinstance(field, s.Variables):
            return ref("Variables")
        enum = self._enum_component(field)
        if enum is not None:
            return nullable(ref(enum), description) if field.allow_none else ref(enum)
        return super().field2property(field)

    def field2nullable(self, field, ret):
        """A nullable nested schema: the reference or null. apispec writes the reference as
        `allOf: [reference]` when the field has other keywords too."""
        if field.allow_none and ("$ref" in ret or len(ret.get("allOf", ())) == 1):
            reference = {"$ref": ret.pop("$ref")} if "$ref" in ret else ret.pop("allOf")[0]
            return nullable(reference)
        return super().field2nullable(field, ret)

    def _field2parameter(self, field, *, name, location):
        """A query parameter is a plain optional value: leaving it out means its default (a nullable
        enum with a default of null became three enum classes in a generated client). An empty
        value is allowed and means absent (envelope.load_query)."""
        parameter = super()._field2parameter(field, name=name, location=location)
        parameter["allowEmptyValue"] = True
        schema = parameter["schema"]
        if "anyOf" in schema:  # a nullable enum's reference: the reference alone
            schema = parameter["schema"] = schema["anyOf"][0]
        if isinstance(schema.get("type"), list):  # a nullable value: the value alone
            [schema["type"]] = [kind for kind in schema["type"] if kind != "null"]
        if "default" in schema and schema["default"] is None:
            del schema["default"]
        return parameter

    def _enum_component(self, field):
        """The component's name of a field whose choices are one of the vocabulary's (ENUMS), which
        is registered on first use; None for any other field."""
        choices = next((tuple(v.choices) for v in field.validators if isinstance(v, validate.OneOf)), None)
        name = ENUMS.get(choices)
        if name is not None and name not in self.spec.components.schemas:
            self.spec.components.schema(name, {"type": "string", "enum": list(choices)})
        return name


class Plugin(MarshmallowPlugin):
    Converter = Converter


def _add_value_components(spec, converter):
    """TypedValue, its three forms, Params, RestartParams and Variables, from schemas.TypedValueSchema's fields."""
    value_fields = s.one(s.TypedValueSchema).fields
    for kind, form in VALUE_FORMS.items():
        wanted = s.VALUE_FIELD[kind]
        properties = {}
        for name in s.VALUE_FIELD.values():
            prop = converter.field2property(value_fields[name])
            if name == wanted:
                [prop["type"]] = [json_type for json_type in prop["type"] if json_type != "null"]
            else:
                prop = NULL | {"description": f"null or absent for {kind}"}
            properties[name] = prop
        properties["type"] = {"type": "string", "enum": [kind]}
        spec.components.schema(
            form,
            {"type": "object", "properties": properties, "required": [wanted, "type"], "additionalProperties": False},
        )
    spec.components.schema(
        "TypedValue",
        {
            "description": "A typed value: `type` says which field holds it; the other two are null or absent.",
            "oneOf": [ref(form) for form in VALUE_FORMS.values()],
            "discriminator": {
                "propertyName": "type",
                "mapping": {kind: ref(form)["$ref"] for kind, form in VALUE_FORMS.items()},
            },
        },
    )
    # A name's rules are schemas.ParamName's validators, as JSON Schema sees them.
    name_schema = converter.field2property(s.Params().key_field)
    limits = {"type": "object", "maxProperties": model.MAX_PARAMS, "propertyNames": name_schema}
    names = f"a name (1-{model.MAX_NAME} characters, no control characters), at most {model.MAX_PARAMS} names"
    spec.components.schema(
        "Params",
        {**limits, "additionalProperties": ref("TypedValue"), "description": f"Typed params: {names}."},
    )
    spec.components.schema(
        "NullableParams",
        {
            **limits,
            "type": ["object", "null"],
            "additionalProperties": ref("TypedValue"),
            "description": f"Typed params, or null: {names}.",
        },
    )
    spec.components.schema(
        "RestartParams",
        {
            **limits,
            "additionalProperties": nullable(ref("TypedValue")),
            "description": "A restart's params, laid over the failed attempt's: a name given a typed value"
            f" takes it, a name given null is removed, the others stay as they were. As Params: {names}.",
        },
    )
    spec.components.schema(
        "Variables",
        {
            "type": "object",
            "additionalProperties": ref("TypedValue"),
            "description": "A process's variables (output only): its steps' results merged in position order,"
            " a later step's name winning; typed values like params, without params' limit of names.",
        },
    )


# -- operations ------------------------------------------------------------------------------
def _envelope_for(data_schema, many):
    key = (data_schema, many)
    if key not in _envelopes:
        name = data_schema.__name__.removesuffix("Schema") + ("List" if many else "") + "Envelope"
        _envelopes[key] = s.envelope_schema(name, fields.Nested(data_schema, many=many, required=True))
    return _envelopes[key]


def _json(schema):
    return {"application/json": {"schema": schema}}


def _response(status, description, schema, idempotent=False):
    """One documented answer, with the headers it carries."""
    headers = {REQUEST_ID_HEADER: REQUEST_ID_RESPONSE_HEADER}
    if status == 401:
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE_HEADER
    if status in RETRY_STATUSES:
        headers["Retry-After"] = RETRY_AFTER_HEADER
    if idempotent:  # the answers an Idempotency-Key keeps, and so may replay
        headers["Idempotent-Replayed"] = REPLAYED_HEADER
    return {"description": description, "headers": headers, "content": _json(schema)}


def _error_response(status, idempotent=False):
    """An error status's answer, as errors.STATUSES describes it."""
    return _response(status, STATUSES[status].description, STATUSES[status].schema, idempotent)


def _operation(view):
    meta = view.openapi
    role = getattr(view, "role", None)
    idempotent = getattr(view, "idempotent", False)
    success = meta["status"]
    responses = {str(success): _response(success, "Success.", _envelope_for(meta["data"], meta["many"]), idempotent)}
    errors = set(meta["errors"]) | {412, 500, 503}  # 412: every endpoint refuses unknown query parameters
    if role is not None:
        errors |= {401, 403} if role == OPERATOR else {401}
    if meta["body"] is not None:
        errors |= {412, 413}
    for status in sorted(errors):  # a 412 from a check of the state is kept for the key too
        responses[str(status)] = _error_response(status, idempotent and status in KEPT_STATUSES)
    operation = {
        "operationId": view.__name__,
        "summary": (view.__doc__ or "").strip().splitlines()[0],
        "tags": [meta["tag"]],
        "responses": responses,
        "parameters": [{"in": "query", "schema": meta["query"]}, REQUEST_ID_PARAMETER],
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
            "schema": {"type": "string", "pattern": model.ID_PATTERN},
        }
        for arg in sorted(rule.arguments)
    ]


def _openapi_path(rule):
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: "{" + PATH_NAMES.get(m.group(1), m.group(1)) + "}", rule.rule)


def build_spec(app):
    """The whole API as an OpenAPI 3.1 document (a dict)."""
    plugin = Plugin()
    spec = APISpec(
        title="stepd",
        version=model.VERSION,
        openapi_version="3.1.0",
        plugins=[plugin],
        info=INFO,
        servers=SERVERS,
        tags=[{"name": name, "description": text} for name, text in TAGS.items()],
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("basic", {"type": "http", "scheme": "basic"})
    _add_value_components(spec, plugin.converter)
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        if not hasattr(view, "openapi"):
            continue
        operations = {method.lower(): _operation(view) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})}
        spec.path(path=_openapi_path(rule), operations=operations, parameters=_path_parameters(rule))
    _add_document_path(spec)
    _add_bulk_rules(spec.components.schemas["RestartMany"])
    return spec.to_dict()


def _add_bulk_rules(body):
    """Each id once (schemas.RestartManySchema.ids_or_filter). Its other rules (step ids or a filter, not
    both; a cursor only with a filter) are a `oneOf` of two forms in JSON Schema, which
    openapi-python-client drops the operation for: the README lists them with what it cannot say."""
    body["properties"]["processStepIds"]["uniqueItems"] = True


def _add_document_path(spec):
    spec.path(
        path="/api/v1/openapi.json",
        operations={
            "get": {
                "operationId": "openapi_document",
                "summary": "This OpenAPI document (not in the envelope, so tools can read it).",
                "tags": ["service"],
                "security": [],
                "parameters": [REQUEST_ID_PARAMETER],
                "responses": {
                    "200": _response(200, "The document.", {"type": "object"}),
                    "412": _error_response(412),
                    "500": _error_response(500),
                },
            }
        },
    )
