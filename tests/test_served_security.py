"""Security on real gunicorn: secrets never in a log line or a response, the security headers and
JSON-only POSTs, gunicorn's own refusals in the envelope (a chunked body over 1 MiB included).

Covered elsewhere, not repeated here: secrets stored hashed (test_api_auth.py
test_secrets_are_stored_hashed), a 500 holding only an error id (test_api_envelope.py
test_an_unexpected_exception_is_a_500_with_only_an_error_id, and on every schemathesis answer in
schemathesis_hooks.py), non-JSON POSTs through the test client (test_api_processes.py), the
injection corpus (test_api_security.py).
"""

import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
from helpers import (
    COMPLETE,
    DELEGATES,
    ENVELOPE_KEYS,
    FAIL,
    OPENAPI,
    RESTART,
    ROOT,
    STEPD,
    STEPS,
    P,
    process_ids,
    typed,
    wait_for,
)

from stepd.auth import hash_secret

# -- secrets ---------------------------------------------------------------------------------------
POSTS = [P, RESTART, FAIL, COMPLETE]


def create_token(db, name, role):
    """`flask --app app token create`, as an operator runs it; returns the secret."""
    env = {"PATH": "/usr/bin:/bin", "STEPD_DB": str(db)}
    run = subprocess.run(
        [str(STEPD), "token", "create", name, "--role", role],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.splitlines()[-1]


class Recorder:
    """Sends requests to a real server and keeps every answer."""

    def __init__(self, server):
        self.server = server
        self.answers = []

    def send(self, method, path, auth=None, **kwargs):
        headers = kwargs.pop("headers", {})
        if isinstance(auth, str):
            headers["Authorization"] = f"Bearer {auth}"
        response = requests.request(
            method, self.server.url + path, headers=headers, auth=auth if isinstance(auth, tuple) else None, **kwargs
        )
        self.answers.append(response)
        return response


def full_run(recorder, env_secret, reader_secret, operator_secret):
    """Every endpoint, with every way to send a secret, right and wrong; returns nothing, records all."""
    send = recorder.send
    started = send("POST", P, env_secret, json={"steps": [{"type": "check", "params": typed(ok=0)}]})
    assert started.status_code == 201
    step_id = started.json()["data"]["steps"][0]["processStepId"]
    wait_for(lambda: send("GET", f"{STEPS}/{step_id}", reader_secret).json()["data"]["status"] == "FAILED")
    restarted = send("POST", RESTART, ("ops2", operator_secret), json={"processStepId": step_id})
    assert restarted.status_code == 200
    waiting = send("POST", P, ("env", env_secret), json={"steps": [{"type": "external"}, {"type": "external"}]})
    waiting_step = waiting.json()["data"]["steps"][0]["processStepId"]
    assert send("POST", COMPLETE, operator_secret, json={"processStepId": waiting_step}).ok
    assert send("POST", FAIL, env_secret, json={"processStepId": waiting_step}).status_code == 412
    for path in (P, STEPS, f"{STEPS}/{step_id}", DELEGATES, "/healthz", OPENAPI):
        for auth in (env_secret, ("env", env_secret), reader_secret, ("viewer", reader_secret), operator_secret):
            assert send("GET", path, auth).status_code == 200, path
    wrong = [env_secret + "x", hash_secret(env_secret), ("viewer", env_secret), ("env", reader_secret)]
    for auth in wrong:
        assert send("GET", P, auth).status_code == 401
    assert send("POST", P, reader_secret, json={"steps": [{"type": "noop"}]}).status_code == 403
    for path in POSTS:
        for content_type, body in (
            ("text/plain", '{"processStepId": "x"}'),
            ("application/x-www-form-urlencoded", "processStepId=x"),
            ("multipart/form-data; boundary=b", '--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b--'),
            ("application/json-patch+json", "{}"),
        ):
            refused = send("POST", path, env_secret, data=body, headers={"Content-Type": content_type})
            assert refused.status_code == 412, (path, content_type)
            assert refused.json()["data"] == {"_schema": ["Content-Type must be application/json."]}


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_never_appear_in_a_log_line_or_a_response(server_factory, tmp_path, log_format):
    env_secret = f"env-{uuid.uuid4().hex}"
    server = server_factory(token=env_secret, extra_env={"STEPD_LOG_LEVEL": "DEBUG", "STEPD_LOG_FORMAT": log_format})
    server.start()
    reader_secret = create_token(server.env["STEPD_DB"], "viewer", "reader")
    operator_secret = create_token(server.env["STEPD_DB"], "ops2", "operator")
    recorder = Recorder(server)
    full_run(recorder, env_secret, reader_secret, operator_secret)
    assert server.stop() == 0  # a clean stop, so every log line is written
    log = server.output()
    assert "DEBUG" in log and "rid=" in log, "the debug and access logs were captured"
    if log_format == "json":
        assert all(line.startswith("{") for line in log.splitlines()), "every line is JSON"

    secrets = [env_secret, reader_secret, operator_secret]
    leaks = [s for s in secrets + [hash_secret(s) for s in secrets] if s in log]
    assert leaks == [], "a secret or its hash is in the log"
    assert "Authorization" not in log and "Bearer" not in log
    for response in recorder.answers:
        assert not [s for s in secrets + [hash_secret(s) for s in secrets] if s in response.text], response.url
        assert response.headers["X-Content-Type-Options"] == "nosniff", response.url
        assert response.headers["Cache-Control"] == "no-store", response.url
    stored = b"".join(path.read_bytes() for path in Path(server.env["STEPD_DB"]).parent.glob("served.db*"))
    assert not [s for s in secrets if s.encode() in stored], "a secret is stored in clear"
    assert len(recorder.answers) > 50


# -- gunicorn's own refusals -----------------------------------------------------------------------
def raw_request(server, request_bytes):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/v1/processes?" + b"x" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",  # request line over 4094 bytes
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header: 1\r\n\r\n",  # a space in a header name
        b"GET /healthz HTTP/9.9\r\nHost: a\r\n\r\n",
        # gunicorn's 501: a client's fault, not the server's, so no 500 and no ERROR log line
        b"POST /api/v1/processes HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: foo\r\n\r\n",
    ],
    ids=["long-request-line", "bad-header-name", "bad-version", "unknown-transfer-encoding"],
)
def test_what_gunicorn_refuses_is_a_412_in_the_envelope(served, request_bytes):
    import json

    server = served
    head, body = raw_request(server, request_bytes)
    assert head.startswith("HTTP/1.1 412 "), head
    assert "Content-Type: application/json" in head
    assert "X-Content-Type-Options: nosniff" in head and "Cache-Control: no-store" in head
    answer = json.loads(body)
    assert set(answer) == ENVELOPE_KEYS
    assert answer["message"] == "Precondition failed"
    assert list(answer["data"]) == ["_schema"]


def test_a_chunked_body_over_1_mib_is_413(served):
    import requests

    server = served
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


# A body sent `Transfer-Encoding: chunked` that cannot be read: gunicorn raises while the app reads
# it (InvalidChunkSize and the like). The client's fault, so a 412 in the envelope, never a 500.
BAD_CHUNKED = [
    ("size-not-hex", b"zz\r\n{}\r\n0\r\n\r\n"),
    ("size-negative", b"-2\r\n{}\r\n0\r\n\r\n"),
    ("size-too-long", b"1" * 40 + b"\r\n{}\r\n0\r\n\r\n"),
    ("chunk-unterminated", b"2\r\n{}XX0\r\n\r\n"),
    ("ends-mid-chunk", b'10\r\n{"steps"'),  # and the client says no more (its half of the socket closed)
]


def test_a_malformed_chunked_body_is_a_412_in_the_envelope(served):
    import json

    server = served
    # The shared service holds other tests' processes and log lines: this test's are those that
    # come after these.
    processes_before, offset = process_ids(server), len(server.output())
    for idempotency in ("", "Idempotency-Key: chunked-1\r\n"):  # with a key, the body is read before the view
        for name, body in BAD_CHUNKED:
            head = (
                "POST /api/v1/processes HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                f"Authorization: Bearer {server.token}\r\nContent-Type: application/json\r\n{idempotency}"
                "Transfer-Encoding: chunked\r\n\r\n"
            )
            status, answer = raw_request_half_closed(server, head.encode() + body)
            assert status.startswith("HTTP/1.1 412 "), (name, status, answer)
            answer = json.loads(answer)
            assert set(answer) == ENVELOPE_KEYS and answer["message"] == "Precondition failed", name
            assert list(answer["data"]) == ["_schema"], (name, answer)
            assert "chunk" in answer["data"]["_schema"][0].lower() or "ended" in answer["data"]["_schema"][0], answer
    assert process_ids(server) == processes_before  # none was started
    log = server.output()[offset:]
    assert "unexpected error" not in log and "Traceback" not in log, log


def raw_request_half_closed(server, request_bytes):
    """Send the bytes, close our sending half, and read the whole answer: (status line, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.decode("latin-1").splitlines()[0], body
