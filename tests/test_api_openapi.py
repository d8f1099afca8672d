"""GET /api/v1/openapi.json: a valid OpenAPI 3 document of the whole API, built from the schemas that
validate requests, and true to what the service really answers; retries, bulk restart, dry run and
Idempotency-Key included (fixtures spec and scenario)."""

import copy
import re

import pytest
from helpers import (
    BULK,
    CANCEL,
    COMPLETE,
    DELEGATES,
    ENVELOPE_KEYS,
    FAIL,
    OPENAPI,
    RESTART,
    SKIP,
    STEPS,
    P,
    insert_failed_steps,
    typed,
    wait_for,
)
from openapi_schema_validator import OAS31Validator, oas31_format_checker
from openapi_spec_validator import validate

from stepd import model
from stepd import schemas as s

PATH_PARAMETER_NAMES = {"process_id": "processId", "step_id": "processStepId"}
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def openapi_path(rule):
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: "{" + PATH_PARAMETER_NAMES.get(m[1], m[1]) + "}", rule)


def documented_rules(app):
    """{openapi path: {methods}} of every route the document must show."""
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/") or rule.rule == "/healthz":
            methods = {m.lower() for m in rule.methods - {"HEAD", "OPTIONS"}}
            routes.setdefault(openapi_path(rule.rule), set()).update(methods)
    return routes


def resolve(spec, node):
    """`node` with every local $ref replaced by what it points to (the schemas here are not recursive).

    A `discriminator` is left out: its mapping names components, which are gone once inlined, and
    it only tells a tool which form of a `oneOf` to try (each form's `type` enum decides anyway)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            return resolve(spec, target)
        return {key: resolve(spec, value) for key, value in node.items() if key != "discriminator"}
    if isinstance(node, list):
        return [resolve(spec, item) for item in node]
    return node


def response_schema(spec, path, method, status):
    response = spec["paths"][path][method]["responses"][str(status)]
    return resolve(spec, response["content"]["application/json"]["schema"])


def request_schema(spec, path):
    body = spec["paths"][path]["post"]["requestBody"]
    return resolve(spec, body["content"]["application/json"]["schema"])


def assert_valid(schema, instance):
    OAS31Validator(schema, format_checker=oas31_format_checker).validate(instance)


def is_valid(schema, instance):
    return OAS31Validator(schema, format_checker=oas31_format_checker).is_valid(instance)


# -- the document --------------------------------------------------------------------------------------
def test_the_document_is_valid_openapi_3(spec):
    validate(copy.deepcopy(spec))
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["version"] == model.VERSION


def test_every_path_and_method_of_the_app_is_documented_and_nothing_else(app, spec):
    documented = {
        path: {method for method in operations if method in HTTP_METHODS} for path, operations in spec["paths"].items()
    }
    assert documented == documented_rules(app)


def test_every_operation_has_a_summary_and_a_unique_operation_id(spec):
    ids = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method in HTTP_METHODS:
                assert operation.get("summary"), (path, method)
                ids.append(operation["operationId"])
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("path", "name"), [(f"{P}/{{processId}}", "processId"), (f"{STEPS}/{{processStepId}}", "processStepId")]
)
def test_path_parameters_are_documented(spec, path, name):
    item = spec["paths"][path]
    parameters = item.get("parameters", []) + item["get"].get("parameters", [])
    [parameter] = [p for p in parameters if p["in"] == "path"]
    assert parameter["name"] == name and parameter["required"] is True
    assert parameter["schema"]["type"] == "string"


SECURED_GET = {"200", "401", "412", "500"}
SECURED_POST = {"401", "403", "412", "413", "500"}
EXPECTED_RESPONSES = [
    (P, "get", SECURED_GET),
    (P, "post", SECURED_POST | {"201"}),
    (f"{P}/{{processId}}", "get", SECURED_GET | {"404", "405"}),
    (STEPS, "get", SECURED_GET),
    (f"{STEPS}/{{processStepId}}", "get", SECURED_GET | {"404"}),
    (RESTART, "post", SECURED_POST | {"200"}),
    (FAIL, "post", SECURED_POST | {"200"}),
    (COMPLETE, "post", SECURED_POST | {"200"}),
    (CANCEL, "post", SECURED_POST | {"200"}),
    (SKIP, "post", SECURED_POST | {"200"}),
    (DELEGATES, "get", SECURED_GET),
    ("/healthz", "get", {"200", "412", "500", "503"}),
    (OPENAPI, "get", {"200", "412", "500"}),
]


@pytest.mark.parametrize(
    ("path", "method", "statuses"), EXPECTED_RESPONSES, ids=[f"{m}-{p}" for p, m, _ in EXPECTED_RESPONSES]
)
def test_every_operation_documents_its_success_and_error_responses(spec, path, method, statuses):
    documented = set(spec["paths"][path][method]["responses"])
    assert statuses <= documented, f"missing {sorted(statuses - documented)}"


def test_every_documented_response_is_the_envelope_with_the_right_data(spec):
    for path, operations in spec["paths"].items():
        if path == OPENAPI:
            continue  # the document itself is served as is
        for method, operation in operations.items():
            if method not in HTTP_METHODS:
                continue
            for status in operation["responses"]:
                schema = response_schema(spec, path, method, status)
                where = f"{method} {path} {status}"
                assert set(schema["properties"]) == ENVELOPE_KEYS, where
                assert set(schema["required"]) == ENVELOPE_KEYS, where
                assert schema.get("additionalProperties") is False, where
                data = schema["properties"]["data"]
                if status == "412":
                    assert data["type"] == "object", where
                elif int(status) >= 400:
                    assert data["type"] == "string", where


def test_secured_operations_declare_bearer_and_basic(spec):
    schemes = spec["components"]["securitySchemes"]
    assert {(v["type"], v["scheme"]) for v in schemes.values()} == {("http", "bearer"), ("http", "basic")}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method not in HTTP_METHODS:
                continue
            names = {
                name for requirement in operation.get("security", spec.get("security", [])) for name in requirement
            }
            if path.startswith("/api/v1/") and path != OPENAPI:
                assert names == set(schemes), (method, path)
            else:
                assert names == set(), (method, path)


# -- request bodies and query strings come from schemas.py ---------------------------------------------
BODIES = [
    (P, s.StartProcessSchema),
    (RESTART, s.RestartStepSchema),
    (FAIL, s.FailStepSchema),
    (COMPLETE, s.CompleteStepSchema),
    (CANCEL, s.CancelProcessSchema),
    (SKIP, s.SkipStepSchema),
]


@pytest.mark.parametrize(("path", "schema_class"), BODIES, ids=[c.__name__ for _, c in BODIES])
def test_request_bodies_are_the_marshmallow_schemas(spec, path, schema_class):
    documented = request_schema(spec, path)
    fields = schema_class().fields.values()
    assert set(documented["properties"]) == {f.data_key or f.name for f in fields}
    assert set(documented.get("required", [])) == {f.data_key or f.name for f in fields if f.required}
    assert documented.get("additionalProperties") is False, "unknown fields are refused"
    assert spec["paths"][path]["post"]["requestBody"]["required"] is True


def test_the_restart_body_is_the_seed_shape(spec):
    """The seed's body, as the union of a typed value's three forms (issue 13 made it a oneOf)."""
    body = request_schema(spec, RESTART)
    assert body["required"] == ["processStepId"]
    assert body["properties"]["processStepId"]["type"] == "string"
    params, _null = body["properties"]["params"]["anyOf"]
    assert params["type"] == "object"
    assert params["maxProperties"] == 256
    value, _null = params["additionalProperties"]["anyOf"]  # a restart's null removes a name
    forms = value["oneOf"]
    assert [form["properties"]["type"]["enum"] for form in forms] == [["STRING"], ["LONG"], ["DOUBLE"]]
    for form in forms:
        assert set(form["properties"]) == {"strValue", "longValue", "doubleValue", "type"}
        assert "type" in form["required"]
        assert form["additionalProperties"] is False
    string, long, double = (form["properties"] for form in forms)
    assert string["strValue"]["type"] == "string"
    assert string["strValue"]["maxLength"] == 65536
    assert long["longValue"]["type"] == "integer"
    assert long["longValue"]["minimum"] == -(2**63)
    assert long["longValue"]["maximum"] == 2**63 - 1
    assert double["doubleValue"]["type"] == "number"
    for form, wanted in zip(forms, ("strValue", "longValue", "doubleValue"), strict=True):
        for field in {"strValue", "longValue", "doubleValue"} - {wanted}:
            assert form["properties"][field]["type"] == "null"


def test_the_documented_restart_body_accepts_and_refuses_what_the_service_does(spec):
    schema = request_schema(spec, RESTART)
    good = {"processStepId": "abc", "params": typed(n=1, s="x", d=0.5)}
    assert is_valid(schema, good)
    assert is_valid(schema, {"processStepId": "abc"})
    assert not is_valid(schema, {"params": {}})
    assert not is_valid(schema, {**good, "force": True})
    assert not is_valid(schema, {"processStepId": "abc", "params": {"x": {"type": "INT", "longValue": 1}}})
    assert not is_valid(schema, {"processStepId": "abc", "params": {"x": {"type": "LONG", "longValue": "1"}}})
    assert not is_valid(schema, {"processStepId": "abc", "params": {"x": {"type": "LONG", "longValue": 2**63}}})
    assert not is_valid(schema, {"processStepId": "abc", "params": {"x": {"type": "LONG", "extra": 1}}})
    too_many = {f"n{i}": {"type": "LONG", "longValue": i} for i in range(257)}
    assert not is_valid(schema, {"processStepId": "abc", "params": too_many})


@pytest.mark.parametrize(
    ("path", "schema_class"), [(P, s.ProcessListQuery), (STEPS, s.StepListQuery)], ids=["processes", "steps"]
)
def test_list_query_parameters_are_documented(spec, path, schema_class):
    parameters = {p["name"]: p for p in spec["paths"][path]["get"]["parameters"] if p["in"] == "query"}
    assert set(parameters) == {field.data_key or name for name, field in schema_class().fields.items()}
    assert all(p.get("required", False) is False for p in parameters.values())
    limit = parameters["limit"]["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"], limit["default"]) == ("integer", 1, 500, 50)
    assert {"FAILED", "COMPLETED"} <= set(resolve(spec, parameters["status"]["schema"])["enum"])


def test_endpoints_without_a_query_document_no_query_parameters(spec):
    for path, operations in spec["paths"].items():
        if path in (P, STEPS, RESTART, BULK):
            continue  # these take paging and filter, or dryRun
        for method, operation in operations.items():
            if method in HTTP_METHODS:
                assert [p for p in operation.get("parameters", []) if p["in"] == "query"] == [], (method, path)


# -- live responses validate against what is documented (fixture scenario) -----------------------------
LIVE_GETS = [
    (P, P, 200),
    (f"{P}?status=FAILED&limit=1", P, 200),
    (f"{P}?limit=1", P, 200),
    (f"{P}/{{done}}", f"{P}/{{processId}}", 200),
    (STEPS, STEPS, 200),
    (f"{STEPS}?status=FAILED", STEPS, 200),
    (f"{STEPS}/{{done_step}}", f"{STEPS}/{{processStepId}}", 200),
    (f"{STEPS}/{{failed_step}}", f"{STEPS}/{{processStepId}}", 200),
    (f"{STEPS}/{{waiting_step}}", f"{STEPS}/{{processStepId}}", 200),
    (DELEGATES, DELEGATES, 200),
    ("/healthz", "/healthz", 200),
    (f"{P}/NoSuchProcess", f"{P}/{{processId}}", 404),
    (f"{STEPS}/NoSuchStep", f"{STEPS}/{{processStepId}}", 404),
    (RESTART, f"{P}/{{processId}}", 405),  # an action's name where an id may stand
    (f"{P}?limit=0", P, 412),
    (f"{STEPS}?cursor=bad", STEPS, 412),
    (f"{DELEGATES}?x=1", DELEGATES, 412),
]


@pytest.mark.parametrize(("url", "documented_path", "status"), LIVE_GETS, ids=[u for u, _, _ in LIVE_GETS])
def test_live_get_responses_validate_against_the_document(api, spec, scenario, url, documented_path, status):
    response = api.get(url.format(**scenario))
    assert response.status_code == status, response.json
    assert_valid(response_schema(spec, documented_path, "get", status), response.json)


def test_live_error_responses_validate_against_the_document(client, api, reader_api, spec):
    cases = [
        (client.get(P), P, "get", 401),
        (reader_api.post(P, {"steps": [{"type": "noop"}]}), P, "post", 403),
        (api.post(P, {"steps": []}), P, "post", 412),
        (api.post(P, {"steps": [{"type": "nope"}]}), P, "post", 412),
        (
            api.post_raw(P, b" " * (1024 * 1024 + 1)),
            P,
            "post",
            413,
        ),
        (api.post(FAIL, {"processStepId": "NoSuchStep"}), FAIL, "post", 412),
    ]
    for response, path, method, status in cases:
        assert response.status_code == status, response.json
        assert_valid(response_schema(spec, path, method, status), response.json)


def test_live_post_responses_validate_against_the_document(api, spec, scenario):
    started = api.post(P, {"steps": [{"type": "noop", "params": typed(a=1, b="x", c=1.5)}]})
    assert started.status_code == 201
    assert_valid(response_schema(spec, P, "post", 201), started.json)

    restarted = api.post(RESTART, {"processStepId": scenario["failed_step"], "params": typed(ok=1)})
    assert restarted.status_code == 200
    assert_valid(response_schema(spec, RESTART, "post", 200), restarted.json)

    completed = api.post(COMPLETE, {"processStepId": scenario["waiting_step"], "result": typed(receipt="r", n=2)})
    assert completed.status_code == 200
    assert_valid(response_schema(spec, COMPLETE, "post", 200), completed.json)

    waiting = api.start(("external", {}))
    step_id = api.wait_deferred(waiting["steps"][0]["processStepId"])["processStepId"]
    failed = api.post(FAIL, {"processStepId": step_id, "error": {"message": "no"}})
    assert failed.status_code == 200
    assert_valid(response_schema(spec, FAIL, "post", 200), failed.json)


def test_the_response_schemas_are_strict_enough_to_catch_a_wrong_shape(api, spec, scenario):
    """Guard for the tests above: the documented schemas really constrain the payload."""
    schema = response_schema(spec, f"{STEPS}/{{processStepId}}", "get", 200)
    good = api.get(f"{STEPS}/{scenario['done_step']}").json
    assert is_valid(schema, good)
    for broken in (
        {**good, "extra": 1},
        {**good, "data": {**good["data"], "status": "DONE"}},
        {**good, "data": {k: v for k, v in good["data"].items() if k != "attemptHistory"}},
        {**good, "data": {**good["data"], "attempts": "1"}},
    ):
        assert not is_valid(schema, broken)


# -- retries, bulk restart, dry run and Idempotency-Key ------------------------------------------------
def test_the_bulk_endpoint_is_documented_with_its_answers(spec):
    operation = spec["paths"][BULK]["post"]
    assert set(spec["paths"][BULK]) & HTTP_METHODS == {"post"}
    assert {"200", "401", "403", "412", "413", "500"} <= set(operation["responses"])
    assert operation["requestBody"]["required"] is True
    data = response_schema(spec, BULK, "post", 200)["properties"]["data"]
    assert set(data["properties"]) == {"restarted", "skipped", "nextCursor"}
    assert set(data["required"]) == {"restarted", "skipped", "nextCursor"}
    assert set(data["properties"]["restarted"]["items"]["properties"]) == {"processId", "processStepId", "params"}
    assert set(data["properties"]["skipped"]["items"]["properties"]) == {"processStepId", "reason"}
    assert data["properties"]["nextCursor"]["type"] == ["string", "null"]


def test_the_bulk_body_is_the_marshmallow_schema(spec):
    body = request_schema(spec, BULK)
    fields = s.RestartManySchema().fields.values()
    assert (
        set(body["properties"])
        == {f.data_key or f.name for f in fields}
        == {
            "processStepIds",
            "filter",
            "cursor",
            "params",
        }
    )
    assert body.get("additionalProperties") is False
    ids = body["properties"]["processStepIds"]
    assert (ids["type"], ids["minItems"], ids["maxItems"]) == (["array", "null"], 1, 1000)
    # a nullable nested schema: anyOf [the object, {"type": "null"}]
    [where] = [b for b in body["properties"]["filter"]["anyOf"] if "properties" in b]
    assert set(where["properties"]) == {"type", "processId", "failedBefore", "failedAfter"}
    assert where["properties"]["failedBefore"]["format"] == "date-time"
    assert where.get("additionalProperties") is False
    assert is_valid(body, {"processStepIds": ["a", "b"], "params": typed(x=1)})
    assert is_valid(body, {"filter": {"type": "check", "failedAfter": "2024-01-01T00:00:00Z"}, "cursor": "abc"})
    assert not is_valid(body, {"processStepIds": []})
    assert not is_valid(body, {"processStepIds": ["a"] * 1001})
    assert not is_valid(where, {"status": "FAILED"})


@pytest.mark.parametrize("path", [RESTART, BULK])
def test_dry_run_is_a_documented_boolean_query_parameter_of_both_restarts(spec, path):
    parameters = [p for p in spec["paths"][path]["post"]["parameters"] if p["in"] == "query"]
    assert [p["name"] for p in parameters] == ["dryRun"]
    assert parameters[0]["schema"]["type"] == "boolean"
    assert parameters[0].get("required", False) is False


def test_no_other_post_documents_dry_run(spec):
    for path, operations in spec["paths"].items():
        if path in (RESTART, BULK):
            continue
        for method, operation in operations.items():
            if method == "post":
                assert "dryRun" not in {p["name"] for p in operation.get("parameters", [])}, path


def test_every_post_documents_the_idempotency_key_header_and_no_get_does(spec):
    posts = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method not in HTTP_METHODS:
                continue
            parameters = [p for p in operation.get("parameters", []) if p["name"] != "X-Request-Id"]
            headers = [p for p in parameters if p["in"] == "header"]
            if method == "post":
                posts += 1
                [header] = headers
                assert header["name"] == "Idempotency-Key" and header.get("required", False) is False
                schema = header["schema"]
                assert (schema["type"], schema["minLength"], schema["maxLength"]) == ("string", 1, 255)
                assert "24 hours" in header["description"]
            else:
                assert headers == [], (method, path)
    assert posts == 7  # start, restart, bulk restart, fail, complete, cancel, skip


def test_next_retry_at_retry_trigger_and_policies_are_documented(spec):
    step = response_schema(spec, f"{STEPS}/{{processStepId}}", "get", 200)["properties"]["data"]
    assert "nextRetryAt" in step["required"]
    assert step["properties"]["nextRetryAt"]["format"] == "date-time"
    assert step["properties"]["nextRetryAt"]["type"] == ["string", "null"]
    trigger = step["properties"]["attemptHistory"]["items"]["properties"]["trigger"]
    assert set(trigger["enum"]) == {"start", "restart", "retry"}
    delegates = response_schema(spec, DELEGATES, "get", 200)["properties"]["data"]["items"]
    assert set(delegates["properties"]["retry"]["properties"]) == {"retries", "backoff", "delay", "maxDelay"}


def test_live_answers_of_the_new_features_validate(api, store, spec, tmp_path):
    counted = tmp_path / "calls.txt"
    failed = api.start(("check", {"ok": 0}))
    failed_id = api.wait_process(failed["processId"], "FAILED")["steps"][0]["processStepId"]
    insert_failed_steps(store, 1001)
    bulk_schema = response_schema(spec, BULK, "post", 200)
    cases = [
        api.post(f"{BULK}?dryRun=true", {"filter": {"type": "fail"}}),
        api.post(BULK, {"processStepIds": [failed_id, "NoSuchStep"], "params": typed(ok=1)}),
        api.post(BULK, {"filter": {"type": "check"}}, headers={"Idempotency-Key": "k"}),
        api.post(BULK, {"filter": {"type": "check"}}, headers={"Idempotency-Key": "k"}),
    ]
    assert cases[0].json["data"]["nextCursor"] and cases[3].headers["Idempotent-Replayed"] == "true"
    for response in cases:
        assert response.status_code == 200, response.json
        assert_valid(bulk_schema, response.json)
    for response in (api.post(BULK, {}), api.post(f"{BULK}?dryRun=1", {"processStepIds": ["a"]})):
        assert response.status_code == 412
        assert_valid(response_schema(spec, BULK, "post", 412), response.json)
    key_refused = api.post(P, {"steps": [{"type": "noop"}]}, headers={"Idempotency-Key": ""})
    assert key_refused.status_code == 412
    assert_valid(response_schema(spec, P, "post", 412), key_refused.json)
    dry = api.post(f"{RESTART}?dryRun=true", {"processStepId": failed_id})
    assert dry.status_code == 412  # restarted above: no longer FAILED
    assert_valid(response_schema(spec, RESTART, "post", 412), dry.json)

    waiting = api.start(("retry_slow", {"file": str(counted)}))["steps"][0]["processStepId"]
    step = wait_for(lambda: (r := api.get(f"{STEPS}/{waiting}")).json["data"]["nextRetryAt"] and r)
    assert_valid(response_schema(spec, f"{STEPS}/{{processStepId}}", "get", 200), step.json)
    retried = api.start(("retry_count", {"file": str(counted), "pass_at": 2}))["steps"][0]["processStepId"]
    api.wait_step(retried, "COMPLETED")
    detail = api.get(f"{STEPS}/{retried}")
    assert [a["trigger"] for a in detail.json["data"]["attemptHistory"]] == ["start", "retry"]
    assert_valid(response_schema(spec, f"{STEPS}/{{processStepId}}", "get", 200), detail.json)
    delegates = api.get(DELEGATES)
    assert_valid(response_schema(spec, DELEGATES, "get", 200), delegates.json)


def test_the_documented_step_rejects_a_wrong_trigger(api, spec):
    schema = resolve(spec, response_schema(spec, f"{STEPS}/{{processStepId}}", "get", 200))
    process = api.start(("noop", {}))
    step_id = api.wait_process(process["processId"], "COMPLETED")["steps"][0]["processStepId"]
    good = api.get(f"{STEPS}/{step_id}").json
    assert is_valid(schema, good)
    history = [{**good["data"]["attemptHistory"][0], "trigger": "auto"}]
    assert not is_valid(schema, {**good, "data": {**good["data"], "attemptHistory": history}})
    assert not is_valid(schema, {**good, "data": {**good["data"], "nextRetryAt": "soon"}})


def test_response_headers_are_documented(spec):
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method not in HTTP_METHODS or "503" not in operation["responses"]:
                continue
            assert "Retry-After" in operation["responses"]["503"]["headers"], (method, path)
            if method == "post":
                success = next(code for code in operation["responses"] if code.startswith("2"))
                for code in (success, "412"):
                    assert "Idempotent-Replayed" in operation["responses"][code]["headers"], (method, path, code)


# -- what a generated client needs (issue 13: openapi-python-client, tests/test_served_client.py) --------
def nodes(node, where="#"):
    """Every (JSON pointer, dict) of the document, depth first."""
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from nodes(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from nodes(value, f"{where}/{index}")


def typed_null(node):
    return node == {"type": "null"}


def test_a_nullable_reference_is_the_reference_or_a_typed_null(spec):
    """`anyOf: [{"type": "object"}, {"$ref": ...}]` would let any object through, and a client could not
    type `step.error`. OpenAPI 3.1 has no `nullable`: null is a type of its own."""
    assert spec["openapi"] == "3.1.0"
    for where, node in nodes(spec):
        assert not ("$ref" in node and len(node) > 1), where
        assert "nullable" not in node, where
        if "anyOf" in node:
            reference, null = node["anyOf"]
            assert set(reference) == {"$ref"} and typed_null(null), where
    schemas = spec["components"]["schemas"]
    for component, prop, target in [
        ("Step", "error", "Error"),
        ("Attempt", "error", "Error"),
        ("FailStep", "error", "ErrorInput"),
        ("RestartMany", "filter", "StepFilter"),
        ("Step", "result", "Params"),
        ("CompleteStep", "result", "Params"),
        ("StepSpec", "params", "Params"),
        ("RestartStep", "params", "RestartParams"),
        ("Step", "phase", "Phase"),
    ]:
        [reference, null] = schemas[component]["properties"][prop]["anyOf"]
        assert reference == {"$ref": f"#/components/schemas/{target}"}, (component, prop)
        assert typed_null(null)


def test_a_nullable_reference_accepts_null_and_the_referenced_shape_only(spec):
    error = {**resolve(spec, spec["components"]["schemas"]["Step"]["properties"]["error"])}
    assert is_valid(error, None)
    assert is_valid(error, {"type": "ValueError", "message": "no"})
    assert not is_valid(error, {"kind": "ValueError"})
    assert not is_valid(error, {})


@pytest.mark.parametrize(("path", "method"), [(P, "get"), (STEPS, "get"), (RESTART, "post"), (BULK, "post")])
def test_a_query_parameter_is_a_plain_optional_value(spec, path, method):
    """No null, no default of null, no `nullable`: a generated client made three enum classes of each."""
    for parameter in spec["paths"][path][method]["parameters"]:
        if parameter["in"] != "query":
            continue
        assert parameter.get("required", False) is False
        assert parameter["allowEmptyValue"] is True  # an empty value means absent (envelope.load_query)
        schema = parameter["schema"]
        assert "anyOf" not in schema and isinstance(schema.get("type", ""), str), parameter
        assert schema.get("default", "unset") is not None, parameter
        assert None not in resolve(spec, schema).get("enum", []), parameter


@pytest.mark.parametrize(("path", "enum"), [(P, "ProcessStatus"), (STEPS, "StepStatus")], ids=["processes", "steps"])
def test_a_status_filter_is_the_status_enum_of_its_resource(spec, path, enum):
    [status] = [p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == "status"]
    assert status["schema"] == {"$ref": f"#/components/schemas/{enum}"}
    assert spec["components"]["schemas"][enum]["enum"] == list(
        model.PROCESS_STATUSES if enum == "ProcessStatus" else model.STEP_STATUSES
    )


V = "#/components/schemas/Variables"  # a process's merged results: output only, no limit of names


def test_params_are_one_component_referenced_everywhere(spec):
    schemas = spec["components"]["schemas"]
    params = schemas["Params"]
    assert params["type"] == "object" and params["maxProperties"] == 256
    assert params["additionalProperties"] == {"$ref": "#/components/schemas/TypedValue"}
    overlay = schemas["RestartParams"]
    assert overlay["additionalProperties"]["anyOf"][0] == {"$ref": "#/components/schemas/TypedValue"}
    assert typed_null(overlay["additionalProperties"]["anyOf"][1])
    assert "null" in overlay["description"] and "removed" in overlay["description"]
    # Params or null is one schema (a type list), not anyOf [Params, null]: schemathesis's fuzzing
    # failed on the latter with some seeds (openapi.Converter.field2property).
    nullable = schemas["NullableParams"]
    assert nullable["type"] == ["object", "null"] and {
        k: v for k, v in nullable.items() if k not in ("type", "description")
    } == {k: v for k, v in params.items() if k not in ("type", "description")}
    assert schemas["SkipStep"]["properties"]["result"] == {"$ref": "#/components/schemas/NullableParams"}
    for where, node in nodes(spec):
        if where.startswith(("#/components/schemas/Params", "#/components/schemas/RestartParams", V)):
            continue
        if where.startswith("#/components/schemas/NullableParams"):
            continue
        assert node.get("additionalProperties") != {"$ref": "#/components/schemas/TypedValue"}, where
    params_or_null = ("#/components/schemas/Params", "#/components/schemas/NullableParams")
    references = {where for where, node in nodes(spec) if node.get("$ref") in params_or_null}
    assert len(references) >= 5


def test_a_typed_value_is_a_one_of_discriminated_by_type(spec):
    schemas = spec["components"]["schemas"]
    typed_value = schemas["TypedValue"]
    forms = {"STRING": "StringValue", "LONG": "LongValue", "DOUBLE": "DoubleValue"}
    assert typed_value["oneOf"] == [{"$ref": f"#/components/schemas/{name}"} for name in forms.values()]
    assert typed_value["discriminator"] == {
        "propertyName": "type",
        "mapping": {kind: f"#/components/schemas/{name}" for kind, name in forms.items()},
    }
    for kind, name in forms.items():
        form = schemas[name]
        wanted = s.VALUE_FIELD[kind]
        assert set(form["properties"]) == {"strValue", "longValue", "doubleValue", "type"}
        assert form["properties"]["type"] == {"type": "string", "enum": [kind]}
        assert sorted(form["required"]) == sorted([wanted, "type"])
        assert form["additionalProperties"] is False
        assert "null" not in form["properties"][wanted]["type"]
        for other in set(s.VALUE_FIELD.values()) - {wanted}:
            assert typed_null({k: v for k, v in form["properties"][other].items() if k != "description"})
    value = resolve(spec, {"$ref": "#/components/schemas/TypedValue"})
    assert is_valid(value, {"type": "LONG", "longValue": 5})
    assert is_valid(value, {"strValue": None, "longValue": 5, "doubleValue": None, "type": "LONG"})
    assert not is_valid(value, {"type": "LONG", "strValue": "5"})
    assert not is_valid(value, {"type": "LONG", "longValue": 5, "strValue": "5"})
    assert not is_valid(value, {"type": "STRING", "strValue": "x" * 65537})


def test_every_operation_takes_and_every_response_carries_x_request_id(spec):
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method not in HTTP_METHODS:
                continue
            [parameter] = [p for p in operation.get("parameters", []) if p.get("name") == "X-Request-Id"]
            assert parameter["in"] == "header" and parameter.get("required", False) is False
            assert "128" in parameter["description"]
            for status, response in operation["responses"].items():
                header = response.get("headers", {}).get("X-Request-Id")
                assert header and header["required"] is True, (method, path, status)


def test_every_401_says_www_authenticate(spec):
    count = 0
    for operations in spec["paths"].values():
        for method, operation in operations.items():
            if method in HTTP_METHODS and "401" in operation["responses"]:
                header = operation["responses"]["401"]["headers"]["WWW-Authenticate"]
                assert header["required"] is True and header["schema"]["type"] == "string"
                count += 1
    assert count == 12  # every operation behind credentials (all but healthz and the document)


def test_servers_tags_and_a_license(spec):
    assert spec["servers"] and all(server["url"] for server in spec["servers"])
    assert spec["info"]["license"]["name"] == "MIT"
    declared = {tag["name"]: tag for tag in spec["tags"]}
    assert all(tag.get("description") for tag in declared.values())
    used = set()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method in HTTP_METHODS:
                [tag] = operation["tags"]
                assert tag in declared, (method, path)
                used.add(tag)
    assert used == set(declared)
    assert spec["paths"][RESTART]["post"]["tags"] == ["steps"]
    assert spec["paths"][P]["post"]["tags"] == ["processes"]
    assert spec["paths"]["/healthz"]["get"]["tags"] == ["service"]


# -- SPEC 10: process data and lifecycle ---------------------------------------------------------------
def test_the_new_statuses_fields_and_filters_are_documented(spec):
    def the(node):  # a schema object, its references followed
        while "$ref" in node:
            node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def enum(node):
        return set(the(node)["enum"]) - {None}

    process = the(the(response_schema(spec, f"{P}/{{processId}}", "get", 200))["properties"]["data"])
    assert enum(process["properties"]["status"]) == {"RUNNING", "COMPLETED", "FAILED", "CANCELLED"}
    assert {"variables", "intervention"} <= set(process["required"])
    assert the(process["properties"]["variables"])["type"] == "object"
    reference, null = process["properties"]["intervention"]["anyOf"]
    intervention = the(reference)
    assert typed_null(null)
    assert set(intervention["required"]) == {"action", "principal", "at", "reason"}
    assert enum(intervention["properties"]["action"]) == {"cancel", "skip"}
    step = the(the(response_schema(spec, f"{STEPS}/{{processStepId}}", "get", 200))["properties"]["data"])
    assert enum(step["properties"]["status"]) == {"PENDING", "STARTED", "COMPLETED", "FAILED", "SKIPPED", "CANCELLED"}
    assert "intervention" in step["required"]
    attempt = the(the(step["properties"]["attemptHistory"])["items"])["properties"]["status"]
    assert enum(attempt) == {"STARTED", "COMPLETED", "FAILED", "CANCELLED"}
    page = the(the(response_schema(spec, P, "get", 200))["properties"]["data"])
    summary = the(the(page["properties"]["items"])["items"])
    assert "intervention" in summary["required"] and "variables" not in summary["properties"]

    def query(path):
        return {p["name"]: p for p in spec["paths"][path]["get"]["parameters"] if p["in"] == "query"}

    processes, steps = query(P), query(STEPS)
    assert {"name", "createdAfter", "createdBefore"} <= set(processes)
    assert the(processes["createdAfter"]["schema"])["format"] == "date-time"
    assert enum(processes["status"]["schema"]) == {"RUNNING", "COMPLETED", "FAILED", "CANCELLED"}
    assert {"processId", "errorType"} <= set(steps)
    assert the(steps["processId"]["schema"])["pattern"] == model.ID_PATTERN
    assert {"SKIPPED", "CANCELLED"} <= enum(steps["status"]["schema"])


def test_the_documented_cancel_and_skip_bodies_accept_and_refuse_what_the_service_does(spec):
    cancel = request_schema(spec, CANCEL)
    assert cancel["required"] == ["processId"]
    assert is_valid(cancel, {"processId": "abc"}) and is_valid(cancel, {"processId": "abc", "reason": "why"})
    assert is_valid(cancel, {"processId": "abc", "reason": None})
    for bad in (
        {},
        {"processId": "a b"},
        {"processId": "abc", "reason": 5},
        {"processId": "abc", "reason": "r" * 1025},
    ):
        assert not is_valid(cancel, bad), bad
    skip = request_schema(spec, SKIP)
    assert skip["required"] == ["processStepId"]
    assert is_valid(skip, {"processStepId": "abc", "result": typed(n=1), "reason": "by hand"})
    for bad in ({"processStepId": "abc", "result": {"x": 1}}, {"processStepId": "abc", "params": {}}, {"reason": "x"}):
        assert not is_valid(skip, bad), bad


def test_live_answers_of_cancel_skip_variables_and_filters_validate(api, spec, db_path):
    produced = api.start(("produce", {"invoice": "INV-1"}), ("check", {"ok": 0}), ("external", {}), name="inv")
    failed = api.wait_process(produced["processId"], "FAILED")["steps"][1]["processStepId"]
    skipped = api.post(SKIP, {"processStepId": failed, "result": typed(sent=1), "reason": "by hand"})
    assert skipped.status_code == 200
    assert_valid(response_schema(spec, SKIP, "post", 200), skipped.json)
    api.wait_deferred(produced["steps"][2]["processStepId"])
    cancelled = api.post(CANCEL, {"processId": produced["processId"], "reason": "enough"})
    assert cancelled.status_code == 200 and cancelled.json["data"]["variables"]
    assert_valid(response_schema(spec, CANCEL, "post", 200), cancelled.json)
    for response, path in (
        (api.post(CANCEL, {"processId": produced["processId"]}), CANCEL),
        (api.post(SKIP, {"processStepId": failed}), SKIP),
        (api.post(CANCEL, {"processId": "a b"}), CANCEL),
    ):
        assert response.status_code == 412
        assert_valid(response_schema(spec, path, "post", 412), response.json)
    for url, documented in (
        (f"{P}/{produced['processId']}", f"{P}/{{processId}}"),
        (f"{STEPS}/{failed}", f"{STEPS}/{{processStepId}}"),
        (
            f"{P}?status=CANCELLED&name=inv&createdAfter=2020-01-01T00:00:00Z&createdBefore=2999-01-01T00:00:00%2B02:00",
            P,
        ),
        (f"{P}?status=CANCELLED", P),
        (f"{STEPS}?processId={produced['processId']}&errorType=ValueError", STEPS),
        (f"{STEPS}?status=SKIPPED", STEPS),
    ):
        response = api.get(url)
        assert response.status_code == 200 and (response.json["data"].get("items") != []), (url, response.json)
        assert_valid(response_schema(spec, documented, "get", 200), response.json)
