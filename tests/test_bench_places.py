"""bench/places.py (the engine row at several STEPD_THREADS values, and the steps' path alone): its
arithmetic and its table. Its runs need wrk and minutes, so they are make bench's kind, not the suite's.
And `BENCH_STEPD_THREADS=N make bench`: every stepd server of the benchmark gets STEPD_THREADS=N, and
the output says the run is not at stepd's defaults."""

import importlib.util
import sys

import pytest
from helpers import ROOT

BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def places():
    """bench/places.py with bench/run.py under its name `run`, imported as the script does; bench/ is on
    the import path only meanwhile (bench/delegates/ must not become a later test's `delegates`)."""
    saved, modules = list(sys.path), dict(sys.modules)
    try:
        sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location("places", BENCH / "places.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = saved
        for name in set(sys.modules) - set(modules):
            del sys.modules[name]


def test_cpu_a_step_is_in_microseconds(places):
    assert places.per_step(0.5, 2_500) == pytest.approx(200.0)
    assert places.per_step(1.0, 0) == 0.0  # a run that ran no step divides by nothing


def test_the_table_has_a_row_a_value_with_both_runs(places):
    with_http = {"steps_per_s": 3501.4, "backlog_s": 0.62, "node_us": 255.2, "runner_us": 52.4, "node_busy": 0.891}
    alone = {"steps_per_s": 5142.0, "node_us": 163.7, "runner_us": 50.0, "node_busy": 0.84, "steps": 40_000}
    lines = places.table([(4, with_http, alone), (16, with_http | {"steps_per_s": 5133}, alone)]).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| 4 | 3,501 (backlog 0.6 s) | 255 | 52 | 89% | 5,142 | 164 | 84% |"
    assert lines[3].startswith("| 16 | 5,133 (backlog 0.6 s) |")
    assert lines[0].count("|") == lines[2].count("|")  # as many cells as headings


@pytest.fixture
def fresh_run(monkeypatch):
    """A loader of bench/run.py anew, under a name of its own, with BENCH_STEPD_THREADS set to the value
    given (None: unset); what the load imported (bench/seed.py) is forgotten afterwards."""
    modules = set(sys.modules)

    def load(threads):
        if threads is None:
            monkeypatch.delenv("BENCH_STEPD_THREADS", raising=False)
        else:
            monkeypatch.setenv("BENCH_STEPD_THREADS", threads)
        monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])  # run.py adds to the copy, not to ours
        spec = importlib.util.spec_from_file_location("run_under_test", BENCH / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def test_bench_stepd_threads_reaches_every_server_and_is_said(fresh_run, capsys):
    run = fresh_run("16")
    server = run.Server(["true"], BENCH / "unused.log", STEPD_SYNC="full")
    assert server.env["STEPD_THREADS"] == "16" and server.env["STEPD_SYNC"] == "full"
    assert run.altered_settings() == "STEPD_THREADS=16 (SPEC 8's default: STEPD_THREADS=4)"
    run.say_if_altered()  # what every script of the benchmark prints above its figures
    assert (
        capsys.readouterr().out
        == "NOT stepd's defaults: stepd ran with STEPD_THREADS=16 (SPEC 8's default: STEPD_THREADS=4)\n\n"
    )
    assert run.Server(["true"], BENCH / "unused.log", STEPD_THREADS="2").env["STEPD_THREADS"] == "2"  # a row's own wins


def test_without_it_the_servers_keep_stepds_default(fresh_run, monkeypatch, capsys):
    monkeypatch.setenv("STEPD_THREADS", "9")  # the caller's own STEPD_* never reach a server
    run = fresh_run(None)
    assert run.ALTERED == {}
    assert "STEPD_THREADS" not in run.Server(["true"], BENCH / "unused.log").env
    run.say_if_altered()
    assert capsys.readouterr().out == ""


def test_the_runner_counts_once_healthz_answers_200(places, monkeypatch):
    answers = iter([(503, {"message": "no runner is alive", "data": None}), (200, {"data": {"runners": 1}})])
    monkeypatch.setattr(places.run, "api", lambda server, method, path: next(answers))
    assert places.runners_alive(None) == 0  # the 503 of a service with no runner yet has no count
    assert places.runners_alive(None) == 1
