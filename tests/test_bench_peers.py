"""`make bench-peers` (bench/peers.py) without running it: the module imports without the peers
installed (huey and DBOS are imported only by the functions that drive them), its options parse,
its goal and table read the figures they are given, and the Makefile's target uses a venv and a
requirements file of the benchmark's own, in no other target."""

import ast
import importlib.util
import shutil
import sys

import pytest
from helpers import ROOT, make_dry_run

PEERS = ROOT / "bench" / "peers.py"
# What the Makefile's targets depend on (as tests/test_makefile.py copies them), and the peers' pins.
MAKE_FILES = ("Makefile", "pyproject.toml", "requirements.txt", "requirements-dev.txt", "package.json")
MAKE_FILES += ("package-lock.json",)


@pytest.fixture(scope="module")
def peers():
    """bench/peers.py, imported as its command line does. It puts bench/ first on the import path
    (to import bench/run.py); that is undone here, or bench/delegates/ would be the `delegates` that
    a later test in this process imports (the old import's test, tests/test_delegates.py)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("peers", PEERS)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
        importlib.invalidate_caches()
    return module


def test_it_imports_no_peer_at_its_top_level():
    tree = ast.parse(PEERS.read_text())
    names = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not names & {"huey", "dbos", "sqlalchemy"}, names


def test_the_default_is_the_issues_workloads_in_three_rounds(peers):
    args = peers.parse_args([])
    assert args.role is None
    assert args.workloads == ((100, 100), (1000, 10)) and args.rounds == 3


def test_quick_is_small_and_one_round(peers):
    args = peers.parse_args(["--quick"])
    assert args.workloads == ((10, 10), (50, 10)) and args.rounds == 1
    assert peers.parse_args(["--quick", "--rounds", "2"]).rounds == 2


def test_the_children_parse_their_arguments(peers):
    consumer = peers.parse_args(["huey-consumer", "/tmp/h.db", "normal", "process", "2"])
    assert (consumer.role, consumer.sync, consumer.worker_type) == ("huey-consumer", "normal", "process")
    assert consumer.workers == 2
    run = peers.parse_args(["dbos-run", "/tmp/d.sqlite", "shipped", "1000", "10"])
    assert (run.role, run.mode, run.sequences, run.steps) == ("dbos-run", "shipped", 1000, 10)
    with pytest.raises(SystemExit):
        peers.parse_args(["dbos-run", "/tmp/d.sqlite", "delete-off", "1", "1"])


def test_every_row_of_the_issue_is_measured(peers):
    rows = {(v.engine, v.durability) for v in peers.VARIANTS}
    assert rows == {(engine, d) for engine in ("stepd", "huey", "dbos") for d in ("normal", "full")}
    huey = [v for v in peers.VARIANTS if v.engine == "huey"]
    assert {(v.setting, v.workers) for v in huey} == {(s, w) for s in ("normal", "full") for w in ("thread", "process")}
    assert {v.setting for v in peers.VARIANTS if v.engine == "dbos"} == {"wal-normal", "shipped", "wal-full"}


def figures(peers, stepd_normal, stepd_full, peer):
    workloads = peers.QUICK_WORKLOADS
    rates = {}
    for variant in peers.VARIANTS:
        value = {"normal": stepd_normal, "full": stepd_full}[variant.durability] if variant.engine == "stepd" else peer
        for workload in workloads:
            rates[variant.label, workload] = [value]
    return rates, workloads


def test_the_goal_is_ahead_at_normal_and_twice_at_full(peers):
    rates, workloads = figures(peers, stepd_normal=1001, stepd_full=2000, peer=1000)
    lines, met = peers.goal(peers.table(rates, workloads)[1], workloads)
    assert met and len(lines) == 4 and all(line.endswith(": MET") for line in lines), lines
    rates, workloads = figures(peers, stepd_normal=5000, stepd_full=1999, peer=1000)
    lines, met = peers.goal(peers.table(rates, workloads)[1], workloads)
    assert not met and [line.endswith("NOT MET") for line in lines] == [False, False, True, True], lines


def test_the_table_has_a_row_per_variant_and_a_column_per_workload(peers):
    rates, workloads = figures(peers, stepd_normal=3016, stepd_full=2306, peer=1167)
    text, _ = peers.table(rates, workloads)
    lines = text.splitlines()
    assert lines[0] == "| | 10 × 10 | 50 × 10 |"
    assert len(lines) == 2 + len(peers.VARIANTS)
    assert "| stepd `normal` | 3,016 | 3,016 |" in lines


def test_the_peers_are_pinned_apart_from_stepds_requirements():
    pins = (ROOT / "bench" / "requirements-peers.txt").read_text().splitlines()
    assert "huey==3.5.4" in pins and "dbos==3.4.0" in pins
    for name in ("requirements.txt", "requirements-dev.txt"):
        text = (ROOT / name).read_text().lower()
        assert "huey" not in text and "dbos" not in text, name
    assert ".venv-peers/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_bench_peers_uses_its_own_venv_and_no_other_target_runs_it(tmp_path):
    for name in (*MAKE_FILES, "bench/requirements-peers.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)

    def make(*args):
        done = make_dry_run(tmp_path, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = make("bench-peers", "BENCH_ARGS=--quick")
    assert f"{sys.executable} -m venv .venv-peers" in out
    assert "-r requirements.txt -r bench/requirements-peers.txt" in out and "--editable ." in out
    assert out.splitlines()[-1] == ".venv-peers/bin/python bench/peers.py --quick", out
    for target in ("test", "test-fast", "bench", "run"):
        out = make(target)
        assert ".venv-peers" not in out and "bench/peers.py" not in out and "requirements-peers" not in out, target
