"""HTTP: the app factory, the routes of /api/v1 and /healthz, and error rendering."""

import json
import logging
import math
import sqlite3
import uuid
from contextlib import nullcontext
from dataclasses import dataclass

from flask import Blueprint, Flask, current_app, g, has_request_context, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.routing import BaseConverter
from werkzeug.routing import ValidationError as RouteMismatch

import config
import schemas as s
from auth import current_principal, reads, token_cli, writes
from delegates import Registry, load_registry
from envelope import envelope, error
from idempotency import idempotent
from runner import Runner
from store import PreconditionFailed, Store, is_busy, is_unwritable, now_iso

MAX_BODY_BYTES = 1024 * 1024
REQUEST_ID_HEADER = "X-Request-Id"

log = logging.getLogger("stepd")


@dataclass
class Stepd:
    """What the routes need, kept in app.extensions["stepd"]."""

    store: Store
    registry: Registry
    runner: Runner


def stepd():
    return current_app.extensions["stepd"]


# -- routing ---------------------------------------------------------------------------------
ACTION_NAMES = {"steps", "restart-failed-step", "restart-failed-steps", "fail-step", "complete-step"}


class IdConverter(BaseConverter):
    """An id path segment; action names are not ids, so `GET …/restart-failed-step` is a 405."""

    regex = r"[A-Za-z0-9_-]{1,64}"

    def to_python(self, value):
        if value in ACTION_NAMES:
            raise RouteMismatch()
        return value


def doc(body=None, query=s.NoQuerySchema, data=None, status=200, errors=(), many=False):
    """Record a view's schemas and status codes; the OpenAPI document is built from them."""

    def record(view):
        view.openapi = {"body": body, "query": query, "data": data, "status": status, "errors": errors, "many": many}
        return view

    return record


# -- parsing -------------------------------------------------------------------------------
def _refuse_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text} is out of range")
    return number


def load_body(schema_class):
    """Parse the request body as strict JSON and load it with the schema (412 on any fault)."""
    if request.mimetype != "application/json":
        raise ValidationError({"_schema": ["Content-Type must be application/json."]})
    raw = request.get_data(cache=True)  # a Content-Length over MAX_CONTENT_LENGTH raises 413
    if request.content_length is None and len(raw) >= MAX_BODY_BYTES:
        raise RequestEntityTooLarge()  # a chunked body is cut at the limit, not refused: refuse it here
    if not raw.strip():
        raise ValidationError({"_schema": ["The body is empty; a JSON object is required."]})
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise ValidationError({"_schema": [f"The body is not valid JSON: {exc}"[:300]]}) from None
    return s.one(schema_class).load(body)


def load_query(schema_class):
    """Load the query string; unknown and repeated parameters are refused."""
    repeated = {key: ["Given more than once."] for key in request.args if len(request.args.getlist(key)) > 1}
    if repeated:
        raise ValidationError(repeated)
    return s.one(schema_class).load(request.args.to_dict())


# -- routes ----------------------------------------------------------------------------------
api = Blueprint("api", __name__, url_prefix="/api/v1")
health = Blueprint("health", __name__)


@api.post("/processes")
@writes
@idempotent
@doc(body=s.StartProcessSchema, data=s.ProcessSchema, status=201, errors=(412,))
def start_process():
    """Start a process; its first step starts at once."""
    load_query(s.NoQuerySchema)
    body = load_body(s.StartProcessSchema)
    unknown = {
        n: {"type": [f"No delegate is registered for step type {step['type']!r}."]}
        for n, step in enumerate(body["steps"])
        if step["type"] not in stepd().registry
    }
    if unknown:
        raise PreconditionFailed({"steps": unknown})
    steps = [(step["type"], step["params"]) for step in body["steps"]]
    process, job = stepd().store.create_process(body["name"], steps, current_principal().name, stepd().runner.id)
    stepd().runner.submit(job)
    return envelope(s.one(s.ProcessSchema).dump(process), "Process started.", 201)


@api.get("/processes")
@reads
@doc(query=s.ProcessListQuery, data=s.ProcessPageSchema, errors=(412,))
def list_processes():
    """List processes, newest first, without their steps."""
    query = load_query(s.ProcessListQuery)
    items, next_seq = stepd().store.list_processes(query["status"], query["limit"], query["cursor"])
    page = {"items": items, "nextCursor": s.encode_cursor("p", next_seq)}
    return envelope(s.one(s.ProcessPageSchema).dump(page))


@api.get("/processes/<id:process_id>")
@reads
@doc(data=s.ProcessSchema, errors=(404, 405, 412))  # 405: GET …/processes/fail-step and the like
def get_process(process_id):
    """One process with its steps."""
    load_query(s.NoQuerySchema)
    process = stepd().store.get_process(process_id)
    if process is None:
        return error(404, "No process has this id.")
    return envelope(s.one(s.ProcessSchema).dump(process))


@api.get("/processes/steps")
@reads
@doc(query=s.StepListQuery, data=s.StepPageSchema, errors=(412,))
def list_steps():
    """List steps across processes, newest first; filter by status and type."""
    query = load_query(s.StepListQuery)
    items, next_seq = stepd().store.list_steps(query["status"], query["type"], query["limit"], query["cursor"])
    page = {"items": items, "nextCursor": s.encode_cursor("s", next_seq)}
    return envelope(s.one(s.StepPageSchema).dump(page))


@api.get("/processes/steps/<id:step_id>")
@reads
@doc(data=s.StepDetailSchema, errors=(404, 412))
def get_step(step_id):
    """One step with its attempt history."""
    load_query(s.NoQuerySchema)
    step = stepd().store.get_step(step_id, with_history=True)
    if step is None:
        return error(404, "No step has this id.")
    return envelope(s.one(s.StepDetailSchema).dump(step))


@api.post("/processes/restart-failed-step")
@writes
@idempotent
@doc(body=s.RestartStepSchema, query=s.RestartQuery, data=s.RestartResultSchema, errors=(412,))
def restart_failed_step():
    """Restart a FAILED step, with params laid over its last ones; the process carries on from it."""
    dry_run = load_query(s.RestartQuery)["dry_run"]
    body = load_body(s.RestartStepSchema)
    restarted = restart_one(body["step_id"], body["params"], dry_run)
    message = "Dry run: the step would be restarted; nothing changed." if dry_run else "Step restarted."
    return envelope(s.one(s.RestartResultSchema).dump(restarted), message)


@api.post("/processes/restart-failed-steps")
@writes
@idempotent
@doc(body=s.RestartManySchema, query=s.RestartQuery, data=s.RestartManyResultSchema, errors=(412,))
def restart_failed_steps():
    """Restart many FAILED steps, listed or matched by a filter, each exactly as restart-failed-step does."""
    dry_run = load_query(s.RestartQuery)["dry_run"]
    body = load_body(s.RestartManySchema)
    step_ids, next_position = steps_to_restart(body)
    restarted, skipped = [], []
    for step_id in step_ids:
        try:
            restarted.append(restart_one(step_id, body["params"], dry_run))
        except PreconditionFailed as exc:
            skipped.append({"step_id": step_id, "reason": reason_of(exc.errors)})
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            skipped.append({"step_id": step_id, "reason": "The database was busy; nothing changed. Retry this step."})
    outcome = {"restarted": restarted, "skipped": skipped, "nextCursor": s.encode_failure_cursor(next_position)}
    message = (
        f"Dry run: {len(restarted)} step(s) would be restarted, {len(skipped)} skipped; nothing changed."
        if dry_run
        else f"{len(restarted)} step(s) restarted, {len(skipped)} skipped."
    )
    if next_position is not None:
        message += f" More than {s.MAX_BULK} steps match: send the same filter with cursor = nextCursor."
    return envelope(s.one(s.RestartManyResultSchema).dump(outcome), message)


def steps_to_restart(body):
    """(the step ids a bulk restart takes, where a filter walk goes on next, or None)."""
    if body["step_ids"] is not None:
        return body["step_ids"], None
    # A walk over pages takes the steps that had failed when it began: a step it restarted
    # that fails again (now later than the cursor) is not picked twice.
    after, until = (body["cursor"][:2], body["cursor"][2]) if body["cursor"] else (None, now_iso())
    rows, more = stepd().store.failed_steps({**body["filter"], "failed_until": until}, after, s.MAX_BULK)
    return [step_id for step_id, _, _ in rows], (*rows[-1][1:], until) if more else None


def restart_one(step_id, params, dry_run):
    """Restart one step in its own compare-and-set; a dry run checks the same and rolls back."""
    store = stepd().store
    with store.transaction(rollback=True) if dry_run else nullcontext():
        job = store.restart_failed_step(
            step_id, params, current_principal().name, stepd().runner.id, stepd().registry.__contains__
        )
    if not dry_run:
        stepd().runner.submit(job)
    return {"process_id": job.process_id, "step_id": job.step_id, "params": job.params}


def reason_of(errors):
    """A precondition's field errors as one sentence, for a skipped step."""
    return " ".join(message for messages in errors.values() for message in messages)


@api.post("/processes/fail-step")
@writes
@idempotent
@doc(body=s.FailStepSchema, data=s.StepSchema, errors=(412,))
def fail_step():
    """Fail a STARTED step from outside (a deferred delegate's work failed, or an operator aborts it)."""
    load_query(s.NoQuerySchema)
    body = load_body(s.FailStepSchema)
    message = body["error"]["message"] if body["error"] else f"Failed by {current_principal().name} through fail-step."
    step = stepd().store.fail_step(body["step_id"], message)
    return envelope(s.one(s.StepSchema).dump(step), "Step failed.")


@api.post("/processes/complete-step")
@writes
@idempotent
@doc(body=s.CompleteStepSchema, data=s.StepSchema, errors=(412,))
def complete_step():
    """Complete a STARTED step from outside, with an optional result; the process carries on."""
    load_query(s.NoQuerySchema)
    body = load_body(s.CompleteStepSchema)
    step, next_job = stepd().store.complete_step(body["step_id"], body["result"], stepd().runner.id)
    stepd().runner.submit(next_job)
    return envelope(s.one(s.StepSchema).dump(step), "Step completed.")


@api.get("/delegates")
@reads
@doc(data=s.DelegateSchema, errors=(412,), many=True)
def list_delegates():
    """The registered step types and what each does."""
    load_query(s.NoQuerySchema)
    delegates = [{"type": d.type, "description": d.description, "retry": d.retry} for d in stepd().registry.all()]
    return envelope(s.one(s.DelegateSchema, many=True).dump(delegates))


@api.get("/openapi.json")
def openapi_document():
    """This API's OpenAPI 3 document (served as is, not in the envelope, so tools can read it)."""
    from openapi import build_spec  # imported here: it walks the app's own routes

    load_query(s.NoQuerySchema)
    if "stepd.openapi" not in current_app.extensions:  # the routes do not change: build it once
        current_app.extensions["stepd.openapi"] = build_spec(current_app)
    return current_app.extensions["stepd.openapi"]


@health.get("/healthz")
@doc(data=s.HealthSchema, errors=(503,))
def healthz():
    """200 when the database answers, else 503. Needs no credentials."""
    load_query(s.NoQuerySchema)
    try:
        stepd().store.ping()
    except sqlite3.Error as exc:
        log.warning("health check: database does not answer: %s", exc)
        return error(503, "The database does not answer.")
    return envelope({"database": "ok"})


# -- errors ----------------------------------------------------------------------------------
HTTP_ERROR_TEXT = {
    401: "Missing or invalid credentials.",
    403: "Not allowed.",
    404: "No endpoint at this path.",
    413: f"The body is over {MAX_BODY_BYTES} bytes.",
}


def on_validation_error(exc):
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    return error(412, messages)


def on_precondition_failed(exc):
    return error(412, exc.errors)


def on_http_error(exc):
    if exc.code == 405:
        response = error(405, f"This path does not accept {request.method}.")
        response.headers["Allow"] = ", ".join(sorted(exc.valid_methods or ()))
        return response
    if exc.code in HTTP_ERROR_TEXT:
        return error(exc.code, HTTP_ERROR_TEXT[exc.code])
    if exc.code < 500:  # any other client error is bad input: a 412 like the rest
        return error(412, {"_schema": [exc.description]})
    return on_unexpected_error(exc)


def on_database_error(exc):
    if is_busy(exc):
        response = error(503, "The database is busy; retry shortly.")
        response.headers["Retry-After"] = "1"
        return response
    if is_unwritable(exc):  # a full disk: reads go on, and writes work again once space is freed
        log.error("database cannot be written on %s %s: %s", request.method, request.path, exc)
        response = error(503, "The database cannot be written now (disk full or read-only); retry later.")
        response.headers["Retry-After"] = "5"
        return response
    return on_unexpected_error(exc)


def on_unexpected_error(exc):
    error_id = uuid.uuid4().hex
    log.error("unexpected error %s on %s %s", error_id, request.method, request.path, exc_info=exc)
    return error(500, error_id)


# -- request ids and logging ---------------------------------------------------------------
def _valid_request_id(value):
    return value and len(value) <= 128 and all(" " <= ch <= "~" for ch in value)


def assign_request_id():
    given = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = given if _valid_request_id(given) else uuid.uuid4().hex
    if request.method == "OPTIONS" and request.url_rule is not None:
        return answer_options()
    return None


def answer_options():
    """Flask's automatic OPTIONS answer is an empty body; ours is the envelope like every other.

    It needs no credentials (as Flask-HTTPAuth lets OPTIONS through for CORS preflights):
    it tells only the allowed methods, which the OpenAPI document publishes anyway.
    """
    path = request.url_rule.rule
    allowed = sorted(
        {method for rule in current_app.url_map.iter_rules() if rule.rule == path for method in rule.methods}
    )
    response = envelope({"allow": allowed})
    response.headers["Allow"] = ", ".join(allowed)
    return response


def finish_response(response):
    response.headers[REQUEST_ID_HEADER] = g.get("request_id") or uuid.uuid4().hex
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or '-') on every log record."""

    def filter(self, record):
        if not hasattr(record, "request_id"):
            record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        return True


def configure_logging(level):
    root = logging.getLogger()
    if not any(isinstance(f, RequestIdFilter) for h in root.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


# -- the factory -----------------------------------------------------------------------------
def create_app(overrides=None):
    """Build the app: settings, database (migrated), delegates, routes. Starts no threads."""
    app = Flask(__name__)
    app.config.update(config.from_env())
    app.config.update(overrides or {})
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    configure_logging(app.config["STEPD_LOG_LEVEL"])

    store = Store(app.config["STEPD_DB"], app.config["STEPD_SYNC"])
    store.create_file()
    store.migrate()
    store.close()  # so no connection is inherited if a server forks after building the app
    registry = load_registry(app.config["STEPD_DELEGATES_PATH"] or None)
    app.extensions["stepd"] = Stepd(store, registry, Runner(store, registry, app.config["STEPD_THREADS"]))

    app.url_map.converters["id"] = IdConverter
    app.url_map.merge_slashes = False  # `//` would be a 308 redirect outside the envelope; now a 404
    app.register_blueprint(api)
    app.register_blueprint(health)
    app.before_request(assign_request_id)
    app.after_request(finish_response)
    app.register_error_handler(ValidationError, on_validation_error)
    app.register_error_handler(PreconditionFailed, on_precondition_failed)
    app.register_error_handler(HTTPException, on_http_error)
    app.register_error_handler(sqlite3.OperationalError, on_database_error)
    app.register_error_handler(Exception, on_unexpected_error)
    app.cli.add_command(token_cli)
    return app


def start_runner(app):
    """Start the delegate threads and heartbeat of this worker process."""
    app.extensions["stepd"].runner.start()
