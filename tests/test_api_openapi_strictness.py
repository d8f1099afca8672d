"""The OpenAPI document is exactly as strict as the validation (issue 19): for each rule, a value just
inside it is accepted by both, and one just outside refused by both. The API's side is what a request
meets (envelope.load_body / load_query with the endpoint's schema, the Idempotency-Key's check); the
document's is the served document's schema for that body or parameter, with a JSON Schema 2020-12
validator (OpenAPI 3.1): jsonschema-rs, schemathesis's own, whose `pattern` is ECMA-262's as JSON Schema
says (Python's jsonschema runs re.search, whose `$` also matches before a final newline, so it takes
"abc\n" for `^[a-z]+$`). If the two drift apart, a case here fails.

What the document cannot say is pinned too (KNOWN_GAPS): the document lets it through, the API
refuses it. Each is in the README's list, "What the OpenAPI document cannot say".
"""

import json

import jsonschema_rs
import pytest
from helpers import BULK, CANCEL, COMPLETE, FAIL, RESTART, ROOT, P
from marshmallow import ValidationError
from test_api_openapi import request_schema, resolve

from stepd import model
from stepd import schemas as s
from stepd.envelope import load_body, load_query

SCHEMAS = {P: s.StartProcessSchema, RESTART: s.RestartStepSchema, FAIL: s.FailStepSchema,
           COMPLETE: s.CompleteStepSchema, CANCEL: s.CancelProcessSchema, BULK: s.RestartManySchema}  # fmt: skip


def api_accepts(app, path, body_text):
    """Whether the validation of `path`'s body lets the JSON text through."""
    with app.test_request_context(path, method="POST", data=body_text, content_type="application/json"):
        try:
            load_body(SCHEMAS[path])
        except ValidationError:
            return False
    return True


def is_valid(schema, instance):
    return jsonschema_rs.Draft202012Validator(schema).is_valid(instance)


def value(kind, v, **others):
    return {"type": kind, s.VALUE_FIELD[kind]: v, **others}


def restart(params):
    return {"processStepId": "abc", "params": params}


def start(**step):
    return {"steps": [{"type": "noop", **step}]}


N, STRING = model.MAX_NAME, model.MAX_STRING
INSIDE_AND_OUTSIDE = [  # (what, path, a body just inside the rule, one just outside it)
    ("step id length", RESTART, {"processStepId": "a" * 64}, {"processStepId": "a" * 65}),
    ("step id not empty", RESTART, {"processStepId": "a"}, {"processStepId": ""}),
    ("step id characters", RESTART, {"processStepId": "A-z_9"}, {"processStepId": "a.b"}),
    ("step id: no final newline", RESTART, {"processStepId": "abc"}, {"processStepId": "abc\n"}),
    ("process id length", CANCEL, {"processId": "p" * 64}, {"processId": "p" * 65}),
    ("process id characters", CANCEL, {"processId": "p-_1"}, {"processId": "p 1"}),
    ("name length", RESTART, restart({"n" * N: value("LONG", 1)}), restart({"n" * (N + 1): value("LONG", 1)})),
    ("name not empty", RESTART, restart({"n": value("LONG", 1)}), restart({"": value("LONG", 1)})),
    ("name: no C0 control", RESTART, restart({"a ~": value("LONG", 1)}), restart({"a\x1f": value("LONG", 1)})),
    ("name: no DEL", RESTART, restart({"a\x7e": value("LONG", 1)}), restart({"a\x7f": value("LONG", 1)})),
    ("name: no C1 control", RESTART, restart({"a\xa0": value("LONG", 1)}), restart({"a\x9f": value("LONG", 1)})),
    ("name: no newline", RESTART, restart({"a\u2028": value("LONG", 1)}), restart({"a\n": value("LONG", 1)})),
    (
        "256 names",
        RESTART,
        restart({f"n{i}": value("LONG", i) for i in range(model.MAX_PARAMS)}),
        restart({f"n{i}": value("LONG", i) for i in range(model.MAX_PARAMS + 1)}),
    ),
    (
        "STRING length",
        RESTART,
        restart({"s": value("STRING", "x" * STRING)}),
        restart({"s": value("STRING", "x" * (STRING + 1))}),
    ),
    (
        "LONG maximum",
        RESTART,
        restart({"n": value("LONG", model.INT64_MAX)}),
        restart({"n": value("LONG", model.INT64_MAX + 1)}),
    ),
    (
        "LONG minimum",
        RESTART,
        restart({"n": value("LONG", model.INT64_MIN)}),
        restart({"n": value("LONG", model.INT64_MIN - 1)}),
    ),
    ("LONG is an integer", RESTART, restart({"n": value("LONG", 1)}), restart({"n": value("LONG", 1.5)})),
    ("LONG not a string", RESTART, restart({"n": value("LONG", 1)}), restart({"n": value("LONG", "1")})),
    ("LONG not a boolean", RESTART, restart({"n": value("LONG", 0)}), restart({"n": value("LONG", False)})),
    (
        "DOUBLE finite",
        RESTART,
        restart({"d": value("DOUBLE", model.MAX_DOUBLE)}),
        restart({"d": value("DOUBLE", 10**309)}),
    ),
    (
        "DOUBLE finite, below",
        RESTART,
        restart({"d": value("DOUBLE", -model.MAX_DOUBLE)}),
        restart({"d": value("DOUBLE", -(10**309))}),
    ),
    ("DOUBLE takes an integer", RESTART, restart({"d": value("DOUBLE", 3)}), restart({"d": value("DOUBLE", "3")})),
    ("the type's field required", RESTART, restart({"n": value("LONG", 1)}), restart({"n": {"type": "LONG"}})),
    ("the type's field not null", RESTART, restart({"n": value("STRING", "")}), restart({"n": value("STRING", None)})),
    (
        "the other fields null or absent",
        RESTART,
        restart({"n": value("LONG", 1, strValue=None, doubleValue=None)}),
        restart({"n": value("LONG", 1, strValue="1")}),
    ),
    (
        "one of three types",
        RESTART,
        restart({"n": value("DOUBLE", 1.0)}),
        restart({"n": {"type": "INT", "longValue": 1}}),
    ),
    ("no other key", RESTART, restart({"n": value("LONG", 1)}), restart({"n": value("LONG", 1, unit="s")})),
    ("a restart's null removes a name", RESTART, restart({"n": None}), restart({"n": 5})),
    (
        "a result's value is not null",
        COMPLETE,
        {"processStepId": "a", "result": {}},
        {"processStepId": "a", "result": {"n": None}},
    ),
    ("no unknown field", RESTART, {"processStepId": "a"}, {"processStepId": "a", "force": True}),
    ("steps: at least one", P, start(), {"steps": []}),
    (
        "steps: at most 100",
        P,
        {"steps": [{"type": "noop"}] * model.MAX_STEPS},
        {"steps": [{"type": "noop"}] * (model.MAX_STEPS + 1)},
    ),
    ("step type length", P, {"steps": [{"type": "t" * 128}]}, {"steps": [{"type": "t" * 129}]}),
    ("step type not empty", P, {"steps": [{"type": "t"}]}, {"steps": [{"type": ""}]}),
    ("process name length", P, {**start(), "name": "n" * 1024}, {**start(), "name": "n" * 1025}),
    ("a step's params are Params", P, start(params={"n": value("LONG", 1)}), start(params={"": value("LONG", 1)})),
    (
        "reason length",
        CANCEL,
        {"processId": "p", "reason": "r" * model.MAX_REASON},
        {"processId": "p", "reason": "r" * (model.MAX_REASON + 1)},
    ),
    (
        "error message length",
        FAIL,
        {"processStepId": "a", "error": {"message": "m" * STRING}},
        {"processStepId": "a", "error": {"message": "m" * (STRING + 1)}},
    ),
    ("error message required", FAIL, {"processStepId": "a", "error": None}, {"processStepId": "a", "error": {}}),
    (
        "bulk: at most 1000 ids",
        BULK,
        {"processStepIds": [f"s{i}" for i in range(model.MAX_BULK)]},
        {"processStepIds": [f"s{i}" for i in range(model.MAX_BULK + 1)]},
    ),
    ("bulk: at least one id", BULK, {"processStepIds": ["a"]}, {"processStepIds": []}),
    ("bulk: each id once", BULK, {"processStepIds": ["a", "b"]}, {"processStepIds": ["a", "a"]}),
    ("bulk: ids well-formed", BULK, {"processStepIds": ["a"]}, {"processStepIds": ["a/b"]}),
    ("bulk: filter's type length", BULK, {"filter": {"type": "t" * 128}}, {"filter": {"type": "t" * 129}}),
]


@pytest.mark.parametrize(
    ("what", "path", "inside", "outside"), INSIDE_AND_OUTSIDE, ids=[case[0] for case in INSIDE_AND_OUTSIDE]
)
def test_just_inside_is_accepted_and_just_outside_refused_by_both(app, spec, what, path, inside, outside):
    document = request_schema(spec, path)
    assert api_accepts(app, path, json.dumps(inside)), f"the API refuses {what}, inside"
    assert is_valid(document, inside), f"the document refuses {what}, inside"
    assert not api_accepts(app, path, json.dumps(outside)), f"the API accepts {what}, outside"
    assert not is_valid(document, outside), f"the document accepts {what}, outside"


def test_every_param_name_character_is_judged_alike(app, spec):
    """Each of the first 0x3000 code points (and the control ones are all among them), alone as a name."""
    names = resolve(spec, spec["components"]["schemas"]["Params"])["propertyNames"]
    for code in range(0x3000):
        name = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue  # lone surrogates: KNOWN_GAPS
        body = json.dumps(restart({name: value("LONG", 1)}))
        assert api_accepts(app, RESTART, body) == is_valid(names, name), hex(code)


LIMIT_CASES = [("1", True), ("500", True), ("0", False), ("501", False)]


@pytest.mark.parametrize(("limit", "ok"), LIMIT_CASES, ids=[f"limit={limit}" for limit, _ in LIMIT_CASES])
def test_a_list_limit_is_judged_alike(app, spec, limit, ok):
    [parameter] = [p for p in spec["paths"][P]["get"]["parameters"] if p["name"] == "limit"]
    with app.test_request_context(f"{P}?limit={limit}"):
        try:
            load_query(s.ProcessListQuery)
            accepted = True
        except ValidationError:
            accepted = False
    assert accepted is ok
    assert is_valid(parameter["schema"], int(limit)) is ok


KEYS = [("k" * 255, True), (" ~", True), ("k" * 256, False), ("", False), ("ké", False), ("k\x7f", False)]


@pytest.mark.parametrize(("key", "ok"), KEYS, ids=["255", "printable", "256", "empty", "not-ascii", "DEL"])
def test_an_idempotency_key_is_judged_alike(api, spec, key, ok):
    [parameter] = [p for p in spec["paths"][P]["post"]["parameters"] if p["name"] == "Idempotency-Key"]
    answer = api.post(P, start(), headers={"Idempotency-Key": key})
    assert (answer.status_code == 201) is ok, answer.json
    assert is_valid(parameter["schema"], key) is ok


# What the document lets through and the API refuses: the README's list.
KNOWN_GAPS = [
    ("a LONG written 1.0", RESTART, '{"processStepId": "a", "params": {"n": {"type": "LONG", "longValue": 1.0}}}'),
    ("a lone surrogate in a name", P, '{"steps": [{"type": "noop"}], "name": "\\ud800"}'),
    ("a lone surrogate in a reason", CANCEL, '{"processId": "p", "reason": "\\udfff"}'),
    ("both step ids and a filter", BULK, '{"processStepIds": ["a"], "filter": {"type": "t"}}'),
    ("neither step ids nor a filter", BULK, "{}"),
    ("a cursor without a filter", BULK, '{"processStepIds": ["a"], "cursor": "abc"}'),
    ("a cursor stepd did not make", BULK, '{"filter": {}, "cursor": "abc"}'),
]


@pytest.mark.parametrize(("what", "path", "text"), KNOWN_GAPS, ids=[gap[0] for gap in KNOWN_GAPS])
def test_what_the_document_cannot_say_is_the_readmes_list(app, spec, what, path, text):
    assert is_valid(request_schema(spec, path), json.loads(text)), f"the document now says {what}: update the README"
    assert not api_accepts(app, path, text), f"the API now accepts {what}"


def test_the_readme_lists_what_the_document_cannot_say():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### What the OpenAPI document cannot say", 1)[1].split("\n#", 1)[0]
    for needle in ("1.0", "surrogate", "processStepIds", "cursor", "delegate", "Idempotency-Key", "256", "1 MiB"):
        assert needle in section, needle
