"""Faults under load, against real gunicorn and a real SQLite file: SIGKILL of the whole service
mid-load, many concurrent writers, a full disk. After each fault tests/invariants.py reads the
file and checks that nothing acknowledged was lost and every state is consistent.
"""

import contextlib
import errno
import fcntl
import os
import random
import signal
import threading
import time
from collections import Counter

import pytest
import requests
from helpers import STEPS, MixedLoad, P, process_ids, report_figure, typed, wait_for

from stepd.invariants import Acknowledged, check, read_only

CRASH_ROUNDS = 4
LOAD_SECONDS = (1.0, 2.0)  # how long each round runs before the kill: a random point in this range


def running_steps(db):
    """Steps whose delegate is running now (STARTED, not deferred), as the file says."""
    conn = read_only(db)
    try:
        return conn.execute("SELECT COUNT(*) FROM steps WHERE status = 'STARTED' AND deferred = 0").fetchone()[0]
    finally:
        conn.close()


def registered_runners(db):
    """The pids of the runners registered in the file."""
    conn = read_only(db)
    try:
        return {pid for (pid,) in conn.execute("SELECT pid FROM runners")}
    finally:
        conn.close()


def orphans_reaped(db):
    """True once no step is STARTED under a runner that is gone (the new service reaps them)."""
    return not [p for p in check(db).problems if "its runner" in p]


@pytest.mark.timeout(240)
def test_sigkill_mid_load_loses_nothing_acknowledged(server_factory, tmp_path):
    db = tmp_path / "crash.db"
    acknowledged = Acknowledged()
    rng = random.Random(3)
    server = server_factory(db_path=db).start()
    totals = Counter()
    for round_number in range(CRASH_ROUNDS):
        with MixedLoad([server], acknowledged) as load:
            wait_for(lambda load=load: load.statuses[201] >= 5, timeout=20, what="load to get going")
            time.sleep(rng.uniform(*LOAD_SECONDS))
            totals["running at the kill"] += running_steps(db)
            server.kill()
        assert load.statuses[500] == 0, f"round {round_number}: {load.statuses}"
        assert set(load.statuses) <= {200, 201, 412}, f"round {round_number}: {load.statuses}"
        totals["requests"] += load.requests

        # Before any recovery, straight from the killed service's file: nothing acknowledged is
        # missing; only the steps whose runner died may break the runner rule (until reaped).
        crashed = check(db, acknowledged)
        assert [p for p in crashed.problems if "its runner" not in p] == [], crashed.problems[:10]
        assert crashed.lost == 0

        server = server_factory(db_path=db).start()  # the same file, as after a crash
        wait_for(lambda: orphans_reaped(db), timeout=10, what="the killed service's steps to be Interrupted")
        report = check(db, acknowledged)
        assert report.problems == [], f"round {round_number}: {report.problems[:10]}"
        assert report.lost == 0
        totals["acks checked"] += crashed.acks_checked + report.acks_checked

    interrupted = server.get(f"{STEPS}?status=FAILED&limit=500").json()["data"]["items"]
    assert totals["running at the kill"] > 0, "no kill landed while a delegate ran"
    assert any(step["error"]["type"] == "Interrupted" for step in interrupted)
    assert len(acknowledged.restarts) > 0 and len(acknowledged.processes) > 0
    assert len(acknowledged.skips) > 0 and len(acknowledged.cancels) > 0
    report_figure(
        "crash",
        f"{CRASH_ROUNDS} SIGKILL rounds, {totals['requests']} requests, "
        f"{len(acknowledged.processes)} starts + {len(acknowledged.restarts)} restarts + "
        f"{len(acknowledged.skips)} skips + {len(acknowledged.cancels)} cancels acknowledged, "
        f"{totals['acks checked']} acknowledgement checks (after each kill and each restart), "
        f"{totals['running at the kill']} steps STARTED (running or queued) at the kills, lost 0",
    )


# -- write contention --------------------------------------------------------------------
def hammer(server, writers, writes_each):
    """`writers` threads, each with its own connection, start processes at once; returns the answers."""
    answers = []
    lock = threading.Lock()
    barrier = threading.Barrier(writers)

    def writer():
        session = requests.Session()
        session.headers.update(server.headers())
        barrier.wait()
        for _ in range(writes_each):
            response = session.post(server.url + P, json={"steps": [{"type": "noop"}]}, timeout=30)
            with lock:
                answers.append(response)

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("writers", "writes_each"), [(16, 40), (64, 10)])
def test_concurrent_writers_get_no_500_and_busy_is_a_503_with_retry_after(served, writers, writes_each):
    server = served
    before = process_ids(server)  # the shared service's processes of other tests
    started = time.monotonic()
    answers = hammer(server, writers, writes_each)
    took = time.monotonic() - started
    assert len(answers) == writers * writes_each
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) <= {201, 503}, statuses
    for busy in (r for r in answers if r.status_code == 503):
        assert busy.json()["message"] == "Service unavailable"
        assert int(busy.headers["Retry-After"]) >= 1
    if writers <= 16:
        assert statuses[503] == 0, "the target: no writer waits out the busy timeout at 16 clients"
    created = {r.json()["data"]["processId"] for r in answers if r.status_code == 201}
    assert process_ids(server) - before == created  # every 201 is there, and nothing refused was written
    assert not created & before
    report_figure(
        f"contention {writers:02d} writers",
        f"{len(answers)} process starts in {took:.1f}s: {statuses[201]} x 201, {statuses[503]} x 503, 0 x 500",
    )


@pytest.mark.timeout(60)
def test_a_writer_that_cannot_get_the_lock_in_time_gets_503_with_retry_after(server_factory):
    """Another process holds stepd's write lock past the 5 s busy timeout: writes 503, reads go on."""
    server = server_factory().start()
    db = server.env["STEPD_DB"]
    wait_for(lambda: registered_runners(db) == set(server.runner_pids()), what="the runner to register")
    lock_fd = os.open(db + ".lock", os.O_RDWR)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        # A node or a runner that starts now must wait for the lock, not fail to start (the node
        # would die again and again; so would a runner).
        (victim,) = server.node_pids()
        (runner,) = server.runner_pids()
        os.kill(victim, signal.SIGKILL)
        os.kill(runner, signal.SIGKILL)
        wait_for(lambda: victim not in server.node_pids() and len(server.node_pids()) == 1, what="a new node")
        wait_for(lambda: server.runner_pids() not in ([], [runner]), what="a new runner")
        started = time.monotonic()
        answers = hammer(server, writers=8, writes_each=1)  # 8 = the requests gunicorn serves at once
        waited = time.monotonic() - started
        assert server.get(f"{P}?limit=1").status_code == 200, "reads do not need the write lock"
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    assert [r.status_code for r in answers] == [503] * 8
    assert server.proc.poll() is None, "the service is up: the new node waited for the lock"
    for busy in answers:
        assert busy.json()["message"] == "Service unavailable"
        assert busy.headers["Retry-After"] == "1"
    assert 4.5 < waited < 15, waited
    assert process_ids(server) == set(), "nothing refused was written"
    wait_for(lambda: registered_runners(db) == set(server.runner_pids()), what="the new runner to register")
    assert server.post(P, {"steps": [{"type": "noop"}]}).status_code == 201, "writes again once the lock is free"
    report_figure("contention lock held", f"8 writers with the lock held: 8 x 503 with Retry-After in {waited:.1f}s")


# -- a full disk -------------------------------------------------------------------------
def fill(folder):
    """Write a file until the filesystem is full, down to the last block; returns it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (folder / "probe").write_bytes(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    return filler


def big_start(tag):
    """A process start whose params are ~600 KB, more than the WAL can hold without growing."""
    params = typed(**{f"blob{n}": f"{tag}{n}" + "x" * 60000 for n in range(10)})
    return {"name": tag, "steps": [{"type": "noop", "params": params}]}


@pytest.mark.timeout(120)
def test_a_full_disk_refuses_writes_with_503_keeps_reads_and_recovers_without_a_restart(
    server_factory, small_disk, tmp_path
):
    db = small_disk / "stepd.db"
    server = server_factory(db_path=db)
    server.log_path = tmp_path / "full-disk.log"  # the log must not sit on the full disk
    server.start()
    workers = set(server.worker_pids()) | set(server.node_pids())
    before = server.post(P, {"name": "before", "steps": [{"type": "noop"}]})
    assert before.status_code == 201
    before_id = before.json()["data"]["processId"]

    filler = fill(small_disk)
    outcomes = Counter()
    written = {"before"}
    for attempt in range(5):
        refused = server.post(P, big_start(f"while-full-{attempt}"))
        outcomes[f"big {refused.status_code}"] += 1
        assert refused.status_code == 503, refused.text
        assert refused.json()["message"] == "Service unavailable"
        assert int(refused.headers["Retry-After"]) >= 1
        assert "stepd.db" not in refused.text and str(small_disk) not in refused.text
        # Reads keep working while writes cannot.
        assert server.get(f"{P}/{before_id}").status_code == 200
        assert server.get(f"{P}?limit=5").status_code == 200
        assert server.get("/healthz").status_code == 200

    # Small writes may still fit in the WAL's free pages: each is either done (201, and there)
    # or refused with 503, never a 500.
    for attempt in range(5):
        small = server.post(P, {"name": f"small-{attempt}", "steps": [{"type": "noop"}]})
        outcomes[f"small {small.status_code}"] += 1
        assert small.status_code in (201, 503), small.text
        if small.status_code == 201:
            written.add(f"small-{attempt}")

    filler.unlink()
    # The first write after the space is back is as big as those refused (issue 18: 600 KB), and
    # its step's outcome rewrites those 600 KB twice: the write-ahead log must not fill the 4 MiB
    # disk again before a checkpoint.
    after = wait_for(
        lambda: (r := server.post(P, big_start("after"))).status_code == 201 and r, timeout=10, what="writes again"
    )
    process_id = after.json()["data"]["processId"]
    wait_for(lambda: server.get(f"{P}/{process_id}").json()["data"]["status"] == "COMPLETED", what="it to run")
    assert set(server.worker_pids()) | set(server.node_pids()) == workers, "the service carried on without a restart"
    names = {p["name"] for p in server.get(f"{P}?limit=50").json()["data"]["items"]}
    assert names == written | {"after"}, "every write done is there, nothing refused was written"
    report = check(db)
    assert report.problems == []
    report_figure(
        "disk full",
        f"writes while full: {dict(sorted(outcomes.items()))}; reads 200; "
        f"first write after freeing space: 201, same workers, invariants ok",
    )


@pytest.mark.timeout(120)
def test_a_worker_respawned_while_the_disk_is_full_waits_instead_of_stopping_the_service(
    server_factory, small_disk, tmp_path
):
    """A node started again while the disk is full, and a runner that cannot register, must wait
    rather than die again and again, or stop the service."""
    db = small_disk / "stepd.db"
    server = server_factory(db_path=db)
    server.log_path = tmp_path / "respawn.log"
    server.start()
    wait_for(lambda: registered_runners(db) == set(server.runner_pids()), what="the runner to register")
    (victim,) = server.node_pids()  # its runner ends with it
    (runner,) = server.runner_pids()

    filler = fill(small_disk)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (p := server.node_pids()) and victim not in p, what="the service to start the node again")
    (new_runner,) = wait_for(lambda: (p := server.runner_pids()) not in ([], [runner]) and p, what="a new runner")
    time.sleep(2)  # the new runner heartbeats against the full disk meanwhile
    assert server.runner_pids() == [new_runner], "the new runner waits: it does not die again and again"
    assert server.proc.poll() is None, f"the service stopped:\n{server.output()[-3000:]}"
    assert server.get(f"{P}?limit=1").status_code == 200, "reads go on"
    assert server.post(P, big_start("while-full")).status_code == 503

    filler.unlink()
    wait_for(lambda: registered_runners(db) == set(server.runner_pids()), what="the new runner to register")
    assert server.proc.poll() is None
    assert server.post(P, {"steps": [{"type": "noop"}]}).status_code == 201
    assert check(db).problems == []


@pytest.mark.timeout(120)
def test_an_outcome_that_meets_a_full_disk_is_recorded_once_space_is_freed(server_factory, small_disk, tmp_path):
    """A delegate that finishes while the disk is full must not leave its step STARTED for ever."""
    server = server_factory(db_path=small_disk / "stepd.db", workers=1)
    server.log_path = tmp_path / "outcome.log"
    server.start()
    release = tmp_path / "release"  # off the small disk, so the test can always create it
    process = server.post(P, {"steps": [{"type": "wait", "params": typed(file=str(release), seconds=60.0)}]})
    step_id = process.json()["data"]["steps"][0]["processStepId"]

    filler = fill(small_disk)
    release.touch()  # the delegate returns now; recording its outcome needs a write
    # Mostly the outcome's write meets the full disk and is retried until space is freed. Now and
    # then it fits at once: the log file keeps the space of what a checkpoint copied out (up to
    # its size limit), and SQLite writes into it without growing the file. Either way the step
    # must not stay STARTED; which way it went is reported.
    met_full_disk = "could not record a step outcome (database or disk is full)"
    wait_for(
        lambda: (
            met_full_disk in server.output() or server.get(f"{STEPS}/{step_id}").json()["data"]["status"] != "STARTED"
        ),
        timeout=10,
        what="the outcome's write to meet the full disk, or to fit",
    )
    path = "retried until space was freed" if met_full_disk in server.output() else "fitted in the log's free space"
    filler.unlink()
    done = wait_for(
        lambda: (s := server.get(f"{STEPS}/{step_id}").json()["data"])["status"] != "STARTED" and s,
        timeout=15,
        what="the outcome to be recorded",
    )
    assert done["status"] == "COMPLETED", done
    report_figure("outcome on a full disk", f"recorded, COMPLETED ({path})")
