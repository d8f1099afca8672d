"""The dispatcher's side of a runner's outcomes (dispatch.py), against a real file and writer, with
the runner's end of a real socketpair read here instead of by a runner."""

import socket
import threading

from stepd.channel import Channel
from stepd.dispatch import Dispatcher, Link
from stepd.model import COMPLETED, Outcome
from stepd.store import Store
from tests.helpers import wait_for


def test_outcomes_read_while_a_write_waits_join_that_write(database):
    """Outcomes that arrive in separate messages while the write recording the first of them still
    waits for its group are recorded by that same write: one member of the group, one change. The
    next steps they began go to the runner, in one message, once the group committed."""
    store = Store(database)
    dispatcher = Dispatcher(store, stopping_reason=lambda: None, current=lambda: True)
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
