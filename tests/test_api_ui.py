"""The operator page, /ui/, through Flask's test client: who may see and act, CSRF and Origin
refusals that change nothing, the headers of every HTML answer, escaping of user data, and each
action (restart as is or with edited typed params, dry run, skip, cancel, bulk restart) acting
exactly once per form. The same flows in a real browser: tests/test_served_ui_browser.py."""

import re
from datetime import UTC, datetime, timedelta

import flask
import pytest
from helpers import (
    CANCEL,
    COMPLETE,
    ENV_SECRET,
    OPERATOR_SECRET,
    RESTART,
    UI,
    Page,
    basic,
    calls,
    db_dump,
    db_write,
    forms_of,
    insert_failed_steps,
    ok,
    out,
    text_of,
    wait_for,
)

from stepd.auth import hash_secret
from stepd.model import iso, now_iso

EVIL = '<script>alert("owned")</script>'
EVIL_ATTRIBUTE = '"><img src=x onerror=alert(1)>'


def step_url(step_id):
    return f"{UI}steps/{step_id}"


def failed_check(api, **params):
    """A FAILED `check` step (ok=0 unless given), followed by a `noop`; its step data."""
    process = api.start(("check", {"ok": 0, **params}), ("noop", {}))
    return api.wait_process(process["processId"], "FAILED")["steps"][0]


def action_forms(html):
    return [form for form in forms_of(html) if form["method"] == "post" and form["action"] != "/ui/sign-out"]


def restart_fields(page, step_id, **changes):
    """The restart form's fields with `changes`, and intent=restart."""
    _, fields = page.form(step_url(step_id), "restart-form")
    return {**fields, **changes, "intent": "restart"}


def value_input(html, input_id):
    """The value attribute of the input `input_id`, as the browser reads it."""
    found = re.search(rf'<input id="{re.escape(input_id)}" [^>]*value="([^"]*)"', html)
    assert found, input_id
    return text_of(found.group(1))


# -- who may see and act -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", [UI, f"{UI}failed", f"{UI}steps/abc"])
def test_without_credentials_the_browser_is_asked_for_basic_credentials(client, path):
    response = client.get(path)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="stepd"')
    assert response.mimetype == "text/html"
    assert "/ui/sign-in?next=" in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "authorization",
    [basic("ops", "wrong"), basic("nobody", OPERATOR_SECRET), "Bearer nope", "Digest x", basic("env", ENV_SECRET)],
)
def test_bad_credentials_get_the_challenge_again(client, authorization):
    response = client.get(UI, headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_an_operator_token_works_with_basic_and_bearer(page, client):
    assert "Overview" in page.html(UI)
    response = client.get(UI, headers={"Authorization": f"Bearer {OPERATOR_SECRET}"})
    assert response.status_code == 200


def test_a_reader_sees_every_page_and_no_action(api, reader_page, page):
    step = failed_check(api)
    for path in (UI, f"{UI}failed", step_url(step["processStepId"])):
        html = reader_page.html(path)
        assert not action_forms(html), path
        assert ">Restart<" not in html and "Dry run" not in html
    # an operator sees them on the same pages
    forms = {form["id"] for form in action_forms(page.html(step_url(step["processStepId"])))}
    assert forms == {"restart-form", "skip-form", "cancel-form"}
    assert action_forms(page.html(f"{UI}failed"))


def test_a_reader_cannot_post_any_action_even_with_a_good_csrf_token(api, reader_page, page, db_path):
    step = failed_check(api)
    step_id = step["processStepId"]
    # a good form, as an operator's page has it, with the reader's own session token in it
    reader_token = dict(forms_of(reader_page.html(f"{UI}sign-in"))[0]["fields"])["csrf_token"]
    posts = []
    for form_id in ("restart-form", "skip-form", "cancel-form"):
        action, fields = page.form(step_url(step_id), form_id)
        posts.append((action, {**fields, "csrf_token": reader_token, "intent": "restart"}))
    bulk = [f for f in forms_of(page.html(f"{UI}failed")) if f["action"] == "/ui/failed/bulk"][0]
    posts.append((bulk["action"], {**dict(bulk["fields"]), "csrf_token": reader_token}))
    before = db_dump(db_path)
    for action, fields in posts:
        response = reader_page.post(action, fields)
        assert response.status_code == 403, (action, response.get_data(as_text=True)[:300])
        assert "may look, not act" in text_of(response.get_data(as_text=True))
    assert db_dump(db_path) == before


def test_sign_in_with_the_form_then_the_session_alone_lets_in(app, client, store):
    signed = Page(client)  # no Authorization header at all: the browser's cookie only
    [form] = forms_of(signed.html(f"{UI}sign-in?next=/ui/failed"))
    fields = dict(form["fields"])
    assert fields["next"] == "/ui/failed"
    response = signed.post(form["action"], {**fields, "name": "ops", "secret": OPERATOR_SECRET})
    assert response.status_code == 303 and response.headers["Location"] == "/ui/failed"
    cookie = response.headers["Set-Cookie"]
    assert "stepd_session=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/ui/" in cookie
    assert "ops" in signed.html(f"{UI}failed") and "Sign out" in signed.html(UI)
    # revoking the token ends the session at once
    store.revoke_token("ops")
    assert signed.get(UI).status_code == 401
    # made again with another secret: the old session does not come back
    store.add_token("ops", "operator", hash_secret("another-secret-for-ops"))
    assert signed.get(UI).status_code == 401


def test_a_wrong_secret_signs_nobody_in(client):
    signed = Page(client)
    [form] = forms_of(signed.html(f"{UI}sign-in"))
    response = signed.post(form["action"], {**dict(form["fields"]), "name": "ops", "secret": "wrong"})
    assert response.status_code == 401
    assert "WWW-Authenticate" not in response.headers  # the form answers, not the browser's prompt
    assert "No token has this name and secret." in response.get_data(as_text=True)
    assert signed.get(UI).status_code == 401


@pytest.mark.parametrize("where", ["//evil.example/", "https://evil.example/ui/", "/api/v1/processes", "/ui/\\evil"])
def test_sign_in_sends_nowhere_but_the_page(client, where):
    signed = Page(client)
    [form] = forms_of(signed.html(f"{UI}sign-in"))
    fields = {**dict(form["fields"]), "name": "ops", "secret": OPERATOR_SECRET, "next": where}
    assert signed.post(form["action"], fields).headers["Location"] == UI


def test_sign_out_ends_the_session(client):
    signed = Page(client)
    [form] = forms_of(signed.html(f"{UI}sign-in"))
    signed.post(form["action"], {**dict(form["fields"]), "name": "ops", "secret": OPERATOR_SECRET})
    [sign_out] = [f for f in forms_of(signed.html(UI)) if f["action"] == "/ui/sign-out"]
    assert signed.post(sign_out["action"], dict(sign_out["fields"])).status_code == 303
    assert signed.get(UI).status_code == 401


# -- CSRF and Origin: a form from elsewhere changes nothing --------------------------------------------
def test_a_form_without_its_csrf_token_changes_nothing(api, page, db_path):
    step = failed_check(api)
    fields = restart_fields(page, step["processStepId"], **{"p0-value": "1"})
    before = db_dump(db_path)
    for forged in ({k: v for k, v in fields.items() if k != "csrf_token"}, {**fields, "csrf_token": "forged"}):
        response = page.post(step_url(step["processStepId"]) + "/restart", forged)
        assert response.status_code == 403
        assert "CSRF" in text_of(response.get_data(as_text=True))
        assert "Content-Security-Policy" in response.headers
    assert db_dump(db_path) == before


def test_a_csrf_token_of_another_session_changes_nothing(app, api, page, db_path):
    step = failed_check(api)
    fields = restart_fields(page, step["processStepId"], **{"p0-value": "1"})
    stranger = Page(app.test_client(), page.headers)  # the same credentials, another browser
    before = db_dump(db_path)
    assert stranger.post(step_url(step["processStepId"]) + "/restart", fields).status_code == 403
    assert db_dump(db_path) == before


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost:1"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_a_form_posted_from_another_origin_changes_nothing(api, page, db_path, headers):
    step = failed_check(api)
    fields = restart_fields(page, step["processStepId"], **{"p0-value": "1"})  # its token is good
    before = db_dump(db_path)
    response = page.post(step_url(step["processStepId"]) + "/restart", fields, headers=headers)
    assert response.status_code == 403
    assert "another site" in text_of(response.get_data(as_text=True))
    assert db_dump(db_path) == before


def test_a_form_posted_from_the_page_itself_acts(api, page):
    step = failed_check(api)
    fields = restart_fields(page, step["processStepId"], **{"p0-value": "1"})
    headers = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
    assert page.post(step_url(step["processStepId"]) + "/restart", fields, headers=headers).status_code == 303
    api.wait_process(step["processId"], "COMPLETED")


def test_the_json_api_takes_no_csrf_token_and_sets_no_cookie(api, client):
    step = failed_check(api)
    response = api.restart(step["processStepId"], ok=1)
    assert ok(response)["params"]["ok"] == out("LONG", 1)
    assert "Set-Cookie" not in response.headers
    assert "Content-Security-Policy" not in response.headers  # a JSON answer is as it was
    # Basic credentials a browser keeps cannot be used by a form of another site: no form sends JSON
    forged = client.post(RESTART, data={"processStepId": step["processStepId"]}, headers=api.headers)
    assert forged.status_code == 412 and forged.json["data"] == {"_schema": ["Content-Type must be application/json."]}


# -- the headers of every HTML answer ----------------------------------------------------------------
def policy_of(response):
    return dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))


def assert_locked_down(response):
    """A strict policy: scripts only with this answer's nonce, nothing from elsewhere, never framed;
    the page's own script tags carry the nonce, and it has no inline script or style at all."""
    assert response.mimetype == "text/html"
    policy = policy_of(response)
    assert policy["default-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'" and response.headers["X-Frame-Options"] == "DENY"
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert "unsafe-eval" not in response.headers["Content-Security-Policy"]
    assert all(source in ("'self'", "'none'") for name, source in policy.items() if name != "script-src")
    html = response.get_data(as_text=True)
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    nonce = re.fullmatch(r"'nonce-([A-Za-z0-9_-]{16,})'", policy["script-src"]).group(1)
    for attributes, body in scripts:
        assert f'nonce="{nonce}"' in attributes and 'src="/ui/static/' in attributes and not body.strip()
    assert not re.search(r"\son[a-z]+\s*=", html), "an inline event handler"
    assert not re.search(r"\sstyle\s*=", html) and "<style" not in html, "an inline style"
    assert "javascript:" not in html
    assert not re.search(r"""(src|href|action)="(https?:)?//""", html), "a reference to another host"
    return nonce


def test_every_page_is_locked_down_with_a_fresh_nonce(api, page, client):
    step = failed_check(api)
    nonces = set()
    answers = [
        page.get(UI),
        page.get(f"{UI}failed"),
        page.get(step_url(step["processStepId"])),
        client.get(f"{UI}sign-in"),
        client.get(UI),  # 401
        page.get(step_url("no-such-step")),  # 404
        page.get(f"{UI}failed?before=garbage"),  # 412
        page.post(step_url(step["processStepId"]) + "/restart", {}),  # 403: no CSRF token
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 401, 404, 412, 403]
    for response in answers:
        nonces.add(assert_locked_down(response))
    assert len(nonces) == len(answers)


def test_the_script_and_style_sheet_are_served_from_the_page(client):
    with client.get("/ui/static/ui.js") as script:
        assert script.status_code == 200 and script.mimetype in ("text/javascript", "application/javascript")
        code = re.sub(r"^\s*//.*$", "", script.get_data(as_text=True), flags=re.M)  # comments aside
    assert "fetch(window.location.href" in code
    assert not re.search(r"https?:|//[a-z]", code)  # no other host
    with client.get("/ui/static/ui.css") as style:
        assert style.status_code == 200 and style.mimetype == "text/css"
        assert "url(" not in style.get_data(as_text=True) and "@import" not in style.get_data(as_text=True)


# -- user data is escaped everywhere -----------------------------------------------------------------
def assert_escaped(html):
    assert EVIL not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(" in html


def test_params_error_messages_and_process_names_are_escaped(api, page):
    name = f"{EVIL}{EVIL_ATTRIBUTE}"
    params = {"message": name, name: name, "n": 1}
    process = api.start(("fail", params), ("noop", {}), name=name)
    step = api.wait_process(process["processId"], "FAILED")["steps"][0]
    assert step["error"]["message"] == name
    listed, detail = page.html(f"{UI}failed"), page.html(step_url(step["processStepId"]))
    assert_escaped(listed)
    assert_escaped(detail)
    assert text_of(detail).count(name) >= 4  # the process name, the error, a param's name and value
    # as the form's values, attribute-escaped, and back in a dry run's answer
    fields = {**restart_fields(page, step["processStepId"]), "intent": "dry-run"}
    preview = page.post(step_url(step["processStepId"]) + "/restart", fields)
    assert preview.status_code == 200
    assert_escaped(preview.get_data(as_text=True))
    assert "would restart with these params" in preview.get_data(as_text=True)
    # a filter echoed in the list and on a bulk restart's confirmation
    listed = page.get(f"{UI}failed", query_string={"process": name})
    assert_escaped(listed.get_data(as_text=True))
    assert step["processStepId"] in listed.get_data(as_text=True)
    [bulk] = [f for f in forms_of(listed.get_data(as_text=True)) if f["action"] == "/ui/failed/bulk"]
    confirmation = page.post(bulk["action"], dict(bulk["fields"]))
    assert confirmation.status_code == 200
    assert_escaped(confirmation.get_data(as_text=True))
    assert "found 1 step(s) to restart" in text_of(confirmation.get_data(as_text=True))


def test_an_error_message_is_escaped_on_the_failed_list_and_in_the_attempt_history(api, page):
    process = api.start(("external", {}))
    step_id = process["steps"][0]["processStepId"]
    api.wait_deferred(step_id)
    ok(api.post(f"{RESTART.rsplit('/', 1)[0]}/fail-step", {"processStepId": step_id, "error": {"message": EVIL}}))
    for html in (page.html(f"{UI}failed?error_type=ExternalFailure"), page.html(step_url(step_id))):
        assert_escaped(html)
        assert "ExternalFailure" in html


# -- restart -------------------------------------------------------------------------------------------
def test_restart_as_it_is(api, page):
    step = failed_check(api, keep="k")
    response = page.post(step_url(step["processStepId"]) + "/restart", restart_fields(page, step["processStepId"]))
    assert response.status_code == 303
    done = page.html(response.headers["Location"])
    assert "Step restarted (attempt 2)" in text_of(done)
    detail = api.wait_step(step["processStepId"], "FAILED")  # ok is still 0: it fails again
    assert detail["attempts"] == 2
    assert detail["params"] == {"ok": out("LONG", 0), "keep": out("STRING", "k")}


def test_restart_with_a_value_changed_a_type_changed_a_param_added_and_one_removed(api, page):
    step = failed_check(api, keep="k", ratio="0.5", drop="me")
    rows = dict(re.findall(r'name="(p[0-9]+)-name" value="([^"]+)"', page.html(step_url(step["processStepId"]))))
    row = {name: key for key, name in rows.items()}
    changes = {
        f"{row['ok']}-value": "1",  # a value changed
        f"{row['ratio']}-type": "DOUBLE",  # a type changed (was the STRING "0.5")
        f"{row['drop']}-remove": "on",  # a param removed
        "n0-name": "added",  # a param added
        "n0-type": "LONG",
        "n0-value": "-7",
    }
    fields = restart_fields(page, step["processStepId"], **changes)
    response = page.post(step_url(step["processStepId"]) + "/restart", fields)
    assert response.status_code == 303, response.get_data(as_text=True)[:2000]
    api.wait_process(step["processId"], "COMPLETED")
    detail = api.step(step["processStepId"])
    assert detail["params"] == {
        "ok": out("LONG", 1),
        "keep": out("STRING", "k"),
        "ratio": out("DOUBLE", 0.5),
        "added": out("LONG", -7),
    }
    assert detail["attemptHistory"][1]["principal"] == "ops"
    # the attempt history says what changed from the attempt before
    history = text_of(page.html(step_url(step["processStepId"])))
    for said in ("added added: LONG -7", "drop removed (was STRING me", "ok changed: LONG 0 → LONG 1"):
        assert said in history
    assert "ratio changed: STRING 0.5 → DOUBLE 0.5" in history
    # and which request began each attempt: the page's own restart has the id it answered with
    assert response.headers["X-Request-Id"] in re.findall(
        r'<td class="request-id"><code>([^<]+)</code>', page.html(step_url(step["processStepId"]))
    )
    assert detail["attemptHistory"][1]["requestId"] == response.headers["X-Request-Id"]


def test_each_params_input_is_labelled_with_its_name_and_the_button_reads_restart(api, page):
    step = failed_check(api, keep="k")
    html = page.html(step_url(step["processStepId"]))
    [form] = [f for f in forms_of(html) if f["id"] == "restart-form"]
    for name in ("ok", "keep"):
        input_id = re.search(rf'<label for="([^"]+)"><code>{name}</code></label>', html).group(1)
        assert re.search(rf'<input id="{input_id}" name="p[0-9]+-value"', html), name
        assert f'aria-label="type of {name}"' in html
    assert ("intent", "restart", "Restart") in form["buttons"]
    assert ("intent", "dry-run", "Dry run") in form["buttons"]


def test_a_dry_run_shows_the_effective_params_and_changes_nothing(api, page, db_path):
    step = failed_check(api, keep="k")
    fields = restart_fields(page, step["processStepId"], **{"p0-remove": "on", "n0-name": "x", "n0-value": "y"})
    before = db_dump(db_path)
    response = page.post(step_url(step["processStepId"]) + "/restart", {**fields, "intent": "dry-run"})
    assert response.status_code == 200
    assert db_dump(db_path) == before
    html = response.get_data(as_text=True)
    preview = text_of(re.search(r'<div class="preview".*?</div>', html, re.S).group(0))
    assert "would restart with these params" in preview
    assert "ok LONG 0" in preview and "x STRING y" in preview and "keep" not in preview  # p0 is keep (sorted)
    assert 'data-refresh="0"' in html  # its URL takes only a POST: it does not refresh itself
    # what was entered is kept, and the same key goes on to the real restart
    [form] = [f for f in forms_of(html) if f["id"] == "restart-form"]
    kept = dict(form["fields"])
    assert kept["n0-name"] == "x" and kept["p0-remove"] == "on"
    assert kept["idempotency_key"] == fields["idempotency_key"]


@pytest.mark.parametrize(
    ("field", "typed_in", "said"),
    [
        ("p0-value", "abc", "Not a whole number"),
        ("p0-value", "99999999999999999999", "less than or equal to 9223372036854775807"),
        ("n0-value", "1e999", "Special numeric values"),
        ("n0-name", "x" * 129, "Length must be between 1 and 128."),
        ("n0-name", "ok", "'ok' is given twice"),
    ],
)
def test_a_412_is_shown_beside_its_field_with_the_values_kept(api, page, db_path, field, typed_in, said):
    step = failed_check(api)
    changes = {"p0-value": "5", "n0-name": "ratio", "n0-type": "DOUBLE", "n0-value": "0.25", field: typed_in}
    fields = restart_fields(page, step["processStepId"], **changes)
    before = db_dump(db_path)
    response = page.post(step_url(step["processStepId"]) + "/restart", fields)
    assert response.status_code == 412
    assert db_dump(db_path) == before
    html = response.get_data(as_text=True)
    # the message sits right after its input, which points at it
    input_id = f"restart-{field}"
    found = re.search(rf'<input id="{input_id}"[^>]*aria-invalid="true" aria-describedby="{input_id}-error">\s*'
                      rf'<p class="field-error" id="{input_id}-error">([^<]*)</p>', html)  # fmt: skip
    assert found and said in text_of(found.group(1)), html[html.find(input_id) - 200 : html.find(input_id) + 600]
    assert 'data-refresh="0"' in html
    # every value entered is still there
    [form] = [f for f in forms_of(html) if f["id"] == "restart-form"]
    assert {k: v for k, v in form["fields"] if k in changes} == changes


def test_a_412_of_the_state_is_shown_above_the_form(api, page, db_path):
    step = failed_check(api)
    fields = restart_fields(page, step["processStepId"], **{"p0-value": "1"})
    api.restart(step["processStepId"], ok=1)
    api.wait_process(step["processId"], "COMPLETED")
    response = page.post(step_url(step["processStepId"]) + "/restart", fields)
    assert response.status_code == 412
    assert "Step is COMPLETED; only a FAILED step can be restarted." in text_of(response.get_data(as_text=True))


def test_more_than_256_names_after_the_overlay_is_shown_beside_the_params(api, page):
    step = failed_check(api, **{f"p{n:03}": n for n in range(255)})  # 256 with ok
    fields = restart_fields(page, step["processStepId"], **{"n0-name": "one-more", "n0-value": "x"})
    response = page.post(step_url(step["processStepId"]) + "/restart", fields)
    assert response.status_code == 412
    said = re.search(r'<p class="field-error" id="restart-params-error">([^<]*)</p>', response.get_data(as_text=True))
    assert said and "At most 256 names are allowed." in said.group(1)


# -- a double submit acts once -----------------------------------------------------------------------
def test_the_same_form_sent_twice_restarts_once_and_shows_the_same_result(api, page, counted):
    process = api.start(("count", {"file": str(counted), "fail": 1}))
    step_id = api.wait_process(process["processId"], "FAILED")["steps"][0]["processStepId"]
    fields = restart_fields(page, step_id)
    first = page.post(step_url(step_id) + "/restart", fields)
    second = page.post(step_url(step_id) + "/restart", fields)
    assert first.status_code == second.status_code == 303
    assert first.headers["Location"] == second.headers["Location"]
    wait_for(lambda: api.step(step_id)["status"] == "FAILED" and len(calls(counted)) == 2)
    third = page.post(step_url(step_id) + "/restart", fields)  # even once the step is FAILED again
    assert third.headers["Location"] == first.headers["Location"]
    assert calls(counted) == [(step_id, 1), (step_id, 2)]
    assert api.step(step_id)["attempts"] == 2
    assert "Step restarted (attempt 2)" in text_of(page.html(first.headers["Location"]))


def test_the_same_key_with_other_values_is_refused(api, page, db_path):
    step = failed_check(api)
    fields = restart_fields(page, step["processStepId"])
    assert page.post(step_url(step["processStepId"]) + "/restart", fields).status_code == 303
    api.wait_step(step["processStepId"], "FAILED")
    before = db_dump(db_path)
    response = page.post(step_url(step["processStepId"]) + "/restart", {**fields, "p0-value": "1"})
    assert response.status_code == 412
    assert "already sent with other values" in text_of(response.get_data(as_text=True))
    assert db_dump(db_path) == before


def test_a_form_without_a_key_the_page_made_does_nothing(api, page, db_path):
    step = failed_check(api)
    fields = restart_fields(page, step["processStepId"], idempotency_key="not-one-of-ours")
    before = db_dump(db_path)
    response = page.post(step_url(step["processStepId"]) + "/restart", fields)
    assert response.status_code == 412 and "reload the page" in text_of(response.get_data(as_text=True))
    assert db_dump(db_path) == before


def test_a_replayed_412_shows_the_same_refusal(api, page):
    step = failed_check(api)
    fields = restart_fields(page, step["processStepId"])
    ok(api.post(CANCEL, {"processId": step["processId"]}))  # cancelled through the API meanwhile
    refusals = [page.post(step_url(step["processStepId"]) + "/restart", fields) for _ in range(2)]
    assert [r.status_code for r in refusals] == [412, 412]
    for response in refusals:
        assert "only a FAILED step can be restarted" in response.get_data(as_text=True)


# -- skip and cancel -------------------------------------------------------------------------------------
def test_skip_with_a_result_and_a_reason_and_the_next_step_sees_the_result(api, page):
    process = api.start(("check", {"ok": 0}), ("need", {"name": "made"}))
    step = api.wait_process(process["processId"], "FAILED")["steps"][0]
    changes = {"n0-name": "made", "n0-type": "STRING", "n0-value": "by hand", "reason": "made by hand, see ticket 7"}
    response = page.submit(step_url(step["processStepId"]), "skip-form", changes)
    assert response.status_code == 303
    assert "Step skipped" in text_of(page.html(response.headers["Location"]))
    done = api.wait_process(process["processId"], "COMPLETED")
    assert done["steps"][0]["status"] == "SKIPPED"
    assert done["steps"][0]["result"] == {"made": out("STRING", "by hand")}
    assert done["steps"][0]["intervention"]["reason"] == "made by hand, see ticket 7"
    assert done["steps"][1]["result"] == {"got": out("STRING", "by hand")}


def test_skip_refuses_a_bad_result_beside_its_field(api, page, db_path):
    step = failed_check(api)
    before = db_dump(db_path)
    changes = {"n1-name": "count", "n1-type": "LONG", "n1-value": "many", "reason": "r" * 2000}
    response = page.submit(step_url(step["processStepId"]), "skip-form", changes)
    assert response.status_code == 412
    html = response.get_data(as_text=True)
    assert 'id="skip-n1-value-error">Not a whole number' in html
    assert re.search(r'id="skip-reason-error">Longer than maximum length 1024', html)
    assert value_input(html, "skip-n1-value") == "many"
    assert db_dump(db_path) == before


def test_cancel_the_process_with_a_reason(api, page):
    step = failed_check(api)
    response = page.submit(step_url(step["processStepId"]), "cancel-form", {"reason": "customer gave up"})
    assert response.status_code == 303
    cancelled = api.process(step["processId"])
    assert cancelled["status"] == "CANCELLED"
    assert cancelled["intervention"]["reason"] == "customer gave up"
    assert [s["status"] for s in cancelled["steps"]] == ["CANCELLED", "CANCELLED"]
    html = page.html(response.headers["Location"])
    assert "Process cancelled" in text_of(html) and not action_forms(html)


def test_a_deferred_steps_process_can_be_cancelled_but_not_the_step_restarted(api, page):
    process = api.start(("external", {}), ("noop", {}))
    step_id = process["steps"][0]["processStepId"]
    api.wait_deferred(step_id)
    forms = {form["id"] for form in action_forms(page.html(step_url(step_id)))}
    assert forms == {"cancel-form"}
    ok(api.post(COMPLETE, {"processStepId": step_id}))
    api.wait_process(process["processId"], "COMPLETED")
    assert not action_forms(page.html(step_url(step_id)))


# -- bulk restart ----------------------------------------------------------------------------------------
def test_bulk_restart_acts_on_exactly_what_the_dry_run_counted(api, page, store):
    ids = insert_failed_steps(store, 5, step_type="fail")
    insert_failed_steps(store, 3, step_type="noop")  # another type: not matched
    listed = page.get(f"{UI}failed", query_string={"type": "fail"}).get_data(as_text=True)
    [bulk] = [f for f in forms_of(listed) if f["action"] == "/ui/failed/bulk"]
    assert dict(bulk["fields"])["type"] == "fail"
    confirmation = page.post(bulk["action"], dict(bulk["fields"])).get_data(as_text=True)
    assert "The dry run found 5 step(s) to restart" in text_of(confirmation)
    [confirm] = [f for f in forms_of(confirmation) if f["action"] == "/ui/failed/bulk/restart"]
    assert confirm["buttons"] == [(None, None, "Restart 5 step(s)")]
    fields = dict(confirm["fields"])
    assert sorted(fields["ids"].split()) == sorted(ids)
    later = insert_failed_steps(store, 2, step_type="fail", start=None)  # fail after the dry run...
    db_write(store.db.path, f"UPDATE steps SET finished_at = ? WHERE id IN ('{later[0]}', '{later[1]}')", now_iso())
    response = page.post(confirm["action"], fields)
    assert response.status_code == 303
    assert response.headers["Location"].startswith("/ui/failed?type=fail&done=")
    said = text_of(page.html(response.headers["Location"]))
    assert "5 step(s) restarted." in said
    assert "2 more step(s) matching this filter failed after the dry run; they were not included." in said
    for step_id in ids:
        wait_for(lambda s=step_id: api.step(s)["attempts"] == 2, what="the counted steps restarted")
    assert [api.step(s)["attempts"] for s in later] == [1, 1]
    # sent again (a double click): the same answer, nothing more restarted
    again = page.post(confirm["action"], fields)
    assert again.headers["Location"] == response.headers["Location"]
    assert [api.step(s)["attempts"] for s in ids] == [2] * 5


def test_bulk_restart_by_error_type_and_process_name(api, page):
    mine = [api.start(("fail", {"message": f"m{n}"}), name="nightly-sync") for n in range(3)]
    other = api.start(("fail", {}), name="weekly")
    for process in [*mine, other]:
        api.wait_process(process["processId"], "FAILED")
    query = {"error_type": "StepFailure", "process": "nightly-sync"}
    listed = page.get(f"{UI}failed", query_string=query).get_data(as_text=True)
    assert text_of(listed).count("StepFailure") == 3
    [bulk] = [f for f in forms_of(listed) if f["action"] == "/ui/failed/bulk"]
    confirmation = page.post(bulk["action"], dict(bulk["fields"])).get_data(as_text=True)
    assert "found 3 step(s)" in text_of(confirmation)
    [confirm] = [f for f in forms_of(confirmation) if f["action"] == "/ui/failed/bulk/restart"]
    assert page.post(confirm["action"], dict(confirm["fields"])).status_code == 303
    for process in mine:
        wait_for(lambda p=process: api.process(p["processId"])["steps"][0]["attempts"] == 2)
    assert api.process(other["processId"])["steps"][0]["attempts"] == 1


def test_a_dry_run_that_finds_nothing_offers_no_restart(page):
    listed = page.html(f"{UI}failed?type=nothing-of-this-type")
    assert "No FAILED step matches this filter." in text_of(listed)
    assert not [f for f in forms_of(listed) if f["action"] == "/ui/failed/bulk"]


def test_bulk_restart_refuses_ids_the_dry_run_could_not_have_made(page, db_path):
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.html(f"{UI}sign-in"))[1]
    before = db_dump(db_path)
    for ids in ("", "a b a", "bad/id", " ".join(f"id{n}" for n in range(1001))):
        fields = {"csrf_token": token, "idempotency_key": "0" * 32, "ids": ids, "until": now_iso()}
        assert page.post("/ui/failed/bulk/restart", fields).status_code == 412
    assert db_dump(db_path) == before


# -- the failed list and the overview ---------------------------------------------------------------------
def test_the_failed_list_is_newest_first_paged_and_filtered(api, page, store):
    ids = insert_failed_steps(store, 60, step_type="fail")  # 1 ms apart, oldest first
    first = page.html(f"{UI}failed?type=fail")
    shown = re.findall(r'href="/ui/steps/([A-Za-z0-9_-]+)"', first)
    assert shown == ids[::-1][:50]
    older = re.search(r'<a href="([^"]+)" rel="next">Older</a>', first).group(1)
    assert "type=fail" in older
    second = page.html(text_of(older))
    assert re.findall(r'href="/ui/steps/([A-Za-z0-9_-]+)"', second) == ids[::-1][50:]
    assert 'rel="next"' not in second and "Newest" in second
    # each row says its error, with its type
    assert text_of(first).count("StepFailure inserted") == 50


def test_the_failed_list_refuses_a_filter_longer_than_the_api_takes(page):
    response = page.get(f"{UI}failed", query_string={"process": "x" * 1025})
    assert response.status_code == 412
    assert "longer than 1024" in text_of(response.get_data(as_text=True))


def test_the_overview_counts_charts_and_says_the_oldest_queued_age(fresh_app, tmp_path):
    client = fresh_app.test_client()
    viewer = Page(client, {"Authorization": basic("env", ENV_SECRET)})
    store = fresh_app.extensions["stepd"].store
    insert_failed_steps(store, 2, step_type="fail", start=None)
    db_write(store.db.path, "UPDATE steps SET finished_at = ?", now_iso())
    db_write(store.db.path, "UPDATE attempts SET finished_at = ?", now_iso())
    # an attempt queued 90 s ago that no runner claimed (this app runs none)
    queued_at = iso(datetime.now(UTC) - timedelta(seconds=90))
    db_write(
        store.db.path,
        "UPDATE steps SET status = 'STARTED', runner_id = NULL, started_at = ?"
        " WHERE id = (SELECT id FROM steps LIMIT 1)",
        queued_at,
    )
    # and in the tallies the counts by status are read from, as the store would have counted it
    db_write(store.db.path, "UPDATE tally SET n = n - 1 WHERE series = 'steps' AND a = 'FAILED'")
    db_write(store.db.path, "UPDATE tally SET n = n + 1 WHERE series = 'steps' AND a = 'STARTED'")
    html = viewer.html(UI)
    said = text_of(html)
    assert re.search(r"Queue 9[0-9]\.[0-9] s", said), said
    assert "FAILED 1" in said and "STARTED 1" in said
    assert "completed 0" in said and "failed 2" in said and "interrupted 0" in said
    assert "0 live" in said
    assert html.count('<rect class="failed"') == 1  # one bar, in this minute
    assert "Attempt outcomes per minute over the last hour: 0 completed, 2 failed, 0 interrupted" in html


def test_an_unknown_step_is_a_404_page(page):
    response = page.get(step_url("no-such-step"))
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert "No step has this id." in response.get_data(as_text=True)


def test_only_the_page_opens_a_session(app):
    """The session is the page's alone (its cookie's path is /ui/): a request to the API gets the
    null session without its cookie being looked for, a request to the page a real one."""
    interface = app.session_interface
    with app.test_request_context("/api/v1/processes", headers={"Cookie": "stepd_session=x"}):
        assert interface.is_null_session(interface.open_session(app, flask.request))
    with app.test_request_context("/ui/"):
        assert not interface.is_null_session(interface.open_session(app, flask.request))
