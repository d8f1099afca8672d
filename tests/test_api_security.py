"""Security of the app itself (fixture corpus_app): an injection and traversal corpus in ids, names,
params and queries changes nothing, a bad STEPD_DELEGATES_PATH refuses to start and changes
nothing, and every answer carries the security headers. On real gunicorn: test_served_security.py."""

import sqlite3
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import COMPLETE, ENV_HEADERS, FAIL, PLUGINS, RESTART, STEPS, P

from stepd.app import create_app
from stepd.auth import hash_secret
from stepd.delegates import DelegateLoadError
from stepd.invariants import check

# -- an injection and traversal corpus -------------------------------------------------------------
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
    for path in (RESTART, FAIL, COMPLETE):
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


# -- STEPD_DELEGATES_PATH --------------------------------------------------------------------------
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
    first.extensions["stepd"].store.db.close()
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


# -- the security headers --------------------------------------------------------------------------
def test_security_headers_on_every_answer(client, api):
    for response in (client.get("/healthz"), client.get("/nowhere"), api.get(P)):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
