"""The store's contract: transitions, compare-and-set under threads, runners, answers, tokens.

Every test of the contract speaks only the store's own verbs, never SQL, through the
`open_store` fixture (conftest.py), which runs it against each backend factory in STORE_BACKENDS;
a second backend passes by its factory's being added there. The query plans at the end are SQLite's own.
"""

import threading
import time

import pytest
from helpers import all_at_once, wait_for

from stepd import invariants
from stepd import store as st
from stepd.db import Database
from stepd.model import COMPLETED, FAILED, Outcome, PreconditionFailed


def fail(store, job, message="boom"):
    return store.finish_attempt(job, FAILED, error={"type": "ValueError", "message": message}, runner_id="r1")


def has_delegate(_type):
    return True


def started_process(store, *types):
    return store.create_process("p", [(t, {"n": ("LONG", i)}) for i, t in enumerate(types)], "alice", "r1")


def runner_row(runner_id):
    return {"id": runner_id, "host": "h", "pid": 1, "pid_started": None}


def race(count, call):
    """call(n) on `count` threads released together (helpers.all_at_once); returns what each
    returned or raised."""

    def returning_errors(n):
        try:
            return call(n)
        except Exception as exc:  # returned, asserted by the caller
            return exc

    return all_at_once(count, returning_errors)


# -- processes and steps ---------------------------------------------------------------------
def test_create_starts_step_zero_only(contract_store):
    store = contract_store
    process, job = started_process(store, "a", "b", "c")
    assert [s["status"] for s in process["steps"]] == ["STARTED", "PENDING", "PENDING"]
    assert process["status"] == "RUNNING"
    assert (job.type, job.attempt, job.params) == ("a", 1, {"n": ("LONG", 0)})


@pytest.mark.parametrize("runner_id", ["r1", None])
def test_create_answers_what_a_read_of_the_process_gives(contract_store, runner_id):
    """create_process makes its answer from the rows it wrote (no read after): it must be exactly
    what GET gives, step 0 begun (RUNNING for a runner, QUEUED without), its attempt recorded."""
    store = contract_store
    store.heartbeat(runner_row("r1"))
    params = [
        {"s": ("STRING", "it's 100%"), "d": ("DOUBLE", 1e300)},
        {},
        {"l": ("LONG", -(2**62)), "b": ("BOOLEAN", True)},
    ]
    for name in ("named", None):
        process, job = store.create_process(
            name, [("a", params[0]), ("b", params[1]), ("c", params[2])], "alice", runner_id
        )
        assert process == store.get_process(process["id"])
        assert [step["phase"] for step in process["steps"]] == ["RUNNING" if runner_id else "QUEUED", None, None]
        assert (job.step_id, job.type, job.attempt, job.params) == (process["steps"][0]["id"], "a", 1, params[0])
        (attempt,) = store.get_step(job.step_id, with_history=True)["attempt_history"]
        assert (attempt["trigger"], attempt["principal"], attempt["status"], attempt["params"]) == (
            "start",
            "alice",
            "STARTED",
            params[0],
        )
    assert invariants.check(getattr(store.db, "url", None) or store.db.path).problems == []


def test_completion_starts_the_next_step_in_the_same_transaction(contract_store):
    store = contract_store
    process, job = started_process(store, "a", "b")
    next_job = store.finish_attempt(job, COMPLETED, result={"x": ("STRING", "y")}, runner_id="r1")
    steps = store.get_process(process["id"])["steps"]
    assert [s["status"] for s in steps] == ["COMPLETED", "STARTED"]
    assert steps[0]["result"] == {"x": ("STRING", "y")}
    assert next_job.step_id == steps[1]["id"]
    history = store.get_step(next_job.step_id, with_history=True)["attempt_history"]
    assert [(a["trigger"], a["principal"]) for a in history] == [("start", "alice")]
    assert store.finish_attempt(next_job, COMPLETED, runner_id="r1") is None
    assert store.get_process(process["id"])["status"] == "COMPLETED"


def test_failure_halts_and_restart_carries_on(contract_store):
    store = contract_store
    process, job = started_process(store, "a", "b")
    assert fail(store, job) is None
    halted = store.get_process(process["id"])
    assert halted["status"] == "FAILED"
    assert [s["status"] for s in halted["steps"]] == ["FAILED", "PENDING"]
    restarted = store.restart_failed_step(job.step_id, {"m": ("DOUBLE", 1.5)}, "bob", "r2", has_delegate)
    assert restarted.attempt == 2
    assert restarted.params == {"n": ("LONG", 0), "m": ("DOUBLE", 1.5)}
    assert store.get_process(process["id"])["status"] == "RUNNING"
    step = store.get_step(job.step_id, with_history=True)
    assert step["attempts"] == 2 and step["error"] is None
    assert [(a["attempt"], a["trigger"], a["principal"], a["status"]) for a in step["attempt_history"]] == [
        (1, "start", "alice", "FAILED"),
        (2, "restart", "bob", "STARTED"),
    ]


@pytest.mark.parametrize("state", ["PENDING", "STARTED", "COMPLETED"])
def test_only_a_failed_step_restarts(contract_store, state):
    store = contract_store
    process, job = started_process(store, "a", "b")
    targets = {"STARTED": job.step_id, "PENDING": process["steps"][1]["id"]}
    if state == "COMPLETED":
        store.finish_attempt(job, COMPLETED, runner_id="r1")
        targets["COMPLETED"] = job.step_id
    with pytest.raises(PreconditionFailed) as refused:
        store.restart_failed_step(targets[state], {}, "bob", "r1", has_delegate)
    assert refused.value.errors == {"status": [f"Step is {state}; only a FAILED step can be restarted."]}


def test_restart_refuses_unknown_step_and_missing_delegate(contract_store):
    store = contract_store
    _, job = started_process(store, "a")
    fail(store, job)
    with pytest.raises(PreconditionFailed) as unknown:
        store.restart_failed_step("nope", {}, "bob", "r1", has_delegate)
    assert unknown.value.errors == {"step_id": ["No step has this id."]}
    with pytest.raises(PreconditionFailed) as no_delegate:
        store.restart_failed_step(job.step_id, {}, "bob", "r1", lambda t: False)
    assert "type" in no_delegate.value.errors
    assert store.get_step(job.step_id)["attempts"] == 1


def test_restart_refuses_too_many_names_after_overlay(contract_store):
    store = contract_store
    process, job = store.create_process(None, [("a", {f"k{i}": ("LONG", i) for i in range(200)})], "alice", "r1")
    fail(store, job)
    extra = {f"x{i}": ("LONG", i) for i in range(57)}
    with pytest.raises(PreconditionFailed) as refused:
        store.restart_failed_step(job.step_id, extra, "bob", "r1", has_delegate)
    assert "params" in refused.value.errors
    assert store.get_step(job.step_id)["status"] == "FAILED"
    ok = store.restart_failed_step(job.step_id, dict(list(extra.items())[:56]), "bob", "r1", has_delegate)
    assert len(ok.params) == 256


def test_concurrent_restarts_from_threads_have_one_winner(open_store):
    setup = open_store()
    _, job = setup.create_process(None, [("a", {})], "alice", "r1")
    fail(setup, job)
    stores = [open_store() for _ in range(16)]  # each thread its own store and connection, like separate workers

    def restart(n):
        return stores[n].restart_failed_step(job.step_id, {"n": ("LONG", n)}, f"t{n}", "r1", has_delegate)

    outcomes = race(16, restart)
    assert sorted(type(o).__name__ for o in outcomes) == ["Job"] + ["PreconditionFailed"] * 15
    # each loser is told the status the winner left (on PostgreSQL it read FAILED, then lost the compare-and-set)
    refusals = {str(o.errors) for o in outcomes if isinstance(o, PreconditionFailed)}
    assert refusals == {str({"status": ["Step is STARTED; only a FAILED step can be restarted."]})}
    step = setup.get_step(job.step_id, with_history=True)
    assert step["attempts"] == 2 and len(step["attempt_history"]) == 2


def test_a_runners_batch_of_outcomes_is_recorded_in_one_change(contract_store):
    """What the dispatcher records for a runner at once (on PostgreSQL the completions are one
    statement): each completion begins its process's next step for that runner, with ctx.results and
    the request id carried on; a stale one changes nothing; a last step completes its process; a
    failure among them halts its own process only."""
    store = contract_store
    store.heartbeat(runner_row("r2"))
    (first, a), (second, b), (third, c), (fourth, d) = (started_process(store, "a", "b") for _ in range(4))
    a.results, a.request_id = {}, "req-a"
    last_of_b = store.finish_attempt(b, COMPLETED, runner_id="r1")
    store.fail_step(c.step_id, "ended from outside")  # c's outcome below is stale
    outcomes = [
        Outcome(a, COMPLETED, result={"x": ("LONG", 7)}),
        Outcome(last_of_b, COMPLETED, result=None),
        Outcome(c, COMPLETED, result=None),
        Outcome(d, FAILED, error={"type": "ValueError", "message": "no"}),
    ]
    begun = store.db.write(store.outcomes_job(outcomes, "r2"))
    assert [job.step_id for job in begun] == [first["steps"][1]["id"]]
    (next_of_a,) = begun
    assert (next_of_a.type, next_of_a.attempt, next_of_a.params) == ("b", 1, {"n": ("LONG", 1)})
    assert next_of_a.results == {0: {"x": ("LONG", 7)}} and next_of_a.request_id == "req-a"
    assert store.get_step(next_of_a.step_id)["phase"] == "RUNNING"
    history = store.get_step(next_of_a.step_id, with_history=True)["attempt_history"]
    assert [(h["trigger"], h["principal"], h["request_id"], h["status"]) for h in history] == [
        ("start", "alice", "req-a", "STARTED")
    ]
    assert store.get_step(a.step_id, with_history=True)["attempt_history"][0]["status"] == "COMPLETED"
    assert [p["status"] for p in map(store.get_process, (first["id"], second["id"], third["id"], fourth["id"]))] == [
        "RUNNING", "COMPLETED", "FAILED", "FAILED"
    ]  # fmt: skip
    assert store.get_step(c.step_id)["error"]["type"] == "ExternalFailure"
    # the tallies the batch wrote are what the database holds
    assert invariants.check(getattr(store.db, "url", None) or store.db.path).problems == []


def test_a_completion_for_no_runner_queues_the_next_step_and_says_so(contract_store):
    """The next step begun with no runner is QUEUED, and the store tells its node (on_queued: a
    claim at the end of the group, and on PostgreSQL a NOTIFY to the others)."""
    store = contract_store
    told = []
    store.on_queued = lambda: told.append(True)
    _, job = started_process(store, "a", "b")
    next_job = store.finish_attempt(job, COMPLETED, runner_id=None)
    assert store.get_step(next_job.step_id)["phase"] == "QUEUED" and told == [True]


def test_stale_outcome_is_ignored(contract_store):
    store = contract_store
    _, job = started_process(store, "a", "b")
    failed = store.fail_step(job.step_id, "operator gave up")
    assert failed["error"] == {"type": "ExternalFailure", "message": "operator gave up"}
    # the delegate that was still running returns later: nothing changes
    assert store.finish_attempt(job, COMPLETED, runner_id="r1") is None
    assert store.get_step(job.step_id)["status"] == "FAILED"
    # and an old attempt cannot complete a newer one
    newer = store.restart_failed_step(job.step_id, {}, "bob", "r1", has_delegate)
    assert store.finish_attempt(job, COMPLETED, runner_id="r1") is None
    assert store.get_step(job.step_id)["attempts"] == newer.attempt == 2


def test_an_attempt_finishes_completed_or_failed_and_nothing_else(contract_store):
    """finish_attempt records what a delegate did; any other status is the caller's mistake, and
    changes nothing."""
    store = contract_store
    _, job = started_process(store, "a", "b")
    with pytest.raises(ValueError, match="COMPLETED or FAILED"):
        store.finish_attempt(job, "DEFERRED", runner_id="r1")
    step = store.get_step(job.step_id)
    assert (step["status"], step["phase"]) == ("STARTED", "RUNNING")


def test_deferred_step_waits_for_complete_step(contract_store):
    store = contract_store
    process, job = started_process(store, "a", "b")
    store.defer_attempt(job)
    assert store.get_step(job.step_id)["deferred"] is True
    assert store.finish_attempt(job, COMPLETED, runner_id="r1") is None  # a deferred attempt ends only from outside
    step, next_job = store.complete_step(job.step_id, {"ok": ("LONG", 1)}, "r1")
    assert step["status"] == "COMPLETED" and step["deferred"] is False and step["result"] == {"ok": ("LONG", 1)}
    assert next_job.type == "b"
    with pytest.raises(PreconditionFailed):
        store.complete_step(job.step_id, None, "r1")


def test_complete_and_fail_refuse_an_unknown_step_by_its_domain_name(contract_store):
    store = contract_store
    for call in (lambda: store.complete_step("nope", None, "r1"), lambda: store.fail_step("nope", "x")):
        with pytest.raises(PreconditionFailed) as refused:
            call()
        assert refused.value.errors == {"step_id": ["No step has this id."]}


def test_attempt_is_current(contract_store):
    store = contract_store
    _, job = started_process(store, "a")
    assert store.attempt_is_current(job)
    store.fail_step(job.step_id, "gave up")
    assert not store.attempt_is_current(job)


# -- automatic retries ---------------------------------------------------------------------
def test_a_scheduled_retry_is_claimed_once_when_due(open_store):
    store = open_store()
    _, job = started_process(store, "a")
    assert store.schedule_retry(job, {"type": "ValueError", "message": "later"}, "2000-01-01T00:00:00.000Z")
    assert not store.attempt_is_current(job)
    assert store.schedule_retry(job, {"type": "ValueError", "message": "again"}, "2000-01-01T00:00:00.000Z") is False
    stores = [open_store() for _ in range(8)]
    claimed = [job for jobs in race(8, lambda n: stores[n].claim_due_retries(f"r{n}", 10)) for job in jobs]
    assert [(j.step_id, j.attempt, j.retries_used) for j in claimed] == [(job.step_id, 2, 1)]
    history = store.get_step(job.step_id, with_history=True)["attempt_history"]
    assert [(a["trigger"], a["status"]) for a in history] == [("start", "FAILED"), ("retry", "STARTED")]


def test_a_retry_not_yet_due_is_not_claimed(contract_store):
    store = contract_store
    _, job = started_process(store, "a")
    store.schedule_retry(job, {"type": "ValueError", "message": "later"}, "2999-01-01T00:00:00.000Z")
    assert store.claim_due_retries("r1", 10) == []
    with pytest.raises(PreconditionFailed, match="automatic retry"):
        store.complete_step(job.step_id, None, "r1")


# -- results, cancel and skip (SPEC 10) ----------------------------------------------------------
def test_earlier_results_are_those_of_the_steps_before_by_position(contract_store):
    store = contract_store
    process, job = started_process(store, "a", "b", "c", "d")
    job = store.finish_attempt(job, COMPLETED, result={"x": ("LONG", 1)}, runner_id="r1")
    job = store.finish_attempt(job, COMPLETED, runner_id="r1")  # no result
    assert store.earlier_results(job.step_id) == {0: {"x": ("LONG", 1)}}
    job = store.finish_attempt(job, COMPLETED, result={"x": ("STRING", "y"), "z": ("DOUBLE", 0.5)}, runner_id="r1")
    assert store.earlier_results(job.step_id) == {
        0: {"x": ("LONG", 1)},
        2: {"x": ("STRING", "y"), "z": ("DOUBLE", 0.5)},
    }
    assert store.earlier_results(process["steps"][0]["id"]) == {}
    store.finish_attempt(job, COMPLETED, result={"w": ("LONG", 4)}, runner_id="r1")
    variables = store.get_process(process["id"])["variables"]
    assert variables == {"x": ("STRING", "y"), "z": ("DOUBLE", 0.5), "w": ("LONG", 4)}


def test_cancel_ends_the_process_and_every_step_not_done(contract_store):
    store = contract_store
    process, job = started_process(store, "a", "b", "c")
    job_b = store.finish_attempt(job, COMPLETED, runner_id="r1")
    cancelled = store.cancel_process(process["id"], "no longer needed", "carol")
    assert cancelled["status"] == "CANCELLED"
    assert (
        cancelled["intervention"]["principal"] == "carol" and cancelled["intervention"]["reason"] == "no longer needed"
    )
    assert [s["status"] for s in cancelled["steps"]] == ["COMPLETED", "CANCELLED", "CANCELLED"]
    history = store.get_step(job_b.step_id, with_history=True)["attempt_history"]
    assert [a["status"] for a in history] == ["CANCELLED"]
    # The delegate that was running returns later; a restart or skip comes: nothing changes.
    assert store.finish_attempt(job_b, COMPLETED, runner_id="r1") is None
    assert store.attempt_is_current(job_b) is False
    with pytest.raises(PreconditionFailed):
        store.restart_failed_step(job_b.step_id, {}, "bob", "r1", has_delegate)
    with pytest.raises(PreconditionFailed):
        store.skip_step(job_b.step_id, None, None, "bob", "r1")
    assert store.get_process(process["id"]) == cancelled


def test_cancel_refuses_an_unknown_a_completed_and_a_cancelled_process(contract_store):
    store = contract_store
    with pytest.raises(PreconditionFailed) as unknown:
        store.cancel_process("nope", None, "carol")
    assert unknown.value.errors == {"process_id": ["No process has this id."]}
    process, job = started_process(store, "a")
    store.finish_attempt(job, COMPLETED, runner_id="r1")
    with pytest.raises(PreconditionFailed, match="COMPLETED"):
        store.cancel_process(process["id"], None, "carol")
    other, _ = started_process(store, "a")
    store.cancel_process(other["id"], None, "carol")
    with pytest.raises(PreconditionFailed, match="CANCELLED"):
        store.cancel_process(other["id"], None, "dave")


def test_skip_carries_the_process_on_with_the_result(contract_store):
    store = contract_store
    process, job = started_process(store, "a", "b")
    fail(store, job)
    step, next_job = store.skip_step(job.step_id, {"r": ("LONG", 7)}, "by hand", "carol", "r1")
    assert (step["status"], step["result"], step["intervention"]["action"]) == ("SKIPPED", {"r": ("LONG", 7)}, "skip")
    assert next_job.type == "b" and next_job.attempt == 1
    assert store.earlier_results(next_job.step_id) == {0: {"r": ("LONG", 7)}}
    assert store.get_process(process["id"])["status"] == "RUNNING"
    store.finish_attempt(next_job, COMPLETED, runner_id="r1")
    assert store.get_process(process["id"])["status"] == "COMPLETED"


def test_skip_of_the_last_step_completes_the_process(contract_store):
    store = contract_store
    process, job = started_process(store, "a")
    fail(store, job)
    assert store.skip_step(job.step_id, None, None, "carol", "r1")[1] is None
    assert store.get_process(process["id"])["status"] == "COMPLETED"


@pytest.mark.parametrize("action", ["cancel", "skip"])
def test_of_16_concurrent_cancels_or_skips_from_threads_one_wins(open_store, action):
    setup = open_store()
    process, job = started_process(setup, "a", "b")
    fail(setup, job)
    stores = [open_store() for _ in range(16)]
    if action == "cancel":
        outcomes = race(16, lambda n: stores[n].cancel_process(process["id"], f"t{n}", f"t{n}"))
    else:
        outcomes = race(16, lambda n: stores[n].skip_step(job.step_id, {"n": ("LONG", n)}, None, f"t{n}", "r1"))
    winners = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(winners) == 1 and all(isinstance(o, PreconditionFailed) for o in outcomes if o not in winners)
    said = {
        "cancel": "Process is CANCELLED; only a RUNNING or FAILED process can be cancelled.",
        "skip": "Step is SKIPPED; only a FAILED step can be skipped.",
    }[action]
    assert {o.errors["status"][0] for o in outcomes if o not in winners} == {said}  # the status as the winner left it
    steps = setup.get_process(process["id"])["steps"]
    if action == "skip":
        assert [(s["status"], s["attempts"]) for s in steps] == [("SKIPPED", 1), ("STARTED", 1)]
    else:
        assert [s["status"] for s in steps] == ["CANCELLED", "CANCELLED"]


ROUNDS = 10


def _race_with_cancel(open_store, make, other):
    """Race a cancel of a fresh process against `other(store, state)`, ROUNDS times; returns, per
    round, (the process as it ended, whether the cancel won, what `other` returned or raised)."""
    setup, racers = open_store(), [open_store(), open_store()]
    ends = []
    for _ in range(ROUNDS):
        state = make(setup)
        outcomes = race(
            2,
            lambda n, state=state: (
                racers[0].cancel_process(state["process_id"], None, "carol") if n == 0 else other(racers[1], state)
            ),
        )
        ends.append((setup.get_process(state["process_id"]), not isinstance(outcomes[0], Exception), outcomes[1]))
    return ends


def _failed(store):
    process, job = started_process(store, "a", "b")
    fail(store, job)
    return {"process_id": process["id"], "job": job}


def _history(store, step_id):
    return [a["status"] for a in store.get_step(step_id, with_history=True)["attempt_history"]]


def test_a_cancel_racing_a_restart_ends_cancelled_with_the_restart_attempt_closed(open_store):
    check = open_store()
    restart = lambda store, state: store.restart_failed_step(state["job"].step_id, {}, "bob", None, has_delegate)  # noqa: E731
    for process, cancel_won, restarted in _race_with_cancel(open_store, _failed, restart):
        assert cancel_won, "a FAILED or restarted process can always be cancelled"
        assert process["status"] == "CANCELLED"
        assert [s["status"] for s in process["steps"]] == ["CANCELLED", "CANCELLED"]
        step_id = process["steps"][0]["id"]
        if isinstance(restarted, Exception):  # the cancel came first: the restart found it CANCELLED
            assert isinstance(restarted, PreconditionFailed) and _history(check, step_id) == ["FAILED"]
        else:  # the restart came first: its attempt was begun, then ended by the cancel
            assert _history(check, step_id) == ["FAILED", "CANCELLED"]


def test_a_cancel_racing_a_skip_ends_in_one_consistent_state(open_store):
    check = open_store()
    skip = lambda store, state: store.skip_step(state["job"].step_id, None, None, "bob", None)  # noqa: E731
    for process, cancel_won, skipped in _race_with_cancel(open_store, _failed, skip):
        assert cancel_won  # after a skip of step 0 the process is RUNNING, so still cancellable
        statuses = [s["status"] for s in process["steps"]]
        if isinstance(skipped, Exception):
            assert statuses == ["CANCELLED", "CANCELLED"]
        else:
            assert statuses == ["SKIPPED", "CANCELLED"]
            assert _history(check, process["steps"][1]["id"]) == ["CANCELLED"]  # begun by the skip, then cancelled


def test_a_cancel_racing_a_completion_ends_in_one_consistent_state(open_store):
    check = open_store()

    def running(store):
        process, job = started_process(store, "a", "b")
        return {"process_id": process["id"], "job": job}

    complete = lambda store, state: store.finish_attempt(state["job"], COMPLETED, runner_id="r1")  # noqa: E731
    for process, cancel_won, next_job in _race_with_cancel(open_store, running, complete):
        assert cancel_won and process["status"] == "CANCELLED"
        statuses = [s["status"] for s in process["steps"]]
        if next_job is None:  # the cancel came first: the outcome was stale
            assert statuses == ["CANCELLED", "CANCELLED"]
            assert _history(check, process["steps"][0]["id"]) == ["CANCELLED"]
        else:  # the completion came first and began step 1, which the cancel then ended
            assert statuses == ["COMPLETED", "CANCELLED"]
            assert _history(check, next_job.step_id) == ["CANCELLED"]


def test_a_cancel_racing_a_due_retry_ends_cancelled_and_the_retry_never_runs_after(open_store):
    check = open_store()

    def waiting(store):
        process, job = started_process(store, "a")
        store.schedule_retry(job, {"type": "E", "message": "later"}, "2000-01-01T00:00:00.000Z")
        return {"process_id": process["id"], "job": job}

    retry = lambda store, state: store.claim_due_retries("r2", 10)  # noqa: E731
    for process, cancel_won, claimed in _race_with_cancel(open_store, waiting, retry):
        assert cancel_won and [s["status"] for s in process["steps"]] == ["CANCELLED"]
        step = process["steps"][0]
        assert step["next_retry_at"] is None
        expected = ["FAILED", "CANCELLED"] if claimed else ["FAILED"]
        assert _history(check, step["id"]) == expected
        if claimed:
            assert check.finish_attempt(claimed[0], COMPLETED, runner_id="r2") is None  # its outcome is stale
    assert check.claim_due_retries("r3", 100) == []


# -- retention: deleting finished processes --------------------------------------------------------
def _finished_process(store, status):
    """A process that is COMPLETED, CANCELLED, FAILED or RUNNING; returns its id."""
    process, job = started_process(store, "a", "b")
    if status == "COMPLETED":
        store.finish_attempt(store.finish_attempt(job, COMPLETED, runner_id="r1"), COMPLETED, runner_id="r1")
    elif status == "CANCELLED":
        store.cancel_process(process["id"], None, "carol")
    elif status == "FAILED":
        fail(store, job)
    return process["id"]


def test_only_completed_and_cancelled_processes_finished_before_the_time_are_deleted(contract_store):
    store = contract_store
    ids = {status: _finished_process(store, status) for status in ("COMPLETED", "CANCELLED", "FAILED", "RUNNING")}
    assert store.finished_before("2000-01-01T00:00:00.000Z", 10) == []
    later = "2999-01-01T00:00:00.000Z"
    due = store.finished_before(later, 10)
    # oldest first, with the rows each would delete: the process, 2 steps, their attempts (2 and 1)
    assert due == [(ids["COMPLETED"], 5), (ids["CANCELLED"], 4)]
    assert store.count_finished_before(later) == 2
    assert store.finished_before(later, 1) == due[:1]
    due_ids = [process_id for process_id, _rows in due]
    assert store.delete_finished(due_ids + [ids["FAILED"], ids["RUNNING"]], later) == (2, 5 + 4)
    assert store.get_process(ids["COMPLETED"]) is None and store.get_process(ids["CANCELLED"]) is None
    assert store.get_process(ids["FAILED"])["status"] == "FAILED"
    assert store.get_process(ids["RUNNING"])["status"] == "RUNNING"
    assert store.finished_before(later, 10) == [] and store.delete_finished([], later) == (0, 0)


def test_writers_changing_different_processes_at_once_never_wait_on_each_other_into_busy(open_store):
    """Two stores (two nodes' writers), four threads each, start, complete, fail, restart and cancel
    processes of their own at once: none is refused Busy. (PostgreSQL's first tallies were counters
    updated in place, which every change of status locked until its group committed: two writers
    then deadlocked on them, for 4 operations in 10.)"""
    stores = [open_store(), open_store()]

    def lifecycles(n):
        store, refused = stores[n % 2], []
        for _ in range(6):
            try:
                process, job = started_process(store, "a", "b", "c")
                job = store.finish_attempt(job, COMPLETED, runner_id="r1")
                fail(store, job)
                store.restart_failed_step(job.step_id, {}, "bob", "r1", has_delegate)
                store.cancel_process(process["id"], None, "carol")
            except Exception as exc:  # returned, asserted below
                refused.append(exc)
        return refused

    assert [exc for refused in race(8, lifecycles) for exc in refused] == []
    steps, processes = counted_by_status(stores[0])
    assert processes == {"CANCELLED": 48} and steps == {"COMPLETED": 48, "CANCELLED": 96}


def test_racing_deletes_delete_each_process_once(open_store):
    setup = open_store()
    ids = [_finished_process(setup, "COMPLETED") for _ in range(20)]
    stores = [open_store() for _ in range(4)]
    later = "2999-01-01T00:00:00.000Z"
    outcomes = race(4, lambda n: stores[n].delete_finished(ids, later))
    assert sum(deleted for deleted, _rows in outcomes) == 20
    assert setup.count_finished_before(later) == 0


# -- runners -------------------------------------------------------------------------------
def test_orphans_of_a_gone_runner_are_interrupted_but_not_deferred_ones(contract_store):
    store = contract_store
    _, job_a = started_process(store, "a")
    _, job_b = started_process(store, "b")
    store.defer_attempt(job_b)
    store.heartbeat(runner_row("r1"))
    assert store.interrupt_orphans(lambda row: True) == []  # r1 is alive
    assert runner_ids(store) == ["r1"]
    assert store.interrupt_orphans(lambda row: row["id"] != "r1") == [job_a.step_id]
    step = store.get_step(job_a.step_id, with_history=True)
    assert step["status"] == "FAILED" and step["error"]["type"] == "Interrupted"
    assert step["attempt_history"][0]["status"] == "FAILED"
    assert store.get_process(step["process_id"])["status"] == "FAILED"
    assert store.get_step(job_b.step_id)["status"] == "STARTED"
    assert runner_ids(store) == []


def test_unregistered_runner_counts_as_gone(contract_store):
    store = contract_store
    _, job = started_process(store, "a")  # runner r1 never registered
    store.heartbeat(runner_row("r2"))
    assert store.interrupt_orphans(lambda row: True) == [job.step_id]


def test_a_sweep_that_finds_another_sweep_was_first_does_nothing(open_store):
    # The bug of issue 9: the loser of two sweeps of one dead runner raised ValueError.
    first, second = open_store(), open_store()
    _, job = started_process(first, "a")
    first.heartbeat(runner_row("r1"))
    first_done = threading.Event()
    looked = []

    def second_judges(row):  # the second sweep has read the runners; the first then sweeps it all
        if not looked:
            looked.append(row["id"])
            threading.Thread(target=lambda: (first.interrupt_orphans(lambda r: False), first_done.set())).start()
            assert first_done.wait(10)
        return False

    assert second.interrupt_orphans(second_judges) == []
    assert looked == ["r1"]
    assert first.get_step(job.step_id)["error"]["type"] == "Interrupted"
    assert runner_ids(first) == []


def test_racing_sweeps_interrupt_each_orphan_once(open_store):
    setup = open_store()
    stores = [open_store() for _ in range(4)]
    for round_number in range(10):
        jobs = [setup.create_process(None, [("a", {})], "alice", f"dead{round_number}")[1] for _ in range(5)]
        setup.heartbeat(runner_row(f"dead{round_number}"))
        outcomes = race(4, lambda n: stores[n].interrupt_orphans(lambda row: False))
        assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
        interrupted = [step_id for swept in outcomes for step_id in swept]
        assert sorted(interrupted) == sorted(job.step_id for job in jobs)  # each once, by one sweep
        assert runner_ids(setup) == []


def test_a_stopping_runner_interrupts_only_its_own_steps(contract_store):
    store = contract_store
    _, mine = started_process(store, "a")
    _, theirs = store.create_process(None, [("a", {})], "alice", "r2")
    store.heartbeat(runner_row("r1"))
    assert store.interrupt_runner("r1", "stopping") == [mine.step_id]
    assert store.get_step(mine.step_id)["error"] == {"type": "Interrupted", "message": "stopping"}
    assert store.get_step(theirs.step_id)["status"] == "STARTED"
    assert runner_ids(store) == []


# -- answers and tokens ---------------------------------------------------------------------
def test_an_answer_is_kept_for_its_principal_and_key(contract_store, monkeypatch):
    store = contract_store
    store.store_answer("ops", "k1", "fp", 201, '{"a": 1}')
    assert store.stored_answer("ops", "k1") == {"fingerprint": "fp", "status": 201, "body": '{"a": 1}'}
    assert store.stored_answer("viewer", "k1") is None and store.stored_answer("ops", "k2") is None
    assert store.forget_answers() == 0
    monkeypatch.setattr(st, "ANSWER_KEPT_SECONDS", 0.05)
    time.sleep(0.1)
    assert store.stored_answer("ops", "k1") is None
    assert store.forget_answers() == 1


def test_first_token_only_once(contract_store):
    store = contract_store
    assert store.add_first_token("admin", "operator", "h1") is True
    assert store.add_first_token("admin2", "operator", "h2") is False
    assert store.add_token("admin", "reader", "h3") is False
    assert [t["name"] for t in store.list_tokens()] == ["admin"]


def test_of_concurrent_first_tokens_one_is_made(open_store):
    """The first token of a database is made once, however many starts (nodes) make it at once."""
    stores = [open_store() for _ in range(8)]
    made = race(8, lambda n: stores[n].add_first_token(f"first{n}", "operator", f"h{n}"))
    assert sorted(made) == [False] * 7 + [True]
    assert len(stores[0].list_tokens()) == 1


def test_tokens_by_hash_and_name_and_revoke(contract_store):
    store = contract_store
    assert store.add_token("ops", "operator", "h1") and store.add_token("viewer", "reader", "h2")
    assert store.token_by_hash("h2") == {"name": "viewer", "role": "reader", "secret_hash": "h2"}
    assert store.token_by_name("ops")["secret_hash"] == "h1"
    assert store.revoke_token("ops") is True and store.revoke_token("ops") is False
    assert store.token_by_name("ops") is None and store.token_by_hash("h1") is None


def test_atomic_makes_several_changes_one(contract_store):
    store = contract_store
    with pytest.raises(RuntimeError), store.atomic():
        store.add_token("a", "reader", "h1")
        store.store_answer("a", "k", "fp", 200, "{}")
        raise RuntimeError("undo both")
    assert store.list_tokens() == [] and store.stored_answer("a", "k") is None
    with store.atomic(rollback=True):
        store.add_token("b", "reader", "h2")
    assert store.list_tokens() == []


# -- the operator page's reads -------------------------------------------------------------------
def failed_in(store, name, step_type="a", message="boom"):
    """A one-step process named `name` whose step failed (ValueError); its step id."""
    process, job = store.create_process(name, [(step_type, {})], "alice", "r1")
    fail(store, job, message)
    return process["steps"][0]["id"]


def counted_by_status(store):
    """({step status: how many}, {process status: how many}), counted row by row: what the tallies
    that status_counts and GET /metrics read must agree with."""
    counted = [
        {row[0]: row[1] for row in store.db.rows(f"SELECT status, COUNT(*) FROM {table} GROUP BY status")}
        for table in ("steps", "processes")
    ]
    return tuple(counted)


def test_the_page_reads_counts_by_status(contract_store):
    store = contract_store
    failed_in(store, "x")
    started_process(store, "a", "b")
    steps, processes = store.status_counts()
    assert steps == {"FAILED": 1, "STARTED": 1, "PENDING": 1}
    assert processes == {"FAILED": 1, "RUNNING": 1}


def test_the_metrics_tallies_count_what_the_store_holds(contract_store):
    """GET /metrics' tallies (kept by the schema's triggers) agree with the rows, before the node's
    checkpoint and after it (PostgreSQL folds its tallies' rows there)."""
    store = contract_store
    _, job = started_process(store, "a", "b")
    fail(store, job)
    store.restart_failed_step(job.step_id, {}, "bob", "r1", has_delegate)
    _, other = started_process(store, "c")
    store.finish_attempt(other, COMPLETED, runner_id="r1")
    store.create_process("q", [("a", {})], "alice", None)  # queued: no runner has it
    for _ in range(2):
        tallies = store.metric_tallies()
        steps, processes = counted_by_status(store)
        assert store.status_counts() == (steps, processes)
        assert {status: n for status, n in tallies["steps"] if n} == steps
        assert steps == {"STARTED": 2, "PENDING": 1, "COMPLETED": 1}
        assert {status: n for status, n in tallies["processes"] if n} == processes == {"RUNNING": 2, "COMPLETED": 1}
        assert tallies["attempts"] == [("a", "restart", 1), ("a", "start", 2), ("c", "start", 1)]
        assert tallies["outcomes"] == [("a", "failed", 1), ("c", "completed", 1)]
        assert tallies["queued"] == 1
        store.checkpoint()


def test_tallies_follow_the_savepoints_they_were_counted_in(contract_store):
    """A change's tallies are written once for its whole group (writer.py, `add_counts`), but they
    still follow its savepoint: a dry run inside a write, or a change whose surrounding savepoint
    is undone, counts nothing; the changes kept around them count once each."""
    store = contract_store
    jobs = [started_process(store, "a")[1] for _ in range(3)]
    for job in jobs:
        fail(store, job)
    with store.atomic():
        store.restart_failed_step(jobs[0].step_id, {}, "bob", "r1", has_delegate)
        with store.atomic(rollback=True):  # a dry run inside the write
            store.restart_failed_step(jobs[1].step_id, {}, "bob", "r1", has_delegate)
        with pytest.raises(RuntimeError), store.atomic():
            store.restart_failed_step(jobs[2].step_id, {}, "bob", "r1", has_delegate)
            raise RuntimeError("undone")
    tallies = store.metric_tallies()
    steps, processes = counted_by_status(store)
    assert steps == {"STARTED": 1, "FAILED": 2}
    assert {status: n for status, n in tallies["steps"] if n} == steps
    assert {status: n for status, n in tallies["processes"] if n} == processes == {"RUNNING": 1, "FAILED": 2}
    assert tallies["attempts"] == [("a", "restart", 1), ("a", "start", 3)]


def test_a_group_writes_each_tally_once_for_all_its_members(database):
    """Restarts that share a group (they waited while another write held the writer) write each
    tally they moved once, for all of them, last in the group's transaction."""
    store = st.Store(database)
    jobs = [started_process(store, "a")[1] for _ in range(4)]
    for job in jobs:
        fail(store, job)
    statements = []
    holding, release = threading.Event(), threading.Event()

    def hold_the_writer():
        with database.transaction() as conn:
            conn.set_trace_callback(statements.append)
            holding.set()
            release.wait(5)

    holder = threading.Thread(target=hold_the_writer)
    holder.start()
    holding.wait(5)
    restarts = [
        threading.Thread(target=store.restart_failed_step, args=(job.step_id, {}, "bob", "r1", has_delegate))
        for job in jobs
    ]
    for thread in restarts:
        thread.start()
    wait_for(lambda: len(database._writer()._waiting) == len(jobs), what="the restarts waiting for the writer")
    release.set()
    for thread in [holder, *restarts]:
        thread.join()
    database.write_connection().set_trace_callback(None)

    # steps FAILED -1, STARTED +1; processes FAILED -1, RUNNING +1; attempts (a, restart) +1: four
    # each, in one statement for the group (an upsert: the key (a, restart) had no row yet)
    writes = [sql for sql in statements if "tally" in sql and not sql.startswith("SELECT")]
    assert len(writes) == 1, writes
    for row in ("'steps', 'FAILED', '', -4", "'steps', 'STARTED', '', 4", "'processes', 'FAILED', '', -4"):
        assert f"({row})" in writes[0], writes
    assert "('processes', 'RUNNING', '', 4)" in writes[0] and "('attempts', 'a', 'restart', 4)" in writes[0]
    assert store.metric_tallies()["attempts"] == [("a", "restart", 4), ("a", "start", 4)]


def test_outcomes_by_minute_tell_completed_failed_and_interrupted_apart(contract_store):
    store = contract_store
    before = st.now_iso()
    _, done = started_process(store, "a")
    store.finish_attempt(done, COMPLETED, runner_id="r1")
    failed_in(store, "x")
    started_process(store, "b")  # its runner r1 stops: the attempt is Interrupted
    store.interrupt_runner("r1", "stopping")
    outcomes = store.outcomes_by_minute(before)
    totals = {}
    for (minute, outcome), count in outcomes.items():
        assert len(minute) == 16 and minute >= before[:16]
        totals[outcome] = totals.get(outcome, 0) + count
    assert totals == {"completed": 1, "failed": 1, "interrupted": 1}
    assert store.outcomes_by_minute(st.now_iso()[:10] + "T23:59:59.999Z") == {}


def test_the_oldest_queued_attempt_is_the_oldest_one_no_runner_has(contract_store):
    store = contract_store
    assert store.oldest_queued_at(st.now_iso()) is None
    started_process(store, "a")  # claimed by r1 as it began: not waiting
    assert store.oldest_queued_at(st.now_iso()) is None
    first, _ = store.create_process("q", [("a", {})], "alice", None)
    store.create_process("q", [("a", {})], "alice", None)
    assert store.oldest_queued_at(st.now_iso()) == first["steps"][0]["started_at"]
    store.claim_queued("r2", 10)
    assert store.oldest_queued_at(st.now_iso()) is None


def test_failed_steps_newest_first_by_type_error_type_and_process_name(contract_store):
    store = contract_store
    ids = [failed_in(store, "nightly" if n % 2 else "weekly", "a" if n < 4 else "b") for n in range(6)]
    page, position = store.failed_page({}, None, 4)
    assert [s["id"] for s in page] == ids[::-1][:4]
    assert [s["process_name"] for s in page] == ["nightly", "weekly", "nightly", "weekly"]
    assert page[0]["error"] == {"type": "ValueError", "message": "boom"}
    rest, last = store.failed_page({}, position, 4)
    assert [s["id"] for s in rest] == ids[::-1][4:] and last is None
    nightly_a, _ = store.failed_page({"process_name": "nightly", "type": "a"}, None, 10)
    assert [s["id"] for s in nightly_a] == [ids[3], ids[1]]
    assert store.failed_page({"error_type": "ValueError"}, None, 10)[0] == page + rest
    assert store.failed_page({"error_type": "Interrupted"}, None, 10) == ([], None)


def test_failed_ids_oldest_first_until_a_time_and_the_count_of_later_ones(contract_store):
    store = contract_store
    early = [failed_in(store, "n") for _ in range(3)]
    time.sleep(0.002)
    until = st.now_iso()
    time.sleep(0.002)
    later = failed_in(store, "n")
    assert store.failed_ids({"process_name": "n"}, until, 10) == (early, False)
    assert store.failed_ids({"process_name": "n"}, until, 2) == (early[:2], True)
    assert store.failed_ids({"process_name": "other"}, until, 10) == ([], False)
    assert store.count_failed_since({"process_name": "n"}, until) == 1
    assert store.count_failed_since({"process_name": "n"}, until, leaving_out=[later]) == 0


def test_each_database_has_its_own_session_secret(open_store):
    secret = open_store().secret("session")
    assert len(secret) == 64 and int(secret, 16) and open_store().secret("session") == secret
    assert open_store().secret("nothing") is None


# -- SQLite's plans of the store's queries (not part of the contract) --------------------------
def sqlite_store(tmp_path):
    database = Database(tmp_path / "plans.db")
    database.prepare()
    return st.Store(database)


def _plan(store, sql, params=()):
    return " | ".join(row[3] for row in store.db.rows("EXPLAIN QUERY PLAN " + sql, params))


def test_refreshing_a_process_reads_only_its_own_steps(tmp_path):
    sqlite = sqlite_store(tmp_path)
    # The planner once chose the status index here: every FAILED step of every process, per write.
    plan = _plan(sqlite, st.REFRESH_PROCESS, {"pid": "p", "now": "t"})
    assert "steps_by_status" not in plan
    assert plan.count("(process_id=?)") == 2, plan


def test_finding_running_steps_reads_only_running_steps(tmp_path):
    sqlite = sqlite_store(tmp_path)
    # Thousands of deferred steps must not be read every second by every runner.
    assert "steps_running" in _plan(sqlite, st.EXECUTING_STEPS)
    assert "steps_running" in _plan(sqlite, st.EXECUTING_STEPS + " AND runner_id = ?", ("r",))


def test_the_orphan_sweep_reads_no_queued_attempt(tmp_path):
    sqlite = sqlite_store(tmp_path)
    # Under a backlog the queue is most of steps_running; the sweep runs every second.
    plan = _plan(sqlite, st.EXECUTING_STEPS + " AND runner_id IS NOT NULL")
    assert "steps_running (runner_id>?)" in plan, plan


def test_a_completion_that_begins_the_next_step_only_touches_its_running_process(tmp_path):
    sqlite = sqlite_store(tmp_path)
    process, job = started_process(sqlite, "a", "b")
    time.sleep(0.002)  # a later millisecond: updated_at must move
    next_job = sqlite.finish_attempt(job, COMPLETED, runner_id="r1")
    after = sqlite.get_process(process["id"])
    assert next_job is not None and after["status"] == "RUNNING"
    assert after["updated_at"] > process["updated_at"]


def test_a_process_that_was_not_running_gets_the_full_refresh(tmp_path):
    sqlite = sqlite_store(tmp_path)
    process, job = started_process(sqlite, "a", "b")
    with sqlite.db.transaction() as conn:  # a status no store verb leaves here: the refresh puts it right
        conn.execute("UPDATE processes SET status = 'FAILED' WHERE id = ?", (process["id"],))
    sqlite.finish_attempt(job, COMPLETED, runner_id="r1")
    assert sqlite.get_process(process["id"])["status"] == "RUNNING"


def test_looking_for_due_retries_reads_only_waiting_steps(tmp_path):
    sqlite = sqlite_store(tmp_path)
    plan = _plan(sqlite, st.DUE_RETRIES, ("t", 1))
    assert "steps_due_retries" in plan and "steps_by_status" not in plan


def test_a_cancel_reads_only_its_own_processs_steps(tmp_path):
    sqlite = sqlite_store(tmp_path)
    plan = _plan(sqlite, f"SELECT id FROM steps WHERE process_id = ? AND {st.NOT_DONE}", ("p",))
    assert "(process_id=?)" in plan and "steps_by_status" not in plan, plan


def test_retention_walks_only_finished_processes_oldest_first(tmp_path):
    sqlite = sqlite_store(tmp_path)
    plan = _plan(sqlite, st.FINISHED_BEFORE, ("t", 5))
    assert "processes_finished_oldest_first" in plan and "TEMP B-TREE" not in plan, plan


def _page_plan(store, table, conditions):
    return _plan(store, *st.page_query(table, "seq", conditions, None, 51))


def test_the_new_list_filters_read_through_their_indexes(tmp_path):
    sqlite = sqlite_store(tmp_path)
    assert "processes_by_name" in _page_plan(sqlite, "processes", st.process_filters({"name": "n", "status": "FAILED"}))
    window = st.process_filters({"created_after": "a", "created_before": "b"})
    assert "processes_by_creation" in _page_plan(sqlite, "processes", window)
    assert "steps_by_error_type" in _page_plan(sqlite, "steps", st.step_filters({"error_type": "Interrupted"}))
    for status in ("PENDING", "STARTED", "FAILED", "SKIPPED", "CANCELLED"):  # what migration 10's index holds
        assert "steps_by_status (status=?)" in _page_plan(sqlite, "steps", st.step_filters({"status": status}))
    plan = _page_plan(sqlite, "steps", st.step_filters({"status": "COMPLETED"}))  # left out: walked, never sorted
    assert "steps_by_status" not in plan and "TEMP B-TREE" not in plan, plan
    # a status with a type or an error type: their own index, as before the status index was partial
    assert "steps_by_type" in _page_plan(sqlite, "steps", st.step_filters({"status": "FAILED", "type": "t"}))
    with_error = st.step_filters({"status": "FAILED", "error_type": "Timeout"})
    assert "steps_by_error_type" in _page_plan(sqlite, "steps", with_error)
    of_a_process = st.step_filters({"process_id": "p", "status": "FAILED", "type": "t", "error_type": "E"})
    plan = _page_plan(sqlite, "steps", of_a_process)
    assert "(process_id=?)" in plan and "steps_by_status" not in plan and "steps_by_error_type" not in plan, plan


def test_the_failed_list_walks_the_failed_steps_index_and_never_sorts(tmp_path, monkeypatch):
    sqlite = sqlite_store(tmp_path)
    plans, rows = [], sqlite.db.rows

    def planned(sql, args=()):
        plans.append(" | ".join(row[3] for row in rows("EXPLAIN QUERY PLAN " + sql, args)))
        return rows(sql, args)

    monkeypatch.setattr(sqlite.db, "rows", planned)
    for where in ({}, {"type": "t", "error_type": "E"}, {"process_name": "n"}):
        sqlite.failed_page(where, None, 50)
        sqlite.failed_page(where, ("2020-01-01T00:00:00.000Z", 5), 50)
        sqlite.failed_ids(where, "2030-01-01T00:00:00.000Z", 1000)
        sqlite.count_failed_since(where, "2020-01-01T00:00:00.000Z")
    assert len(plans) == 12
    for plan in plans:
        assert "steps_failed_oldest_first" in plan and "TEMP B-TREE" not in plan, plan


def runner_ids(store):
    """The ids of the runners registered (alive or not yet found gone)."""
    return [row["id"] for row in store.runners()]
