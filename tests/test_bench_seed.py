"""`make bench` seeds its files directly (bench/seed.py: 10^6 steps are far too many for the API)
and checks a seeded row against one the service made (bench/run.py's seeded_differences). Here
that check runs against the app, so a schema change that the seeder does not follow fails the
suite, not the next `make bench` after it."""

import importlib.util
import sys

import pytest
from helpers import ROOT

BENCH = ROOT / "bench"


def _import(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    """bench/seed.py and bench/run.py, imported as `make bench` does; run.py puts bench/ first on the
    import path, which is undone here (bench/delegates/ must not become a later test's `delegates`)."""
    saved, modules = list(sys.path), dict(sys.modules)
    try:
        sys.path.insert(0, str(BENCH))
        seed = _import("seed")
        sys.modules["seed"] = seed
        yield seed, _import("run")
    finally:
        sys.path[:] = saved
        for name in set(sys.modules) - set(modules):
            del sys.modules[name]


def seeded_and_made(seed, api, db_path, monkeypatch, change=None):
    """(a step the service failed, a step seeded as failed the same way): the built-in `fail`
    delegate, as the API's operator 'ops'. `change(conn, seeded id)` alters the seeded rows."""
    monkeypatch.setattr(seed, "PRINCIPAL", "ops")
    conn = seed.open_db(str(db_path))
    [seeded] = seed.failed_steps(conn, "fail", 1, {"message": ("STRING", "same")}, "StepFailure", "same")
    if change is not None:
        change(conn, seeded)
    seed.close_db(conn)
    made = api.start(("fail", {"message": "same"}))["steps"][0]["processStepId"]
    api.wait_step(made, "FAILED")
    return made, seeded


def test_a_seeded_failed_step_has_the_rows_the_service_writes(bench, api, db_path, monkeypatch):
    seed, run = bench
    made, seeded = seeded_and_made(seed, api, db_path, monkeypatch)
    assert run.seeded_differences(str(db_path), made, seeded) == []


def test_the_check_names_a_column_the_seeder_leaves_out(bench, api, db_path, monkeypatch):
    seed, run = bench

    def forget_request_id(conn, step_id):
        conn.execute("UPDATE attempts SET request_id = NULL WHERE step_id = ?", (step_id,))

    made, seeded = seeded_and_made(seed, api, db_path, monkeypatch, forget_request_id)
    differences = run.seeded_differences(str(db_path), made, seeded)
    assert len(differences) == 1 and differences[0].startswith("seeded request_id is None"), differences


def test_the_drain_counts_what_the_engine_still_has_to_run(bench, tmp_path):
    """bench/run.py's active_steps, which drain() asks 20 times a second: the PENDING steps and the
    STARTED ones not deferred (queued, running, or waiting for a retry); a deferred step waits for
    complete-step or fail-step, not for the engine."""
    from stepd.db import Database
    from stepd.model import COMPLETED, Outcome
    from stepd.store import Store

    _, run = bench
    path = tmp_path / "drain.db"
    store = Store(Database(path))
    store.db.prepare()
    store.create_process("queued", [("a", {}), ("b", {})], "t", None)  # step 0 queued, step 1 PENDING
    _, running = store.create_process("running", [("a", {})], "t", "r1")
    _, deferred = store.create_process("deferred", [("a", {})], "t", "r1")
    assert run.active_steps(path) == 4
    store.db.write(store.outcomes_job([Outcome(deferred, "DEFERRED")], "r1"))
    assert run.active_steps(path) == 3
    store.db.write(store.outcomes_job([Outcome(running, COMPLETED)], "r1"))
    assert run.active_steps(path) == 2
