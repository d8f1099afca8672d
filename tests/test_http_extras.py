"""Corners of HTTP handling: OPTIONS, odd methods, headers on every answer."""

import pytest


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/api/v1/processes", "GET, HEAD, OPTIONS, POST"),
        ("/api/v1/processes/restart-failed-step", "OPTIONS, POST"),
        ("/healthz", "GET, HEAD, OPTIONS"),
    ],
)
def test_options_answers_in_the_envelope(client, path, allowed):
    response = client.options(path)
    assert response.status_code == 200
    assert set(response.json) == {"message", "timestamp", "data", "version"}
    assert response.headers["Allow"] == allowed
    assert response.json["data"]["allow"] == allowed.split(", ")


def test_unknown_method_is_405_in_the_envelope(client):
    response = client.open("/api/v1/processes", method="PATCH")
    assert response.status_code == 405
    assert response.json["message"] == "Method not allowed"
    assert "POST" in response.headers["Allow"]


def test_security_headers_on_every_answer(client, api):
    for response in (client.get("/healthz"), client.get("/nowhere"), api.get("/api/v1/processes")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"


def test_null_params_mean_no_params(api):
    process = api.post("/api/v1/processes", {"steps": [{"type": "check", "params": None}]}).json["data"]
    step_id = process["steps"][0]["processStepId"]
    api.wait_step(step_id, "FAILED")
    response = api.post("/api/v1/processes/restart-failed-step", {"processStepId": step_id, "params": None})
    assert response.status_code == 200
    assert response.json["data"]["params"] == {}
