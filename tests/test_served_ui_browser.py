"""The operator page in a real browser: Playwright driving Debian's chromium against the real
service (`stepd serve`, its workers and runner process: the shared `served`). Signing in as an
operator (the browser's Basic prompt) and as a reader (the form), filtering, restarting with an
edited param until the process completes, a dry run, a bulk restart's confirmation count, a
double click that acts once, skip and cancel, the auto-refresh pausing while a form is edited,
and every request the pages make going to 127.0.0.1 only (fixture `browse`)."""

import re
import sqlite3
import time
from html import unescape

from helpers import UI, calls, run_cli, wait_for
from playwright.sync_api import expect

from stepd.model import new_id

REFRESH_SECONDS = 5  # views.REFRESH_SECONDS: how long a test waits to see a refresh happen, or not
expect.set_options(timeout=10_000)  # a loaded machine (two test processes, a service each) is slow


def unique(prefix):
    return f"{prefix}-{new_id()[-10:]}"  # the random end (an id starts with its time)


def failed_step(served, *steps, name=None):
    """The first step of a new process of `steps` (default: a failing `check`, then `noop`), once FAILED."""
    process = served.start_process(*(steps or (("check", {"ok": 0}), ("noop", {}))), name=name)
    return served.wait_process(process["processId"], "FAILED")["steps"][0]


def rows(page):
    return page.locator("table.failed tbody tr")


def test_an_operator_signs_in_through_the_browsers_prompt_and_sees_the_actions(served, browse):
    step = failed_step(served)
    page = browse()  # the Basic credentials the browser's prompt would send
    page.goto(f"{UI}steps/{step['processStepId']}")
    expect(page.locator("header .who")).to_have_text("env operator")
    expect(page.get_by_role("button", name="Restart", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Dry run", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Skip", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Cancel the process", exact=True)).to_be_visible()

    nobody = browse(None)  # no credentials: the 401 that makes a browser prompt (headless, it has none)
    answer = nobody.request.get(UI)
    assert answer.status == 401 and answer.headers["www-authenticate"].startswith('Basic realm="stepd"')
    assert "sign in with a form" in answer.text()


def test_a_reader_signs_in_with_the_form_and_sees_no_action(served, browse):
    name = unique("viewer")
    secret = run_cli(served.env["STEPD_DB"], "token", "create", name, "--role", "reader").output.splitlines()[-1]
    process_name = unique("reader-sees")
    step = failed_step(served, name=process_name)
    page = browse(None)
    # The 401 makes a browser prompt for Basic credentials; headless chromium has no prompt, so the
    # test follows the link of the page a person sees when they dismiss it.
    answer = page.request.get(f"{UI}failed?process={process_name}")
    assert answer.status == 401 and answer.headers["www-authenticate"].startswith("Basic")
    page.goto(unescape(re.search(r'<a href="([^"]+)">sign in with a form</a>', answer.text()).group(1)))
    page.get_by_label("token name").fill(name)
    page.get_by_label("secret").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(rf"/ui/failed\?process={process_name}$"))  # back where it was
    expect(page.locator("header .who")).to_have_text(f"{name} reader")
    expect(rows(page)).to_have_count(1)
    expect(page.get_by_role("button", name=re.compile("Restart every step"))).to_have_count(0)
    page.get_by_role("link", name="check").click()
    expect(page.locator("h1")).to_contain_text("check")
    expect(page.locator("pre.error-message")).to_have_text("ok is 0, not 1")
    assert page.locator("form[method=post]").count() == 1  # signing out, and no action
    expect(page.get_by_role("button", name="Restart", exact=True)).to_have_count(0)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.request.get(f"{UI}steps/{step['processStepId']}").status == 401


def test_filter_by_process_name_error_type_and_type_in_a_url_that_can_be_shared(served, browse):
    name, other = unique("nightly"), unique("weekly")
    for _ in range(2):
        failed_step(served, name=name)
    failed_step(served, ("fail", {"message": "disk full"}), name=name)
    failed_step(served, name=other)
    page = browse()
    page.goto(f"{UI}failed")
    page.get_by_label("process name").fill(name)
    page.get_by_role("button", name="Filter", exact=True).click()
    expect(page).to_have_url(re.compile(rf"process={name}"))
    expect(rows(page)).to_have_count(3)
    page.get_by_label("error type").fill("ValueError")
    page.get_by_role("button", name="Filter", exact=True).click()
    expect(rows(page)).to_have_count(2)
    expect(rows(page).first).to_contain_text("ValueError ok is 0, not 1")
    shared = page.url
    assert "error_type=ValueError" in shared
    someone_else = browse()  # the link, opened by another browser
    someone_else.goto(shared)
    expect(rows(someone_else)).to_have_count(2)
    expect(someone_else.get_by_label("process name")).to_have_value(name)
    someone_else.get_by_label("type", exact=True).fill("fail")
    someone_else.get_by_label("error type").fill("")
    someone_else.get_by_role("button", name="Filter", exact=True).click()
    expect(rows(someone_else)).to_have_count(1)
    expect(rows(someone_else)).to_contain_text("StepFailure disk full")


def test_restart_with_an_edited_param_and_see_the_process_complete(served, browse):
    step = failed_step(served, ("check", {"ok": 0, "note": "keep me"}), ("noop", {}))
    page = browse()
    page.goto(f"{UI}steps/{step['processStepId']}")
    page.get_by_label("ok", exact=True).fill("1")
    page.get_by_role("button", name="Restart", exact=True).click()
    expect(page.locator("#done")).to_have_text("Step restarted (attempt 2); the process carries on from it.")
    # the page refreshes by itself until the process is done
    expect(page.locator(".crumbs .status")).to_have_text("COMPLETED", timeout=4 * REFRESH_SECONDS * 1000)
    expect(page.locator("h1 .status")).to_have_text("COMPLETED")
    assert served.process(step["processId"])["status"] == "COMPLETED"
    detail = served.step(step["processStepId"])
    assert detail["params"]["ok"]["longValue"] == 1 and detail["params"]["note"]["strValue"] == "keep me"
    expect(page.locator("ul.changes")).to_contain_text("ok changed: LONG 0 → LONG 1")


def test_a_dry_run_shows_the_effective_params_and_changes_nothing(served, browse):
    step = failed_step(served, ("check", {"ok": 0, "note": "old"}), ("noop", {}))
    page = browse()
    page.goto(f"{UI}steps/{step['processStepId']}")
    page.get_by_label("note", exact=True).fill("new")
    page.get_by_label("type of ok").select_option("DOUBLE")
    page.get_by_label("name of new param 1").fill("extra")
    page.get_by_label("value of new param 1").fill("x")
    page.get_by_role("button", name="Dry run").click()
    preview = page.locator("#preview")
    expect(preview).to_contain_text("Dry run: the step would restart with these params; nothing changed.")
    effective = [r"extra\s*STRING\s*x", r"note\s*STRING\s*new", r"ok\s*DOUBLE\s*0\.0"]
    expect(preview.locator("tbody tr")).to_have_text([re.compile(row) for row in effective])
    expect(page.get_by_label("note", exact=True)).to_have_value("new")  # what was typed is kept
    expect(page.get_by_label("name of new param 1")).to_have_value("extra")
    detail = served.step(step["processStepId"])
    assert detail["status"] == "FAILED" and detail["attempts"] == 1
    assert detail["params"]["note"]["strValue"] == "old"


def test_a_412_appears_beside_its_field_with_the_values_kept(served, browse):
    step = failed_step(served)
    page = browse()
    page.goto(f"{UI}steps/{step['processStepId']}")
    page.get_by_label("ok", exact=True).fill("one")
    page.get_by_label("name of new param 1").fill("kept")
    page.get_by_role("button", name="Restart", exact=True).click()
    value = page.get_by_label("ok", exact=True)
    expect(value).to_have_value("one")
    expect(value).to_have_attribute("aria-invalid", "true")
    expect(page.locator(f"#{value.get_attribute('aria-describedby')}")).to_have_text(re.compile("Not a whole number"))
    expect(page.get_by_label("name of new param 1")).to_have_value("kept")
    assert served.step(step["processStepId"])["attempts"] == 1


def test_a_bulk_restart_confirmation_states_the_count_and_restarts_only_those(served, browse):
    name = unique("bulk")
    counted = [failed_step(served, name=name)["processStepId"] for _ in range(3)]
    page = browse()
    page.goto(f"{UI}failed?process={name}")
    expect(rows(page)).to_have_count(3)
    page.get_by_role("button", name=re.compile("Restart every step this filter matches")).click()
    expect(page.locator("#count")).to_have_text("The dry run found 3 step(s) to restart.")
    later = failed_step(served, name=name)["processStepId"]  # fails after the dry run
    page.get_by_role("button", name="Restart 3 step(s)").click()
    expect(page.locator("#done")).to_contain_text("3 step(s) restarted.")
    expect(page.locator("#later")).to_have_text(
        "1 more step(s) matching this filter failed after the dry run; they were not included."
    )
    for step_id in counted:  # each restarted once (and, ok still 0, failed again)
        wait_for(lambda s=step_id: served.step(s)["attempts"] == 2 and served.step(s)["status"] == "FAILED")
    assert served.step(later)["attempts"] == 1


def test_a_double_click_on_restart_acts_once(served, browse, tmp_path):
    """Two clicks on Restart, the second while the first one's request is still being answered (the
    test holds the database's write lock meanwhile, as a busy service would): the browser sends the
    form twice, and the step is restarted once. (Two clicks before the first request leaves, as
    Playwright's dblclick makes them, are one submission to chromium: it sends one request.)"""
    count_file = tmp_path / "calls.txt"
    step = failed_step(served, ("count", {"file": str(count_file), "fail": 1}))
    step_id = step["processStepId"]
    page = browse()
    page.goto(f"{UI}steps/{step_id}")
    button = page.get_by_role("button", name="Restart", exact=True)
    button.scroll_into_view_if_needed()
    box = button.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def restart_post(request):
        return request.method == "POST" and request.url.endswith("/restart")

    holder = sqlite3.connect(served.env["STEPD_DB"], timeout=10, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the service's writes wait until this ends
        for _ in range(2):  # the mouse itself: a locator's click would wait for the first answer
            with page.expect_request(restart_post):
                page.mouse.click(x, y)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    expect(page.locator("#done")).to_have_text("Step restarted (attempt 2); the process carries on from it.")
    posts = [r for r in browse.requests if restart_post(r)]
    keys = {re.search(r"idempotency_key=([0-9a-f]+)", r.post_data).group(1) for r in posts}
    assert len(posts) == 2 and len(keys) == 1, posts
    wait_for(lambda: served.step(step_id)["status"] == "FAILED" and len(calls(count_file)) == 2)
    time.sleep(0.5)  # a second restart, had there been one, would have called the delegate by now
    assert calls(count_file) == [(step_id, 1), (step_id, 2)]
    assert served.step(step_id)["attempts"] == 2


def test_skip_with_a_result_and_cancel_with_a_reason(served, browse):
    step = failed_step(served, ("check", {"ok": 0}), ("need", {"name": "made"}))
    page = browse()
    page.goto(f"{UI}steps/{step['processStepId']}")
    page.get_by_label("name of result 1").fill("made")
    page.get_by_label("value of result 1").fill("by hand")
    page.locator("#skip-reason").fill("made by hand")
    page.get_by_role("button", name="Skip", exact=True).click()
    expect(page.locator("#done")).to_have_text("Step skipped; the process carries on after it.")
    done = served.wait_process(step["processId"], "COMPLETED")
    assert done["steps"][0]["intervention"]["reason"] == "made by hand"
    assert done["steps"][1]["result"]["got"]["strValue"] == "by hand"

    other = failed_step(served)
    page.goto(f"{UI}steps/{other['processStepId']}")
    page.locator("#cancel-reason").fill("nobody wants it now")
    page.get_by_role("button", name="Cancel the process").click()
    expect(page.locator("#done")).to_have_text("Process cancelled, with each of its steps not yet done.")
    expect(page.locator(".crumbs .status")).to_have_text("CANCELLED")
    cancelled = served.process(other["processId"])
    assert cancelled["status"] == "CANCELLED" and cancelled["intervention"]["reason"] == "nobody wants it now"


def test_auto_refresh_pauses_while_a_form_is_edited_and_when_paused(served, browse):
    name = unique("refresh")
    failed_step(served, name=name)
    page = browse()
    page.goto(f"{UI}failed?process={name}")
    body = page.locator("body")
    expect(body).to_have_attribute("data-refreshed", "1", timeout=3 * REFRESH_SECONDS * 1000)  # it refreshes
    # someone starts typing a filter: no refresh while they do, and what they typed stays
    page.get_by_label("process name").fill(f"{name}-and-more")
    expect(body).to_have_attribute("data-refresh-state", "editing")
    expect(page.locator("#refresh-status")).to_have_text("Auto-refresh paused while you edit a form")
    refreshed = body.get_attribute("data-refreshed")
    failed_step(served, name=name)  # a refresh would show it
    page.get_by_label("process name").blur()  # the focus elsewhere: the unsent change still holds it
    page.wait_for_timeout(REFRESH_SECONDS * 1000 + 2000)
    assert body.get_attribute("data-refreshed") == refreshed
    expect(rows(page)).to_have_count(1)
    expect(page.get_by_label("process name")).to_have_value(f"{name}-and-more")
    # resumed: the fresh page comes at once
    page.get_by_role("button", name="Resume auto-refresh").click()
    expect(rows(page)).to_have_count(2)
    expect(page.get_by_label("process name")).to_have_value(name)
    # paused by hand: nothing moves until resumed
    page.get_by_role("button", name="Pause auto-refresh").click()
    expect(page.locator("#refresh-status")).to_have_text("Auto-refresh paused")
    failed_step(served, name=name)
    page.wait_for_timeout(REFRESH_SECONDS * 1000 + 2000)
    expect(rows(page)).to_have_count(2)
    page.get_by_role("button", name="Resume auto-refresh").click()
    expect(rows(page)).to_have_count(3)


def test_no_request_leaves_127_0_0_1_and_nothing_breaks_the_policy(served, browse):
    step = failed_step(served, ("fail", {"message": '<script>alert("x")</script>'}), name="<b>bold</b>")
    page = browse()
    problems = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("dialog", lambda dialog: problems.append(f"a dialog: {dialog.message}"))
    for path in (UI, f"{UI}failed", f"{UI}steps/{step['processStepId']}", f"{UI}sign-in"):
        assert page.goto(path).status == 200
    expect(page.locator("body")).to_have_attribute("data-refresh", "0")
    page.goto(f"{UI}steps/{step['processStepId']}")
    expect(page.locator("pre.error-message")).to_have_text('<script>alert("x")</script>')  # shown, not run
    expect(page.locator(".process-name")).to_have_text("<b>bold</b>")
    page.wait_for_timeout(REFRESH_SECONDS * 1000 + 1500)  # a refresh's fetch is recorded too
    urls = [request.url for request in browse.requests]
    assert {re.sub(r"\?.*", "", url.removeprefix(served.url)) for url in urls} >= {
        "/ui/",
        "/ui/failed",
        "/ui/static/ui.js",
        "/ui/static/ui.css",
        "/ui/static/favicon.svg",
    }
    assert any(r.resource_type == "fetch" for r in browse.requests)  # the auto-refresh's own request
    assert all(url.startswith("http://127.0.0.1:") for url in urls), urls
    assert not problems, problems
