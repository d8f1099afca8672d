"""Admission (admission.py): new processes wait while the node is busy and its queue is old.

A real store on a real file; only the CPU clock is the test's own, so that "busy" does not depend
on how loaded the machine running the tests is. The queue's age is real: a process started with
no runner to claim its first step leaves that step queued, and the test waits for it to age."""

import threading
import time

import pytest

from stepd import admission
from stepd.admission import Admission
from stepd.delegates import Registry
from stepd.engine import Engine
from stepd.store import Store


class CpuClock:
    """CPU seconds that grow by `share` of each wall second (a process that busy)."""

    def __init__(self, share):
        self.share = share
        self._at, self._used = time.monotonic(), 0.0

    def __call__(self):
        now = time.monotonic()
        self._used += (now - self._at) * self.share
        self._at = now
        return self._used


@pytest.fixture
def store(database):
    return Store(database)


def queue_one(store, age):
    """A process whose first step is queued (no runner claims it), once it has waited `age` seconds."""
    store.create_process("queued", [("noop", {})], "op", None)
    time.sleep(age)


def measured(store, share):
    gate = Admission(store, cpu=CpuClock(share))
    time.sleep(0.02)
    gate.measure()
    return gate


def test_a_busy_node_with_an_old_queue_is_crowded(store):
    queue_one(store, admission.QUEUE_AGE + 0.05)
    assert measured(store, share=0.95).crowded


def test_an_idle_node_is_not_crowded_however_old_its_queue(store):
    queue_one(store, admission.QUEUE_AGE + 0.05)
    assert not measured(store, share=0.3).crowded


def test_a_busy_node_with_a_young_queue_or_none_is_not_crowded(store):
    assert not measured(store, share=0.95).crowded  # nothing queued
    queue_one(store, 0)
    assert not measured(store, share=0.95).crowded


def test_crowding_ends_when_the_queue_is_claimed(store):
    queue_one(store, admission.QUEUE_AGE + 0.05)
    gate = measured(store, share=0.95)
    assert gate.crowded
    assert store.claim_queued("R1", 10)
    time.sleep(0.02)
    gate.measure()
    assert not gate.crowded


def test_wait_returns_at_once_when_not_crowded(store):
    gate = measured(store, share=0.95)
    assert gate.wait() < 0.05


def test_wait_returns_when_crowding_ends(store):
    queue_one(store, admission.QUEUE_AGE + 0.05)
    gate = measured(store, share=0.95)
    threading.Timer(0.2, lambda: setattr(gate, "crowded", False)).start()
    assert 0.15 < gate.wait() < admission.WAIT_LIMIT


def test_wait_gives_up_after_its_limit(store, monkeypatch):
    monkeypatch.setattr(admission, "WAIT_LIMIT", 0.3)
    queue_one(store, admission.QUEUE_AGE + 0.05)
    gate = measured(store, share=0.95)
    assert 0.3 <= gate.wait() < 0.6


def test_starting_a_process_waits_while_crowded_and_then_starts_it(store, monkeypatch):
    monkeypatch.setattr(admission, "WAIT_LIMIT", 0.3)
    registry = Registry()
    registry.add("noop", lambda ctx: None, "test")
    engine = Engine(store, registry)
    queue_one(store, admission.QUEUE_AGE + 0.05)
    engine.admission = measured(store, share=0.95)
    started = time.monotonic()
    process = engine.start_process("late", [("noop", {})], "op")
    assert time.monotonic() - started >= 0.3
    assert store.get_process(process["id"])["status"] == "RUNNING"


def test_the_node_gives_the_engine_its_admission(app):
    stepd = app.extensions["stepd"]
    assert stepd.engine.admission is stepd.node.admission
    assert any(chore.run == stepd.node.admission.measure for chore in stepd.node.ticks)
