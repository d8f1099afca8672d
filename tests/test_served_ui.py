"""The operator page on the real service (`stepd serve`: gunicorn's workers and a runner process),
without a browser: a form sent many times at once acts once, whichever worker takes each copy;
the secret that signs the page's session and CSRF tokens is the same in every worker and survives
a restart with no setting, and STEPD_SECRET_KEY replaces it when set."""

import requests
from helpers import UI, all_at_once, calls, forms_of, text_of, wait_for


class Browser(requests.Session):
    """A browser's cookie jar; each request on a connection of its own, so the workers take turns."""

    def __init__(self, server, auth=None):
        super().__init__()
        self.server, self.auth = server, auth
        self.headers["Connection"] = "close"

    def go(self, method, path, **kwargs):
        return self.request(method, self.server.url + path, allow_redirects=False, timeout=10, **kwargs)


def form(html, form_id):
    [found] = [f for f in forms_of(html) if f["id"] == form_id or f["action"] == form_id]
    return found["action"], dict(found["fields"])


def signed_in(server, name, secret):
    """A browser signed in with the form."""
    browser = Browser(server)
    action, fields = form(browser.go("GET", f"{UI}sign-in").text, f"{UI}sign-in")
    answer = browser.go("POST", action, data={**fields, "name": name, "secret": secret})
    assert answer.status_code == 303, answer.text[:500]
    return browser


def test_a_form_sent_eight_times_at_once_restarts_once(served, tmp_path):
    counted = tmp_path / "calls.txt"
    process = served.start_process(("count", {"file": str(counted), "fail": 1}))
    step_id = served.wait_process(process["processId"], "FAILED")["steps"][0]["processStepId"]
    browser = Browser(served, auth=("env", served.token))
    action, fields = form(browser.go("GET", f"{UI}steps/{step_id}").text, "restart-form")
    fields["intent"] = "restart"
    answers = all_at_once(8, lambda _: browser.go("POST", action, data=fields))
    assert [a.status_code for a in answers] == [303] * 8, [a.text[:300] for a in answers if a.status_code != 303]
    assert len({a.headers["Location"] for a in answers}) == 1
    wait_for(lambda: len(calls(counted)) == 2 and served.step(step_id)["status"] == "FAILED", what="the one restart")
    assert calls(counted) == [(step_id, 1), (step_id, 2)]
    assert served.step(step_id)["attempts"] == 2
    assert "Step restarted (attempt 2)" in text_of(browser.go("GET", answers[0].headers["Location"]).text)


def test_the_secret_is_the_same_in_every_worker_and_survives_a_restart(server_factory, tmp_path):
    server = server_factory(workers=2).start()
    browsers = [signed_in(server, "env", server.token) for _ in range(6)]  # signed in on either worker
    for browser in browsers:
        for _ in range(4):  # each read on a new connection: either worker
            assert browser.go("GET", UI).status_code == 200
    # a page rendered by one worker, its form posted to whichever: the CSRF token is good in both
    process = server.start_process(("check", {"ok": 0}))
    step_id = server.wait_process(process["processId"], "FAILED")["steps"][0]["processStepId"]
    first = browsers[0]
    for _ in range(6):
        action, fields = form(first.go("GET", f"{UI}steps/{step_id}").text, "restart-form")
        dry = first.go("POST", action, data={**fields, "intent": "dry-run"})
        assert dry.status_code == 200, text_of(dry.text)[:500]
    kept_page = first.go("GET", f"{UI}steps/{step_id}").text
    assert server.stop() == 0

    server = server_factory(db_path=tmp_path / "served.db", workers=2).start()  # the same file, no setting
    for browser in browsers:
        browser.server = server
    assert browsers[1].go("GET", UI).status_code == 200
    action, fields = form(kept_page, "restart-form")  # rendered before the restart
    restarted = first.go("POST", action, data={**fields, "intent": "restart", "p0-value": "1"})
    assert restarted.status_code == 303, text_of(restarted.text)[:500]
    server.wait_process(process["processId"], "COMPLETED")
    assert server.stop() == 0

    # STEPD_SECRET_KEY, when set, signs instead: the sessions the file's secret signed are not good
    server = server_factory(db_path=tmp_path / "served.db", extra_env={"STEPD_SECRET_KEY": "x" * 40}).start()
    browsers[1].server = server
    assert browsers[1].go("GET", UI).status_code == 401
    assert signed_in(server, "env", server.token).go("GET", UI).status_code == 200
