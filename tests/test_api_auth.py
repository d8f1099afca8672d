"""SPEC section 6: tokens, roles, Bearer and Basic, STEPD_TOKEN, hashed secrets, the `token` commands."""

import os
import sqlite3
import subprocess

import pytest
from helpers import (
    BULK,
    CANCEL,
    COMPLETE,
    DELEGATES,
    ENV_SECRET,
    ENVELOPE_KEYS,
    FAIL,
    OPENAPI,
    OPERATOR_SECRET,
    READER_SECRET,
    RESTART,
    ROOT,
    SKIP,
    STEPD,
    STEPS,
    P,
    basic,
    run_cli,
)

from stepd.app import create_app
from stepd.auth import hash_secret

# Every route under /api/v1 that needs credentials, with a body a POST would accept in shape.
ROUTES = [
    ("GET", P, None),
    ("POST", P, {"steps": [{"type": "noop"}]}),
    ("GET", f"{P}/SomeProcessId", None),
    ("GET", STEPS, None),
    ("GET", f"{STEPS}/SomeStepId", None),
    ("POST", RESTART, {"processStepId": "SomeStepId"}),
    ("POST", BULK, {"processStepIds": ["SomeStepId"]}),
    ("POST", FAIL, {"processStepId": "SomeStepId"}),
    ("POST", COMPLETE, {"processStepId": "SomeStepId"}),
    ("POST", CANCEL, {"processId": "SomeProcessId"}),
    ("POST", SKIP, {"processStepId": "SomeStepId"}),
    ("GET", DELEGATES, None),
]
OPEN_ROUTES = ["/healthz", OPENAPI]


def call(client, method, path, body, authorization=None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    return client.open(path, method=method, headers=headers, json=body)


def assert_401(response):
    assert response.status_code == 401, response.get_data(as_text=True)[:300]
    assert response.json["message"] == "Unauthorized request"
    assert set(response.json) == ENVELOPE_KEYS
    challenge = response.headers.get("WWW-Authenticate", "")
    assert "Bearer" in challenge or "Basic" in challenge, challenge


def test_the_route_table_covers_every_secured_route(app):
    """So a new endpoint cannot slip past the tests below without credentials checks."""
    secured = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1/") and rule.rule != OPENAPI
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    covered = set()
    for method, path, _ in ROUTES:
        adapter = app.url_map.bind("localhost")
        endpoint, _ = adapter.match(path, method=method)
        covered |= {(method, r.rule) for r in app.url_map.iter_rules(endpoint)}
    assert covered == secured


# -- 401 -------------------------------------------------------------------------------------------
BAD_CREDENTIALS = [
    ("missing", None),
    ("bearer-wrong", "Bearer not-a-token"),
    ("bearer-empty", "Bearer "),
    ("bearer-secret-plus-one", f"Bearer {OPERATOR_SECRET}x"),
    ("bearer-secret-prefix", f"Bearer {OPERATOR_SECRET[:-1]}"),
    ("bearer-the-stored-hash", f"Bearer {hash_secret(OPERATOR_SECRET)}"),
    ("bearer-name-colon-secret", f"Bearer ops:{OPERATOR_SECRET}"),
    ("no-scheme", OPERATOR_SECRET),
    ("other-scheme", f"Token {OPERATOR_SECRET}"),
    ("basic-wrong-secret", basic("ops", "wrong")),
    ("basic-unknown-name", basic("nobody", OPERATOR_SECRET)),
    ("basic-someone-elses-secret", basic("viewer", OPERATOR_SECRET)),
    ("basic-no-name", basic("", OPERATOR_SECRET)),
    ("basic-no-secret", basic("ops", "")),
    ("basic-env-without-stepd-token", basic("env", OPERATOR_SECRET)),
    ("basic-the-stored-hash", basic("ops", hash_secret(OPERATOR_SECRET))),
    ("basic-not-base64", "Basic !!!not-base64!!!"),
]


@pytest.mark.parametrize("authorization", [c[1] for c in BAD_CREDENTIALS], ids=[c[0] for c in BAD_CREDENTIALS])
def test_missing_or_wrong_credentials_are_401_on_every_secured_route(client, api, authorization):
    for method, path, body in ROUTES:
        assert_401(call(client, method, path, body, authorization))
    assert api.process_count() == 0


def test_401_comes_before_404_and_412(client):
    assert_401(client.get(f"{P}/NoSuchProcess"))
    assert_401(client.post(P, data=b"not json", content_type="text/plain"))
    assert_401(client.get(f"{P}?limit=0"))


@pytest.mark.parametrize("path", OPEN_ROUTES)
def test_health_and_the_openapi_document_need_no_credentials(client, path):
    assert client.get(path).status_code == 200


# -- roles ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_a_reader_may_get_but_every_post_is_403(client, api, scheme):
    authorization = f"Bearer {READER_SECRET}" if scheme == "bearer" else basic("viewer", READER_SECRET)
    for method, path, body in ROUTES:
        response = call(client, method, path, body, authorization)
        if method == "GET":
            assert response.status_code in (200, 404), (path, response.json)
        else:
            assert response.status_code == 403, (path, response.json)
            assert response.json["message"] == "Forbidden"
            assert isinstance(response.json["data"], str) and response.json["data"]
            # The credentials were good: a challenge to send others would mislead (RFC 9110 puts it on 401 only).
            assert "WWW-Authenticate" not in response.headers, path
    assert api.process_count() == 0


def test_403_comes_before_body_validation(client):
    response = client.post(
        P, data=b"not json", content_type="text/plain", headers={"Authorization": f"Bearer {READER_SECRET}"}
    )
    assert response.status_code == 403


@pytest.mark.parametrize(
    "authorization", [f"Bearer {OPERATOR_SECRET}", basic("ops", OPERATOR_SECRET)], ids=["bearer", "basic"]
)
def test_an_operator_may_call_everything_with_bearer_or_basic(api, client, authorization):
    response = call(client, "POST", P, {"steps": [{"type": "check", "params": {}}]}, authorization)
    assert response.status_code == 201
    process = api.wait_process(response.json["data"]["processId"], "FAILED")
    step_id = process["steps"][0]["processStepId"]
    restart = call(client, "POST", RESTART, {"processStepId": step_id}, authorization)
    assert restart.status_code == 200
    for method, path, _ in ROUTES:
        if method == "GET":
            assert call(client, method, path, None, authorization).status_code in (200, 404)
    history = api.step(step_id)["attemptHistory"]
    assert [a["principal"] for a in history] == ["ops", "ops"]


def test_a_revoked_token_is_401(app, client, store):
    headers = {"Authorization": f"Bearer {READER_SECRET}"}
    assert client.get(P, headers=headers).status_code == 200
    assert store.revoke_token("viewer")
    for method, path, body in ROUTES:
        assert_401(call(client, method, path, body, headers["Authorization"]))
        assert_401(call(client, method, path, body, basic("viewer", READER_SECRET)))


# -- STEPD_TOKEN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "authorization", [f"Bearer {ENV_SECRET}", basic("env", ENV_SECRET)], ids=["bearer", "basic-env"]
)
def test_stepd_token_is_an_operator_named_env(env_app, authorization):
    client = env_app.test_client()
    headers = {"Authorization": authorization}
    response = client.post(P, json={"steps": [{"type": "noop"}, {"type": "noop"}]}, headers=headers)
    assert response.status_code == 201
    step_id = response.json["data"]["steps"][0]["processStepId"]
    detail = client.get(f"{STEPS}/{step_id}", headers=headers).json["data"]
    assert detail["attemptHistory"][0]["principal"] == "env"


@pytest.mark.parametrize(
    "authorization",
    [basic("admin", ENV_SECRET), basic("ops", ENV_SECRET), basic("env", "wrong"), f"Bearer {ENV_SECRET}x"],
    ids=["other-name", "fixture-name", "env-wrong-secret", "bearer-wrong"],
)
def test_stepd_token_only_with_its_own_secret_and_name(env_app, authorization):
    assert_401(env_app.test_client().get(P, headers={"Authorization": authorization}))


def test_stepd_token_is_not_accepted_when_unset(client):
    assert_401(client.get(P, headers={"Authorization": f"Bearer {ENV_SECRET}"}))
    assert_401(client.get(P, headers={"Authorization": basic("env", ENV_SECRET)}))


# -- the token commands ----------------------------------------------------------------------------------
def cli(app, *args):
    return run_cli(app.config["STEPD_DB"], "token", *args)


def create(app, name, role):
    result = cli(app, "create", name, "--role", role)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    secret = lines[-1]
    assert secret and secret == secret.strip() and " " not in secret and "\t" not in secret
    assert name not in secret and role not in secret
    return secret, result.stdout


def test_token_create_prints_the_secret_alone_on_the_last_line_and_it_works(app, client, api):
    secret, stdout = create(app, "deploy-bot", "operator")
    assert stdout.endswith(secret + "\n")
    bearer = {"Authorization": f"Bearer {secret}"}
    response = client.post(P, json={"steps": [{"type": "noop"}]}, headers=bearer)
    assert response.status_code == 201
    step_id = response.json["data"]["steps"][0]["processStepId"]
    assert api.step(step_id)["attemptHistory"][0]["principal"] == "deploy-bot"
    assert client.get(P, headers={"Authorization": basic("deploy-bot", secret)}).status_code == 200


def test_a_reader_token_from_the_command_may_only_read(app, client):
    secret, _ = create(app, "dashboard", "reader")
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get(P, headers=headers).status_code == 200
    assert client.post(P, json={"steps": [{"type": "noop"}]}, headers=headers).status_code == 403


def test_every_created_secret_is_new(app):
    secrets = {create(app, f"bot{i}", "reader")[0] for i in range(5)}
    assert len(secrets) == 5


def test_secrets_are_stored_hashed(app, db_path):
    secret, _ = create(app, "hashed", "operator")
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT * FROM tokens").fetchall()
    assert len(rows) == 3  # ops, viewer (from the fixture) and hashed
    for row in rows:
        for value in row:
            assert secret not in str(value)
    on_disk = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    assert secret.encode() not in on_disk


def test_token_list_shows_names_and_roles_only(app):
    secret, _ = create(app, "lister", "reader")
    result = cli(app, "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    by_name = {line.split()[0]: line.split()[1] for line in lines if line.strip()}
    assert by_name == {"lister": "reader", "ops": "operator", "viewer": "reader"}
    for leaked in (secret, hash_secret(secret), OPERATOR_SECRET, hash_secret(OPERATOR_SECRET)):
        assert leaked not in result.output


def test_token_revoke_makes_it_401(app, client):
    secret, _ = create(app, "short-lived", "operator")
    assert client.get(P, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    result = cli(app, "revoke", "short-lived")
    assert result.exit_code == 0, result.output
    assert_401(client.get(P, headers={"Authorization": f"Bearer {secret}"}))
    assert_401(client.get(P, headers={"Authorization": basic("short-lived", secret)}))
    assert "short-lived" not in cli(app, "list").stdout
    assert client.get(P, headers={"Authorization": f"Bearer {OPERATOR_SECRET}"}).status_code == 200


def test_revoking_an_unknown_token_fails(app):
    assert cli(app, "revoke", "nobody").exit_code != 0


def test_creating_a_taken_name_fails_and_keeps_the_old_secret(app, client):
    secret, _ = create(app, "twice", "operator")
    result = cli(app, "create", "twice", "--role", "reader")
    assert result.exit_code != 0
    assert (
        client.post(P, json={"steps": [{"type": "noop"}]}, headers={"Authorization": f"Bearer {secret}"}).status_code
        == 201
    )


@pytest.mark.parametrize(
    "args",
    [
        ["create", "x", "--role", "admin"],
        ["create", "x"],
        ["create", "env", "--role", "operator"],
        ["create", "has space", "--role", "reader"],
        ["create", "", "--role", "reader"],
    ],
    ids=["bad-role", "no-role", "name-env", "name-with-space", "empty-name"],
)
def test_token_create_refuses_bad_input_and_creates_nothing(app, args):
    result = cli(app, *args)
    assert result.exit_code != 0
    assert {line.split()[0] for line in cli(app, "list").stdout.splitlines() if line.strip()} == {"ops", "viewer"}


def test_the_real_stepd_command_creates_lists_and_revokes(tmp_path):
    """`.venv/bin/stepd token …` from the checkout, as an operator runs it."""
    db = tmp_path / "cli" / "stepd.db"
    served = create_app({"STEPD_DB": str(db)})  # the service made the database (a command never does)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPD_", "FLASK_"))}
    env["STEPD_DB"] = str(db)

    def stepd(*args):
        return subprocess.run(
            [str(STEPD), "token", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    created = stepd("create", "ci-runner", "--role", "operator")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.splitlines()[-1]
    assert secret.strip() == secret and secret

    listed = stepd("list")
    assert listed.returncode == 0, listed.stderr
    assert "ci-runner" in listed.stdout and "operator" in listed.stdout and secret not in listed.stdout

    client = served.test_client()
    assert client.get(P, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert client.get(P, headers={"Authorization": basic("ci-runner", secret)}).status_code == 200

    revoked = stepd("revoke", "ci-runner")
    assert revoked.returncode == 0, revoked.stderr
    assert_401(client.get(P, headers={"Authorization": f"Bearer {secret}"}))


def stepd_from(folder, *args, db=None):
    """`.venv/bin/stepd token …` run from `folder`, as from another directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPD_", "FLASK_"))}
    if db is not None:
        env["STEPD_DB"] = str(db)
    return subprocess.run(
        [str(STEPD), "token", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args", [["list"], ["create", "bot", "--role", "operator"], ["revoke", "admin"]], ids=lambda a: a[0]
)
def test_a_token_command_without_a_database_refuses_in_one_line_and_creates_none(tmp_path, args):
    """Run from another folder, STEPD_DB's default var/stepd.db is not the service's: say so, make nothing."""
    done = stepd_from(tmp_path, *args)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert str(tmp_path / "var" / "stepd.db") in lines[0] and "STEPD_DB" in lines[0], lines
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_token_command_names_the_database_it_used(tmp_path):
    db = tmp_path / "service" / "stepd.db"
    create_app({"STEPD_DB": str(db)})  # the service's database
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    created = stepd_from(elsewhere, "create", "bot", "--role", "reader", db=db)
    assert created.returncode == 0, created.stderr
    assert f"stepd: database {db}" in created.stderr
    listed = stepd_from(elsewhere, "list", db=db)
    assert listed.returncode == 0 and listed.stdout.split()[:2] == ["bot", "reader"], listed
    assert f"stepd: database {db}" in listed.stderr
    assert list(elsewhere.iterdir()) == []
