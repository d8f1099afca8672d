"""Corners of HTTP handling: OPTIONS, odd methods, headers on every answer."""

import pytest
from helpers import ENVELOPE_KEYS, FAIL, RESTART, P


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        (P, "GET, HEAD, OPTIONS, POST"),
        (RESTART, "OPTIONS, POST"),
        ("/healthz", "GET, HEAD, OPTIONS"),
    ],
)
def test_options_answers_in_the_envelope(client, path, allowed):
    response = client.options(path)
    assert response.status_code == 200
    assert set(response.json) == ENVELOPE_KEYS
    assert response.headers["Allow"] == allowed
    assert response.json["data"]["allow"] == allowed.split(", ")


def test_unknown_method_is_405_in_the_envelope(client):
    response = client.open(P, method="PATCH")
    assert response.status_code == 405
    assert response.json["message"] == "Method not allowed"
    assert "POST" in response.headers["Allow"]


def test_security_headers_on_every_answer(client, api):
    for response in (client.get("/healthz"), client.get("/nowhere"), api.get(P)):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"


def test_null_params_mean_no_params(api):
    process = api.post(P, {"steps": [{"type": "check", "params": None}]}).json["data"]
    step_id = process["steps"][0]["processStepId"]
    api.wait_step(step_id, "FAILED")
    response = api.post(RESTART, {"processStepId": step_id, "params": None})
    assert response.status_code == 200
    assert response.json["data"]["params"] == {}


@pytest.mark.parametrize("path", ["/api/v1//processes", "//api/v1/processes", f"{P}/"])
def test_odd_slashes_are_404_in_the_envelope_not_redirects(api, path):
    response = api.get(path)
    assert response.status_code == 404
    assert response.json["message"] == "Not found"


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        (P, {"name": "\ud800", "steps": [{"type": "noop"}]}, ["name"]),
        (P, {"steps": [{"type": "no\udc80op"}]}, ["steps", "0", "type"]),
        (FAIL, {"processStepId": "abc", "error": {"message": "\udc80"}}, ["error", "message"]),
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


def test_lone_surrogates_in_params_are_kept_exactly(api):
    process = api.start(("noop", {"s": "\ud800x"}))
    assert process["steps"][0]["params"]["s"]["strValue"] == "\ud800x"


@pytest.mark.parametrize("number", [2**63, 10**20])
def test_a_cursor_past_64_bits_is_412(api, number):
    import base64

    cursor = base64.urlsafe_b64encode(f"p:{number}".encode()).decode().rstrip("=")
    response = api.get(f"{P}?cursor={cursor}")
    assert response.status_code == 412
    assert response.json["data"] == {"cursor": ["Not a valid cursor."]}


def test_a_chunked_body_over_1_mib_is_413(server_factory):
    import requests

    server = server_factory().start()
    chunk = b" " * 65536

    def body():  # a generator body is sent chunked, with no Content-Length
        yield b'{"processStepId": "abc"'
        for _ in range(17):
            yield chunk
        yield b"}"

    headers = {**server.headers(), "Content-Type": "application/json"}
    response = requests.post(server.url + RESTART, data=body(), headers=headers)
    assert response.status_code == 413
    assert response.json()["message"] == "Payload too large"
    small = requests.post(server.url + RESTART, data=iter([b'{"processStepId": "abc"}']), headers=headers)
    assert small.status_code == 412 and small.json()["data"] == {"processStepId": ["No step has this id."]}
