"""The runner's threads, with the test as its node over a socketpair: a quick type's jobs run on
the thread that read them, and a quick delegate that turns slow or hangs holds up nothing else
(the jobs behind it, a cancel, a stop, the places)."""

import socket
import threading
import time

import pytest
from helpers import wait_for

from stepd import runner as runner_module
from stepd.channel import Channel
from stepd.delegates import Registry
from stepd.model import COMPLETED, FAILED, Job
from stepd.runner import HELD_UP_SECONDS, QUICK_SECONDS, WATCH_SECONDS, Runner

WAIT = {"wait": ("LONG", 1)}  # typed params, as the node sends them: the delegate waits for its gate
# The watch hands the reading over at its first look after HELD_UP_SECONDS: within this, with room.
HANDED_OVER_WITHIN = HELD_UP_SECONDS + WATCH_SECONDS + 0.5


class Node:
    """The test's end of the runner's connection."""

    def __init__(self, runner):
        ours, theirs = socket.socketpair()
        ours.settimeout(10)  # a runner that sends nothing fails the test, never hangs it
        self.channel = Channel(ours)
        self.runner = runner
        runner.start(Channel(theirs))
        kind, hello = self.channel.receive()
        assert kind == "hello" and hello["places"] == runner.threads
        self.outcomes = {}  # step id -> Outcome
        self.unstarted = None
        self._sent = 0

    def run(self, *steps):
        """Send one message of jobs: (step id, type, params) each."""
        jobs = [Job(step_id, "p", step_type, params, 1) for step_id, step_type, params in steps]
        self.channel.send("run", jobs)
        return jobs

    def wait_outcome(self, step_id):
        while step_id not in self.outcomes:
            message = self.channel.receive()
            assert message is not None, f"the runner closed before {step_id}'s outcome"
            kind, payload = message
            if kind == "outcomes":
                self.outcomes.update((outcome.job.step_id, outcome) for outcome in payload)
            elif kind == "unstarted":
                self.unstarted = payload
        return self.outcomes[step_id]

    def wait_unstarted(self):
        while self.unstarted is None:
            message = self.channel.receive()
            assert message is not None, "the runner closed without saying what it never began"
            kind, payload = message
            if kind == "outcomes":
                self.outcomes.update((outcome.job.step_id, outcome) for outcome in payload)
            elif kind == "unstarted":
                self.unstarted = payload
        return self.unstarted


@pytest.fixture
def make_runner():
    made = []

    def make(registry, threads):
        node = Node(Runner(registry, threads))
        made.append(node)
        return node

    yield make
    for node in made:
        node.runner.stop(grace=0.1)
        while node.channel.receive() is not None:  # to the runner's end: the reader closes with it
            pass
        node.channel.close()


class Probe:
    """Delegates that say on which thread they ran, and whether it was the reading one, and that
    wait for a gate when their params ask."""

    def __init__(self):
        self.calls = {}  # step id -> (thread ident, ran on the reading thread)
        self.runner = None
        self.gates = {}  # step id -> Event the delegate waits for
        self.began = {}  # step id -> Event set when its delegate is called
        self.cancelled = {}  # step id -> ctx.cancelled

    def registry(self, timeout=None):
        registry = Registry()
        registry.add("probe", self.probe, "test", timeout=timeout)
        registry.add("slow", self.slow, "test")
        return registry

    def on_reading_thread(self, ctx):
        inline = self.runner._inline
        return inline is not None and inline.job.step_id == ctx.step_id

    def probe(self, ctx):
        self.calls[ctx.step_id] = (threading.get_ident(), self.on_reading_thread(ctx))
        self.cancelled[ctx.step_id] = ctx.cancelled
        self.began.setdefault(ctx.step_id, threading.Event()).set()
        if ctx.params.get("wait"):
            self.gates.setdefault(ctx.step_id, threading.Event()).wait(30)
        return None

    def slow(self, ctx):
        self.calls[ctx.step_id] = (threading.get_ident(), self.on_reading_thread(ctx))
        time.sleep(QUICK_SECONDS * 5)
        return None

    def hold(self, node, step_id, *behind):
        """Send a job that waits for its gate, with `behind` in the same message; once it began."""
        self.began[step_id] = threading.Event()
        node.run((step_id, "probe", WAIT), *behind)
        assert self.began[step_id].wait(5)

    def release_all(self):
        for step_id in list(self.began):
            self.gates.setdefault(step_id, threading.Event()).set()


def warm_up(node, probe):
    """Make `probe` a quick type, and leave every thread but the reading one waiting. The first job
    goes to another thread (the type is not known yet); the next ones run on the reading thread,
    unless that other thread, still awake from the last, takes one first: once one ran on the
    reading thread, the others have waited a whole round, and only the reading thread takes the
    next job."""
    node.run(("warm", "probe", {}))
    node.wait_outcome("warm")
    assert probe.calls["warm"][1] is False, "a type never seen yet goes to another thread"
    for n in range(20):
        node.run((f"warm {n}", "probe", {}))
        node.wait_outcome(f"warm {n}")
        if probe.calls[f"warm {n}"][1]:
            return
    raise AssertionError("a quick type never ran on the thread that read it")


@pytest.fixture
def probe():
    made = Probe()
    yield made
    made.release_all()


def test_a_quick_type_runs_on_the_thread_that_read_it_and_a_slow_one_on_another(make_runner, probe):
    node = make_runner(probe.registry(), threads=4)
    probe.runner = node.runner
    warm_up(node, probe)  # asserts both: the first on another thread, then on the reading one
    node.run(("a slow one", "slow", {}))
    node.wait_outcome("a slow one")
    node.run(("slow again", "slow", {}))
    node.wait_outcome("slow again")
    assert probe.calls["slow again"][1] is False, "a type slower than QUICK_SECONDS goes to another thread"


def test_jobs_behind_a_quick_delegate_that_hangs_run_and_a_cancel_still_arrives(make_runner, probe):
    node = make_runner(probe.registry(), threads=2)
    probe.runner = node.runner
    warm_up(node, probe)
    node.run(("hangs", "probe", WAIT), ("behind", "probe", {}))
    began = time.monotonic()
    assert node.wait_outcome("behind").kind == COMPLETED
    assert time.monotonic() - began < HANDED_OVER_WITHIN
    assert probe.calls["hangs"][1] is True, "it ran on the reading thread, which it held up"
    assert "hangs" not in node.outcomes
    # The hung delegate's fail-step (the node's cancel) is read by the thread that reads now.
    node.channel.send("cancel", [("hangs", 1)])
    assert probe.cancelled["hangs"].wait(1.0), "ctx.cancelled within 1 s"
    # Its place is free, and a thread still reads: two more jobs (both places) run.
    node.run(("after 1", "probe", {}), ("after 2", "probe", {}))
    assert node.wait_outcome("after 1").kind == COMPLETED
    assert node.wait_outcome("after 2").kind == COMPLETED
    wait_for(lambda: node.runner._busy == 0, timeout=2, what="the places to be free")


def test_each_reading_thread_held_up_in_turn_hands_the_reading_over(make_runner, probe):
    node = make_runner(probe.registry(), threads=3)
    probe.runner = node.runner
    warm_up(node, probe)
    for turn in (1, 2):  # the second is held up while the first still is
        node.run((f"hangs {turn}", "probe", WAIT), (f"behind {turn}", "probe", {}))
        began = time.monotonic()
        assert node.wait_outcome(f"behind {turn}").kind == COMPLETED
        assert time.monotonic() - began < HANDED_OVER_WITHIN
        assert probe.calls[f"hangs {turn}"][1] is True
    probe.release_all()
    assert node.wait_outcome("hangs 1").kind == COMPLETED
    assert node.wait_outcome("hangs 2").kind == COMPLETED
    node.run(("last", "probe", {}))
    assert node.wait_outcome("last").kind == COMPLETED


def test_a_quick_delegate_past_its_timeout_on_the_reading_thread_fails_and_the_next_runs(make_runner, probe):
    node = make_runner(probe.registry(timeout=0.3), threads=1)
    probe.runner = node.runner
    warm_up(node, probe)
    node.run(("hangs", "probe", WAIT))
    failed = node.wait_outcome("hangs")
    assert failed.kind == FAILED and failed.error["type"] == "Timeout"
    assert probe.calls["hangs"][1] is True
    assert probe.cancelled["hangs"].is_set()
    # The one place is free again though the hung thread has not returned, and a thread reads.
    node.run(("next", "probe", {}))
    assert node.wait_outcome("next").kind == COMPLETED


def test_a_stop_gives_back_the_jobs_waiting_behind_a_delegate_on_the_reading_thread(make_runner, probe, monkeypatch):
    monkeypatch.setattr(runner_module, "HELD_UP_SECONDS", 30.0)  # no hand-over: the stop comes first
    node = make_runner(probe.registry(), threads=2)
    probe.runner = node.runner
    warm_up(node, probe)
    probe.hold(node, "holds", ("waits", "probe", {}))
    stopper = threading.Thread(target=node.runner.stop, kwargs={"grace": 5.0})
    stopper.start()
    time.sleep(0.1)
    probe.gates.setdefault("holds", threading.Event()).set()  # it returns within the grace
    stopper.join(10)
    assert node.wait_unstarted() == [("waits", 1)]
    assert node.wait_outcome("holds").kind == COMPLETED
    assert "waits" not in probe.calls, "never called"


def test_never_more_delegates_at_once_than_places(make_runner, probe):
    node = make_runner(probe.registry(), threads=2)
    probe.runner = node.runner
    running, most = [0], [0]
    lock = threading.Lock()
    original = probe.probe

    def counting(ctx):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.001 if int(ctx.step_id) % 7 else 0.02)  # mostly quick, now and then not
            return original(ctx)
        finally:
            with lock:
                running[0] -= 1

    node.runner.registry.remove("probe")
    node.runner.registry.add("probe", counting, "test")
    sent = 0
    for _ in range(60):  # as the node does: a job a place freed by an outcome
        batch = [(str(sent + i), "probe", {}) for i in range(2)]
        sent += 2
        node.run(*batch)
        for step_id, _, _ in batch:
            node.wait_outcome(step_id)
    assert len(node.outcomes) == sent
    assert most[0] <= 2
    ran_on = {on_reading_thread for _, on_reading_thread in probe.calls.values()}
    assert ran_on == {True, False}, "both ways ran: on the reading thread (quick) and on others (after a slow one)"


def test_more_jobs_than_places_never_run_more_delegates_at_once(make_runner, probe):
    """The node may send more jobs than places (quick types, dispatch.QUICK_DEPTH); the reading
    thread's delegate takes a place like any other, so STEPD_THREADS still bounds the delegates
    running at once (1: one at a time, for delegates that must not run together)."""
    node = make_runner(probe.registry(), threads=1)
    probe.runner = node.runner
    running, most = [0], [0]
    lock = threading.Lock()

    def counting(delegate):
        def count(ctx):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                time.sleep(QUICK_SECONDS / 4)  # long enough for a thread woken meanwhile to start
                return delegate(ctx)
            finally:
                with lock:
                    running[0] -= 1

        return count

    for name, delegate in (("probe", probe.probe), ("slow", probe.slow)):
        node.runner.registry.remove(name)
        node.runner.registry.add(name, counting(delegate), "test")
    warm_up(node, probe)
    node.run(("slow-0", "slow", {}))
    node.wait_outcome("slow-0")  # known slow from here on
    for round_number in range(10):  # a slow job on the place, and quick ones behind it
        batch = [(f"s{round_number}", "slow", {})] + [(f"q{round_number}-{i}", "probe", {}) for i in range(5)]
        node.run(*batch)
        for step_id, _, _ in batch:
            node.wait_outcome(step_id)
    assert most[0] == 1
    assert {on_reading_thread for _, on_reading_thread in probe.calls.values()} == {True, False}


def test_jobs_waiting_for_a_place_leave_a_thread_to_read_a_cancel_and_a_stop_gives_them_back(make_runner, probe):
    """With every place taken and more jobs waiting, a thread still reads: a cancel frees the place
    (ctx.cancelled set), the next job takes it, and a stop gives back what never began."""
    node = make_runner(probe.registry(), threads=1)
    probe.runner = node.runner
    probe.began["b"] = threading.Event()
    probe.hold(node, "a", ("b", "probe", WAIT), ("c", "probe", {}))  # not yet known quick
    time.sleep(0.2)
    assert not probe.began["b"].is_set()  # no place for it
    node.channel.send("cancel", [("a", 1)])
    assert probe.cancelled["a"].wait(2)
    assert probe.began["b"].wait(5)  # the cancelled delegate's place went to the next job
    assert "c" not in probe.calls
    stopper = threading.Thread(target=node.runner.stop, kwargs={"grace": 0.5})
    stopper.start()
    stopper.join(10)
    assert node.wait_unstarted() == [("c", 1)]
    assert "c" not in probe.calls, "never called"
    probe.release_all()


def test_a_job_waiting_behind_a_held_up_delegate_runs_once_that_delegate_returns(make_runner, probe):
    """One place: a quick delegate holds the reading thread up, the reading goes to another thread,
    and the quick job sent with it waits for the place. When the held-up delegate returns, its
    thread ends and the place it frees goes to the job waiting, with no new message to wake it."""
    node = make_runner(probe.registry(), threads=1)
    probe.runner = node.runner
    warm_up(node, probe)
    probe.hold(node, "a", ("b", "probe", {}))
    wait_for(lambda: node.runner._inline is None, timeout=HANDED_OVER_WITHIN, what="the reading handed over")
    assert "b" not in probe.calls  # no place for it while `a` runs
    probe.gates.setdefault("a", threading.Event()).set()
    assert node.wait_outcome("a").kind == COMPLETED
    assert node.wait_outcome("b").kind == COMPLETED


def test_a_cancel_of_a_job_still_waiting_for_a_place_means_it_never_begins(make_runner, probe):
    """The node frees a cancelled attempt's place at once (fail-step, a cancel of its process): one
    still waiting in the runner must never be begun, nor answered."""
    node = make_runner(probe.registry(), threads=1)
    probe.runner = node.runner
    probe.hold(node, "a", ("b", "probe", {}), ("c", "probe", {}))
    node.channel.send("cancel", [("b", 1)])
    wait_for(lambda: [job.step_id for job in node.runner._waiting] == ["c"], what="b taken off the waiting jobs")
    probe.gates.setdefault("a", threading.Event()).set()
    assert node.wait_outcome("a").kind == COMPLETED
    assert node.wait_outcome("c").kind == COMPLETED  # after b's turn would have been
    assert "b" not in probe.calls and "b" not in node.outcomes
