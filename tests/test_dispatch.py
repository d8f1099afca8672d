"""The dispatcher's side of a runner's outcomes (dispatch.py), against a real file and writer, with
the runner's end of a real socketpair read here instead of by a runner."""

import socket
import threading

from stepd.channel import Channel
from stepd.dispatch import Dispatcher, Link
from stepd.model import COMPLETED, Outcome, Unavailable
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
