"""Admission (admission.py): new processes wait while quick work has been queued for a while.

A real store on a real file; only the runners' turnover (attempts ended, places) is the test's own,
so that "quick" does not depend on how loaded the machine running the tests is. The queue's age is
real: a process started with no runner to claim its first step leaves that step queued, and the
test waits for it to age."""

import threading
import time

import pytest
from helpers import wait_for

from stepd import admission
from stepd.admission import Admission
from stepd.delegates import Registry
from stepd.engine import Engine
from stepd.store import Store


class Turnover:
    """Runners with `places` that end `per_second` attempts a second: (ended so far, places)."""

    def __init__(self, per_second, places=4):
        self.per_second, self.places = per_second, places
        self._at, self._ended = time.monotonic(), 0.0

    def __call__(self):
        now = time.monotonic()
        self._ended += (now - self._at) * self.per_second
        self._at = now
        return self._ended, self.places


QUICK = 4 / admission.QUICK_SECONDS * 2  # attempts a second: twice what 4 places must end to be quick
SLOW = 4 / admission.QUICK_SECONDS / 4


@pytest.fixture
def store(database):
    return Store(database)


def queue_one(store, age):
    """A process whose first step is queued (no runner claims it), once it has waited `age` seconds."""
    store.create_process("queued", [("noop", {})], "op", None)
    time.sleep(age)


def measured(store, per_second, places=4):
    gate = Admission(store, Turnover(per_second, places))
    time.sleep(0.02)
    gate.measure()
    return gate


def test_quick_work_queued_for_a_while_is_crowded(store):
    queue_one(store, admission.QUEUE_AGE + 0.05)
    assert measured(store, QUICK).crowded


def test_slow_delegates_never_crowd_however_old_the_queue(store):
    queue_one(store, admission.QUEUE_AGE + 0.05)
    assert not measured(store, SLOW).crowded
    assert not measured(store, 0).crowded


def test_without_runners_nothing_is_crowded(store):
    queue_one(store, admission.QUEUE_AGE + 0.05)
    assert not measured(store, QUICK, places=0).crowded


def test_quick_work_with_a_young_queue_or_none_is_not_crowded(store):
    assert not measured(store, QUICK).crowded  # nothing queued
    queue_one(store, 0)
    assert not measured(store, QUICK).crowded


def test_crowding_ends_when_the_queue_is_claimed(store):
    queue_one(store, admission.QUEUE_AGE + 0.05)
    gate = measured(store, QUICK)
    assert gate.crowded
    assert store.claim_queued("R1", 10)
    time.sleep(0.02)
    gate.measure()
    assert not gate.crowded


def test_wait_returns_at_once_when_not_crowded(store):
    gate = measured(store, QUICK)
    assert gate.wait() < 0.05


def test_wait_returns_when_crowding_ends(store):
    queue_one(store, admission.QUEUE_AGE + 0.05)
    gate = measured(store, QUICK)
    threading.Timer(0.2, lambda: setattr(gate, "crowded", False)).start()
    assert 0.15 < gate.wait() < admission.WAIT_LIMIT


def test_wait_gives_up_after_its_limit(store, monkeypatch):
    monkeypatch.setattr(admission, "WAIT_LIMIT", 0.3)
    queue_one(store, admission.QUEUE_AGE + 0.05)
    gate = measured(store, QUICK)
    assert 0.3 <= gate.wait() < 0.6


def test_starting_a_process_waits_while_crowded_and_then_starts_it(store, monkeypatch):
    monkeypatch.setattr(admission, "WAIT_LIMIT", 0.3)
    registry = Registry()
    registry.add("noop", lambda ctx: None, "test")
    engine = Engine(store, registry)
    queue_one(store, admission.QUEUE_AGE + 0.05)
    engine.admission = measured(store, QUICK)
    started = time.monotonic()
    process = engine.start_process("late", [("noop", {})], "op")
    assert time.monotonic() - started >= 0.3
    assert store.get_process(process["id"])["status"] == "RUNNING"


def test_the_node_gives_the_engine_its_admission(app):
    stepd = app.extensions["stepd"]
    assert stepd.engine.admission is stepd.node.admission
    assert any(chore.run == stepd.node.admission.measure for chore in stepd.node.ticks)


def test_the_dispatcher_counts_the_attempts_its_runners_end(app, api):
    dispatcher = app.extensions["stepd"].node.dispatcher
    before, places = dispatcher.turnover()
    api.wait_process(api.start(("noop", {}), ("noop", {}), ("noop", {}))["processId"], "COMPLETED")
    # The count moves once the writer tells the dispatcher its group committed, just after the
    # COMMIT that a read may already see (a loaded machine showed 2 here once): wait for it.
    wait_for(lambda: dispatcher.turnover()[0] - before >= 3, timeout=5, what="the third outcome counted")
    ended, places = dispatcher.turnover()
    assert (ended - before, places) == (3, 4)  # the app's one runner on threads: STEPD_THREADS=4
