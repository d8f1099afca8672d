"""The dispatcher's side of a runner's outcomes (dispatch.py), against a real file and writer, with
the runner's end of a real socketpair read here instead of by a runner."""

import os
import socket
import threading

import pytest

from stepd.channel import Channel
from stepd.dispatch import QUICK_DEPTH, Dispatcher, Link
from stepd.model import COMPLETED, Busy, Outcome, Unavailable
from stepd.store import Store
from tests.helpers import wait_for


def test_outcomes_read_while_a_write_waits_join_that_write(database):
    """Outcomes that arrive in separate messages while the write recording the first of them still
    waits for its group are recorded by that same write: one member of the group, one change. The
    next steps they began go to the runner, in one message, once the group committed."""
    store = Store(database)
    dispatcher = Dispatcher(store, stopping_reason=lambda: None)
    ours, theirs = socket.socketpair()
    runner_end = Channel(theirs)
    link = Link(Channel(ours), places=4, pid=0)
    dispatcher.links.append(link)
    jobs = [store.create_process("p", [("noop", {})] * 2, "op", link.id)[1] for _ in range(3)]
    link.sent.update(job.key for job in jobs)
    writer = database._writer()

    holding, release = threading.Event(), threading.Event()

    def hold_the_writer():
        with database.transaction():
            holding.set()
            release.wait(5)

    holder = threading.Thread(target=hold_the_writer)
    holder.start()
    holding.wait(5)
    members_before = writer.committed[1]
    for job in jobs:  # three messages, one outcome each, while the writer is held
        dispatcher._record(link, [Outcome(job, COMPLETED, result=None)])
    release.set()
    holder.join()
    wait_for(lambda: dispatcher.recorded == 3, what="the three outcomes recorded")

    assert writer.committed[1] - members_before == 2  # the held turn, and one write for all three
    kind, sent = runner_end.receive()
    assert kind == "run"
    assert sorted(job.process_id for job in sent) == sorted(job.process_id for job in jobs)
    assert all(job.attempt == 1 and job.results == {} for job in sent)
    assert link.sent == {job.key for job in sent}  # the ended attempts' places went to the next steps
    for job in jobs:
        steps = store.get_process(job.process_id)["steps"]
        assert [step["status"] for step in steps] == ["COMPLETED", "STARTED"]
    ours.close()
    theirs.close()


def test_a_claim_looks_for_due_retries_only_when_one_may_be_due(database):
    """The look for due retries is a round trip to PostgreSQL's server at the end of every group
    that claims: the dispatcher makes it at start, when a retry this node scheduled falls due, and
    after a poll found claimable work (node.py), not otherwise. Queued work is claimed either way."""
    store = Store(database)
    dispatcher = Dispatcher(store, stopping_reason=lambda: None)
    ours, theirs = socket.socketpair()
    link = Link(Channel(ours), places=4, pid=0)
    looks = []
    claim_due_retries = store.claim_due_retries
    store.claim_due_retries = lambda *args: looks.append(args) or claim_due_retries(*args)

    assert dispatcher._claim_for([link]) == [] and len(looks) == 1  # at start: it looks, finds none
    queued = store.create_process("p", [("noop", {})], "op", None)[1]
    [(_, claimed)] = dispatcher._claim_for([link])
    assert [job.key for job in claimed] == [queued.key] and len(looks) == 1  # queued work, no look

    _, failing = store.create_process("p", [("noop", {})], "op", link.id)
    store.schedule_retry(failing, {"type": "ValueError", "message": "again"}, "2000-01-01T00:00:00.000Z")
    assert dispatcher._claim_for([link]) == [] and len(looks) == 1  # not this node's retry to know of
    dispatcher._note_retries(["2000-01-01T00:00:00.000Z"])
    dispatcher.wake_for_due_retries()  # falls due
    [(_, claimed)] = dispatcher._claim_for([link])
    assert [(job.step_id, job.attempt) for job in claimed] == [(failing.step_id, 2)] and len(looks) == 2
    ours.close()
    theirs.close()


def test_each_poll_has_the_next_claim_look_for_due_retries_however_full_the_runners(database):
    """A retry this node did not schedule (another node's, or one from before this node began) is
    found by the next claim after a poll, even when the poll found no free place: under steady work
    the runners are full at every poll, and a claim that did not look would leave it waiting."""
    store = Store(database)
    dispatcher = Dispatcher(store, stopping_reason=lambda: None)
    ours, theirs = socket.socketpair()
    link = Link(Channel(ours), places=1, pid=0)
    dispatcher.links.append(link)
    assert dispatcher._claim_for([link]) == []  # the look at start finds none
    _, busy = store.create_process("p", [("noop", {})], "op", link.id)
    link.sent.add(busy.key)  # its one place taken
    _, failing = store.create_process("p", [("noop", {})], "op", link.id)
    store.schedule_retry(failing, {"type": "ValueError", "message": "again"}, "2000-01-01T00:00:00.000Z")
    asked = []
    dispatcher.poll(lambda: asked.append(True) or True)
    assert asked == [] and dispatcher.retries_may_be_due  # no free place: no group now, but the flag
    link.sent.discard(busy.key)
    [(_, claimed)] = dispatcher._claim_for([link])
    assert [(job.step_id, job.attempt) for job in claimed] == [(failing.step_id, 2)]
    ours.close()
    theirs.close()


def test_outcomes_a_database_that_did_not_answer_could_not_record_are_written_again(database):
    """An outcome exists only in the dispatcher until it is in the database: when the database
    did not answer (PostgreSQL restarting, a connection it ended), it is written again soon, not
    turned into a failure of a step whose delegate did its work."""
    store = Store(database)
    dispatcher = Dispatcher(store, stopping_reason=lambda: None)
    ours, theirs = socket.socketpair()
    link = Link(Channel(ours), places=4, pid=0)
    dispatcher.links.append(link)
    process, job = store.create_process("p", [("noop", {})], "op", link.id)
    dispatcher._record_failed(link, [Outcome(job, COMPLETED, result=None)], Unavailable("the server restarted"))
    wait_for(lambda: store.get_process(process["id"])["status"] != "RUNNING", what="the outcome written again")
    step = store.get_process(process["id"])["steps"][0]
    assert (step["status"], step["error"]) == ("COMPLETED", None)
    ours.close()
    theirs.close()


def complete(jobs, quick=True):
    return [Outcome(job, COMPLETED, result=None, quick=quick) for job in jobs]


@pytest.fixture
def wired(database):
    """A dispatcher over a real store and file, and `connect(places, depth)`: a runner's Link on a
    socketpair, and the runner's end for the test to read (a runner that is sent nothing fails the
    test after 10 s, never hangs it)."""
    store = Store(database)
    dispatcher = Dispatcher(store, stopping_reason=lambda: None)
    sockets = []

    def connect(places, depth):
        ours, theirs = socket.socketpair()
        theirs.settimeout(10)
        sockets.extend((ours, theirs))
        return Link(Channel(ours), places=places, pid=0, depth=depth), Channel(theirs)

    yield store, dispatcher, connect
    for sock in sockets:
        sock.close()


def test_quick_types_fill_a_runner_deeper_than_its_places_and_every_outcome_frees_its_place(wired):
    """A runner holds `depth` attempts of types it said are quick, and only its places of any
    other (a type it has not run yet counts as slow). Claims and next steps fill it that deep,
    one message a group; once every outcome is recorded no place is held any more."""
    store, dispatcher, connect = wired
    link, runner_end = connect(places=2, depth=8)
    processes = [store.create_process("p", [("noop", {})] * 3, "op", None)[0]["id"] for _ in range(10)]
    dispatcher.links.append(link)  # after: their groups' claims took nothing

    dispatcher.wake()
    kind, first = runner_end.receive()
    assert kind == "run" and len(first) == 2  # not known to be quick yet: its places only
    assert link.skipped and link.slow == {job.key for job in first}

    dispatcher._record(link, complete(first))  # quick: the next steps, and 6 more claimed
    kind, second = runner_end.receive()
    assert kind == "run" and len(second) == 8 and not link.slow
    assert {job.attempt for job in second} == {1}
    assert sum(job.process_id in {j.process_id for j in first} for job in second) == 2  # their next steps

    recorded, running = 2, second
    while running:
        dispatcher._record(link, complete(running))
        recorded += len(running)
        wait_for(lambda expected=recorded: dispatcher.recorded == expected, what="the outcomes recorded")
        running = runner_end.receive()[1] if recorded < 30 else []
        assert len(running) <= 8
    assert recorded == 30
    assert link.sent == set() and link.slow == set() and link.reserved == 0
    assert {store.get_process(pid)["status"] for pid in processes} == {"COMPLETED"}


def test_a_next_step_of_a_slow_type_with_no_slow_place_left_is_queued_then_claimed(wired):
    """A completion begins its process's next step for the same runner only if the runner has a
    place for its type; else the step is queued (phase QUEUED, for any runner), and claimed once a
    slow place is free."""
    store, dispatcher, connect = wired
    link, runner_end = connect(places=1, depth=4)
    link.quick["fast"] = True
    dispatcher.links.append(link)
    process, fast = store.create_process("p", [("fast", {}), ("slow", {})], "op", link.id)
    _, slow = store.create_process("p", [("slow", {})], "op", link.id)
    link.sent.update({fast.key, slow.key})
    link.slow.add(slow.key)  # its one slow place is taken

    dispatcher._record(link, complete([fast]))
    wait_for(lambda: dispatcher.recorded == 1, what="the outcome recorded")
    following = store.get_process(process["id"])["steps"][1]
    assert (following["status"], following["phase"]) == ("STARTED", "QUEUED")
    assert link.sent == {slow.key} and link.reserved == 0

    dispatcher._record(link, complete([slow], quick=False))  # the slow place frees: the claim takes it
    kind, claimed = runner_end.receive()
    assert kind == "run" and [job.key for job in claimed] == [(following["id"], 1)]
    assert link.slow == link.sent == {(following["id"], 1)}
    assert store.get_process(process["id"])["steps"][1]["phase"] == "RUNNING"


def test_a_due_retry_goes_to_a_runner_with_a_slow_place_when_the_first_has_none(wired):
    """A due retry takes a slow place. The first runner's are all taken (it still has room for quick
    types): the claim passes it over for the next runner, which takes the retry."""
    store, dispatcher, connect = wired
    (full, _), (idle, _) = connect(places=1, depth=4), connect(places=1, depth=4)
    _, busy = store.create_process("p", [("slow", {})], "op", full.id)
    _, failing = store.create_process("p", [("slow", {})], "op", full.id)
    store.schedule_retry(failing, {"type": "ValueError", "message": "again"}, "2000-01-01T00:00:00.000Z")
    full.sent.add(busy.key)
    full.slow.add(busy.key)
    dispatcher.links += [full, idle]
    dispatcher.retries_may_be_due = dispatcher.maybe_queued = True

    wanting = dispatcher._wanting()
    assert wanting == [full, idle]  # `full` has room for quick types
    claimed = dispatcher._claim_for(wanting)
    assert [(link, [job.key for job in jobs]) for link, jobs in claimed] == [(idle, [(failing.step_id, 2)])]


def test_a_due_retry_waits_for_the_only_runners_slow_place_and_is_claimed_once_it_frees(wired):
    """With one runner whose slow places are all taken, a due retry waits (it could not take it);
    the outcome that frees a slow place has its group's claim take the retry."""
    store, dispatcher, connect = wired
    link, runner_end = connect(places=1, depth=4)
    _, busy = store.create_process("p", [("slow", {})], "op", link.id)
    _, failing = store.create_process("p", [("slow", {})], "op", link.id)
    store.schedule_retry(failing, {"type": "ValueError", "message": "again"}, "2000-01-01T00:00:00.000Z")
    link.sent.add(busy.key)
    link.slow.add(busy.key)
    dispatcher.links.append(link)
    dispatcher.retries_may_be_due = True

    dispatcher.wake()  # a group, whose claim has no slow place for the retry
    wait_for(lambda: not dispatcher.maybe_queued, what="the group's claim")
    assert store.get_step(failing.step_id)["attempts"] == 1 and dispatcher.retries_may_be_due
    dispatcher._record(link, complete([busy], quick=False))
    kind, claimed = runner_end.receive()
    assert kind == "run" and [job.key for job in claimed] == [(failing.step_id, 2)]
    assert link.sent == link.slow == {(failing.step_id, 2)}


def test_a_record_that_fails_keeps_its_places_from_the_same_groups_claim(wired):
    """A runner's outcomes free their places for the next steps they begin; if recording them fails
    (the database was busy: they are written again soon), the places are still theirs, and the claim
    at the end of that same group must not give them to queued work."""
    store, dispatcher, connect = wired
    link, runner_end = connect(places=1, depth=1)
    _, running = store.create_process("p", [("noop", {})], "op", link.id)
    queued = store.create_process("p", [("noop", {})], "op", None)[0]["id"]
    link.sent.add(running.key)
    dispatcher.links.append(link)
    dispatcher.maybe_queued = True
    failed = threading.Event()
    outcomes_job = store.outcomes_job

    def busy_once(*args):
        if not failed.is_set():
            failed.set()
            raise Busy("the database is busy")
        return outcomes_job(*args)

    store.outcomes_job = busy_once
    holding, release = threading.Event(), threading.Event()

    def hold_the_writer():
        with store.db.transaction():
            holding.set()
            release.wait(5)

    holder = threading.Thread(target=hold_the_writer)
    holder.start()
    holding.wait(5)
    # The next group: a write first, then the record (a member of its own that fails; the group goes on).
    store.db.submit(lambda conn: None, lambda result, error: None)
    dispatcher._record(link, complete([running]))
    release.set()
    holder.join()
    assert failed.wait(5)
    store.db.write(lambda conn: None)  # returns once that group (and its claim) is done; the retry is 0.5 s away
    assert link.sent == {running.key} and link.reserved == 0  # its place was not given away
    assert store.get_process(queued)["steps"][0]["phase"] == "QUEUED"
    kind, claimed = runner_end.receive()  # written again: the place frees, and the claim takes the queued step
    assert kind == "run" and [job.process_id for job in claimed] == [queued]
    assert store.get_process(running.process_id)["status"] == "COMPLETED"


def test_a_runner_attached_on_sqlite_holds_quick_attempts_beyond_its_places(database):
    """The depth a runner is given when it attaches: its places times QUICK_DEPTH on SQLite (its
    places on PostgreSQL: test_postgres_wakeups.py)."""
    store = Store(database)
    dispatcher = Dispatcher(store, stopping_reason=lambda: None)
    ours, theirs = socket.socketpair()
    Channel(theirs).send("hello", {"pid": os.getpid(), "places": 3})
    link = dispatcher.attach(Channel(ours))
    assert (link.places, link.depth) == (3, 3 * QUICK_DEPTH) and QUICK_DEPTH > 1
    theirs.close()
    wait_for(link.closed.is_set, what="the runner's end recorded")
