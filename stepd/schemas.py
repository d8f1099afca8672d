"""What goes over the wire: marshmallow schemas for requests, responses and the envelope.

The same schemas validate requests and generate the OpenAPI document (openapi.py).
Typed params are {name: (TYPE, value)} in Python and their wire form on the outside.
"""

import base64
import binascii
import functools
import json
import math
import re
from datetime import datetime

from marshmallow import Schema, ValidationError, fields, post_load, pre_load, utils, validate, validates_schema
from marshmallow.decorators import POST_DUMP, PRE_DUMP
from marshmallow.utils import missing as marshmallow_missing

from stepd.model import (
    ATTEMPT_STATUSES,
    ID_PATTERN,
    INT64_MAX,
    INT64_MIN,
    INTERVENTIONS,
    MAX_BULK,
    MAX_DOUBLE,
    MAX_NAME,
    MAX_PARAMS,
    MAX_REASON,
    MAX_STEPS,
    MAX_STRING,
    NAME_PATTERN,
    PHASES,
    PROCESS_STATUSES,
    STEP_STATUSES,
    TRIGGERS,
    VALUE_TYPES,
    iso,
    now_iso,
)

VALUE_FIELD = {"STRING": "strValue", "LONG": "longValue", "DOUBLE": "doubleValue"}


@functools.cache
def one(schema_class, many=False):
    """The shared instance of a schema class: building one costs more than most loads, and
    marshmallow 4 schemas keep no state between calls, so threads can share them."""
    return schema_class(many=many)


# -- fields ------------------------------------------------------------------------------
class StrictInteger(fields.Integer):
    """A JSON integer only: no booleans, no 1.0, no strings."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)


class FiniteFloat(fields.Float):
    """A finite JSON number (an integer is read as a double); strings and booleans are refused."""

    def __init__(self, **kwargs):
        # The range only says, for the OpenAPI document, what the finite check below keeps out.
        super().__init__(allow_nan=False, validate=validate.Range(-MAX_DOUBLE, MAX_DOUBLE), **kwargs)

    def _validated(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid", input=value)
        try:
            number = float(value)
        except OverflowError:
            raise self.make_error("special") from None
        if not math.isfinite(number):
            raise self.make_error("special")
        return number


def utf8_encodable(text):
    """Whether UTF-8 can encode `text`: a lone surrogate ("\\ud800" in JSON) cannot be stored as text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encodable(text):
    """Refuse lone surrogates: they cannot be stored as UTF-8 text (utf8_encodable)."""
    if not utf8_encodable(text):
        raise ValidationError("Must be valid Unicode (no lone surrogates).")


class Text(fields.String):
    """A string that can be stored as text: no lone surrogates."""

    def __init__(self, max_length, **kwargs):
        super().__init__(validate=[validate.Length(max=max_length), encodable], **kwargs)


class Pattern(validate.Regexp):
    """The whole value matches `regex`, as a JSON Schema `pattern` of `^…$` means (ECMA-262), so the
    OpenAPI document can state it as is: re.match would take "abc\n" for `^[a-z]+$`, since Python's
    `$` also matches before a final newline."""

    def __call__(self, value):
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


class ParamName(fields.String):
    """A param name: 1-128 characters, no control characters (model.NAME_PATTERN)."""

    def __init__(self, **kwargs):
        no_control_characters = Pattern(NAME_PATTERN, error="Must not contain control characters.")
        super().__init__(validate=[validate.Length(1, MAX_NAME), no_control_characters], **kwargs)


def typed_shape(value):
    """The typed value a bare JSON value would be, as a hint: 0.1 -> {"type": "DOUBLE", "doubleValue": 0.1}."""
    for kind, python_type in (("STRING", str), ("LONG", int), ("DOUBLE", float)):
        if type(value) is python_type:  # not isinstance: a bool is an int to Python, not a LONG
            shown = json.dumps(value) if len(json.dumps(value)) <= 40 else '"…"'
            return f'{{"type": "{kind}", "{VALUE_FIELD[kind]}": {shown}}}'
    return '{"type": "STRING"|"LONG"|"DOUBLE", "strValue"|"longValue"|"doubleValue": …}'


class TypedValueSchema(Schema):
    """One typed value: `type` says which of the three value fields holds it."""

    strValue = fields.String(allow_none=True, validate=validate.Length(max=MAX_STRING))
    longValue = StrictInteger(allow_none=True, validate=validate.Range(INT64_MIN, INT64_MAX))
    doubleValue = FiniteFloat(allow_none=True)
    type = fields.String(required=True, validate=validate.OneOf(VALUE_TYPES))

    @pre_load
    def an_object(self, data, **kwargs):
        """A bare value (`{"seconds": 0.1}`) is the commonest slip: say which shape it needs,
        rather than marshmallow's "Invalid input type."."""
        if not isinstance(data, dict):
            raise ValidationError(f"Not a typed value: send {typed_shape(data)}.")
        return data

    @validates_schema
    def exactly_one_value(self, data, **kwargs):
        wanted = VALUE_FIELD[data["type"]]
        errors = {}
        if data.get(wanted) is None:
            errors[wanted] = [f"Required and not null for type {data['type']}."]
        for other in VALUE_FIELD.values():
            if other != wanted and data.get(other) is not None:
                errors[other] = [f"Must be null or absent for type {data['type']}."]
        if errors:
            raise ValidationError(errors)

    @post_load
    def to_pair(self, data, **kwargs):
        return (data["type"], data[VALUE_FIELD[data["type"]]])


def typed_value_output(kind, value):
    """The output form: all four keys, the two unused ones null."""
    out = {"strValue": None, "longValue": None, "doubleValue": None, "type": kind}
    out[VALUE_FIELD[kind]] = value
    return out


_NAME = re.compile(NAME_PATTERN)
_TYPED_KEYS = {"type", *VALUE_FIELD.values()}


def typed_params_or_none(params, null_values=False):
    """`params` ({name: typed value} as JSON gives it) as {name: (TYPE, value)}, if every name and
    value is valid as Params and TypedValueSchema load them; None if anything is not (or may not be)."""
    if type(params) is not dict or len(params) > MAX_PARAMS:
        return None
    loaded = {}
    for name, typed in params.items():
        if type(name) is not str or not 1 <= len(name) <= MAX_NAME or _NAME.fullmatch(name) is None:
            return None
        if typed is None and null_values:
            loaded[name] = None
            continue
        pair = _typed_value_or_none(typed)
        if pair is None:
            return None
        loaded[name] = pair
    return loaded


def _typed_value_or_none(typed):
    """One typed value as TypedValueSchema loads it, (TYPE, value); None if it is not a valid one."""
    if type(typed) is not dict or not typed.keys() <= _TYPED_KEYS:
        return None
    kind = typed.get("type")
    if type(kind) is not str or kind not in VALUE_FIELD:
        return None
    wanted = VALUE_FIELD[kind]
    if any(typed.get(other) is not None for other in VALUE_FIELD.values() if other != wanted):
        return None
    value = typed.get(wanted)
    if kind == "STRING":
        return (kind, value) if type(value) is str and len(value) <= MAX_STRING else None
    if kind == "LONG":
        return (kind, value) if type(value) is int and INT64_MIN <= value <= INT64_MAX else None
    if type(value) is int:  # a DOUBLE may be written as an integer (FiniteFloat)
        if not -MAX_DOUBLE <= value <= MAX_DOUBLE:
            return None
        value = float(value)
    return (kind, value) if type(value) is float and -MAX_DOUBLE <= value <= MAX_DOUBLE else None


def at_most_max_params(params):
    if len(params) > MAX_PARAMS:
        raise ValidationError(f"At most {MAX_PARAMS} names are allowed, not {len(params)}.")


class Params(fields.Dict):
    """A params dictionary: at most 256 names, each mapped to a typed value (or, with
    `null_values`, to None)."""

    def __init__(self, null_values=False, metadata=None, **kwargs):
        super().__init__(
            keys=ParamName(),
            values=fields.Nested(TypedValueSchema, allow_none=null_values),
            validate=at_most_max_params,
            metadata={"maxProperties": MAX_PARAMS, **(metadata or {})},
            **kwargs,
        )
        self.null_values = null_values

    def _deserialize(self, value, attr, data, **kwargs):
        # Params that are all valid, the common case, are read here; anything else takes marshmallow's
        # own path, which says what is wrong (and is what these checks mirror: test_api_properties.py
        # holds them to it). marshmallow's nested schema costs ~19 us a value (a restart's one param: a
        # fifth of its load), this ~1.
        valid = typed_params_or_none(value, self.null_values)
        return valid if valid is not None else super()._deserialize(value, attr, data, **kwargs)

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        return {name: typed_value_output(kind, v) for name, (kind, v) in value.items()}


class Variables(fields.Dict):
    """A process's variables (output only): typed values like params, without params' limit of
    names, as they merge the results of up to 100 steps."""

    def __init__(self, **kwargs):
        super().__init__(keys=fields.String(), values=fields.Nested(TypedValueSchema), **kwargs)

    def _serialize(self, value, attr, obj, **kwargs):
        return {name: typed_value_output(kind, v) for name, (kind, v) in value.items()}


class OptionalParams(Params):
    """Params a request may leave out or send as null: both mean no params."""

    def __init__(self, **kwargs):
        super().__init__(load_default=dict, allow_none=True, **kwargs)

    def deserialize(self, value, attr=None, data=None, **kwargs):
        result = super().deserialize(value, attr, data, **kwargs)
        return {} if result is None else result


class RestartParams(OptionalParams):
    """A restart's params, laid over the failed attempt's (store.restart_failed_step): a name
    mapped to null is removed, so a misspelt or harmful param can be dropped."""

    def __init__(self, **kwargs):
        super().__init__(null_values=True, **kwargs)


class Cursor(fields.String):
    """An opaque paging cursor; loads to the sequence number to continue before."""

    def __init__(self, prefix, **kwargs):
        self.prefix = prefix
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        _, _, number = _decode_cursor(text).partition(f"{self.prefix}:")
        # Decoding skips stray characters, so only a cursor that encodes back to itself is ours.
        if (
            not number.isdecimal()
            or len(number) > 19  # before int(): a string of thousands of digits is refused by int()
            or not 1 <= int(number) <= INT64_MAX
            or encode_cursor(self.prefix, int(number)) != text
        ):
            raise ValidationError("Not a valid cursor.")
        return int(number)


def _decode_cursor(text):
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""


class QueryInteger(fields.Integer):
    """A whole number written in ASCII digits only (int() would also take '1_0', ' 5' or '٣')."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 18:
            raise self.make_error("invalid", input=value)
        return super()._deserialize(value, attr, data, **kwargs)


class QueryBoolean(fields.Boolean):
    """`true` or `false` in a query string, spelt exactly so (not 1, yes or on)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if value not in ("true", "false"):
            raise ValidationError("Must be true or false.")
        return value == "true"


class UtcTime(fields.AwareDateTime):
    """An ISO 8601 time with its offset; loads to stepd's own UTC form, so it compares as text."""

    def _deserialize(self, value, attr, data, **kwargs):
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            return iso(moment)
        except OverflowError:  # 0001-01-01T00:00:00+00:01 has no UTC time
            raise ValidationError("Not a time stepd can compare (out of range in UTC).") from None


STEPD_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def is_stepd_time(text):
    """Whether `text` is a real time written as stepd writes times (model.iso)."""
    try:
        return bool(STEPD_TIME.fullmatch(text)) and bool(datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ"))
    except ValueError:  # 2020-02-30
        return False


class FailureCursor(fields.String):
    """Where a bulk restart by filter left off: the last step's failure time and seq, and when the
    walk began (later failures, such as a restarted step failing again, are not part of it).

    Checked as strictly as a list cursor: only a position some walk can have made passes (stepd's
    own times, a seq of a row, a failure before the walk began, a walk begun in the past), so a
    forged cursor cannot widen what a walk takes.
    """

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        finished_at, number, until = ([*_decode_cursor(text).removeprefix("f:").split("|"), "", ""])[:3]
        if (
            not number.isdecimal()
            or len(number) > 19  # before int(): a string of thousands of digits is refused by int()
            or not 1 <= int(number) <= INT64_MAX
            or not (is_stepd_time(finished_at) and is_stepd_time(until))
            or not finished_at < until <= now_iso()  # stepd's times compare as text
            or encode_failure_cursor((finished_at, int(number), until)) != text
        ):
            raise ValidationError("Not a valid cursor.")
        return finished_at, int(number), until


def encode_failure_cursor(position):
    if position is None:
        return None
    finished_at, seq, until = position
    return base64.urlsafe_b64encode(f"f:{finished_at}|{seq}|{until}".encode()).decode().rstrip("=")


def encode_cursor(prefix, seq):
    if seq is None:
        return None
    return base64.urlsafe_b64encode(f"{prefix}:{seq}".encode()).decode().rstrip("=")


def step_id_field(**kwargs):
    return fields.String(required=True, validate=Pattern(ID_PATTERN, error="Not a valid step id."), **kwargs)


def process_id_field(**kwargs):
    return fields.String(validate=Pattern(ID_PATTERN, error="Not a valid process id."), **kwargs)


def reason_field():
    return Text(
        MAX_REASON,
        allow_none=True,
        load_default=None,
        metadata={"description": "Why, in your words; shown on the process and its steps."},
    )


# -- request bodies and query strings --------------------------------------------------
MAX_STEP_TYPE, MAX_PROCESS_NAME = 128, 1024  # characters of a step's type, of a process's name


class StepSpecSchema(Schema):
    type = fields.String(required=True, validate=[validate.Length(1, MAX_STEP_TYPE), encodable])
    params = OptionalParams()


class StartProcessSchema(Schema):
    name = Text(MAX_PROCESS_NAME, allow_none=True, load_default=None)
    steps = fields.List(fields.Nested(StepSpecSchema), required=True, validate=validate.Length(1, MAX_STEPS))

    def load(self, data, *, many=None, partial=None, unknown=None):
        # A valid body, the common case, is read here (as for Params); any other takes marshmallow's
        # path, which says what is wrong. marshmallow's nested schema a step costs ~7 us (76 us a
        # body of 10 steps); test_api_properties.py holds the two to the same result.
        plain = many is None and partial is None and unknown is None
        loaded = start_process_or_none(data) if plain else None
        return loaded if loaded is not None else super().load(data, many=many, partial=partial, unknown=unknown)


def start_process_or_none(body):
    """A POST /processes body as StartProcessSchema loads it, if all of it is valid; else None."""
    if type(body) is not dict or not body.keys() <= {"name", "steps"}:
        return None
    name, steps = body.get("name"), body.get("steps")
    if name is not None and not _storable_text(name, MAX_PROCESS_NAME):
        return None
    if type(steps) is not list or not 1 <= len(steps) <= MAX_STEPS:
        return None
    loaded = []
    for step in steps:
        if type(step) is not dict or not step.keys() <= {"type", "params"}:
            return None
        step_type, params = step.get("type"), step.get("params")
        if not (_storable_text(step_type, MAX_STEP_TYPE) and step_type):
            return None
        params = {} if params is None else typed_params_or_none(params)
        if params is None:
            return None
        loaded.append({"type": step_type, "params": params})
    return {"name": name, "steps": loaded}


def _storable_text(text, max_length):
    """Whether `text` is a str of at most `max_length` characters that UTF-8 can encode (Text)."""
    return type(text) is str and len(text) <= max_length and utf8_encodable(text)


class RestartStepSchema(Schema):
    step_id = step_id_field(data_key="processStepId")
    params = RestartParams()


class RestartQuery(Schema):
    dry_run = QueryBoolean(data_key="dryRun", load_default=False)


class StepFilterSchema(Schema):
    type = fields.String(validate=[validate.Length(1, 128), encodable], load_default=None)
    process_id = process_id_field(data_key="processId", load_default=None)
    failed_before = UtcTime(data_key="failedBefore", load_default=None)
    failed_after = UtcTime(data_key="failedAfter", load_default=None)


class RestartManySchema(Schema):
    """Either a list of step ids or a filter (with the cursor of an earlier call), not both."""

    step_ids = fields.List(
        step_id_field(), data_key="processStepIds", validate=validate.Length(1, MAX_BULK), load_default=None
    )
    filter = fields.Nested(StepFilterSchema, load_default=None)
    cursor = FailureCursor(load_default=None)
    params = RestartParams()

    @validates_schema
    def ids_or_filter(self, data, **kwargs):
        if (data.get("step_ids") is None) == (data.get("filter") is None):
            raise ValidationError("Give exactly one of processStepIds and filter.", "_schema")
        if data.get("cursor") is not None and data.get("filter") is None:
            raise ValidationError("A cursor continues a filter; give the filter too.", "cursor")
        ids = data.get("step_ids") or []
        if len(set(ids)) != len(ids):
            raise ValidationError("Each step id may be listed once.", "processStepIds")


class ErrorInputSchema(Schema):
    message = Text(MAX_STRING, required=True)


class FailStepSchema(Schema):
    step_id = step_id_field(data_key="processStepId")
    error = fields.Nested(ErrorInputSchema, load_default=None)


class CompleteStepSchema(Schema):
    step_id = step_id_field(data_key="processStepId")
    result = Params(load_default=None, allow_none=True)


class CancelProcessSchema(Schema):
    process_id = process_id_field(data_key="processId", required=True)
    reason = reason_field()


class SkipStepSchema(Schema):
    step_id = step_id_field(data_key="processStepId")
    result = Params(
        load_default=None,
        allow_none=True,
        metadata={
            "description": "The step's result, as if its delegate had returned it: later steps see it.",
            # In the OpenAPI document one component with null among its types, not anyOf [Params,
            # null], on which schemathesis's fuzzing of skip-step failed for some seeds (openapi.py).
            "one_nullable_component": True,
        },
    )
    reason = reason_field()


class NoQuerySchema(Schema):
    """Endpoints that take no query parameters refuse any."""


class ProcessListQuery(Schema):
    status = fields.String(validate=validate.OneOf(PROCESS_STATUSES), load_default=None)
    name = Text(1024, load_default=None, metadata={"description": "Only processes of exactly this name."})
    created_after = UtcTime(
        data_key="createdAfter",
        load_default=None,
        metadata={"description": "Only processes created strictly after this time (ISO 8601 with offset)."},
    )
    created_before = UtcTime(
        data_key="createdBefore",
        load_default=None,
        metadata={"description": "Only processes created strictly before this time (ISO 8601 with offset)."},
    )
    limit = QueryInteger(validate=validate.Range(1, 500), load_default=50)
    cursor = Cursor("p", load_default=None)


class StepListQuery(Schema):
    status = fields.String(validate=validate.OneOf(STEP_STATUSES), load_default=None)
    type = fields.String(validate=validate.Length(1, 128), load_default=None)
    process_id = process_id_field(
        data_key="processId", load_default=None, metadata={"description": "Only the steps of this process."}
    )
    error_type = fields.String(
        data_key="errorType",
        validate=[validate.Length(1, 256), encodable],
        load_default=None,
        metadata={"description": "Only steps whose error has this type (e.g. Interrupted, Timeout, ExternalFailure)."},
    )
    limit = QueryInteger(validate=validate.Range(1, 500), load_default=50)
    cursor = Cursor("s", load_default=None)


# -- responses ---------------------------------------------------------------------------
def timestamp(description=None, **kwargs):
    metadata = {"format": "date-time"} | ({"description": description} if description else {})
    return fields.String(metadata=metadata, **kwargs)


class ErrorSchema(Schema):
    type = fields.String(required=True)
    message = fields.String(required=True)


class InterventionSchema(Schema):
    """Who cancelled (a process and its steps) or skipped (a step), when and why."""

    action = fields.String(required=True, validate=validate.OneOf(INTERVENTIONS))
    principal = fields.String(required=True, metadata={"description": "The token that did it."})
    at = timestamp(required=True)
    reason = fields.String(allow_none=True, required=True)


def intervention_field():
    return fields.Nested(
        InterventionSchema,
        allow_none=True,
        required=True,
        metadata={"description": "Who cancelled or skipped it, when and why; null if nobody did."},
    )


class StepSchema(Schema):
    processStepId = fields.String(attribute="id", required=True)
    processId = fields.String(attribute="process_id", required=True)
    position = fields.Integer(required=True)
    type = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STEP_STATUSES))
    params = Params(required=True)
    result = Params(allow_none=True, required=True)
    attempts = fields.Integer(required=True)
    error = fields.Nested(ErrorSchema, allow_none=True, required=True)
    createdAt = timestamp(attribute="created_at", required=True)
    startedAt = timestamp(attribute="started_at", allow_none=True, required=True)
    finishedAt = timestamp(attribute="finished_at", allow_none=True, required=True)
    deferred = fields.Boolean(required=True)
    phase = fields.String(
        allow_none=True,
        required=True,
        validate=validate.OneOf(PHASES),
        metadata={
            "description": "Where a STARTED step is: QUEUED (committed, no runner has it yet), RUNNING (its"
            " delegate is being called), DEFERRED (waits for complete-step or fail-step), RETRY_WAIT (waits"
            " for nextRetryAt). null for every other status."
        },
    )
    nextRetryAt = timestamp(
        attribute="next_retry_at",
        allow_none=True,
        required=True,
        description="While a STARTED step waits for an automatic retry: when it is due.",
    )
    intervention = intervention_field()


class AttemptSchema(Schema):
    attempt = fields.Integer(required=True)
    trigger = fields.String(required=True, validate=validate.OneOf(TRIGGERS))
    principal = fields.String(required=True)
    params = Params(required=True)
    status = fields.String(required=True, validate=validate.OneOf(ATTEMPT_STATUSES))
    error = fields.Nested(ErrorSchema, allow_none=True, required=True)
    startedAt = timestamp(attribute="started_at", required=True)
    finishedAt = timestamp(attribute="finished_at", allow_none=True, required=True)
    requestId = fields.String(
        attribute="request_id",
        allow_none=True,
        required=True,
        metadata={
            "description": "The X-Request-Id of the request that began it (null: from before stepd recorded it)."
        },
    )


class StepDetailSchema(StepSchema):
    attemptHistory = fields.List(fields.Nested(AttemptSchema), attribute="attempt_history", required=True)


class ProcessSummarySchema(Schema):
    processId = fields.String(attribute="id", required=True)
    name = fields.String(allow_none=True, required=True)
    status = fields.String(required=True, validate=validate.OneOf(PROCESS_STATUSES))
    createdAt = timestamp(attribute="created_at", required=True)
    updatedAt = timestamp(attribute="updated_at", required=True)
    intervention = intervention_field()


class ProcessSchema(ProcessSummarySchema):
    steps = fields.List(fields.Nested(StepSchema), required=True)
    variables = Variables(
        required=True,
        metadata={"description": "The steps' results merged in position order (a later step's name wins)."},
    )


class ProcessPageSchema(Schema):
    items = fields.List(fields.Nested(ProcessSummarySchema), required=True)
    nextCursor = fields.String(allow_none=True, required=True)


class StepPageSchema(Schema):
    items = fields.List(fields.Nested(StepSchema), required=True)
    nextCursor = fields.String(allow_none=True, required=True)


class RestartResultSchema(Schema):
    processId = fields.String(attribute="process_id", required=True)
    processStepId = fields.String(attribute="step_id", required=True)
    params = Params(required=True)


class SkippedStepSchema(Schema):
    processStepId = fields.String(attribute="step_id", required=True)
    reason = fields.String(required=True)


class RestartManyResultSchema(Schema):
    restarted = fields.List(fields.Nested(RestartResultSchema), required=True)
    skipped = fields.List(fields.Nested(SkippedStepSchema), required=True)
    nextCursor = fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "Set when a filter matched more steps than one call restarts: send it back."},
    )


class RetryPolicySchema(Schema):
    retries = fields.Integer(required=True)
    backoff = fields.Float(required=True)
    delay = fields.Float(required=True)
    maxDelay = fields.Float(attribute="max_delay", required=True)


class DelegateSchema(Schema):
    type = fields.String(required=True)
    description = fields.String(required=True)
    retry = fields.Nested(RetryPolicySchema, required=True)


class HealthSchema(Schema):
    database = fields.String(required=True)
    runners = fields.Integer(required=True, metadata={"description": "Runner processes alive now."})


# -- the envelope --------------------------------------------------------------------------
class EnvelopeSchema(Schema):
    message = fields.String(required=True)
    timestamp = timestamp(required=True)
    version = fields.String(required=True)


def envelope_schema(name, data_field):
    """An envelope schema class whose `data` is `data_field` (for the OpenAPI document)."""
    return type(name, (EnvelopeSchema,), {"data": data_field})


FieldErrorsEnvelope = envelope_schema(
    "FieldErrorsEnvelope",
    fields.Dict(
        required=True,
        metadata={"description": "Field errors as marshmallow shapes them: {field: [message]} or nested."},
    ),
)
TextErrorEnvelope = envelope_schema(
    "TextErrorEnvelope", fields.String(required=True, metadata={"description": "What was wrong."})
)
ServerErrorEnvelope = envelope_schema(
    "ServerErrorEnvelope",
    fields.String(required=True, metadata={"description": "An error id, also in the log line with the traceback."}),
)


# -- answers, dumped ---------------------------------------------------------------------------
# marshmallow's dump asks each field, for each object, how to find its value and what to do with
# it: ~15 us a step (152 us of a POST of 10 steps' 1 ms). `dumper` asks once per schema, and keeps
# for each field its key, where its value is, and its conversion: the String, Integer, Nested and
# List fields' own (as marshmallow 4's _serialize does them), any other field's _serialize as is.
# A schema it does not know to keep so (dump hooks, a field that reads no attribute) is dumped by
# marshmallow. tests/conftest.py holds every answer of the in-process tests to marshmallow's dump.
@functools.cache
def dumper(schema_class, many=False):
    """`one(schema_class, many).dump`, for the dicts and lists the views answer with."""
    schema = one(schema_class, many)
    dump_one = _compiled(schema)
    if dump_one is None:
        return schema.dump
    if many:
        return lambda objects: schema.dump(objects) if objects is None else [dump_one(each) for each in objects]
    return dump_one


def _compiled(schema):
    """A function dumping one object as `schema` does, or None if this schema is marshmallow's to dump."""
    if schema._hooks[PRE_DUMP] or schema._hooks[POST_DUMP]:
        return None
    parts = []
    for name, field in schema.dump_fields.items():
        convert = _conversion(field, name)
        if convert is None:
            return None
        key = field.data_key if field.data_key is not None else name
        parts.append((key, field.attribute if field.attribute is not None else name, convert))
    if any("." in source for _key, source, _convert in parts):
        return None
    missing = marshmallow_missing

    def dump_one(obj):
        if type(obj) is not dict:
            return schema.dump(obj, many=False)
        out = {}
        for key, source, convert in parts:
            # marshmallow's get_value: the key, else an attribute of that name (a dict's own: `items`)
            value = obj[source] if source in obj else getattr(obj, source, missing)
            if value is not missing:
                out[key] = convert(value, obj)
        return out

    return dump_one


def _conversion(field, name):
    """(value, obj) -> the field's dumped value, as marshmallow 4's `field.serialize` gives it for a
    value found; None if the field must be left to marshmallow."""
    if not field._CHECK_ATTRIBUTE or field.dump_default is not marshmallow_missing:
        return None
    kind = type(field)
    if kind._serialize is fields.String._serialize:
        return lambda value, obj: None if value is None else utils.ensure_text_type(value)
    if kind._serialize is fields.Number._serialize and _plain_integer(field):
        return lambda value, obj: None if value is None else int(value)
    if kind._serialize is fields.Nested._serialize:
        return _nested_conversion(field)
    if kind._serialize is fields.List._serialize:
        inner = _conversion(field.inner, name)
        if inner is None:
            return None
        return lambda value, obj: None if value is None else [inner(each, obj) for each in value]
    return lambda value, obj: field._serialize(value, name, obj)


def _plain_integer(field):
    """A Number field that dumps int(value), as fields.Integer does (not as text, no rounding of its own)."""
    return type(field)._format_num is fields.Number._format_num and field.num_type is int and not field.as_string


def _nested_conversion(field):
    schema = field.schema
    many = schema.many or field.many
    dump_one = _compiled(schema)
    if dump_one is None:
        return lambda value, obj: None if value is None else schema.dump(value, many=many)
    if many:
        return lambda value, obj: None if value is None else [dump_one(each) for each in value]
    return lambda value, obj: None if value is None else dump_one(value)
