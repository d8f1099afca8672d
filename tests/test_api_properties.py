"""Generated bad input (hypothesis): the params schema and every request body.

Any JSON value is either accepted, and then echoed back exactly in output form, or refused
with 412 and field errors; never an exception, never a 500. An oracle written from SPEC
section 2 (not from schemas.py) says which of the two each value must get.
"""

import itertools
import json
import math
import sys
import unicodedata
from collections import Counter

import pytest
from helpers import (
    CANCEL,
    COMPLETE,
    ENV_HEADERS,
    ENVELOPE_KEYS,
    FAIL,
    IN_PROCESS_POLL,
    RESTART,
    SKIP,
    STEPS,
    P,
    report_figure,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError, fields

from stepd import schemas as s

# A failing example's repr may be large (65,536-character strings); that is no reason to fail.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

HEADERS = {**ENV_HEADERS, "Content-Type": "application/json"}
VALUE_FIELDS = {"STRING": "strValue", "LONG": "longValue", "DOUBLE": "doubleValue"}
SCHEMA_EXAMPLES = 1000
BODY_EXAMPLES = 300

EXAMPLES = Counter()  # examples run, per test and outcome, for the figures (see count)

PROPERTY_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# -- strategies: JSON values, and values near the schema's shapes ----------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Strings at the 65,536-character limit (hypothesis draws no text that long by itself).
long_strings = st.builds(lambda n, c: c * n, st.integers(65530, 65540), st.sampled_from(["x", "é", "\ud800"]))
names = st.text(max_size=6) | st.text(min_size=120, max_size=140) | st.sampled_from(["a\x00", "tab\t", "x" * 129])
typed_values = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["STRING", "LONG", "DOUBLE", "string", "INT", ""]) | scalars,
        "strValue": scalars,
        "longValue": scalars | st.sampled_from([2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 1.0, True]),
        "doubleValue": scalars | st.sampled_from([10**400, 1, -0.0, 1e308, True]),
        "other": scalars,
    },
)
# Well-formed typed values too, or nearly every generated dictionary would be refused.
good_values = {
    "STRING": st.text(max_size=40),
    "LONG": st.integers(-(2**63), 2**63 - 1),
    "DOUBLE": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**70), 2**70),
}
good_typed_values = st.sampled_from(sorted(VALUE_FIELDS)).flatmap(
    lambda kind: st.fixed_dictionaries(
        {"type": st.just(kind), VALUE_FIELDS[kind]: good_values[kind]},
        optional={field: st.none() for k, field in VALUE_FIELDS.items() if k != kind},
    )
)
# Values at the STRING limit, for the schema test only: in bodies they would pass 1 MiB.
long_typed_values = st.fixed_dictionaries(
    {"type": st.just("STRING"), "strValue": long_strings}, optional={"longValue": st.none()}
)
good_names = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=16)
good_params = st.dictionaries(good_names, good_typed_values, max_size=6)
params_like = (
    json_values
    | st.dictionaries(names, typed_values | json_values, max_size=5)
    | st.dictionaries(good_names | names, good_typed_values | typed_values, max_size=5)
    | good_params
)
ids = st.just("abc") | st.sampled_from(["", "a" * 65, "a b", "../x"]) | st.text(max_size=8) | scalars


# -- the oracle: SPEC section 2, written out ----------------------------------------------
def valid_value(value):
    if not isinstance(value, dict) or not set(value) <= {"type", *VALUE_FIELDS.values()}:
        return False
    kind = value.get("type")
    if kind not in VALUE_FIELDS:
        return False
    if any(value.get(f) is not None for k, f in VALUE_FIELDS.items() if k != kind):
        return False
    given_value = value.get(VALUE_FIELDS[kind])
    if kind == "STRING":
        return isinstance(given_value, str) and len(given_value) <= 65536
    if isinstance(given_value, bool) or not isinstance(given_value, (int, float)):
        return False
    if kind == "LONG":
        return isinstance(given_value, int) and -(2**63) <= given_value < 2**63
    try:
        return math.isfinite(float(given_value))
    except OverflowError:
        return False


def valid_name(name):
    return isinstance(name, str) and 1 <= len(name) <= 128 and not any(unicodedata.category(c) == "Cc" for c in name)


def valid_params(params, optional=True, overlay=False):
    """Params as SPEC section 2 has them; a restart's (`overlay`) may also map a name to null,
    which removes it (issue 13)."""
    if params is None:
        return optional
    return (
        isinstance(params, dict)
        and len(params) <= 256
        and all(valid_name(n) and (valid_value(v) or (overlay and v is None)) for n, v in params.items())
    )


def valid_overlay(params):
    return valid_params(params, overlay=True)


def output_form(params):
    """The echo SPEC section 2 promises: all four keys, the unused two null, a DOUBLE as a float."""
    out = {}
    for name, value in (params or {}).items():
        if value is None:
            continue  # a restart's null removes the name
        kind = value["type"]
        echoed = {"strValue": None, "longValue": None, "doubleValue": None, "type": kind}
        given_value = value[VALUE_FIELDS[kind]]
        echoed[VALUE_FIELDS[kind]] = float(given_value) if kind == "DOUBLE" else given_value
        out[name] = echoed
    return out


def storable(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid_start(body):
    if not isinstance(body, dict) or not set(body) <= {"name", "steps"}:
        return False
    name, steps = body.get("name"), body.get("steps")
    if name is not None and not (isinstance(name, str) and len(name) <= 1024 and storable(name)):
        return False
    if not isinstance(steps, list) or not 1 <= len(steps) <= 100:
        return False
    return all(
        isinstance(step, dict)
        and set(step) <= {"type", "params"}
        and step.get("type") in ("noop", "external")
        and valid_params(step.get("params"))
        for step in steps
    )


def valid_action(body, extra_key, extra_valid):
    return (
        isinstance(body, dict)
        and set(body) <= {"processStepId", extra_key}
        and isinstance(body.get("processStepId"), str)
        and extra_valid(body.get(extra_key))
    )


def valid_error(error):
    return error is None or (
        isinstance(error, dict)
        and set(error) == {"message"}
        and isinstance(error["message"], str)
        and len(error["message"]) <= 65536
        and storable(error["message"])
    )


def count(test, outcome):
    """One more example of `test` with this outcome, in the "hypothesis" reliability figure."""
    EXAMPLES[test, outcome] += 1
    outcomes = "; ".join(f"{name} {result}: {n}" for (name, result), n in sorted(EXAMPLES.items()))
    report_figure("hypothesis", f"{sum(EXAMPLES.values())} examples, 0 errors ({outcomes})")


# -- the params schema on its own --------------------------------------------------------
@settings(PROPERTY_SETTINGS, max_examples=SCHEMA_EXAMPLES)
@given(params=params_like | st.dictionaries(good_names, long_typed_values, max_size=3))
def test_the_params_schema_accepts_exactly_the_valid_params_and_echoes_them(params):
    try:
        loaded = s.RestartStepSchema().load({"processStepId": "abc", "params": params})
    except ValidationError as refused:
        count("schema", "refused")
        assert not valid_overlay(params), f"refused valid params: {refused.messages}"
        assert isinstance(refused.messages, dict) and "params" in refused.messages
        return
    count("schema", "accepted")
    assert valid_overlay(params), "accepted invalid params"
    kept = {name: value for name, value in loaded["params"].items() if value is not None}  # as the store lays them
    echoed = s.RestartResultSchema().dump({"process_id": "p", "step_id": "abc", "params": kept})
    assert echoed["params"] == output_form(params)
    assert json.loads(json.dumps(echoed["params"])) == output_form(params)


def read_as_marshmallow_reads(what, fast, marshmallow):
    """Whether a fast path read its input (None: it left it to marshmallow); what it read must be
    what marshmallow reads (`marshmallow`: ("loaded", the result) or ("refused", the messages))."""
    outcome, loaded = marshmallow
    if fast is None:
        count(what, "left to marshmallow")
        return False
    count(what, "read")
    assert outcome == "loaded", f"the fast path read what marshmallow refuses: {loaded}"
    assert fast == loaded
    return True


def marshmallow_load(field, params):
    """What marshmallow's own path (fields.Dict, a nested TypedValueSchema a value) makes of
    `params`: ("loaded", the dict) or ("refused", its messages)."""
    try:
        return "loaded", fields.Dict._deserialize(field, params, "params", {})
    except ValidationError as refused:
        return "refused", refused.messages


# A typed value of each kind holding a value at or past an edge of some kind's: where a check that
# is almost right (a bool taken for an integer, an off-by-one at 2**63) would differ from marshmallow.
EDGES = [True, False, None, 0, 1, -1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 1.0, -0.0, 0.5, 1e308, -1e308]
EDGES += [sys.float_info.max, int(sys.float_info.max), int(sys.float_info.max) * 2, 10**400, "", "x", "\ud800", [], {}]
edge_typed_values = st.sampled_from(sorted(VALUE_FIELDS)).flatmap(
    lambda kind: st.fixed_dictionaries(
        {"type": st.just(kind), VALUE_FIELDS[kind]: st.sampled_from(EDGES)},
        optional={field: st.sampled_from([None, 0, "", False]) for k, field in VALUE_FIELDS.items() if k != kind},
    )
)


@settings(PROPERTY_SETTINGS, max_examples=SCHEMA_EXAMPLES)
@given(
    params=params_like
    | good_params
    | st.dictionaries(good_names, long_typed_values, max_size=3)
    | st.dictionaries(good_names, edge_typed_values, min_size=1, max_size=2),
    null_values=st.booleans(),
)
def test_the_params_fast_path_loads_as_marshmallow_does(params, null_values):
    """schemas.typed_params_or_none reads valid params without marshmallow's nested schema: what it
    reads must be exactly what marshmallow would, and what it leaves (None) marshmallow's to refuse
    or read."""
    fast = s.typed_params_or_none(params, null_values)
    outcome, loaded = marshmallow_load(s.Params(null_values=null_values), params)
    if read_as_marshmallow_reads("fast path", fast, (outcome, loaded)):
        assert [type(v[1]) if v else None for v in fast.values()] == [
            type(v[1]) if v else None for v in loaded.values()
        ]
        assert list(fast) == list(loaded)


def test_the_params_fast_path_loads_every_edge_as_marshmallow_does():
    """Every kind with every edge value, exhaustively (the property above draws only some of them)."""
    read = 0
    for kind, edge, null_values in itertools.product(sorted(VALUE_FIELDS), EDGES, (False, True)):
        params = {"p": {"type": kind, VALUE_FIELDS[kind]: edge}}
        fast = s.typed_params_or_none(params, null_values)
        if fast is not None:
            read += 1
            assert marshmallow_load(s.Params(null_values=null_values), params) == ("loaded", fast), params
            assert type(fast["p"][1]) is type(marshmallow_load(s.Params(), params)[1]["p"][1])
    assert read >= 20  # the valid ones: the check above was not vacuous


def test_the_start_fast_path_loads_every_edge_as_marshmallow_does():
    """Every edge name with every edge type, and 0-101 steps, exhaustively."""
    bodies = [{"name": name, "steps": [{"type": kind}]} for name, kind in itertools.product(EDGE_NAMES, EDGE_TYPES)]
    bodies += [{"steps": [{"type": "noop"}] * n} for n in (0, 1, 100, 101)]
    read = [body for body in bodies if s.start_process_or_none(body) is not None]
    for body in read:
        assert marshmallow_start(body) == ("loaded", s.start_process_or_none(body)), body
    assert len(read) >= 10  # the valid ones: the check above was not vacuous


def test_the_params_fast_path_reads_the_common_shapes():
    """The shapes a client sends most (one of each type, a restart's null) take the fast path, so the
    property above is not vacuous; a value it must not read goes to marshmallow."""
    params = {
        "s": {"type": "STRING", "strValue": "x"},
        "n": {"type": "LONG", "longValue": 5, "doubleValue": None},
        "d": {"type": "DOUBLE", "doubleValue": 2},
    }
    assert s.typed_params_or_none(params) == {"s": ("STRING", "x"), "n": ("LONG", 5), "d": ("DOUBLE", 2.0)}
    assert s.typed_params_or_none({"gone": None}, null_values=True) == {"gone": None}
    for left in ({"gone": None}, {"b": {"type": "LONG", "longValue": True}}, {"": {"type": "STRING", "strValue": ""}}):
        assert s.typed_params_or_none(left) is None


# -- every request body, over HTTP against a real SQLite file (fixture module_client) ----
def post(client, path, body):
    """POST any JSON value; check it is an envelope with 2xx or 412 and never a server error."""
    response = client.post(path, data=json.dumps(body), headers=HEADERS)
    assert response.status_code < 500, response.get_data(as_text=True)
    reply = response.get_json()
    assert set(reply) == ENVELOPE_KEYS
    if response.status_code == 412:
        assert reply["message"] == "Precondition failed"
        assert isinstance(reply["data"], dict) and reply["data"], reply
    return response.status_code, reply["data"]


def started_step(client, fail=False):
    """A fresh STARTED step (or FAILED, through fail-step), so every example has its own."""
    process = client.post(P, json={"steps": [{"type": "external"}]}, headers=HEADERS).get_json()["data"]
    step_id = process["steps"][0]["processStepId"]
    if fail:
        assert client.post(FAIL, json={"processStepId": step_id}, headers=HEADERS).status_code == 200
    return step_id


def aim(body, step_id, use_real_id):
    """The generated body, with its processStepId swapped for a real step's when asked to."""
    if use_real_id and isinstance(body, dict) and isinstance(body.get("processStepId"), str):
        return {**body, "processStepId": step_id}
    return body


good_start_bodies = st.fixed_dictionaries(
    {
        "steps": st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["noop", "external"])}, optional={"params": st.none() | good_params}
            ),
            min_size=1,
            max_size=3,
        )
    },
    optional={"name": st.none() | st.text(max_size=30)},
)
start_bodies = (
    good_start_bodies
    | json_values
    | st.fixed_dictionaries(
        {
            "steps": st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["noop", "external"]) | st.sampled_from(["nope", ""]) | scalars},
                    optional={"params": params_like},
                ),
                max_size=3,
            )
            | json_values
        },
        optional={"name": st.none() | st.text(max_size=20) | st.text(min_size=1020, max_size=1030) | scalars},
    )
)


def marshmallow_start(body):
    """marshmallow's own load of a POST /processes body (Schema.load, not the fast path's override)."""
    try:
        return "loaded", Schema.load(s.StartProcessSchema(), body)
    except ValidationError as refused:
        return "refused", refused.messages


# Bodies near the edges of each check: a name or type at its length limit or past it, a lone
# surrogate, 0, 1, 100 and 101 steps, a step with an unknown key, params null, empty or invalid.
EDGE_NAMES = [None, "", "n", "x" * 1024, "x" * 1025, "\ud800", 5, True, []]
EDGE_TYPES = ["noop", "", "t" * 128, "t" * 129, "\udfff", None, 7]
edge_names, edge_types = st.sampled_from(EDGE_NAMES), st.sampled_from(EDGE_TYPES)
edge_steps = st.fixed_dictionaries(
    {"type": edge_types},
    optional={
        "params": st.none() | st.just({}) | good_params | st.dictionaries(good_names, edge_typed_values, max_size=1)
    },
)
edge_start_bodies = st.fixed_dictionaries(
    {"steps": st.lists(edge_steps, max_size=3) | st.lists(st.just({"type": "noop"}), min_size=99, max_size=102)},
    optional={"name": edge_names, "other": st.just(1)},
) | st.fixed_dictionaries({"name": edge_names})


@settings(PROPERTY_SETTINGS, max_examples=SCHEMA_EXAMPLES)
@given(body=start_bodies | good_start_bodies | edge_start_bodies)
def test_the_start_fast_path_loads_as_marshmallow_does(body):
    """schemas.start_process_or_none reads valid bodies of POST /processes without marshmallow's
    nested schemas: what it reads must be exactly what marshmallow would (None: marshmallow's to do)."""
    fast = s.start_process_or_none(body)
    if read_as_marshmallow_reads("start fast path", fast, marshmallow_start(body)):
        assert s.StartProcessSchema().load(body) == fast  # the schema's own load takes the fast path


@settings(PROPERTY_SETTINGS, max_examples=BODY_EXAMPLES)
@given(body=start_bodies)
def test_start_process_accepts_valid_bodies_echoes_them_and_refuses_the_rest(module_client, body):
    status, data = post(module_client, P, body)
    count("start", status)
    if status == 412:
        assert not valid_start(body), data
        return
    assert status == 201 and valid_start(body)
    assert data["name"] == body.get("name")
    assert [step["type"] for step in data["steps"]] == [step["type"] for step in body["steps"]]
    assert [step["params"] for step in data["steps"]] == [output_form(step.get("params")) for step in body["steps"]]


@settings(PROPERTY_SETTINGS, max_examples=BODY_EXAMPLES)
@given(
    body=json_values
    | st.fixed_dictionaries({"processStepId": ids}, optional={"params": params_like, "x": scalars})
    | st.fixed_dictionaries({"processStepId": st.just("abc")}, optional={"params": st.none() | good_params}),
    use_real_id=st.booleans(),
)
def test_restart_accepts_valid_bodies_echoes_the_params_and_refuses_the_rest(module_client, body, use_real_id):
    body = aim(body, started_step(module_client, fail=True), use_real_id)
    status, data = post(module_client, RESTART, body)
    count("restart", status)
    if status == 412:
        assert not (use_real_id and valid_action(body, "params", valid_overlay)), data
        return
    assert status == 200 and valid_action(body, "params", valid_overlay)
    assert data["processStepId"] == body["processStepId"]
    assert data["params"] == output_form(body.get("params"))


@settings(PROPERTY_SETTINGS, max_examples=BODY_EXAMPLES)
@given(
    body=json_values
    | st.fixed_dictionaries(
        {"processStepId": ids},
        optional={"result": params_like, "x": scalars},
    )
    | st.fixed_dictionaries({"processStepId": st.just("abc")}, optional={"result": st.none() | good_params}),
    use_real_id=st.booleans(),
)
def test_complete_step_accepts_valid_bodies_echoes_the_result_and_refuses_the_rest(module_client, body, use_real_id):
    body = aim(body, started_step(module_client), use_real_id)
    status, data = post(module_client, COMPLETE, body)
    count("complete", status)
    if status == 412:
        assert not (use_real_id and valid_action(body, "result", valid_params)), data
        return
    assert status == 200 and valid_action(body, "result", valid_params)
    assert data["status"] == "COMPLETED"
    assert data["result"] == (None if body.get("result") is None else output_form(body["result"]))


@settings(PROPERTY_SETTINGS, max_examples=BODY_EXAMPLES)
@given(
    body=json_values
    | st.fixed_dictionaries(
        {"processStepId": ids},
        optional={
            "error": json_values | st.fixed_dictionaries({"message": st.text(max_size=20) | scalars}),
            "x": scalars,
        },
    )
    | st.fixed_dictionaries(
        {"processStepId": st.just("abc")},
        optional={"error": st.none() | st.fixed_dictionaries({"message": st.text(max_size=40)})},
    ),
    use_real_id=st.booleans(),
)
def test_fail_step_accepts_valid_bodies_echoes_the_error_and_refuses_the_rest(module_client, body, use_real_id):
    body = aim(body, started_step(module_client), use_real_id)
    status, data = post(module_client, FAIL, body)
    count("fail", status)
    if status == 412:
        assert not (use_real_id and valid_action(body, "error", valid_error)), data
        return
    assert status == 200 and valid_action(body, "error", valid_error)
    assert data["status"] == "FAILED"
    expected = body["error"]["message"] if body.get("error") else "Failed by env through fail-step."
    assert data["error"] == {"type": "ExternalFailure", "message": expected}


# -- SPEC 10: cancel and skip-step --------------------------------------------------------------------
reasons = st.none() | st.text(max_size=30) | st.text(min_size=1020, max_size=1030) | st.sampled_from(["\ud800"])
reasons |= scalars | json_values


def valid_reason(reason):
    return reason is None or (isinstance(reason, str) and len(reason) <= 1024 and storable(reason))


def valid_skip(body):
    return (
        isinstance(body, dict)
        and set(body) <= {"processStepId", "result", "reason"}
        and isinstance(body.get("processStepId"), str)
        and valid_params(body.get("result"))
        and valid_reason(body.get("reason"))
    )


def valid_cancel(body):
    return (
        isinstance(body, dict)
        and set(body) <= {"processId", "reason"}
        and isinstance(body.get("processId"), str)
        and valid_reason(body.get("reason"))
    )


def get(client, path):
    return client.get(path, headers=HEADERS).get_json()["data"]


@settings(PROPERTY_SETTINGS, max_examples=BODY_EXAMPLES)
@given(
    body=json_values
    | st.fixed_dictionaries({"processId": ids}, optional={"reason": reasons, "x": scalars})
    | st.fixed_dictionaries({"processId": st.just("abc")}, optional={"reason": st.none() | st.text(max_size=40)}),
    use_real_id=st.booleans(),
)
def test_cancel_accepts_valid_bodies_and_refuses_the_rest_changing_nothing(module_client, body, use_real_id):
    step_id = started_step(module_client)
    # Once deferred, the process stays as it is (a queued or running step would move on by itself).
    deferred = wait_for(
        lambda: (step := get(module_client, f"{STEPS}/{step_id}"))["deferred"] and step, interval=IN_PROCESS_POLL
    )
    process_id = deferred["processId"]
    if use_real_id and isinstance(body, dict) and isinstance(body.get("processId"), str):
        body = {**body, "processId": process_id}
    before = get(module_client, f"{P}/{process_id}")
    status, data = post(module_client, CANCEL, body)
    count("cancel", status)
    if status == 412:
        assert not (use_real_id and valid_cancel(body)), data
        assert get(module_client, f"{P}/{process_id}") == before
        return
    assert status == 200 and valid_cancel(body)
    assert data["status"] == "CANCELLED" and [s["status"] for s in data["steps"]] == ["CANCELLED"]
    assert data["intervention"]["reason"] == body.get("reason")


@settings(PROPERTY_SETTINGS, max_examples=BODY_EXAMPLES)
@given(
    body=json_values
    | st.fixed_dictionaries({"processStepId": ids}, optional={"result": params_like, "reason": reasons, "x": scalars})
    | st.fixed_dictionaries(
        {"processStepId": st.just("abc")},
        optional={"result": st.none() | good_params, "reason": st.none() | st.text(max_size=40)},
    ),
    use_real_id=st.booleans(),
)
def test_skip_step_accepts_valid_bodies_echoes_the_result_and_refuses_the_rest_changing_nothing(
    module_client, body, use_real_id
):
    step_id = started_step(module_client, fail=True)
    body = aim(body, step_id, use_real_id)
    before = get(module_client, f"{STEPS}/{step_id}")
    status, data = post(module_client, SKIP, body)
    count("skip", status)
    if status == 412:
        assert not (use_real_id and valid_skip(body)), data
        assert get(module_client, f"{STEPS}/{step_id}") == before
        return
    assert status == 200 and valid_skip(body)
    assert data["status"] == "SKIPPED" and data["intervention"]["reason"] == body.get("reason")
    assert data["result"] == (None if body.get("result") is None else output_form(body["result"]))
