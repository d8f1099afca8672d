"""groupcommit.GroupCommit against a real SQLite file and real threads: concurrent writes share
one transaction, each keeps its own outcome, and none returns before its write is committed."""

import sqlite3
import threading
import time

from helpers import all_at_once

from groupcommit import GroupCommit
from model import PreconditionFailed, Unwritable


def insert_token(database, name):
    def write():
        with database.transaction() as conn:
            conn.execute(
                "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES (?, 'reader', ?, 'now')",
                (name, f"hash-{name}"),
            )
        return name

    return write


def committed_names(database):
    """The token names as another connection sees them: only what is committed."""
    with sqlite3.connect(database.path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM tokens")}


def test_a_write_returns_its_result_once_committed(database):
    commits = GroupCommit(database)
    assert commits.run(insert_token(database, "a")) == "a"
    assert committed_names(database) == {"a"}
    assert (commits.batches, commits.writes) == (1, 1)


def test_concurrent_writes_are_committed_together_and_each_is_seen_committed_on_return(database):
    commits = GroupCommit(database)
    seen_on_return = {}

    def slow_write(index):
        def write():
            time.sleep(0.02)  # holds the batch open while the other threads queue up
            return insert_token(database, f"t{index}")()

        name = commits.run(write)
        seen_on_return[name] = name in committed_names(database)
        return name

    names = all_at_once(16, slow_write)
    assert sorted(names) == sorted(f"t{n}" for n in range(16))
    assert all(seen_on_return.values()), seen_on_return
    assert commits.writes == 16
    assert commits.batches < 16, "no two writes shared a transaction"


def test_a_failing_write_is_undone_alone_and_raises_in_its_own_caller(database):
    commits = GroupCommit(database)
    gate = threading.Event()

    def first():  # the leader: holds the batch until the others are queued
        gate.wait(5)
        return insert_token(database, "first")()

    def failing():
        insert_token(database, "half-done")()
        raise PreconditionFailed.on("x", "no")

    outcomes = {}

    def call(name, fn):
        try:
            outcomes[name] = commits.run(fn)
        except PreconditionFailed as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=("first", first))]
    threads[0].start()
    time.sleep(0.05)
    for name, fn in (("failing", failing), ("last", insert_token(database, "last"))):
        threads.append(threading.Thread(target=call, args=(name, fn)))
        threads[-1].start()
    time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert outcomes["first"] == "first" and outcomes["last"] == "last"
    assert isinstance(outcomes["failing"], PreconditionFailed)
    assert committed_names(database) == {"first", "last"}


def test_a_batch_that_cannot_commit_fails_every_write_in_it(database):
    commits = GroupCommit(database)

    def write_then_lose_the_transaction():
        insert_token(database, "lost")()
        database.connection().execute("ROLLBACK")  # as SQLite does by itself on a full disk

    try:
        commits.run(write_then_lose_the_transaction)
    except Unwritable:
        pass
    else:
        raise AssertionError("a write whose transaction was rolled back returned")
    assert committed_names(database) == set()
    assert commits.run(insert_token(database, "after")) == "after"  # the next batch works
