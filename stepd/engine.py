"""What callers ask of processes and steps: start, restart (one or many, or a dry run),
complete, fail, cancel, skip, and the reads. The API's views call only this.

Every change goes through the store, in one transaction. Each attempt a caller begins here
is committed as queued (no runner has it yet); the node's dispatcher claims it for a runner at
the end of the same group transaction, and sends it once that commits (dispatch.py).
"""

import time
from contextlib import nullcontext

from stepd.liveness import runner_is_alive
from stepd.model import MAX_BULK, Busy, NoRunner, NotFound, PreconditionFailed, now_iso

BUSY_REASON = "The database was busy; nothing changed. Retry this step."
NO_RUNNER_GRACE_SECONDS = 10.0  # how long after start /healthz forgives that no runner is alive yet


class Engine:
    """The domain's operations over a store and a delegate registry."""

    def __init__(self, store, registry):
        self.store = store
        self.registry = registry
        self.started = time.monotonic()
        # The node's (start_node): new processes wait while it is crowded (admission.py). A process
        # with no node (the commands, a second app in the tests) has nothing to wait for.
        self.admission = None

    # -- processes -------------------------------------------------------------------------
    def start_process(self, name, steps, principal):
        """Start a process of (type, params) steps; its first step begins at once."""
        unknown = {
            position: {"type": [f"No delegate is registered for step type {step_type!r}."]}
            for position, (step_type, _params) in enumerate(steps)
            if step_type not in self.registry
        }
        if unknown:
            raise PreconditionFailed({"steps": unknown})
        if self.admission is not None:
            self.admission.wait()
        process, _job = self.store.create_process(name, steps, principal, None)
        return process

    def process(self, process_id):
        process = self.store.get_process(process_id)
        if process is None:
            raise NotFound("No process has this id.")
        return process

    def processes(self, where, limit, before_seq):
        """(a page of processes, newest first, the seq to continue before or None); `where`: status,
        name, created_after, created_before (None: any)."""
        return self.store.list_processes(where, limit, before_seq)

    def cancel(self, process_id, reason, principal):
        """A RUNNING or FAILED process, and each of its steps not yet done, becomes CANCELLED.

        A delegate still running for it sees ctx.cancelled within a second: the node's watch
        finds the attempt no longer executing and tells its runner (dispatch.Dispatcher.let_go_of_ended)."""
        return self.store.cancel_process(process_id, reason, principal)

    # -- steps -----------------------------------------------------------------------------
    def step(self, step_id):
        """One step with its attempt history."""
        step = self.store.get_step(step_id, with_history=True)
        if step is None:
            raise NotFound("No step has this id.")
        return step

    def steps(self, where, limit, before_seq):
        """Like `processes`; `where`: status, type, process_id, error_type."""
        return self.store.list_steps(where, limit, before_seq)

    def restart(self, step_id, params, principal, dry_run=False):
        """Restart one FAILED step in its own compare-and-set, with `params` laid over its last
        ones; a dry run checks the same and rolls back. Returns the attempt's Job."""
        with self.store.atomic(rollback=True) if dry_run else nullcontext():
            return self.store.restart_failed_step(step_id, params, principal, None, self.registry.__contains__)

    def restart_many(self, request, principal, dry_run=False):
        """Restart the steps a bulk request names or its filter matches, each as `restart` does.

        `request`: step_ids, or filter and cursor; and params. Returns {"restarted": [Job],
        "skipped": [{"step_id", "reason"}], "next_position": where a filter walk goes on, or None}.
        """
        step_ids, next_position = self._steps_to_restart(request)
        restarted, skipped = [], []
        for step_id in step_ids:
            try:
                restarted.append(self.restart(step_id, request["params"], principal, dry_run))
            except PreconditionFailed as exc:
                skipped.append({"step_id": step_id, "reason": reason_of(exc.errors)})
            except Busy:
                skipped.append({"step_id": step_id, "reason": BUSY_REASON})
        return {"restarted": restarted, "skipped": skipped, "next_position": next_position}

    def _steps_to_restart(self, request):
        """(the step ids a bulk restart takes, where a filter walk goes on next, or None)."""
        if request["step_ids"] is not None:
            return request["step_ids"], None
        # A walk over pages takes the steps that had failed when it began: a step it restarted
        # that fails again (now later than the cursor) is not picked twice.
        cursor = request["cursor"]
        after, until = (cursor[:2], cursor[2]) if cursor else (None, now_iso())
        rows, more = self.store.failed_steps({**request["filter"], "failed_until": until}, after, MAX_BULK)
        return [step_id for step_id, _, _ in rows], (*rows[-1][1:], until) if more else None

    def complete(self, step_id, result):
        """A STARTED step becomes COMPLETED from outside; the process carries on."""
        step, _next_job = self.store.complete_step(step_id, result, None)
        return step

    def skip(self, step_id, result, reason, principal):
        """A FAILED step becomes SKIPPED with `result` (which later steps see); the process carries on."""
        step, _next_job = self.store.skip_step(step_id, result, reason, principal, None)
        return step

    def fail(self, step_id, message, principal):
        """A STARTED step becomes FAILED from outside (`message` None: say who failed it)."""
        if message is None:
            message = f"Failed by {principal} through fail-step."
        return self.store.fail_step(step_id, message)

    # -- the service -----------------------------------------------------------------------
    def delegates(self):
        return [{"type": d.type, "description": d.description, "retry": d.retry} for d in self.registry.all()]

    def health(self):
        """What /healthz reports. Raises model.Unavailable when the database does not answer, and
        NoRunner when, 10 s after start, no runner is alive: queued steps would never run."""
        self.store.ping()
        alive = sum(1 for row in self.store.runners() if runner_is_alive(row))
        if not alive and time.monotonic() - self.started > NO_RUNNER_GRACE_SECONDS:
            raise NoRunner("No runner is alive: queued steps would not run. Start one (STEPD_RUNNERS, stepd runner).")
        return {"database": "ok", "runners": alive}


def reason_of(errors):
    """A precondition's field errors as one sentence, for a skipped step."""
    return " ".join(message for messages in errors.values() for message in messages)
