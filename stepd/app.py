"""HTTP: the app factory and the routes of /api/v1 and /healthz, each a few lines calling the engine.

How a view reads its input and frames its answer is `envelope.endpoint`'s job; who may call it,
`auth`'s; what it does, `engine`'s.
"""

import functools
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.routing import BaseConverter
from werkzeug.routing import ValidationError as RouteMismatch

from stepd import auth, config, envelope, errors, handoff, idempotency, metrics, ui
from stepd import schemas as s
from stepd.auth import current_principal, reads, writes
from stepd.delegates import Registry, load_registry
from stepd.engine import Engine
from stepd.envelope import endpoint, load_query
from stepd.httplogs import ContextFilter
from stepd.idempotency import idempotent
from stepd.logs import add_filter, configure_logging
from stepd.model import MAX_BULK
from stepd.node import Node
from stepd.runner import STOP_GRACE_SECONDS, Runner
from stepd.store import Store
from stepd.wiring import make_node, open_store


@dataclass
class Stepd:
    """What one app holds, kept in app.extensions["stepd"]; the views use only `engine`."""

    store: Store
    registry: Registry
    engine: Engine
    node: Node | None = None  # the node's dispatcher and chores, in the process that writes (start_node)
    runner: Runner | None = None  # a runner on this process's threads (start_background), if any


def engine():
    return current_app.extensions["stepd"].engine


class App(Flask):
    """Flask, with whether each view and hook is `async def` looked up once per function: Flask's
    own `ensure_sync` (its documented place for this) asks `inspect` on every request, for the view
    and every hook and handler (14 times a restart: ~2% of one's CPU, measured in-process)."""

    def ensure_sync(self, func):
        synced = self._synced.get(func)
        if synced is None:
            synced = self._synced[func] = super().ensure_sync(func)
        return synced

    @functools.cached_property
    def _synced(self):
        return {}


# -- routing ---------------------------------------------------------------------------------
ACTION_NAMES = {
    "steps", "restart-failed-step", "restart-failed-steps", "fail-step", "complete-step", "cancel", "skip-step",
}  # fmt: skip


class IdConverter(BaseConverter):
    """An id path segment; action names are not ids, so `GET …/restart-failed-step` is a 405."""

    regex = r"[A-Za-z0-9_-]{1,64}"

    def to_python(self, value):
        if value in ACTION_NAMES:
            raise RouteMismatch()
        return value


api = Blueprint("api", __name__, url_prefix="/api/v1")
health = Blueprint("health", __name__)


# -- processes -------------------------------------------------------------------------------
@api.post("/processes")
@writes
@idempotent
@endpoint(data=s.ProcessSchema, body=s.StartProcessSchema, status=201, errors=(412,), tag="processes")
def start_process(body):
    """Start a process; its first step starts at once."""
    steps = [(step["type"], step["params"]) for step in body["steps"]]
    return engine().start_process(body["name"], steps, current_principal().name), "Process started."


@api.get("/processes")
@reads
@endpoint(data=s.ProcessPageSchema, query=s.ProcessListQuery, errors=(412,), tag="processes")
def list_processes(query):
    """List processes, newest first, without their steps; filter by status, name and creation time."""
    where = {key: query[key] for key in ("status", "name", "created_after", "created_before")}
    items, next_seq = engine().processes(where, query["limit"], query["cursor"])
    return {"items": items, "nextCursor": s.encode_cursor("p", next_seq)}


@api.get("/processes/<id:process_id>")
@reads
# 405: GET …/processes/fail-step and the like (an action's name where an id may stand)
@endpoint(data=s.ProcessSchema, errors=(404, 405, 412), tag="processes")
def get_process(process_id):
    """One process with its steps and variables."""
    return engine().process(process_id)


@api.post("/processes/cancel")
@writes
@idempotent
@endpoint(data=s.ProcessSchema, body=s.CancelProcessSchema, errors=(412,), tag="processes")
def cancel_process(body):
    """Cancel a RUNNING or FAILED process: it and each of its steps not yet done become CANCELLED."""
    process = engine().cancel(body["process_id"], body["reason"], current_principal().name)
    return process, "Process cancelled."


# -- steps -----------------------------------------------------------------------------------
@api.get("/processes/steps")
@reads
@endpoint(data=s.StepPageSchema, query=s.StepListQuery, errors=(412,), tag="steps")
def list_steps(query):
    """List steps across processes, newest first; filter by status, type, process and error type."""
    where = {key: query[key] for key in ("status", "type", "process_id", "error_type")}
    items, next_seq = engine().steps(where, query["limit"], query["cursor"])
    return {"items": items, "nextCursor": s.encode_cursor("s", next_seq)}


@api.get("/processes/steps/<id:step_id>")
@reads
@endpoint(data=s.StepDetailSchema, errors=(404, 412), tag="steps")
def get_step(step_id):
    """One step with its attempt history."""
    return engine().step(step_id)


@api.post("/processes/restart-failed-step")
@writes
@idempotent
@endpoint(data=s.RestartResultSchema, body=s.RestartStepSchema, query=s.RestartQuery, errors=(412,), tag="steps")
def restart_failed_step(body, query):
    """Restart a FAILED step, with params laid over its last ones; the process carries on from it."""
    dry_run = query["dry_run"]
    job = engine().restart(body["step_id"], body["params"], current_principal().name, dry_run)
    return job, "Dry run: the step would be restarted; nothing changed." if dry_run else "Step restarted."


@api.post("/processes/restart-failed-steps")
@writes
@idempotent
@endpoint(data=s.RestartManyResultSchema, body=s.RestartManySchema, query=s.RestartQuery, errors=(412,), tag="steps")
def restart_failed_steps(body, query):
    """Restart many FAILED steps, listed or matched by a filter, each exactly as restart-failed-step does."""
    dry_run = query["dry_run"]
    outcome = engine().restart_many(body, current_principal().name, dry_run)
    restarted, skipped = len(outcome["restarted"]), len(outcome["skipped"])
    message = (
        f"Dry run: {restarted} step(s) would be restarted, {skipped} skipped; nothing changed."
        if dry_run
        else f"{restarted} step(s) restarted, {skipped} skipped."
    )
    if outcome["next_position"] is not None:
        message += f" More than {MAX_BULK} steps match: send the same filter with cursor = nextCursor."
    return {**outcome, "nextCursor": s.encode_failure_cursor(outcome["next_position"])}, message


@api.post("/processes/fail-step")
@writes
@idempotent
@endpoint(data=s.StepSchema, body=s.FailStepSchema, errors=(412,), tag="steps")
def fail_step(body):
    """Fail a STARTED step from outside (a deferred delegate's work failed, or an operator aborts it)."""
    message = body["error"]["message"] if body["error"] else None
    return engine().fail(body["step_id"], message, current_principal().name), "Step failed."


@api.post("/processes/complete-step")
@writes
@idempotent
@endpoint(data=s.StepSchema, body=s.CompleteStepSchema, errors=(412,), tag="steps")
def complete_step(body):
    """Complete a STARTED step from outside, with an optional result; the process carries on."""
    return engine().complete(body["step_id"], body["result"]), "Step completed."


@api.post("/processes/skip-step")
@writes
@idempotent
@endpoint(data=s.StepSchema, body=s.SkipStepSchema, errors=(412,), tag="steps")
def skip_step(body):
    """Skip a FAILED step, with an optional result later steps see; the process carries on."""
    step = engine().skip(body["step_id"], body["result"], body["reason"], current_principal().name)
    return step, "Step skipped."


# -- the service -----------------------------------------------------------------------------
@api.get("/delegates")
@reads
@endpoint(data=s.DelegateSchema, many=True, errors=(412,), tag="service")
def list_delegates():
    """The registered step types and what each does."""
    return engine().delegates()


@api.get("/openapi.json")
def openapi_document():
    """This API's OpenAPI 3 document (served as is, not in the envelope, so tools can read it)."""
    from stepd.openapi import build_spec  # imported here: it walks the app's own routes

    load_query(s.NoQuerySchema)
    if "stepd.openapi" not in current_app.extensions:  # the routes do not change: build it once
        current_app.extensions["stepd.openapi"] = build_spec(current_app)
    return current_app.extensions["stepd.openapi"]


@health.get("/healthz")
@endpoint(data=s.HealthSchema, errors=(503,), tag="service")
def healthz():
    """200 when the database answers, else 503. Needs no credentials."""
    return engine().health()


@health.get("/metrics")
@reads
def metrics_page():
    """The Prometheus metrics, in its text format (not in the envelope, so a scraper reads it)."""
    return metrics.exposition(current_app.extensions["stepd"].store), {"Content-Type": metrics.CONTENT_TYPE}


# -- the factory -----------------------------------------------------------------------------
def create_app(overrides=None, node_address=None):
    """Build the app: settings, database (made and migrated), delegates, routes. Starts no threads.

    `node_address`: the node's socket, for the HTTP front of `stepd serve` (front.py), which writes
    nothing itself and hands its writes to the node there (handoff.py). Without it, the app's engine
    writes in this process (the node, and the tests)."""
    app = App(__name__)
    app.config.update(config.from_env())
    app.config.update(overrides or {})
    configure_logging(app.config["STEPD_LOG_LEVEL"], app.config["STEPD_LOG_FORMAT"])
    add_filter(ContextFilter())  # each line made inside a request carries its id and principal

    store = open_store(app.config)
    registry = load_registry(app.config["STEPD_DELEGATES_PATH"] or None)
    if node_address is None:
        engine = Engine(store, registry)
    else:
        store.db.refuse_writes(WRITES_REFUSED)
        engine = handoff.HandingEngine(store, registry, handoff.Window(node_address))
    app.extensions["stepd"] = Stepd(store, registry, engine)
    auth.init_app(app, store)
    idempotency.init_app(app, store)

    app.url_map.converters["id"] = IdConverter
    app.url_map.merge_slashes = False  # `//` would be a 308 redirect outside the envelope; now a 404
    app.register_blueprint(api)
    app.register_blueprint(health)
    ui.init_app(app, store, exempt=(api,))  # the operator page, /ui/; the JSON API takes no CSRF token
    envelope.init_app(app)
    errors.init_app(app)
    metrics.init_app(app)  # every request counted and timed, by its route
    if node_address is not None:
        # First of all the hooks: the body, kept before the CSRF check reads the form (Werkzeug then
        # parses the kept bytes); last: the request sent whole, with the front's request id.
        app.before_request_funcs.setdefault(None, []).insert(0, functools.partial(_keep_the_body, app))
        app.before_request(functools.partial(_forward_whole, app, engine.window))
    app.teardown_appcontext(lambda _exc: store.db.release())  # PostgreSQL: its read connection back to the pool
    return app


WRITES_REFUSED = "the HTTP front writes nothing: its writes are the node's (handoff.py)"


def _keep_the_body(app):
    if handoff.forwards(request, app):
        request.get_data(cache=True)


def _forward_whole(app, window):
    """A request that holds a write transaction across its view is run whole by the node (handoff.forwards)."""
    if not handoff.forwards(request, app):
        return None
    environ = {**request.environ, "HTTP_X_REQUEST_ID": g.request_id}  # the node answers under the front's id
    status, headers, body = window.forward(environ, request.get_data())
    return Response(body, status, headers)  # its headers the node's (ui/access.py leaves its HTML policy)


def start_node(app, runner_processes):
    """Make this process the node: its dispatcher and chores, and `runner_processes` runner
    processes (the service's HTTP worker does this; node.py)."""
    stepd = app.extensions["stepd"]
    if stepd.node is None:
        stepd.node = make_node(stepd.store, stepd.registry, app.config)
        stepd.node.start(runner_processes)
        stepd.engine.admission = stepd.node.admission
    return stepd.node


def start_background(app):
    """Make this process the node, with one runner on its threads (the tests): it runs what this
    app queues, as a runner process would."""
    stepd = app.extensions["stepd"]
    if stepd.runner is None:
        node = start_node(app, runner_processes=0)
        (stepd.runner,) = node.start_runners_here(1)


def stop_background(app, grace=STOP_GRACE_SECONDS):
    """Stop the node and its runners: running delegates get `grace` seconds, then their steps are Interrupted."""
    stepd = app.extensions["stepd"]
    if stepd.node is not None:
        stepd.node.stop(grace=grace)
        stepd.node = None
        stepd.engine.admission = None
    stepd.runner = None
