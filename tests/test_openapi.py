"""GET /api/v1/openapi.json: a valid OpenAPI 3 document of the whole API, built from the schemas that
validate requests, and true to what the service really answers."""

import copy
import re

import pytest
from helpers import BULK, COMPLETE, DELEGATES, ENVELOPE_KEYS, FAIL, OPENAPI, RESTART, STEPS, P, typed
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from openapi_spec_validator import validate

import schemas as s

PATH_PARAMETER_NAMES = {"process_id": "processId", "step_id": "processStepId"}
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture
def spec(client):
    response = client.get(OPENAPI)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.json


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
    """`node` with every local $ref replaced by what it points to (the schemas here are not recursive)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            return resolve(spec, target)
        return {key: resolve(spec, value) for key, value in node.items()}
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
    OAS30Validator(schema, format_checker=oas30_format_checker).validate(instance)


def is_valid(schema, instance):
    return OAS30Validator(schema, format_checker=oas30_format_checker).is_valid(instance)


# -- the document -------------------------------------------------------------------------------------
def test_the_document_is_valid_openapi_3(spec):
    validate(copy.deepcopy(spec))
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["version"] == s.VERSION


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


# -- request bodies and query strings come from schemas.py --------------------------------------------------
BODIES = [
    (P, s.StartProcessSchema),
    (RESTART, s.RestartStepSchema),
    (FAIL, s.FailStepSchema),
    (COMPLETE, s.CompleteStepSchema),
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
    body = request_schema(spec, RESTART)
    assert body["required"] == ["processStepId"]
    assert body["properties"]["processStepId"]["type"] == "string"
    params = body["properties"]["params"]
    assert params["type"] == "object"
    assert params["maxProperties"] == 256
    value = params["additionalProperties"]
    assert set(value["properties"]) == {"strValue", "longValue", "doubleValue", "type"}
    assert value["required"] == ["type"]
    assert value["additionalProperties"] is False
    assert value["properties"]["type"]["enum"] == ["STRING", "LONG", "DOUBLE"]
    assert value["properties"]["strValue"]["type"] == "string"
    assert value["properties"]["strValue"]["maxLength"] == 65536
    assert value["properties"]["longValue"]["type"] == "integer"
    assert value["properties"]["longValue"]["minimum"] == -(2**63)
    assert value["properties"]["longValue"]["maximum"] == 2**63 - 1
    assert value["properties"]["doubleValue"]["type"] == "number"
    for field in ("strValue", "longValue", "doubleValue"):
        assert value["properties"][field]["nullable"] is True


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
    assert set(parameters) == set(schema_class().fields)
    assert all(p.get("required", False) is False for p in parameters.values())
    limit = parameters["limit"]["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"], limit["default"]) == ("integer", 1, 500, 50)
    assert {"FAILED", "COMPLETED"} <= set(parameters["status"]["schema"]["enum"])


def test_endpoints_without_a_query_document_no_query_parameters(spec):
    for path, operations in spec["paths"].items():
        if path in (P, STEPS, RESTART, BULK):
            continue  # these take paging and filter, or dryRun
        for method, operation in operations.items():
            if method in HTTP_METHODS:
                assert [p for p in operation.get("parameters", []) if p["in"] == "query"] == [], (method, path)


# -- live responses validate against what is documented ---------------------------------------------------
@pytest.fixture
def scenario(api):
    """A completed process, a failed one, and one waiting on a deferred step."""
    done = api.start(("results", {}), ("noop", {}), name="done")
    failed = api.start(("check", {"ok": 0, "note": "x"}), ("noop", {}))
    waiting = api.start(("external", {"ratio": 0.5}), ("noop", {}))
    api.wait_process(done["processId"], "COMPLETED")
    failed = api.wait_process(failed["processId"], "FAILED")
    api.wait_deferred(waiting["steps"][0]["processStepId"])
    return {
        "done": done["processId"],
        "done_step": done["steps"][0]["processStepId"],
        "failed_step": failed["steps"][0]["processStepId"],
        "waiting_step": waiting["steps"][0]["processStepId"],
    }


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
