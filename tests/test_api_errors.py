"""What the endpoints refuse across the board (SPEC section 4): bad bodies of the action endpoints,
bodies over 1 MiB, unknown query parameters, text that could not be stored."""

import pytest
from helpers import CANCEL, COMPLETE, DELEGATES, FAIL, OPENAPI, RESTART, SKIP, STEPS, P, refused

# -- bad bodies of restart-failed-step, fail-step, complete-step, skip-step (fixture action_step) ---
# Bodies every action endpoint must refuse with 412: (id, raw body, keys of data or None to skip).
ACTION_FAULTS = [
    ("not-json", b"processStepId=abc", {"_schema"}),
    ("array", b'["abc"]', {"_schema"}),
    ("string", b'"abc"', {"_schema"}),
    ("number", b"5", {"_schema"}),
    ("null", b"null", {"_schema"}),
    ("empty", b"", {"_schema"}),
    ("truncated", b'{"processStepId": "STEP', {"_schema"}),
    ("two-objects", b'{"processStepId": "STEP"}{}', {"_schema"}),
    ("nan", b'{"processStepId": "STEP", "x": NaN}', {"_schema"}),
    ("empty-object", b"{}", {"processStepId"}),
    ("unknown-field", b'{"processStepId": "STEP", "force": true}', {"force"}),
    ("id-null", b'{"processStepId": null}', {"processStepId"}),
    ("id-number", b'{"processStepId": 5}', {"processStepId"}),
    ("id-list", b'{"processStepId": ["STEP"]}', {"processStepId"}),
    ("id-empty", b'{"processStepId": ""}', {"processStepId"}),
    ("id-bad-characters", b'{"processStepId": "../STEP"}', {"processStepId"}),
    ("id-too-long", b'{"processStepId": "' + b"a" * 65 + b'"}', {"processStepId"}),
    ("id-wrong-case-key", b'{"processstepid": "STEP"}', {"processstepid", "processStepId"}),
]


@pytest.mark.parametrize(("raw", "keys"), [c[1:] for c in ACTION_FAULTS], ids=[c[0] for c in ACTION_FAULTS])
def test_a_bad_action_body_is_412_and_changes_nothing(api, action_step, raw, keys):
    path, step = action_step
    before = api.step(step["processStepId"])
    data = refused(api.post_raw(path, raw.replace(b"STEP", step["processStepId"].encode())))
    assert set(data) == keys
    assert api.step(step["processStepId"]) == before


def test_an_action_body_with_the_wrong_content_type_is_412(api, action_step):
    path, step = action_step
    before = api.step(step["processStepId"])
    raw = b'{"processStepId": "%s"}' % step["processStepId"].encode()
    refused(api.post_raw(path, raw, "text/plain"))
    assert api.step(step["processStepId"]) == before


# -- bodies over 1 MiB -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", [P, RESTART, FAIL, COMPLETE, CANCEL, SKIP])
def test_every_post_refuses_a_body_over_1_mib(api, path):
    raw = b'{"processStepId": "' + b"a" * (1024 * 1024) + b'"}'
    assert api.post_raw(path, raw).status_code == 413


# -- query parameters on every endpoint ------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", DELEGATES),
        ("GET", f"{P}/SomeId"),
        ("GET", f"{STEPS}/SomeId"),
        ("GET", "/healthz"),
        ("GET", OPENAPI),
        ("POST", P),
        ("POST", RESTART),
        ("POST", FAIL),
        ("POST", COMPLETE),
        ("POST", CANCEL),
        ("POST", SKIP),
    ],
)
def test_an_unknown_query_parameter_is_412_on_every_endpoint(api, method, path):
    body = {P: {"steps": [{"type": "noop"}]}, CANCEL: {"processId": "SomeId"}}.get(path, {"processStepId": "SomeId"})
    response = api.client.open(
        f"{path}?verbose=1", method=method, headers=api.headers, json=body if method == "POST" else None
    )
    assert response.status_code == 412, response.get_data(as_text=True)[:300]
    assert "verbose" in response.json["data"]
    assert api.process_count() == 0


# -- text that cannot be stored --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        (P, {"name": "\ud800", "steps": [{"type": "noop"}]}, ["name"]),
        (P, {"steps": [{"type": "no\udc80op"}]}, ["steps", "0", "type"]),
        (FAIL, {"processStepId": "abc", "error": {"message": "\udc80"}}, ["error", "message"]),
        (CANCEL, {"processId": "abc", "reason": "\ud800"}, ["reason"]),
        (SKIP, {"processStepId": "abc", "reason": "x\udc80"}, ["reason"]),
    ],
)
def test_lone_surrogates_in_stored_text_are_412(api, path, body, where):
    before = api.process_count()
    response = api.post(path, body)
    assert response.status_code == 412
    errors = response.json["data"]
    for key in where:
        errors = errors[key]
    assert errors == ["Must be valid Unicode (no lone surrogates)."]
    assert api.process_count() == before


# -- empty query values (a script that always writes every name: ?cursor=$c) ------------------------
@pytest.mark.parametrize("query", ["status=&limit=&cursor=", "cursor=", "limit=&limit=", "limit=&limit=2"], ids=repr)
def test_an_empty_query_value_means_the_parameter_is_absent(api, query):
    for n in range(3):
        api.wait_process(api.start(("noop", {}), name=f"p{n}")["processId"], "COMPLETED")
    expected = api.get(P if "limit=2" not in query else f"{P}?limit=2").json["data"]
    response = api.get(f"{P}?{query}")
    assert response.status_code == 200, response.json
    assert response.json["data"] == expected
    steps = api.get(f"{STEPS}?status=&type=&limit=&cursor=")
    assert steps.status_code == 200, steps.json
    assert steps.json["data"] == api.get(STEPS).json["data"]


def test_an_empty_dry_run_is_no_dry_run(api, failed_step):
    response = api.post(f"{RESTART}?dryRun=", {"processStepId": failed_step["processStepId"]})
    assert response.status_code == 200, response.json
    assert response.json["message"] == "Step restarted."


def test_an_unknown_query_parameter_is_412_even_when_empty(api):
    assert "verbose" in refused(api.get(f"{P}?verbose="))
