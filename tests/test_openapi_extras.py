"""The OpenAPI document covers retries, bulk restart, dry run and Idempotency-Key, and live answers of
these features validate against it."""

import pytest
from helpers import BULK, DELEGATES, OPENAPI, RESTART, STEPS, P, insert_failed_steps, typed, wait_for
from test_openapi import HTTP_METHODS, assert_valid, is_valid, request_schema, resolve, response_schema

import schemas as s


@pytest.fixture
def spec(client):
    response = client.get(OPENAPI)
    assert response.status_code == 200
    return response.json


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
    assert data["properties"]["nextCursor"]["nullable"] is True


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
    assert (ids["type"], ids["minItems"], ids["maxItems"]) == ("array", 1, 1000)
    # a nullable nested schema: apispec writes anyOf [the object, {"type": "object", "nullable": true}]
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
            headers = [p for p in operation.get("parameters", []) if p["in"] == "header"]
            if method == "post":
                posts += 1
                [header] = headers
                assert header["name"] == "Idempotency-Key" and header.get("required", False) is False
                schema = header["schema"]
                assert (schema["type"], schema["minLength"], schema["maxLength"]) == ("string", 1, 255)
                assert "24 hours" in header["description"]
            else:
                assert headers == [], (method, path)
    assert posts == 5


def test_next_retry_at_retry_trigger_and_policies_are_documented(spec):
    step = response_schema(spec, f"{STEPS}/{{processStepId}}", "get", 200)["properties"]["data"]
    assert "nextRetryAt" in step["required"]
    assert step["properties"]["nextRetryAt"]["format"] == "date-time"
    assert step["properties"]["nextRetryAt"]["nullable"] is True
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
