"""`make bench`'s PostgreSQL part (bench/postgres_rows.py, run by bench/run.py): its targets read the
rows they are given, MET or NOT MET (or not measured, saying why); wrk's runs against two nodes add
up; a delegate call counted twice is found; without PostgreSQL the part says why in one line;
`--only postgres` leaves make bench's SQLite scripts out. On a real PostgreSQL: the LISTEN connection
is found and ended by name, and make bench's reads beside the service run there too."""

import importlib.util
import shutil
import sys

import psycopg
import pytest
from helpers import ROOT, make_dry_run

BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def rows_module():
    """bench/postgres_rows.py with bench/run.py under its name `run`, imported as the driver does. bench/
    is on the import path only meanwhile (or bench/delegates/ would be the `delegates` a later test in
    this process imports); the modules it imported stay, as bench/peers.py's test leaves its."""
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        for name in ("run", "postgres_rows"):
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
                sys.modules[name] = module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
        importlib.invalidate_caches()
    return sys.modules["postgres_rows"]


def wrk_result(counted, seconds, p99, cpu_ms, statuses, split):
    return {
        "rps": counted / seconds,
        "counted": counted,
        "counted_status": 201,
        "seconds": seconds,
        "requests": sum(statuses.values()),
        "p50": p99 / 10,
        "p99": p99,
        "statuses": statuses,
        "not_failed_yet": 0,
        "wraps": 0,
        "late_sends": 0,
        "max_late_ms": 0.0,
        "socket_errors": "",
        "cpu_ms": cpu_ms,
        "split": split,
        "http_processes": 1,
        "rate": None,
        "command": f"wrk {split}",
    }


def test_two_nodes_wrk_runs_add_up(rows_module):
    """The answers and the CPU of both runs count, over the longer run's time; p99 is the slower node's."""
    run = sys.modules["run"]
    merged = run.merge_wrk(
        [
            wrk_result(100, 10.0, 50.0, 2.0, {201: 100, 503: 2}, "8"),
            wrk_result(300, 10.5, 20.0, 1.0, {201: 300}, "8"),
        ]
    )
    assert (merged["counted"], merged["seconds"], merged["rps"]) == (400, 10.5, 400 / 10.5)
    assert merged["statuses"] == {201: 400, 503: 2} and merged["requests"] == 402
    assert (merged["p50"], merged["p99"]) == (5.0, 50.0)
    assert merged["cpu_ms"] == (100 * 2.0 + 300 * 1.0) / 400
    assert (merged["split"], merged["http_processes"]) == ("8 + 8", 2)


def test_an_attempt_called_twice_is_found(rows_module):
    calls = "s1 1\ns2 1\ns3 1\n"
    assert rows_module.twice(calls) == []
    assert rows_module.twice(calls + "s2 1\n") == [("s2", "*"), ("s2", "1")]
    assert rows_module.twice(calls + "s3 2\n") == [("s3", "*")]  # a second attempt of a step never restarted


def engine(nodes, steps_per_s):
    return {"key": "pg-engine", "nodes": nodes, "steps_per_s": steps_per_s, "backlog_s": 0.4}


def kill(**changes):
    """A kill row as run_kill makes it: 4 rounds, 6 attempts Interrupted, nothing lost or twice."""
    row = {
        "key": "pg-kill",
        "kill_seconds": [5.1, 5.3, 4.9, 6.0],
        "held": [2, 1, 2, 1],
        "outcomes": {"FAILED Interrupted": 6},
        "acknowledged": 200,
        "lost": 0,
        "twice": [],
        "retried": 0,
        "check": True,
    }
    return row | changes


def wake(key, p99):
    return {"key": key, "row": f"queued -> running, {key}", "p50": p99 / 2, "p99": p99, "note": ""}


def verdicts(rows_module, rows):
    return [line.split(":")[0] for line in rows_module.targets(rows).splitlines() if line.startswith("- ")][:-1]


def test_each_of_issue_20s_targets_is_met_at_its_goal(rows_module):
    rows = [engine(1, 1500), engine(2, 2000), kill(), wake("pg-idle", 50.0), wake("pg-listen-broken", 2500.0)]
    assert verdicts(rows_module, rows) == ["- MET"] * 5
    text = rows_module.targets(rows)
    assert (
        "- MET: engine on PostgreSQL, noop steps/s end to end, two nodes: 2,000 (goal >= 2,000; one node: 1,500;"
        in text
    )
    assert "Interrupted 6.0 s after the kill at most, over 4 rounds (6 attempts; goal <= 10 s)" in text
    assert text.endswith(
        "Not measured by this run:\n"
        "- stepd's two nodes >= 2x procrastinate's two workers: `make bench-peers` measures it"
    )


def test_each_target_is_not_met_past_its_goal(rows_module):
    rows = [engine(2, 1999), kill(kill_seconds=[5.0, 10.1, 5.0, 5.0]), wake("pg-idle", 50.1)]
    rows.append(wake("pg-listen-broken", 2501.0))
    assert verdicts(rows_module, rows) == ["- NOT MET", "- NOT MET", "- MET", "- NOT MET", "- NOT MET"]


@pytest.mark.parametrize(
    "changes",
    [
        {"lost": 1},
        {"twice": [("s1", "1")]},
        {"retried": 1},
        {"check": False},
        {"kill_seconds": [5.0] * 3, "held": [2] * 3, "outcomes": {"FAILED Interrupted": 6}},
    ],
)
def test_a_kill_round_that_lost_ran_twice_or_was_too_few_is_not_met(rows_module, changes):
    assert verdicts(rows_module, [kill(**changes)])[1] == "- NOT MET"


def test_a_kill_with_nothing_interrupted_or_not_by_interrupted_is_not_met(rows_module):
    """A round where the node ran nothing proves nothing; attempts ended other than Interrupted are not the promise."""
    assert verdicts(rows_module, [kill(held=[0, 0, 0, 0], outcomes={})])[0] == "- NOT MET"
    assert verdicts(rows_module, [kill(outcomes={"FAILED Interrupted": 5, "COMPLETED": 1})])[0] == "- NOT MET"


def test_without_a_listen_connection_the_broken_row_says_so_and_claims_nothing(rows_module):
    run = sys.modules["run"]
    note = "no LISTEN to break: this build has no 'stepd-listen' connection (its wake-up is a poll)"
    row = run.row("pg-listen-broken", "queued -> running, LISTEN broken", "(PostgreSQL)", {}, note)
    text = rows_module.targets([row])
    assert text.splitlines()[0] == f"- not measured: queued -> running, LISTEN broken: {note}"
    assert "| queued -> running, LISTEN broken | (PostgreSQL) | – | – | – |" in run.table([row])


def test_without_postgresql_the_part_is_skipped_with_one_line(rows_module, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(rows_module.pgcluster, "postgres_missing", lambda: "no initdb here")
    sys.modules["run"].print_postgres(tmp_path, 1, "token")
    out = capsys.readouterr().out
    assert "PostgreSQL (issue 20): PostgreSQL rows skipped: no initdb here" in out
    assert "- not measured: every PostgreSQL target (PostgreSQL rows skipped: no initdb here)" in out
    assert "| row |" not in out


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_only_postgres_leaves_make_benchs_sqlite_scripts_out(tmp_path):
    for name in ("Makefile", "pyproject.toml", "requirements.txt", "requirements-dev.txt", "package.json"):
        shutil.copy(ROOT / name, tmp_path / name)
    every = make_dry_run(tmp_path, "bench").stdout
    assert "bench/queue_latency.py" in every and "bench/metrics_cost.py" in every
    only = make_dry_run(tmp_path, "bench", "BENCH_ARGS=--only postgres")
    assert only.returncode == 0, only.stderr
    assert only.stdout.splitlines()[-1] == ".venv/bin/python bench/run.py  --only postgres", only.stdout
    assert "queue_latency" not in only.stdout and "metrics_cost" not in only.stdout


# -- on a real PostgreSQL ----------------------------------------------------------------------------
def test_the_listen_connection_is_found_and_ended_by_its_name(rows_module, postgres_url):
    """break_listen ends the connections named 'stepd-listen' of the database, and only those."""
    with psycopg.connect(postgres_url, autocommit=True, application_name="stepd-listen") as listener:
        listener.execute("LISTEN stepd")
        with psycopg.connect(postgres_url, autocommit=True, application_name="someone-else") as other:
            assert rows_module.listen_connections(postgres_url) == [listener.info.backend_pid]
            assert rows_module.break_listen(postgres_url) == 1
            assert rows_module.listen_connections(postgres_url) == []
            assert other.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError):
            listener.execute("SELECT 1")
    assert rows_module.break_listen(postgres_url) == 0


def test_make_benchs_reads_beside_the_service_run_on_postgresql(rows_module, postgres_url):
    """run.query takes SQLite's ? placeholders to PostgreSQL's; active_steps counts what is left to run."""
    from stepd.postgres import PostgresDatabase

    run = sys.modules["run"]
    PostgresDatabase(postgres_url).prepare()
    assert run.query(postgres_url, "SELECT ? + ?, ?", (1, 2, "a")) == [(3, "a")]
    assert run.active_steps(postgres_url) == 0
