"""SPEC section 2 (typed params), on both endpoints that take params from a client:
POST /api/v1/processes and POST /api/v1/processes/restart-failed-step.

Every refused input is a 412 whose `data` names the field the way marshmallow nests it,
and changes nothing.
"""

import json

import pytest
from helpers import BULK, RESTART, P, out, refused, typed

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StartTarget:
    """Params given to POST /api/v1/processes (one `noop` step)."""

    name = "start"

    def __init__(self, api):
        self.api = api
        self.processes = api.process_count()

    def send(self, params):
        return self.api.post(P, {"steps": [{"type": "noop", "params": params}]})

    def send_raw(self, params_json):
        raw = '{"steps": [{"type": "noop", "params": ' + params_json + "}]}"
        return self.api.post_raw(P, raw)

    def param_errors(self, response):
        return response.json["data"]["steps"]["0"]["params"]

    def echoed(self, response):
        assert response.status_code == 201, response.json
        return response.json["data"]["steps"][0]["params"]

    def stored(self, response):
        return self.api.step(response.json["data"]["steps"][0]["processStepId"])["params"]

    def assert_unchanged(self):
        assert self.api.process_count() == self.processes


class RestartTarget:
    """Params given to POST /api/v1/processes/restart-failed-step, for a FAILED `check` step."""

    name = "restart"
    FAILED_PARAMS = {"ok": 0}

    def __init__(self, api):
        self.api = api
        process = api.start(("check", self.FAILED_PARAMS))
        failed = api.wait_process(process["processId"], "FAILED")
        self.step_id = failed["steps"][0]["processStepId"]
        self.before = api.step(self.step_id)
        self.processes = api.process_count()

    def send(self, params):
        return self.api.post(RESTART, {"processStepId": self.step_id, "params": params})

    def send_raw(self, params_json):
        raw = '{"processStepId": ' + json.dumps(self.step_id) + ', "params": ' + params_json + "}"
        return self.api.post_raw(RESTART, raw)

    def param_errors(self, response):
        return response.json["data"]["params"]

    def echoed(self, response):
        assert response.status_code == 200, response.json
        return response.json["data"]["params"]

    def stored(self, response):
        return self.api.step(self.step_id)["attemptHistory"][-1]["params"]

    def assert_unchanged(self):
        after = self.api.step(self.step_id)
        assert after["status"] == "FAILED"
        assert after["attempts"] == self.before["attempts"] == 1
        assert after["params"] == self.before["params"]
        assert after["attemptHistory"] == self.before["attemptHistory"]
        assert self.api.process_count() == self.processes


# Each test of a target runs against both (fixture target in conftest.py builds it).
TARGETS = pytest.mark.parametrize("target", [StartTarget, RestartTarget], ids=["start", "restart"], indirect=True)


# -- one value ---------------------------------------------------------------------------------
# (id, wire value, the keys of the field-error dict under params.x.value)
BAD_VALUES = [
    ("type-missing", {"longValue": 1}, {"type"}),
    ("type-null", {"type": None, "longValue": 1}, {"type"}),
    ("type-unknown", {"type": "INTEGER", "longValue": 1}, {"type"}),
    ("type-lowercase", {"type": "long", "longValue": 1}, {"type"}),
    ("type-number", {"type": 1, "longValue": 1}, {"type"}),
    ("type-list", {"type": ["LONG"], "longValue": 1}, {"type"}),
    ("LONG-value-missing", {"type": "LONG"}, {"longValue"}),
    ("LONG-value-null", {"type": "LONG", "longValue": None}, {"longValue"}),
    ("LONG-all-null", {"type": "LONG", "strValue": None, "longValue": None, "doubleValue": None}, {"longValue"}),
    ("STRING-value-missing", {"type": "STRING"}, {"strValue"}),
    ("STRING-value-null", {"type": "STRING", "strValue": None}, {"strValue"}),
    ("DOUBLE-value-missing", {"type": "DOUBLE"}, {"doubleValue"}),
    ("DOUBLE-value-null", {"type": "DOUBLE", "doubleValue": None}, {"doubleValue"}),
    ("LONG-in-strValue", {"type": "LONG", "strValue": "5"}, {"longValue", "strValue"}),
    ("LONG-in-doubleValue", {"type": "LONG", "doubleValue": 5.0}, {"longValue", "doubleValue"}),
    ("STRING-in-longValue", {"type": "STRING", "longValue": 5}, {"strValue", "longValue"}),
    ("DOUBLE-in-strValue", {"type": "DOUBLE", "strValue": "0.5"}, {"doubleValue", "strValue"}),
    ("DOUBLE-in-longValue", {"type": "DOUBLE", "longValue": 1}, {"doubleValue", "longValue"}),
    ("LONG-with-empty-strValue", {"type": "LONG", "longValue": 1, "strValue": ""}, {"strValue"}),
    ("LONG-with-zero-doubleValue", {"type": "LONG", "longValue": 1, "doubleValue": 0.0}, {"doubleValue"}),
    ("STRING-with-zero-longValue", {"type": "STRING", "strValue": "a", "longValue": 0}, {"longValue"}),
    ("STRING-with-doubleValue", {"type": "STRING", "strValue": "a", "doubleValue": 1.5}, {"doubleValue"}),
    ("DOUBLE-with-strValue", {"type": "DOUBLE", "doubleValue": 1.5, "strValue": "1.5"}, {"strValue"}),
    ("DOUBLE-with-longValue", {"type": "DOUBLE", "doubleValue": 1.5, "longValue": 1}, {"longValue"}),
    ("unknown-key", {"type": "LONG", "longValue": 1, "value": 1}, {"value"}),
    ("unknown-key-booleanValue", {"type": "LONG", "longValue": 1, "booleanValue": True}, {"booleanValue"}),
    ("unknown-key-wrong-case", {"type": "LONG", "longValue": 1, "LongValue": 1}, {"LongValue"}),
    ("LONG-true", {"type": "LONG", "longValue": True}, {"longValue"}),
    ("LONG-false", {"type": "LONG", "longValue": False}, {"longValue"}),
    ("LONG-1.0", {"type": "LONG", "longValue": 1.0}, {"longValue"}),
    ("LONG-1.5", {"type": "LONG", "longValue": 1.5}, {"longValue"}),
    ("LONG-string-5", {"type": "LONG", "longValue": "5"}, {"longValue"}),
    ("LONG-empty-string", {"type": "LONG", "longValue": ""}, {"longValue"}),
    ("LONG-list", {"type": "LONG", "longValue": [5]}, {"longValue"}),
    ("LONG-object", {"type": "LONG", "longValue": {"n": 5}}, {"longValue"}),
    ("LONG-2**63", {"type": "LONG", "longValue": 2**63}, {"longValue"}),
    ("LONG-below-min", {"type": "LONG", "longValue": INT64_MIN - 1}, {"longValue"}),
    ("LONG-10**30", {"type": "LONG", "longValue": 10**30}, {"longValue"}),
    ("DOUBLE-string", {"type": "DOUBLE", "doubleValue": "1.5"}, {"doubleValue"}),
    ("DOUBLE-true", {"type": "DOUBLE", "doubleValue": True}, {"doubleValue"}),
    ("DOUBLE-list", {"type": "DOUBLE", "doubleValue": [1.5]}, {"doubleValue"}),
    ("DOUBLE-huge-integer", {"type": "DOUBLE", "doubleValue": 10**400}, {"doubleValue"}),
    ("STRING-number", {"type": "STRING", "strValue": 5}, {"strValue"}),
    ("STRING-float", {"type": "STRING", "strValue": 1.5}, {"strValue"}),
    ("STRING-true", {"type": "STRING", "strValue": True}, {"strValue"}),
    ("STRING-list", {"type": "STRING", "strValue": ["a"]}, {"strValue"}),
    ("STRING-object", {"type": "STRING", "strValue": {"a": "b"}}, {"strValue"}),
    ("STRING-65537", {"type": "STRING", "strValue": "x" * 65537}, {"strValue"}),
    ("STRING-65537-non-ascii", {"type": "STRING", "strValue": "é" * 65537}, {"strValue"}),
    ("value-a-string", "LONG", {"_schema"}),
    ("value-a-number", 5, {"_schema"}),
    ("value-a-list", [{"type": "LONG", "longValue": 1}], {"_schema"}),
    ("value-true", True, {"_schema"}),
]


@pytest.mark.parametrize(("value", "error_keys"), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
@TARGETS
def test_a_bad_value_is_412_naming_its_field_and_changes_nothing(target, value, error_keys):
    response = target.send({"x": value})
    refused(response)
    errors = target.param_errors(response)
    assert set(errors) == {"x"}
    assert set(errors["x"]) == {"value"}
    field_errors = errors["x"]["value"]
    assert set(field_errors) == error_keys
    for messages in field_errors.values():
        assert isinstance(messages, list) and messages and all(isinstance(m, str) and m for m in messages)
    target.assert_unchanged()


@pytest.mark.parametrize("target", [StartTarget], ids=["start"], indirect=True)
def test_a_null_value_is_412(target):
    """Only a restart's params may map a name to null (which removes it; see below)."""
    response = target.send({"x": None})
    refused(response)
    messages = target.param_errors(response)["x"]["value"]
    assert isinstance(messages, list) and messages
    target.assert_unchanged()


@TARGETS
def test_only_the_bad_names_are_named(target):
    response = target.send({"good": {"type": "LONG", "longValue": 1}, "bad": {"type": "LONG", "longValue": "1"}})
    refused(response)
    assert set(target.param_errors(response)) == {"bad"}
    target.assert_unchanged()


@pytest.mark.parametrize("params", ["not an object", 5, ["x"], True], ids=repr)
@TARGETS
def test_params_that_are_not_an_object_are_412(target, params):
    response = target.send(params)
    refused(response)
    messages = target.param_errors(response)
    assert isinstance(messages, list) and messages
    target.assert_unchanged()


# A bare value where a typed value belongs (`{"seconds": 0.1}`): the answer shows the shape it needs.
BARE_VALUES = [
    (0.1, '{"type": "DOUBLE", "doubleValue": 0.1}'),
    (5, '{"type": "LONG", "longValue": 5}'),
    ("ten", '{"type": "STRING", "strValue": "ten"}'),
    (True, '{"type": "STRING"|"LONG"|"DOUBLE", "strValue"|"longValue"|"doubleValue": …}'),
    ([1], '{"type": "STRING"|"LONG"|"DOUBLE", "strValue"|"longValue"|"doubleValue": …}'),
    ("x" * 100, '{"type": "STRING", "strValue": "…"}'),
]


@pytest.mark.parametrize(("value", "shape"), BARE_VALUES, ids=[repr(v)[:12] for v, _ in BARE_VALUES])
@TARGETS
def test_a_bare_value_is_412_showing_the_typed_shape_it_needs(target, value, shape):
    response = target.send({"seconds": value})
    refused(response)
    assert target.param_errors(response) == {"seconds": {"value": {"_schema": [f"Not a typed value: send {shape}."]}}}
    target.assert_unchanged()


# Raw JSON text: literals a Python client could not even send with json=.
NON_FINITE = [
    ("NaN", "DOUBLE", "doubleValue"),
    ("Infinity", "DOUBLE", "doubleValue"),
    ("-Infinity", "DOUBLE", "doubleValue"),
    ("1e999", "DOUBLE", "doubleValue"),
    ("-1e999", "DOUBLE", "doubleValue"),
    ("1E400", "DOUBLE", "doubleValue"),
    ("NaN", "LONG", "longValue"),
    ("Infinity", "LONG", "longValue"),
    ("1e999", "LONG", "longValue"),
]


@pytest.mark.parametrize(("literal", "kind", "field"), NON_FINITE, ids=[f"{c[0]}-{c[1]}" for c in NON_FINITE])
@TARGETS
def test_non_finite_literals_in_the_raw_body_are_412(target, literal, kind, field):
    response = target.send_raw('{"x": {"type": "' + kind + '", "' + field + '": ' + literal + "}}")
    data = refused(response)
    assert all(isinstance(messages, (list, dict)) for messages in data.values())
    target.assert_unchanged()


@TARGETS
def test_the_raw_body_route_accepts_a_finite_double(target):
    """Control for the test above: the same raw text with a finite number is accepted."""
    response = target.send_raw('{"x": {"type": "DOUBLE", "doubleValue": 1e300}}')
    assert target.echoed(response)["x"] == out("DOUBLE", 1e300)


# (id, wire value, output form expected back)
GOOD_VALUES = [
    ("LONG-0", {"type": "LONG", "longValue": 0}, out("LONG", 0)),
    ("LONG-negative", {"type": "LONG", "longValue": -42}, out("LONG", -42)),
    ("LONG-max", {"type": "LONG", "longValue": INT64_MAX}, out("LONG", INT64_MAX)),
    ("LONG-min", {"type": "LONG", "longValue": INT64_MIN}, out("LONG", INT64_MIN)),
    ("LONG-2**53+1", {"type": "LONG", "longValue": 2**53 + 1}, out("LONG", 2**53 + 1)),
    (
        "LONG-others-explicitly-null",
        {"type": "LONG", "longValue": 5, "strValue": None, "doubleValue": None},
        out("LONG", 5),
    ),
    ("DOUBLE-half", {"type": "DOUBLE", "doubleValue": 0.5}, out("DOUBLE", 0.5)),
    ("DOUBLE-0.1", {"type": "DOUBLE", "doubleValue": 0.1}, out("DOUBLE", 0.1)),
    ("DOUBLE-integer-3", {"type": "DOUBLE", "doubleValue": 3}, out("DOUBLE", 3.0)),
    ("DOUBLE-integer-0", {"type": "DOUBLE", "doubleValue": 0}, out("DOUBLE", 0.0)),
    ("DOUBLE-integer-negative", {"type": "DOUBLE", "doubleValue": -7}, out("DOUBLE", -7.0)),
    ("DOUBLE-integer-2**63", {"type": "DOUBLE", "doubleValue": 2**63}, out("DOUBLE", float(2**63))),
    ("DOUBLE-max", {"type": "DOUBLE", "doubleValue": 1.7976931348623157e308}, out("DOUBLE", 1.7976931348623157e308)),
    ("DOUBLE-smallest", {"type": "DOUBLE", "doubleValue": 5e-324}, out("DOUBLE", 5e-324)),
    ("DOUBLE-negative", {"type": "DOUBLE", "doubleValue": -2.5e-10}, out("DOUBLE", -2.5e-10)),
    (
        "DOUBLE-others-explicitly-null",
        {"type": "DOUBLE", "doubleValue": 1.5, "strValue": None, "longValue": None},
        out("DOUBLE", 1.5),
    ),
    ("STRING-empty", {"type": "STRING", "strValue": ""}, out("STRING", "")),
    ("STRING-65536", {"type": "STRING", "strValue": "x" * 65536}, out("STRING", "x" * 65536)),
    ("STRING-65536-non-ascii", {"type": "STRING", "strValue": "é" * 65536}, out("STRING", "é" * 65536)),
    ("STRING-looks-like-a-number", {"type": "STRING", "strValue": "5"}, out("STRING", "5")),
]
NON_ASCII = [
    "héllo wörld",
    "日本語のテキスト",
    "😀🎉 emoji",
    "e\u0301 combining",
    "\u0000 nul inside",
    "line\nbreak\ttab\r",
    "\u2028\u2029 separators",
    "\ufeff bom",
    'quote " and \\ backslash',
    "Ω≈ç√∫˜µ≤≥÷",
    "عربى RTL",
]
GOOD_VALUES += [(f"STRING-{s[:6]!r}", {"type": "STRING", "strValue": s}, out("STRING", s)) for s in NON_ASCII]


@pytest.mark.parametrize(("value", "expected"), [c[1:] for c in GOOD_VALUES], ids=[c[0] for c in GOOD_VALUES])
@TARGETS
def test_a_good_value_is_accepted_and_echoed_exactly_in_output_form(target, value, expected):
    response = target.send({"x": value})
    echoed = target.echoed(response)["x"]
    assert echoed == expected
    value_field = {"STRING": "strValue", "LONG": "longValue", "DOUBLE": "doubleValue"}[expected["type"]]
    assert type(echoed[value_field]) is type(expected[value_field])
    stored = target.stored(response)["x"]
    assert stored == expected
    assert type(stored[value_field]) is type(expected[value_field])


# -- names ---------------------------------------------------------------------------------------
BAD_NAMES = [
    ("empty", ""),
    ("129-ascii", "n" * 129),
    ("129-non-ascii", "é" * 129),
    ("nul", "a\x00b"),
    ("soh", "\x01"),
    ("unit-separator", "x\x1f"),
    ("newline", "a\nb"),
    ("tab", "a\tb"),
    ("carriage-return", "a\r"),
    ("del", "a\x7f"),
    ("c1-nel", "a\x85b"),
    ("c1-csi", "\x9b"),
]
GOOD_NAMES = [
    ("1", "a"),
    ("128-ascii", "n" * 128),
    ("128-non-ascii", "é" * 128),
    ("spaces", "with spaces"),
    ("punctuation", "dotted.name-with_dash/and:colon"),
    ("unicode", "日本"),
    ("emoji", "😀"),
]


@pytest.mark.parametrize("name", [c[1] for c in BAD_NAMES], ids=[c[0] for c in BAD_NAMES])
@TARGETS
def test_a_bad_name_is_412_naming_the_key_and_changes_nothing(target, name):
    response = target.send({name: {"type": "LONG", "longValue": 1}})
    refused(response)
    errors = target.param_errors(response)
    assert set(errors) == {name}
    assert set(errors[name]) == {"key"}
    assert isinstance(errors[name]["key"], list) and errors[name]["key"]
    target.assert_unchanged()


@pytest.mark.parametrize("name", [c[1] for c in GOOD_NAMES], ids=[c[0] for c in GOOD_NAMES])
@TARGETS
def test_a_good_name_is_accepted_and_echoed_exactly(target, name):
    response = target.send({name: {"type": "LONG", "longValue": 7}})
    assert target.echoed(response)[name] == out("LONG", 7)
    assert target.stored(response)[name] == out("LONG", 7)


def names(count):
    """`count` names, `ok` among them (so a restart of the failed `check` step keeps the count)."""
    params = {"ok": {"type": "LONG", "longValue": 0}}
    params.update({f"n{i:03d}": {"type": "LONG", "longValue": i} for i in range(count - 1)})
    return params


@TARGETS
def test_257_names_are_412(target):
    response = target.send(names(257))
    refused(response)
    messages = target.param_errors(response)
    assert isinstance(messages, list) and messages and all(isinstance(m, str) for m in messages)
    target.assert_unchanged()


@TARGETS
def test_256_names_are_accepted(target):
    response = target.send(names(256))
    echoed = target.echoed(response)
    assert len(echoed) == 256
    assert echoed["n254"] == out("LONG", 254)
    assert len(target.stored(response)) == 256


# -- restart: effective params are the failed attempt's with the request's laid over them ----
FAILED_OUTPUT = {"ok": out("LONG", 0), "keep": out("STRING", "k"), "ratio": out("DOUBLE", 0.5)}


def test_restart_lays_the_request_params_over_the_failed_ones(api, failed_check_step):
    response = api.post(
        RESTART, {"processStepId": failed_check_step["processStepId"], "params": typed(ok=1, extra="new")}
    )
    assert response.status_code == 200, response.json
    effective = {**FAILED_OUTPUT, "ok": out("LONG", 1), "extra": out("STRING", "new")}
    assert response.json["data"] == {
        "processId": failed_check_step["processId"],
        "processStepId": failed_check_step["processStepId"],
        "params": effective,
    }
    done = api.wait_process(failed_check_step["processId"], "COMPLETED")
    assert done["steps"][0]["params"] == effective
    history = api.step(failed_check_step["processStepId"])["attemptHistory"]
    assert [a["params"] for a in history] == [FAILED_OUTPUT, effective]


@pytest.mark.parametrize("body_params", ["absent", {}], ids=["absent", "empty"])
def test_restart_without_params_reuses_the_failed_ones(api, failed_check_step, body_params):
    body = {"processStepId": failed_check_step["processStepId"]}
    if body_params != "absent":
        body["params"] = body_params
    response = api.post(RESTART, body)
    assert response.status_code == 200, response.json
    assert response.json["data"]["params"] == FAILED_OUTPUT
    step = api.wait_step(failed_check_step["processStepId"], "FAILED")  # ok is still 0: it fails again
    assert step["attempts"] == 2
    assert [a["params"] for a in step["attemptHistory"]] == [FAILED_OUTPUT, FAILED_OUTPUT]


def test_restart_overlay_may_change_a_names_type(api, failed_check_step):
    response = api.post(
        RESTART, {"processStepId": failed_check_step["processStepId"], "params": typed(keep=3, ratio="half")}
    )
    assert response.status_code == 200, response.json
    assert response.json["data"]["params"] == {
        "ok": out("LONG", 0),
        "keep": out("LONG", 3),
        "ratio": out("STRING", "half"),
    }


def test_restart_with_a_null_param_removes_that_name(api, failed_check_step):
    """A misspelt or harmful param can be dropped: null removes the name from the effective params."""
    step_id = failed_check_step["processStepId"]
    body = {"processStepId": step_id, "params": {**typed(ok=1), "keep": None, "never-there": None}}
    dry = api.post(f"{RESTART}?dryRun=true", body)
    effective = {"ok": out("LONG", 1), "ratio": out("DOUBLE", 0.5)}
    assert dry.status_code == 200 and dry.json["data"]["params"] == effective, dry.json
    response = api.post(RESTART, body)
    assert response.status_code == 200, response.json
    assert response.json["data"]["params"] == effective
    done = api.wait_process(failed_check_step["processId"], "COMPLETED")
    assert done["steps"][0]["params"] == effective
    assert api.step(step_id)["attemptHistory"][-1]["params"] == effective


def test_a_bulk_restart_with_a_null_param_removes_that_name(api):
    process = api.start(("check", {"ok": 0, "typo": "x"}))
    step_id = api.wait_process(process["processId"], "FAILED")["steps"][0]["processStepId"]
    body = {"processStepIds": [step_id], "params": {**typed(ok=1), "typo": None}}
    response = api.post(BULK, body)
    assert response.status_code == 200, response.json
    assert response.json["data"]["restarted"][0]["params"] == {"ok": out("LONG", 1)}
    api.wait_process(process["processId"], "COMPLETED")


def test_a_restart_may_remove_every_name(api, failed_check_step):
    body = {"processStepId": failed_check_step["processStepId"], "params": dict.fromkeys(FAILED_OUTPUT)}
    response = api.post(RESTART, body)
    assert response.status_code == 200, response.json
    assert response.json["data"]["params"] == {}


def failed_with_names(api, count):
    """A FAILED `check` step with `count` params (ok=0 among them)."""
    params = {"ok": 0, **{f"old{i:03d}": i for i in range(count - 1)}}
    process = api.start(("check", params))
    return api.wait_process(process["processId"], "FAILED")["steps"][0]


def new_names(count):
    return {f"new{i:03d}": {"type": "STRING", "strValue": str(i)} for i in range(count)}


def test_restart_over_256_names_after_the_overlay_is_412_with_a_params_key(api):
    step = failed_with_names(api, 200)
    before = api.step(step["processStepId"])
    response = api.post(RESTART, {"processStepId": step["processStepId"], "params": new_names(57)})
    data = refused(response)
    assert "params" in data
    after = api.step(step["processStepId"])
    assert after == before
    assert after["status"] == "FAILED" and after["attempts"] == 1 and len(after["params"]) == 200


def test_restart_to_exactly_256_names_after_the_overlay_is_accepted(api):
    step = failed_with_names(api, 200)
    response = api.post(RESTART, {"processStepId": step["processStepId"], "params": new_names(56)})
    assert response.status_code == 200, response.json
    assert len(response.json["data"]["params"]) == 256


def test_restart_overlaying_only_existing_names_keeps_the_count(api):
    step = failed_with_names(api, 256)
    overlay = {f"old{i:03d}": {"type": "STRING", "strValue": "over"} for i in range(255)}
    response = api.post(RESTART, {"processStepId": step["processStepId"], "params": overlay})
    assert response.status_code == 200, response.json
    params = response.json["data"]["params"]
    assert len(params) == 256
    assert params["old000"] == out("STRING", "over") and params["ok"] == out("LONG", 0)


def test_delegates_see_plain_values_of_the_effective_params(api, failed_check_step):
    """`check` compares ctx.params["ok"] with the int 1: only a plain 1 completes it."""
    response = api.post(RESTART, {"processStepId": failed_check_step["processStepId"], "params": typed(ok="1")})
    assert response.status_code == 200
    step = api.wait_step(failed_check_step["processStepId"], "FAILED")
    assert step["error"] == {"type": "ValueError", "message": "ok is '1', not 1"}
    assert api.restart(failed_check_step["processStepId"], ok=1).status_code == 200
    done = api.wait_process(failed_check_step["processId"], "COMPLETED")
    assert done["steps"][0]["result"] == {"checked": out("LONG", 1)}


def test_json_echo_of_int64_extremes_is_exact_on_the_wire(api):
    """Not just equal after parsing: the digits themselves come back."""
    response = api.post(P, {"steps": [{"type": "noop", "params": typed(big=INT64_MAX, small=INT64_MIN)}]})
    text = response.get_data(as_text=True)
    assert json.dumps(INT64_MAX) in text and json.dumps(INT64_MIN) in text


# -- null params and unpaired surrogates -----------------------------------------------------------
def test_null_params_mean_no_params(api):
    process = api.post(P, {"steps": [{"type": "check", "params": None}]}).json["data"]
    step_id = process["steps"][0]["processStepId"]
    api.wait_step(step_id, "FAILED")
    response = api.post(RESTART, {"processStepId": step_id, "params": None})
    assert response.status_code == 200
    assert response.json["data"]["params"] == {}


def test_lone_surrogates_in_params_are_kept_exactly(api):
    process = api.start(("noop", {"s": "\ud800x"}))
    assert process["steps"][0]["params"]["s"]["strValue"] == "\ud800x"
