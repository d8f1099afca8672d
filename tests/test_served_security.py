"""Security: secrets never in a log line or a response, an injection and traversal corpus that
changes nothing, the security headers and JSON-only POSTs on a real server, gunicorn's own
refusals in the envelope.

Covered elsewhere, not repeated here: secrets stored hashed (test_auth.py
test_secrets_are_stored_hashed), a 500 holding only an error id (test_envelope.py
test_an_unexpected_exception_is_a_500_with_only_an_error_id, and on every schemathesis answer in
schemathesis_hooks.py), non-JSON POSTs through the test client (test_api.py).
"""

import socket
import sqlite3
import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from helpers import (
    COMPLETE,
    DELEGATES,
    ENV_HEADERS,
    ENVELOPE_KEYS,
    FAIL,
    FLASK,
    OPENAPI,
    PLUGINS,
    RESTART,
    ROOT,
    STEPS,
    P,
    typed,
    wait_for,
)
from invariants import check

from app import create_app
from auth import hash_secret
from delegates import DelegateLoadError

POSTS = [P, RESTART, FAIL, COMPLETE]


# -- secrets -------------------------------------------------------------------------------
def create_token(db, name, role):
    """`flask --app app token create`, as an operator runs it; returns the secret."""
    env = {"PATH": "/usr/bin:/bin", "STEPD_DB": str(db)}
    run = subprocess.run(
        [str(FLASK), "--app", "app", "token", "create", name, "--role", role],
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


@pytest.mark.slow
def test_secrets_never_appear_in_a_log_line_or_a_response(server_factory, tmp_path):
    env_secret = f"env-{uuid.uuid4().hex}"
    server = server_factory(token=env_secret, extra_env={"STEPD_LOG_LEVEL": "DEBUG"})
    server.start()
    reader_secret = create_token(server.env["STEPD_DB"], "viewer", "reader")
    operator_secret = create_token(server.env["STEPD_DB"], "ops2", "operator")
    recorder = Recorder(server)
    full_run(recorder, env_secret, reader_secret, operator_secret)
    assert server.stop() == 0  # a clean stop, so every log line is written
    log = server.output()
    assert "DEBUG" in log and "rid=" in log, "the debug and access logs were captured"

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


# -- gunicorn's own refusals -----------------------------------------------------------------
def raw_request(server, request_bytes):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


@pytest.mark.slow
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
def test_what_gunicorn_refuses_is_a_412_in_the_envelope(server_factory, request_bytes):
    import json

    server = server_factory(workers=1).start()
    head, body = raw_request(server, request_bytes)
    assert head.startswith("HTTP/1.1 412 "), head
    assert "Content-Type: application/json" in head
    assert "X-Content-Type-Options: nosniff" in head and "Cache-Control: no-store" in head
    answer = json.loads(body)
    assert set(answer) == ENVELOPE_KEYS
    assert answer["message"] == "Precondition failed"
    assert list(answer["data"]) == ["_schema"]


# -- an injection and traversal corpus ---------------------------------------------------
CORPUS = [
    "' OR '1'='1",
    "'; DROP TABLE steps; --",
    '" OR 1=1 --',
    "1; DELETE FROM processes",
    "x' UNION SELECT secret_hash, name, role FROM tokens --",
    "%' OR name LIKE '%",
    "*",
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "/etc/shadow",
    "..%2F..%2Fetc%2Fpasswd",
    "file:///etc/passwd",
    "a\x00b",
    "$(touch /tmp/stepd-pwned)",
    "`id`",
    "{{7*7}}",
    "<script>alert(1)</script>",
]


def database_state(db):
    """Everything that must not change: the schema, the tokens, and the ids of every row."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            "schema": conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall(),
            "tokens": conn.execute("SELECT name, role, secret_hash FROM tokens ORDER BY name").fetchall(),
            "processes": conn.execute("SELECT id, name, status FROM processes ORDER BY seq").fetchall(),
            "steps": conn.execute("SELECT id, status, params FROM steps ORDER BY seq").fetchall(),
        }
    finally:
        conn.close()


@pytest.mark.parametrize("evil", CORPUS)
def test_an_injection_in_ids_and_queries_is_refused_and_changes_nothing(corpus_app, evil):
    app, db = corpus_app
    client = app.test_client()
    before = database_state(db)
    for path in (f"{P}/{quote(evil, safe='')}", f"{STEPS}/{quote(evil, safe='')}", f"{P}/{quote(evil)}"):
        response = client.get(path, headers=ENV_HEADERS)
        assert response.status_code in (404, 405), (path, response.status_code)
    for path in POSTS[1:]:
        response = client.post(path, json={"processStepId": evil}, headers=ENV_HEADERS)
        assert response.status_code == 412
        assert set(response.json["data"]) == {"processStepId"}
    for query in ("status", "cursor", "limit"):
        assert client.get(f"{STEPS}?{query}={quote(evil)}", headers=ENV_HEADERS).status_code == 412
    listed = client.get(f"{STEPS}?type={quote(evil)}", headers=ENV_HEADERS)
    assert listed.status_code in (200, 412)
    if listed.status_code == 200:
        assert listed.json["data"]["items"] == []  # no step has this type; the filter is a value, not SQL
    assert database_state(db) == before
    assert not Path("/tmp/stepd-pwned").exists()


def test_an_injection_in_names_and_params_is_stored_and_echoed_as_plain_text(corpus_app):
    app, db = corpus_app
    client = app.test_client()
    tokens_before = database_state(db)["tokens"]
    started = []
    for evil in CORPUS:
        name = evil.replace("\x00", "0")  # a param name may hold no control character (SPEC section 2)
        params = {name: {"type": "STRING", "strValue": evil}, "n": {"type": "STRING", "strValue": evil * 3}}
        body = {"name": evil, "steps": [{"type": "external", "params": params}]}
        response = client.post(P, json=body, headers=ENV_HEADERS)
        assert response.status_code == 201, (evil, response.json)
        process = response.json["data"]
        assert process["name"] == evil
        assert process["steps"][0]["params"][name]["strValue"] == evil
        started.append(process["processId"])
    listed = client.get(f"{P}?limit=500", headers=ENV_HEADERS).json["data"]["items"]
    assert [p["name"] for p in reversed(listed)] == CORPUS
    after = database_state(db)
    assert after["tokens"] == tokens_before
    assert [row[0] for row in after["processes"]] == started
    assert {name for _, name, _ in after["schema"]} >= {"processes", "steps", "attempts", "tokens", "runners"}
    assert check(db).problems == []


@pytest.mark.parametrize(
    "folder",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "/nonexistent/../../etc/shadow",
        "'; DROP TABLE tokens; --",
        "$(touch /tmp/stepd-pwned)",
        "plugins\x00/../x",
    ],
)
def test_a_bad_delegates_path_refuses_to_start_and_changes_nothing(tmp_path, folder):
    db = tmp_path / "paths.db"
    first = create_app({"STEPD_DB": str(db), "STEPD_TOKEN": "t"})
    first.extensions["stepd"].store.add_token("keeper", "operator", hash_secret("keeper-secret"))
    first.extensions["stepd"].store.close()
    before = database_state(db)
    with pytest.raises((DelegateLoadError, ValueError)):
        create_app({"STEPD_DB": str(db), "STEPD_TOKEN": "t", "STEPD_DELEGATES_PATH": folder})
    assert database_state(db) == before
    assert not Path("/tmp/stepd-pwned").exists()


def test_a_delegates_path_with_dot_dot_loads_only_the_folder_it_names(tmp_path):
    roundabout = f"{PLUGINS}/../plugins/../../tests/plugins"
    straight = create_app({"STEPD_DB": str(tmp_path / "a.db"), "STEPD_DELEGATES_PATH": str(PLUGINS)})
    winding = create_app({"STEPD_DB": str(tmp_path / "b.db"), "STEPD_DELEGATES_PATH": roundabout})
    types = [d.type for d in straight.extensions["stepd"].registry.all()]
    assert [d.type for d in winding.extensions["stepd"].registry.all()] == types
    assert "nap" in types and "noop" in types
