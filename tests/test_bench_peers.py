"""`make bench-peers` (bench/peers.py): the module imports without the peers installed (huey, DBOS,
procrastinate and psycopg are imported only by the functions that drive them), its options parse,
its goals and table read the figures they are given, the Makefile's target uses a venv and a
requirements file of the benchmark's own, in no other target. On a real PostgreSQL: the run's
cluster keeps PostgreSQL's durability and is gone after it stops, stepd's hook reads stepd's
schema, and (where .venv-peers/ has procrastinate) a tiny procrastinate run end to end."""

import ast
import contextlib
import importlib.util
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, is_zombie, make_dry_run, postgres_missing, wait_for

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
    assert not names & {"huey", "dbos", "sqlalchemy", "procrastinate", "psycopg"}, names


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
    worker = peers.parse_args(["procrastinate-worker", "4"])
    assert (worker.role, worker.concurrency) == ("procrastinate-worker", 4)


def test_engines_and_workloads_can_be_chosen(peers):
    args = peers.parse_args(["--engines", "stepd-pg, procrastinate", "--workloads", "3x3,20X10"])
    assert args.engines == ("procrastinate", "stepd-pg")  # ENGINES' order, whatever the order asked
    assert args.workloads == ((3, 3), (20, 10)) and args.rounds == 3
    assert peers.parse_args([]).engines == ("stepd", "huey", "dbos", "procrastinate", "stepd-pg")
    assert peers.parse_args(["--quick", "--workloads", "2x2"]).workloads == ((2, 2),)
    for wrong in (["--engines", "celery"], ["--workloads", "3x"], ["--workloads", "0x3"], ["--workloads", "3x3x3"]):
        with pytest.raises(SystemExit):
            peers.parse_args(wrong)


def test_every_row_of_the_issues_is_measured(peers):
    rows = {(v.engine, v.durability) for v in peers.VARIANTS}
    sqlite = {(engine, d) for engine in ("stepd", "huey", "dbos") for d in ("normal", "full")}
    assert rows == sqlite | {("procrastinate", "postgresql"), ("stepd-pg", "postgresql")}
    on_postgres = [v for v in peers.VARIANTS if v.durability == "postgresql"]
    assert {(v.engine, v.processes, v.setting) for v in on_postgres} == {
        (engine, n, "on") for engine in ("procrastinate", "stepd-pg") for n in (1, 2)
    }
    assert "procrastinate, 2 workers" in {v.label for v in on_postgres}
    assert {v.engine for v in on_postgres} == set(peers.ON_POSTGRES) and set(peers.ENGINES) == {
        v.engine for v in peers.VARIANTS
    }
    huey = [v for v in peers.VARIANTS if v.engine == "huey"]
    assert {(v.setting, v.workers) for v in huey} == {(s, w) for s in ("normal", "full") for w in ("thread", "process")}
    assert {v.setting for v in peers.VARIANTS if v.engine == "dbos"} == {"wal-normal", "shipped", "wal-full"}


def figures(peers, stepd_normal, stepd_full, peer, stepd_pg=None):
    """Rates of every row, one round each: stepd's on SQLite as given, each peer's `peer`, stepd's
    on PostgreSQL `stepd_pg` (left out when None, as where PostgreSQL is missing)."""
    workloads = peers.QUICK_WORKLOADS
    stepd = {"normal": stepd_normal, "full": stepd_full, "postgresql": stepd_pg}
    rates = {}
    for variant in peers.VARIANTS:
        value = stepd[variant.durability] if variant.engine.startswith("stepd") else peer
        for workload in workloads:
            if value is not None:
                rates[variant.label, workload] = [value]
    return rates, workloads


def test_the_goal_is_ahead_at_normal_and_twice_at_full(peers):
    rates, workloads = figures(peers, stepd_normal=1001, stepd_full=2000, peer=1000)
    lines, met = peers.goal(peers.table(rates, workloads)[1], workloads)
    assert met and len(lines) == 4 and all(line.endswith(": MET") for line in lines), lines
    assert lines[0] == (
        "- normal, 10 × 10: stepd `normal` 1,001 against huey NORMAL, chains, 4 threads 1,000"
        " (1.00x; goal ahead of the best peer): MET"
    )
    assert lines[2].endswith("(2.00x; goal >= 2x the best peer): MET"), lines
    rates, workloads = figures(peers, stepd_normal=5000, stepd_full=1999, peer=1000)
    lines, met = peers.goal(peers.table(rates, workloads)[1], workloads)
    assert met is False and [line.endswith("NOT MET") for line in lines] == [False, False, True, True], lines


def test_issue_20s_goal_is_two_nodes_at_twice_procrastinates_two_workers(peers):
    rates, workloads = figures(peers, 1, 1, peer=1000, stepd_pg=2000)
    lines, met = peers.goal_20(peers.table(rates, workloads)[1], workloads, {})
    assert met is True and len(lines) == 2, lines
    assert lines[0] == (
        "- 10 × 10: stepd on PostgreSQL, 2 nodes 2,000 against procrastinate, 2 workers 1,000 (2.00x; goal >= 2x): MET"
    )
    rates, workloads = figures(peers, 1, 1, peer=1000, stepd_pg=1999)
    lines, met = peers.goal_20(peers.table(rates, workloads)[1], workloads, {})
    assert met is False and all(line.endswith(": NOT MET") for line in lines), lines


def test_stepd_on_postgresql_is_measured_and_a_row_left_out_says_why(peers):
    """stepd serves from PostgreSQL: its rows are never left out up front. Where a row is missing
    (PostgreSQL not installed, say), the goal is not claimed either way and the line says why."""
    assert peers.left_out(("stepd-pg",)) == {}
    why_not = {"stepd-pg": "PostgreSQL rows skipped: no initdb here"}
    rates, workloads = figures(peers, 1, 1, peer=1000)
    text, medians = peers.table(rates, workloads)
    assert "stepd on PostgreSQL" not in text and "| procrastinate, 2 workers | 1,000 | 1,000 |" in text.splitlines()
    assert peers.not_measured(why_not) == [
        "PostgreSQL rows skipped: no initdb here"
        " (not measured: stepd on PostgreSQL, 1 node; stepd on PostgreSQL, 2 nodes)"
    ]
    lines, met = peers.goal_20(medians, workloads, why_not)
    assert met is None and len(lines) == 2, lines
    assert all(line.endswith(": not measured (PostgreSQL rows skipped: no initdb here)") for line in lines), lines


def test_procrastinate_is_left_out_saying_so_where_it_is_not_installed(peers):
    why_not = peers.left_out(peers.ENGINES)
    installed = importlib.util.find_spec("procrastinate") is not None  # .venv/ has it not; .venv-peers/ has
    assert ("procrastinate" in why_not) is not installed, why_not
    if not installed:
        assert "make bench-peers installs it in .venv-peers/" in why_not["procrastinate"]
    assert peers.left_out(("stepd", "huey", "dbos")) == {}


def test_without_postgresql_its_rows_are_skipped_with_one_line(peers, monkeypatch):
    monkeypatch.setattr(peers.pgcluster, "postgres_missing", lambda: "no initdb here")
    assert peers.start_cluster() == (None, "PostgreSQL rows skipped: no initdb here")


def test_the_table_has_a_row_per_variant_and_a_column_per_workload(peers):
    rates, workloads = figures(peers, stepd_normal=3016, stepd_full=2306, peer=1167)
    text, _ = peers.table(rates, workloads)
    lines = text.splitlines()
    assert lines[0] == "| | 10 × 10 | 50 × 10 |"
    assert len(lines) == 2 + len(peers.VARIANTS) - 2  # stepd's two rows on PostgreSQL not measured
    assert "| stepd `normal` | 3,016 | 3,016 |" in lines
    rates, workloads = figures(peers, stepd_normal=3016, stepd_full=2306, peer=1167, stepd_pg=2500)
    lines = peers.table(rates, workloads)[0].splitlines()
    assert len(lines) == 2 + len(peers.VARIANTS) and lines[-4] == "| stepd on PostgreSQL, 1 node | 2,500 | 2,500 |"


def test_the_peers_are_pinned_apart_from_stepds_requirements():
    pins = (ROOT / "bench" / "requirements-peers.txt").read_text().splitlines()
    assert "huey==3.5.4" in pins and "dbos==3.4.0" in pins and "procrastinate==3.10.0" in pins
    assert "psycopg-pool==3.3.3" in pins  # procrastinate's, pinned too
    names = [line.split("==")[0].lower() for line in pins if line and not line.startswith("#")]
    assert all("==" in line for line in pins if line and not line.startswith("#")), pins
    assert len(names) == len(set(names)), names
    for name in ("requirements.txt", "requirements-dev.txt"):
        text = (ROOT / name).read_text().lower()
        assert "huey" not in text and "dbos" not in text and "procrastinate" not in text, name
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


# -- on a real PostgreSQL ----------------------------------------------------------------------------
def need_postgres():
    """Skip where this machine cannot run PostgreSQL; under CI (which installs it) fail instead, as the
    fixture postgres_cluster does."""
    why = postgres_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the PostgreSQL tests: {why}")
        pytest.skip(why)


def processes_holding(folder):
    """The pids whose command line names `folder` (a PostgreSQL server names its data folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(folder) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass  # gone meanwhile
    return pids


def test_the_runs_cluster_has_postgresqls_own_durability_and_is_gone_once_stopped(peers):
    """What procrastinate's rows are measured on: synchronous_commit, fsync and full_page_writes on
    (not the tests' throwaway settings); stop() leaves no server and no folder."""
    need_postgres()
    cluster, missing = peers.start_cluster()
    assert missing is None and cluster is not None
    try:
        pid = cluster.server_pid()
        assert pid in processes_holding(cluster.data)
        url = cluster.new_database("peers")
        assert peers.postgres_settings(url) == "synchronous_commit on, fsync on, full_page_writes on"
        cluster.drop_database(url)
    finally:
        cluster.stop()
    assert not cluster.folder.exists() and processes_holding(cluster.data) == []


def test_stepds_hook_reads_its_steps_finished_on_postgresql(peers, postgres_url):
    """stepd_finished_postgres, which measure_stepd_postgres waits with: COMPLETED steps of the
    processes of one name counted, the last finishedAt returned, a FAILED step stops the wait."""
    import psycopg

    from stepd.postgres import PostgresDatabase

    PostgresDatabase(postgres_url).prepare()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for process, name in (("p1", "peers"), ("p2", "other")):
            conn.execute(
                "INSERT INTO processes (id, name, status, principal, created_at, updated_at)"
                " VALUES (%s, %s, 'RUNNING', 'a', now(), now())",
                (process, name),
            )
        for position, finished in enumerate(("2026-01-02T03:04:05.250Z", "2026-01-02T03:04:06.500Z")):
            conn.execute(
                "INSERT INTO steps (id, process_id, position, type, status, params, created_at, finished_at)"
                " VALUES (%s, 'p1', %s, 'noop', 'COMPLETED', '{}', now(), %s)",
                (f"s{position}", position, finished),
            )
        conn.execute(
            "INSERT INTO steps (id, process_id, position, type, status, params, created_at, finished_at)"
            " VALUES ('o0', 'p2', 0, 'noop', 'COMPLETED', '{}', now(), '2030-01-01T00:00:00Z')"
        )
        assert peers.stepd_finished_postgres(postgres_url, "peers", 2) == 1767323046.5
        conn.execute(
            "INSERT INTO steps (id, process_id, position, type, status, params, created_at)"
            " VALUES ('s2', 'p1', 2, 'noop', 'FAILED', '{}', now())"
        )
        with pytest.raises(RuntimeError, match="a noop step FAILED"):
            peers.stepd_finished_postgres(postgres_url, "peers", 3)


PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def need_procrastinate():
    """Skip where .venv-peers/ (made by make bench-peers, not by make test) has no procrastinate."""
    if not PEERS_PYTHON.exists():
        pytest.skip(f"{PEERS_PYTHON} is not there: make bench-peers makes it")
    if subprocess.run([PEERS_PYTHON, "-c", "import procrastinate"], capture_output=True).returncode != 0:
        pytest.skip(f"procrastinate is not installed in {PEERS_PYTHON}: make bench-peers installs it")


def test_procrastinate_runs_three_sequences_of_three_steps_on_a_real_postgresql(tmp_path):
    """bench/peers.py itself, in .venv-peers/ (where make bench-peers installs procrastinate): its own
    cluster, 3 sequences of 3 steps, procrastinate's chained jobs with 1 and then 2 workers and stepd's
    processes on 1 and then 2 nodes, the figures in the table, the durability read back, issue 20's
    goal judged, and the cluster gone afterwards."""
    need_procrastinate()
    need_postgres()
    command = [PEERS_PYTHON, "bench/peers.py", "--engines", "procrastinate,stepd-pg", "--workloads", "3x3"]
    done = subprocess.run([*command, "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    labels = ("procrastinate, 1 worker", "procrastinate, 2 workers")
    for label in (*labels, "stepd on PostgreSQL, 1 node", "stepd on PostgreSQL, 2 nodes"):
        rate = float(rows[label].split(" | ")[1].strip(" |").replace(",", ""))
        assert 0 < rate < 100_000, rows[label]
        assert f"- {label} (read back: synchronous_commit on, fsync on, full_page_writes on): 3 × 3: " in done.stdout
    issue_20 = done.stdout.split("Issue 20's goal")[1]
    assert "not measured" not in issue_20 and ("Goal: MET" in issue_20 or "Goal: NOT MET" in issue_20), issue_20
    [folder] = [line.split(", in ")[1] for line in done.stderr.splitlines() if line.startswith("PostgreSQL on ")]
    assert not Path(folder).exists() and processes_holding(folder) == []


def test_processes_are_posted_over_every_node_in_turn(peers, server_factory, tmp_path):
    """post_processes, as measure_stepd_postgres calls it with two nodes: the submitters take the
    nodes in turn, so each node gets its share. Here two real services on files of their own, so
    that each file shows what its node was sent (6 processes: 2 + 1 submitters' worth each)."""
    files = [tmp_path / "node-0.db", tmp_path / "node-1.db"]
    nodes = [server_factory(db_path=file).start() for file in files]
    peers.post_processes(nodes, nodes[0].token, "spread", 6, 2)
    for file in files:
        assert peers.stepd_finished(file, "spread", 3 * 2) > 0  # each node ran its 3 processes' 2 steps
        with sqlite3.connect(file) as conn:
            assert conn.execute("SELECT count(*) FROM processes WHERE name = 'spread'").fetchone()[0] == 3


def test_ctrl_c_in_a_procrastinate_row_stops_its_workers_and_the_cluster(tmp_path):
    """SIGINT to the driver while a row runs (as Ctrl-C sends it): it says so and exits, leaving no
    worker, no PostgreSQL server and no cluster folder behind."""
    need_procrastinate()
    need_postgres()
    command = [PEERS_PYTHON, "bench/peers.py", "--engines", "procrastinate", "--workloads", "2000x10", "--rounds", "1"]
    err = tmp_path / "stderr"
    with open(err, "wb") as out:
        driver = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=out,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's job has it
        )
    try:
        wait_for(lambda: workers_of(driver.pid), timeout=60, what="procrastinate's worker under the driver")
        workers = workers_of(driver.pid)
        [folder] = [line.split(", in ")[1] for line in err.read_text().splitlines() if line.startswith("PostgreSQL on")]
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=60) != 0
    finally:
        if driver.poll() is None:
            driver.kill()
    assert "interrupted; every server, consumer, worker and PostgreSQL cluster it started is stopped" in err.read_text()
    assert not Path(folder).exists() and processes_holding(folder) == []
    assert not [pid for pid in workers if not is_zombie(pid)]  # ended (the driver, their parent, is gone: not reaped)


def workers_of(pid):
    """The procrastinate worker processes among `pid`'s children."""
    found = []
    with contextlib.suppress(OSError):  # the driver, or a child, gone meanwhile
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            if b"procrastinate-worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found
