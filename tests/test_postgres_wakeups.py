"""The wake-ups between nodes on PostgreSQL (SPEC 12; dispatch.py, node.py): the NOTIFY that a group
queuing work sends in its own transaction, and what a node does without one. Nodes run in this
process here, with their runners on threads, on a fresh database of the test run's own cluster; the
served tests of two nodes are in test_served_postgres_wakeups.py.
"""

import contextlib
from datetime import datetime

import psycopg
import pytest
from helpers import PLUGINS, wait_for

from stepd import config
from stepd.delegates import load_registry
from stepd.dispatch import Dispatcher
from stepd.model import Conflict
from stepd.node import Node
from stepd.postgres import PostgresDatabase
from stepd.store import QUEUED_CHANNEL, Store

QUIET_SECONDS = 0.5  # a notification committed is delivered in milliseconds: none in this long is none


@contextlib.contextmanager
def pg_store(url):
    database = PostgresDatabase(url)
    database.prepare()
    try:
        yield Store(database)
    finally:
        database.close()


@contextlib.contextmanager
def listener(url):
    """A connection of the test's own LISTENing as a node does; yields heard(), the payloads
    notified since the last call (waiting QUIET_SECONDS for more after each)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"LISTEN {QUEUED_CHANNEL}")
        yield lambda: [notify.payload for notify in conn.notifies(timeout=QUIET_SECONDS)]


@contextlib.contextmanager
def pg_node(url, node_id, runners=1):
    """A started node on its own store, with `runners` runners on threads (2 places each)."""
    with pg_store(url) as store:
        settings = {**config.from_env({}), "STEPD_DB": url, "STEPD_THREADS": 2}
        node = Node(store, load_registry(PLUGINS), settings, node_id=node_id)
        node.start()
        if runners:
            node.start_runners_here(runners)
        try:
            yield node
        finally:
            node.stop(grace=0.5)


def start(store, step_type="noop", params=None):
    """A process of one step, queued (no runner named): its id."""
    return store.create_process(None, [(step_type, params or {})], "alice", None)[0]["id"]


def test_a_group_queuing_work_no_runner_here_takes_notifies_once_when_it_commits(postgres_url):
    with pg_store(postgres_url) as store, listener(postgres_url) as heard:
        Dispatcher(store, lambda: None, node_id="node-a")  # a node without runners
        start(store)
        assert heard() == ["node-a"], "the other nodes are told, naming the node that queued it"
        with store.atomic():  # one group, three processes: one NOTIFY
            for _ in range(3):
                start(store)
        assert heard() == ["node-a"]
        store.list_processes({})  # a group that queues nothing (a read here) tells nobody
        store.db.write(lambda conn: None)
        assert heard() == []


def test_a_rolled_back_group_sends_no_notification(postgres_url):
    """The NOTIFY is a statement of the group's own transaction: a COMMIT that fails (here a
    deferred foreign key, checked only then) takes it away with the group's writes."""
    with pg_store(postgres_url) as store, listener(postgres_url) as heard:
        Dispatcher(store, lambda: None, node_id="node-a")
        store.db.connection().execute(
            "CREATE TABLE late_check (process_id text REFERENCES processes (id) DEFERRABLE INITIALLY DEFERRED)"
        )

        def queue_then_break_the_commit(conn):
            start(store)
            conn.execute("INSERT INTO late_check VALUES ('no such process')")

        with pytest.raises(Conflict):
            store.db.write(queue_then_break_the_commit)
        assert heard() == []
        assert store.list_processes({})[0] == [], "the process went with the group"
        start(store)
        assert heard() == ["node-a"], "the next group that commits tells, once"


def test_a_node_that_claims_all_it_queued_tells_nobody(postgres_url):
    with pg_node(postgres_url, "node-a") as node, listener(postgres_url) as heard:
        process_id = start(node.store)
        wait_for(lambda: node.store.get_process(process_id)["status"] == "COMPLETED", what="the process to complete")
        assert heard() == []


def test_work_queued_without_a_notification_is_claimed_by_the_poll_within_2_s(postgres_url):
    """A notification lost (here: a store with no node queues the work, so nobody is told) costs a
    poll at most: once a second on PostgreSQL (node.POLL_SECONDS_LISTENING)."""
    with pg_node(postgres_url, "node-b") as node, pg_store(postgres_url) as elsewhere:
        wait_for(lambda: node.store.runners(), what="the runner to register")
        process_id = start(elsewhere)
        wait_for(lambda: elsewhere.get_process(process_id)["status"] == "COMPLETED", timeout=2.5, interval=0.05,
                 what="the poll to find the work")  # fmt: skip


def test_a_node_hears_another_nodes_work_and_runs_it_at_once(postgres_url):
    """Node A has no runner: node B's LISTEN hears A's NOTIFY and claims it in well under a poll."""
    with pg_node(postgres_url, "node-a", runners=0) as sender, pg_node(postgres_url, "node-b") as runner:
        wait_for(lambda: runner.store.runners(), what="the runner to register")
        for _ in range(5):
            process_id = start(sender.store, "echo")
            done = wait_for(lambda p=process_id: (d := sender.store.get_process(p))["status"] == "COMPLETED" and d,
                            interval=0.005, what="the process to complete")  # fmt: skip
            step = done["steps"][0]
            assert seconds(step["finished_at"], step["started_at"]) < 0.5, step


def test_a_due_retry_this_node_scheduled_begins_without_waiting_for_the_poll(postgres_url, tmp_path):
    """retry_window fails and retries 3 times, 0.1 to 0.5 s apart: each retry begins within a tick
    (0.1 s) or so of being due, where the poll alone (once a second here) would be up to 1 s late."""
    counted = tmp_path / "calls.txt"
    with pg_node(postgres_url, "node-a") as node:
        process_id = start(node.store, "retry_window", {"file": ("STRING", str(counted))})
        step_id = node.store.get_process(process_id)["steps"][0]["id"]
        due = {}  # attempt -> when its retry is due
        while (step := node.store.get_step(step_id, with_history=True))["attempts"] < 4 or step["phase"]:
            if step["next_retry_at"] is not None:
                due[step["attempts"]] = step["next_retry_at"]
            assert len(step["attempt_history"]) <= 4
    retries = step["attempt_history"][1:]
    assert [retry["trigger"] for retry in retries] == ["retry"] * 3 and sorted(due) == [1, 2, 3]
    late = [seconds(retry["started_at"], due[retry["attempt"] - 1]) for retry in retries]
    assert all(-0.002 <= wait < 0.35 for wait in late), late


def seconds(later, earlier):
    moment = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()  # noqa: E731
    return moment(later) - moment(earlier)


def test_a_runner_on_postgresql_holds_no_more_attempts_than_its_places(postgres_url):
    """PostgreSQL's claims and next steps are single statements that do not pick by type, so a
    runner there is given no deeper queue than its places (dispatch.QUICK_DEPTH is SQLite's)."""
    with pg_node(postgres_url, "node-a") as node:
        [link] = node.dispatcher.links
        assert (link.places, link.depth) == (2, 2)
