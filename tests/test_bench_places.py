"""bench/places.py (the engine row at several STEPD_THREADS values, and the steps' path alone): its
arithmetic and its table. Its runs need wrk and minutes, so they are make bench's kind, not the suite's."""

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
