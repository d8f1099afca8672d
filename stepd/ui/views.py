"""The operator page's routes: the overview, the failed steps, a step's page, sign-in, and the
actions (restart, dry run, skip, cancel, bulk restart), each a few lines calling the engine.

Reads the engine has no verb for (counts, the chart, the failed list with its filters) are the
store's, in the block at the end of store.Store. Every change is an engine verb run through
actions.once, so a form sent twice acts once.
"""

import base64
import binascii
import re
from datetime import UTC, datetime
from itertools import chain

from flask import Blueprint, current_app, g, redirect, render_template, request, session, url_for
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import BadRequest, HTTPException

from stepd import auth, errors
from stepd.liveness import runner_is_alive
from stepd.model import FAILED, ID_PATTERN, MAX_BULK, PreconditionFailed, iso, now_iso
from stepd.schemas import is_stepd_time
from stepd.tokens import OPERATOR
from stepd.ui import actions, forms
from stepd.ui.access import can_act, csp_nonce, page, same_origin_only
from stepd.ui.chart import chart, window

ui = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")

PAGE_SIZE = 50
REFRESH_SECONDS = 5
# The failed list's filters: (query name, the store's name, longest value the API takes).
FILTERS = (("type", "type", 128), ("error_type", "error_type", 256), ("process", "process_name", 1024))
KNOWN_ERROR_TYPES = ("Interrupted", "Timeout", "ExternalFailure")  # what stepd itself records
CANCELLABLE = ("RUNNING", "FAILED")
ID = re.compile(ID_PATTERN)


def engine():
    return current_app.extensions["stepd"].engine


def store():
    return current_app.extensions["stepd"].store


def principal():
    return g.ui_principal.name


ui.before_request(same_origin_only)


@ui.context_processor
def common():
    who = g.get("ui_principal")
    return {"principal": who, "can_act": can_act(), "csp_nonce": csp_nonce, "signed_in": "proof" in session}


# -- the overview ------------------------------------------------------------------------------------
@ui.get("/")
@page()
def overview():
    """Counts by status, the runners, the last hour's outcomes, the oldest queued attempt's age."""
    now = datetime.now(UTC)
    steps, processes = store().status_counts()
    since, _ = window(now)
    oldest = store().oldest_queued_at(iso(now))
    waited = max((now - datetime.fromisoformat(oldest)).total_seconds(), 0.0) if oldest else None
    runners = [{**row, "alive": runner_is_alive(row)} for row in store().runners()]
    return render_template(
        "overview.html", steps=steps, processes=processes, runners=runners, waited=waited,
        chart=chart(store().outcomes_by_minute(since), now), refresh=REFRESH_SECONDS,
    )  # fmt: skip


# -- the failed steps --------------------------------------------------------------------------------
def filters_from(values):
    """The failed list's filters from a query or a form: {query name: value}, empty ones left out."""
    chosen = {}
    for name, _, longest in FILTERS:
        value = values.get(name, "").strip()
        if len(value) > longest:
            raise BadRequest(f"The {name.replace('_', ' ')} filter is longer than {longest} characters.")
        if value:
            chosen[name] = value
    return chosen


def where_of(chosen):
    return {key: chosen.get(name) for name, key, _ in FILTERS}


def encode_position(position):
    return base64.urlsafe_b64encode(f"{position[0]}|{position[1]}".encode()).decode().rstrip("=")


def decode_position(text):
    try:
        finished_at, _, seq = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii").partition("|")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("This page link is not valid: start again from the newest failures.") from None
    if not is_stepd_time(finished_at) or not seq.isdecimal() or len(seq) > 19:
        raise BadRequest("This page link is not valid: start again from the newest failures.")
    return finished_at, int(seq)


@ui.get("/failed")
@page()
def failed():
    """FAILED steps, newest failure first, filtered by type, error type and process name (all in the URL)."""
    chosen = filters_from(request.args)
    before = decode_position(request.args["before"]) if request.args.get("before") else None
    steps, next_position = store().failed_page(where_of(chosen), before, PAGE_SIZE)
    older = url_for("ui.failed", **chosen, before=encode_position(next_position)) if next_position else None
    return render_template(
        "failed.html", steps=steps, chosen=chosen, older=older, first_page=before is None,
        types=[d["type"] for d in engine().delegates()], error_types=KNOWN_ERROR_TYPES,
        done=actions.kept(request.args.get("done")), refresh=REFRESH_SECONDS,
    )  # fmt: skip


@ui.post("/failed/bulk")
@page(OPERATOR)
def bulk_preview():
    """The dry run of a bulk restart: how many of the steps the filter matches would restart."""
    chosen = filters_from(request.form)
    until = now_iso()
    ids, more = store().failed_ids(where_of(chosen), until, MAX_BULK)
    outcome = {"restarted": [], "skipped": []}
    if ids:
        with store().atomic(rollback=True):  # one transaction, undone: the state as one moment has it
            outcome = engine().restart_many(bulk_request(ids), principal(), dry_run=True)
    return render_template(
        "bulk.html", chosen=chosen, until=until, matched=len(ids), more=more, skipped=outcome["skipped"],
        ids=[job.step_id for job in outcome["restarted"]], key=actions.new_key(),
    )  # fmt: skip


@ui.post("/failed/bulk/restart")
@page(OPERATOR)
def bulk_restart():
    """Restart exactly the steps the confirmed dry run counted; say how many failed since."""
    chosen = filters_from(request.form)
    ids, until, key = bulk_ids(request.form.get("ids", "")), request.form.get("until", ""), actions.form_key()
    if key is None or not is_stepd_time(until):
        raise BadRequest("This form is not one the page made (no Idempotency-Key or dry-run time): start again.")

    def act():
        outcome = engine().restart_many(bulk_request(ids), principal())
        later = store().count_failed_since(where_of(chosen), until, leaving_out=ids)
        restarted, skipped = len(outcome["restarted"]), outcome["skipped"]
        message = f"{restarted} step(s) restarted" + (f", {len(skipped)} skipped" if skipped else "") + "."
        return {"message": message, "skipped": skipped, "later": later}

    answer = actions.once(key, act)
    return redirect(url_for("ui.failed", **chosen, done=key), 303) if answer["status"] == 200 else error_page(answer)


def bulk_ids(text):
    ids = text.split()
    if not 1 <= len(ids) <= MAX_BULK or len(set(ids)) != len(ids) or not all(ID.fullmatch(i) for i in ids):
        raise BadRequest("This form's step ids are not ones the dry run found: start again.")
    return ids


def bulk_request(ids):
    return {"step_ids": ids, "filter": None, "cursor": None, "params": {}}


# -- a step's page -----------------------------------------------------------------------------------
def step_page(step_id, status=200, **states):
    """A step's page; `states` replaces the default state of its restart, skip and cancel forms."""
    step = engine().step(step_id)
    process = engine().process(step["process_id"])
    history = step["attempt_history"]
    changed = [[], *(forms.changes(a["params"], b["params"]) for a, b in zip(history, history[1:], strict=False))]
    forms_shown = {
        "restart": forms.FormState(actions.new_key(), rows=forms.rows_of(step["params"])),
        "skip": forms.FormState(actions.new_key(), rows=forms.rows_of({})),
        "cancel": forms.FormState(actions.new_key()),
        **states,
    }
    results = {s["position"]: s["result"] for s in process["steps"] if s["position"] < step["position"] and s["result"]}
    restartable, cancellable = step["status"] == FAILED, process["status"] in CANCELLABLE
    offered = {"restart": restartable, "skip": restartable, "cancel": cancellable}
    # A refusal of a form the step no longer offers (it is not FAILED any more) is said above the page.
    refused = [m for name, state in forms_shown.items() if not offered[name] for m in chain(*state.errors.values())]
    # An answer to a POST (a dry run, a refusal) shows what was entered, at the form's action, a URL
    # that takes only a POST: it does not refresh itself.
    return render_template(
        "step.html", step=step, process=process, history=history, changed=changed, results=results,
        forms=forms_shown, failed=restartable, cancellable=cancellable, refused=refused,
        done=actions.kept(request.args.get("done")), refresh=REFRESH_SECONDS if request.method == "GET" else 0,
    ), status  # fmt: skip


@ui.get("/steps/<id:step_id>")
@page()
def step(step_id):
    """A step: its params, error, attempt history, its process's other steps and ctx.results so far."""
    return step_page(step_id)


@ui.post("/steps/<id:step_id>/restart")
@page(OPERATOR)
def restart(step_id):
    """Restart the step with the params as edited, or (intent dry-run) show what it would run with."""
    rows = forms.rows_from(request.form)
    params, errors = forms.params_from(rows)
    state = forms.FormState(actions.form_key() or actions.new_key(), rows=rows, errors=errors)
    if errors:
        return step_page(step_id, 412, restart=state)
    if request.form.get("intent") == "dry-run":
        return dry_run(step_id, params, state)
    return acted(step_id, "restart", state, lambda: restarted(step_id, params))


def dry_run(step_id, params, state):
    try:
        state.preview = engine().restart(step_id, params, principal(), dry_run=True).params
    except PreconditionFailed as exc:
        state.errors = forms.placed(exc.errors)
        return step_page(step_id, 412, restart=state)
    return step_page(step_id, restart=state)


def restarted(step_id, params):
    job = engine().restart(step_id, params, principal())
    return {"message": f"Step restarted (attempt {job.attempt}); the process carries on from it."}


@ui.post("/steps/<id:step_id>/skip")
@page(OPERATOR)
def skip(step_id):
    """Skip the FAILED step with a result (later steps see it) and a reason."""
    rows = forms.rows_from(request.form)
    result, errors = forms.params_from(rows)
    reason = forms.reason_from(request.form, errors)
    state = forms.FormState(actions.form_key() or actions.new_key(), rows=rows, values=request.form, errors=errors)
    if errors:
        return step_page(step_id, 412, skip=state)

    def act():
        engine().skip(step_id, result or None, reason, principal())
        return {"message": "Step skipped; the process carries on after it."}

    return acted(step_id, "skip", state, act)


@ui.post("/steps/<id:step_id>/cancel")
@page(OPERATOR)
def cancel(step_id):
    """Cancel the step's process (and each of its steps not yet done), with a reason."""
    errors = {}
    reason = forms.reason_from(request.form, errors)
    state = forms.FormState(actions.form_key() or actions.new_key(), values=request.form, errors=errors)
    if errors:
        return step_page(step_id, 412, cancel=state)
    process_id = engine().step(step_id)["process_id"]

    def act():
        engine().cancel(process_id, reason, principal())
        return {"message": "Process cancelled, with each of its steps not yet done."}

    return acted(step_id, "cancel", state, act)


def acted(step_id, form, state, act):
    """Run `act` once for the form's key; a success goes to the step's page (Post/Redirect/Get), a
    412 shows the form again with what was entered and its errors beside the fields they name."""
    if actions.form_key() is None:
        state.errors = {forms.FORM: ["This form has no Idempotency-Key the page made: reload the page."]}
        return step_page(step_id, 412, **{form: state})
    answer = actions.once(state.key, act)
    if answer["status"] == 200:
        return redirect(url_for("ui.step", step_id=step_id, done=state.key), 303)
    state.errors = forms.placed(answer["errors"])
    state.key = actions.new_key()  # this key's answer is the 412: a corrected form is a new request
    return step_page(step_id, 412, **{form: state})


def error_page(answer):
    messages = [m for messages in answer["errors"].values() for m in messages]
    return render_template("error.html", status=412, title="Precondition failed", detail=" ".join(messages)), 412


# -- signing in --------------------------------------------------------------------------------------
def next_page(value):
    """Where to go after signing in: a page of /ui/ only (never another site)."""
    return value if value.startswith("/ui/") and "\\" not in value and value.isprintable() else url_for("ui.overview")


@ui.get("/sign-in")
def sign_in_form():
    """The sign-in form: a token's name and secret, kept as a session (a cookie) once checked."""
    return render_template("sign_in.html", next=next_page(request.args.get("next", "")), error=None)


@ui.post("/sign-in")
def sign_in():
    name, secret = request.form.get("name", ""), request.form.get("secret", "")
    where = next_page(request.form.get("next", ""))
    if auth.verify_password(name, secret) is None:
        error = "No token has this name and secret."
        return render_template("sign_in.html", next=where, error=error, name=name), 401
    session.clear()
    session["principal"], session["proof"] = name, auth.session_proof(name, secret)
    return redirect(where, 303)


@ui.post("/sign-out")
def sign_out():
    session.clear()
    return redirect(url_for("ui.sign_in_form"), 303)


# -- errors ------------------------------------------------------------------------------------------
def html_error(exc):
    """An error of a page, as a page: its status, log line and headers as the API's one table says
    (errors.ERRORS); a refused CSRF token is a 403, as a form from another site is."""
    response = errors.answer(exc)
    status = 403 if isinstance(exc, CSRFError) else response.status_code
    data = response.get_json()["data"]
    if isinstance(exc, CSRFError):
        detail = f"{exc.description} Nothing changed: reload the page and send the form again."
    elif isinstance(exc, HTTPException) and status < 500:
        detail = exc.description
    elif status == 500:
        detail = f"An unexpected error; the server's log has it under the id {data}."
    else:
        detail = data if isinstance(data, str) else " ".join(str(m) for ms in data.values() for m in ms)
    page_html = render_template("error.html", status=status, title=errors.STATUSES[status].message, detail=detail)
    headers = {name: response.headers[name] for name in ("Retry-After", "Allow") if name in response.headers}
    return page_html, status, headers


for _error_class in (*errors.ERRORS, CSRFError):
    ui.register_error_handler(_error_class, html_error)
