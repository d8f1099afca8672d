"""The service's logs on real gunicorn and runner processes (SPEC 11 "Logs"): with
STEPD_LOG_FORMAT=json every line is one JSON object with the documented fields; in text the
access line has a timestamp; a bad STEPD_LOG_FORMAT stops the start with one line.

The "no secret in any log line" test runs in both formats in test_served_security.py.
"""

import json
import os
import re
import signal

import pytest
import requests
from helpers import COMPLETE, RESTART, STEPS, P, typed, wait_for

BASE_FIELDS = {"ts", "level", "logger", "msg"}
STEP_FIELDS = {"process_id", "step_id", "attempt", "type"}
ACCESS_FIELDS = {"method", "route", "status", "duration_ms", "request_id", "path"}
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


def json_lines(text):
    """Every line of `text` as a dict; fails naming the first line that is not one JSON object."""
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        assert set(entry) >= BASE_FIELDS, line
        assert TS.match(entry["ts"]) and entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        lines.append(entry)
    return lines


def test_every_line_of_a_full_run_is_json_with_the_documented_fields(server_factory, tmp_path):
    server = server_factory(extra_env={"STEPD_LOG_FORMAT": "json", "STEPD_LOG_LEVEL": "DEBUG"}).start()
    failing = server.post(P, {"steps": [{"type": "check", "params": typed(ok=0)}]}, headers={"X-Request-Id": "rid-a"})
    assert failing.status_code == 201
    process_id = failing.json()["data"]["processId"]
    step_id = failing.json()["data"]["steps"][0]["processStepId"]
    server.wait_step(step_id, "FAILED")
    bad = server.post(RESTART, {"processStepId": step_id, "params": {"ok": "one"}}, headers={"X-Request-Id": "rid-b"})
    assert bad.status_code == 412
    failing_again = server.post(
        RESTART, {"processStepId": step_id, "params": typed(ok=2)}, headers={"X-Request-Id": "r"}
    )
    assert failing_again.status_code == 200
    wait_for(lambda: server.step(step_id)["attempts"] == 2 and server.step(step_id)["status"] == "FAILED")
    restarted = server.post(RESTART, {"processStepId": step_id, "params": typed(ok=1)}, headers={"X-Request-Id": "c"})
    assert restarted.status_code == 200
    server.wait_step(step_id, "COMPLETED")
    deferred = server.start_process(("external", {}))  # its delegate writes with ctx.log
    deferred_step = deferred["steps"][0]["processStepId"]
    server.wait_step(deferred_step, "STARTED")
    assert server.post(COMPLETE, {"processStepId": deferred_step}).ok
    assert server.get("/api/v1/nowhere", headers={"X-Request-Id": "rid-d"}).status_code == 404
    assert server.stop() == 0  # a clean stop, so every line is written

    lines = json_lines(server.output())
    loggers = {entry["logger"] for entry in lines}
    assert {"stepd.service", "stepd.runner", "gunicorn.error", "gunicorn.access", "stepd.delegate.external"} <= loggers

    start = next(e for e in lines if e["logger"] == "stepd.service" and "serving" in e["msg"])
    assert start["url"] == server.url and start["database"] == server.env["STEPD_DB"]
    assert (start["sync"], start["workers"], start["runners"]) == ("full", 1, 1)  # one HTTP process: the node
    assert "check" in start["delegates"][server.env["STEPD_DELEGATES_PATH"]]

    access = {e["request_id"]: e for e in lines if e["logger"] == "gunicorn.access" and "request_id" in e}
    request = access["rid-a"]
    assert ACCESS_FIELDS | {"principal"} <= set(request), request
    assert (request["method"], request["route"], request["status"], request["principal"]) == ("POST", P, 201, "env")
    assert isinstance(request["duration_ms"], float) and request["duration_ms"] >= 0
    assert access["rid-b"]["status"] == 412 and access["rid-b"]["route"] == RESTART
    assert access["rid-d"]["route"] is None and access["rid-d"]["path"] == "/api/v1/nowhere"
    step_route = next(e for e in access.values() if e["path"] == f"{STEPS}/{step_id}")
    assert step_route["route"] == f"{STEPS}/<id:step_id>"  # the rule, not the path: one value per endpoint

    failed = [e for e in lines if e["logger"] == "stepd.runner" and "attempt 1 failed" in e["msg"]]
    assert len(failed) == 1
    assert {k: failed[0][k] for k in STEP_FIELDS} == {
        "process_id": process_id,
        "step_id": step_id,
        "attempt": 1,
        "type": "check",
    }
    traceback = next(e for e in lines if e["msg"].startswith("traceback of step"))
    assert "ValueError: ok is 0, not 1" in traceback["exc_info"] and traceback["step_id"] == step_id

    delegate_line = next(e for e in lines if e["logger"] == "stepd.delegate.external")
    assert delegate_line["step_id"] == deferred_step and delegate_line["type"] == "external"

    # Issue 19 part 3: one request id from the HTTP line to the delegate's log. The start's id is
    # on the runner's line and the delegate's ctx.log line of attempt 1, the restart's on attempt
    # 2's; a refusal's reason is logged (DEBUG) with its request's id.
    assert failed[0]["request_id"] == "rid-a" and traceback["request_id"] == "rid-a"
    said = {e["attempt"]: e for e in lines if e["logger"] == "stepd.delegate.check"}
    assert (said[1]["request_id"], said[1]["msg"]) == ("rid-a", "checking ok=0")
    assert (said[2]["request_id"], said[2]["msg"]) == ("r", "checking ok=2")
    assert (said[3]["request_id"], said[3]["msg"]) == ("c", "checking ok=1")
    # a restart's id: on its access line, the runner's line for its attempt, its delegate's line
    assert access["r"]["route"] == RESTART and access["r"]["status"] == 200
    [runner_line] = [e for e in lines if e["logger"] == "stepd.runner" and "attempt 2 failed" in e["msg"]]
    assert (runner_line["request_id"], runner_line["step_id"]) == ("r", step_id)
    assert access["c"]["route"] == RESTART and access["c"]["status"] == 200
    refusal = next(e for e in lines if e["logger"] != "gunicorn.access" and e.get("request_id") == "rid-b")
    assert refusal["level"] == "DEBUG" and "refused POST" in refusal["msg"] and "params" in refusal["msg"]
    assert any(e["logger"] == "gunicorn.error" and "Shutting down" in e["msg"] for e in lines)


def test_a_restarted_runner_and_a_first_token_are_json_too(server_factory, tmp_path):
    server = server_factory(token=None, extra_env={"STEPD_LOG_FORMAT": "json"}).start()
    first = next(e for e in json_lines(server.output()) if e.get("secret"))
    assert first["logger"] == "stepd.auth" and first["secret"].startswith("stepd_")
    bearer = {"Authorization": f"Bearer {first['secret']}"}
    assert requests.get(server.url + P, headers=bearer, timeout=10).status_code == 200
    server.token = first["secret"]

    [runner] = server.runner_pids()
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: "starting another" in server.output(), what="the node's line")
    wait_for(lambda: server.runner_pids() and server.runner_pids() != [runner], what="a new runner")
    assert server.stop() == 0
    news = next(e for e in json_lines(server.output()) if "starting another" in e["msg"])
    assert (news["logger"], news["level"]) == ("stepd.node", "WARNING")  # the node starts the runners now


def test_the_text_access_line_has_a_timestamp(served):
    server = served
    assert server.get(P, headers={"X-Request-Id": "stamped"}).status_code == 200
    wait_for(lambda: "rid=stamped" in server.output(), what="the access line")
    line = next(x for x in server.output().splitlines() if "rid=stamped" in x)
    date = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    # every atom of front.py's access_log_format: address, request line, status, bytes, ms, request id
    assert re.fullmatch(date + r' 127\.0\.0\.1 "GET /api/v1/processes HTTP/1\.1" 200 [1-9]\d* \d+ms rid=stamped', line)
    assert "serving " + server.url in server.output()  # the start-up line, in text


def test_a_bad_log_format_stops_the_start_with_one_line(server_factory):
    server = server_factory(extra_env={"STEPD_LOG_FORMAT": "yaml"}).start(wait=False)
    assert server.proc.wait(timeout=20) == 2  # refused
    assert server.output().splitlines() == ["stepd: cannot start: STEPD_LOG_FORMAT must be one of text, json"]
