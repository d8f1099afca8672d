"""The `stepd` command (SPEC 11): every subcommand's --help, `version`, `migrate`, `check`,
`backup`, and refusals in one line with exit code 2. The token and purge commands have their
own tests (test_api_auth.py, test_api_retention.py)."""

import os
import sqlite3
import subprocess
import sys
import threading

import pytest
from helpers import STEPD, P, run_cli

from stepd import db as db_module
from stepd.invariants import check
from stepd.model import VERSION

SUBCOMMANDS = [
    ["serve"],
    ["runner"],
    ["migrate"],
    ["check"],
    ["backup"],
    ["purge"],
    ["token"],
    ["token", "create"],
    ["token", "list"],
    ["token", "revoke"],
    ["version"],
]


def stepd(*args, cwd=None, **env):
    """The installed command, as an operator runs it, with only these STEPD_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEPD_")}
    return subprocess.run(
        [str(STEPD), *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(args):
    done = run_cli("unused.db", *args, "--help")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("Usage: stepd " + " ".join(args)), done.stdout


def test_the_command_lists_its_subcommands():
    done = run_cli("unused.db", "--help")
    for name in ("serve", "runner", "migrate", "check", "backup", "purge", "token", "version"):
        assert f"  {name} " in done.stdout, done.stdout


def test_version_as_a_command_and_as_a_module():
    assert stepd("version").stdout == f"{VERSION}\n"
    as_module = subprocess.run([sys.executable, "-m", "stepd", "version"], capture_output=True, text=True, timeout=60)
    assert as_module.returncode == 0 and as_module.stdout == f"{VERSION}\n", as_module.stderr


def test_migrate_makes_the_file_and_says_its_schema_version(tmp_path):
    db = tmp_path / "new" / "stepd.db"
    done = stepd("migrate", STEPD_DB=str(db))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{db}: schema version {db_module.SCHEMA_VERSION}\n"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db_module.SCHEMA_VERSION
    assert stepd("migrate", STEPD_DB=str(db)).returncode == 0  # again: nothing to do


def test_migrate_refuses_a_newer_schema_naming_both_versions(tmp_path):
    db = tmp_path / "future.db"
    db_module.Database(db).prepare()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {db_module.SCHEMA_VERSION + 1}")
    done = stepd("migrate", STEPD_DB=str(db))
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert f"schema version {db_module.SCHEMA_VERSION + 1}" in line and f"up to {db_module.SCHEMA_VERSION}" in line


def test_check_passes_a_healthy_file(api, app, scenario):
    done = run_cli(app.config["STEPD_DB"], "check")
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines()[-1] == "ok" and "3 processes" in done.stdout


# (a file whose invariants a test broke by hand exits 1: test_invariants.py)


@pytest.mark.parametrize("command", [["check"], ["backup", "copy.db"], ["purge", "--older-than", "1"]], ids=" ".join)
def test_a_command_on_a_missing_database_refuses_in_one_line_and_makes_none(tmp_path, command):
    done = stepd(*command, cwd=tmp_path, STEPD_DB="nothing-here.db")
    assert done.returncode == 2
    assert str(tmp_path / "nothing-here.db") in one_line(done.stderr) and done.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["token", "create", "bot", "--role", "admin"], "'admin' is not one of"),
        (["token", "create", "bot"], "--role"),
        (["purge", "--older-than", "soon"], "--older-than"),
        (["purge", "--older-than", "-3"], "--older-than"),
        (["backup"], "FILE"),
        (["no-such-command"], "no-such-command"),
    ],
    ids=["wrong-role", "no-role", "days-not-a-number", "negative-days", "no-file", "unknown-command"],
)
def test_usage_errors_are_one_line_with_exit_2(tmp_path, args, words):
    db = tmp_path / "s.db"
    db_module.Database(db).prepare()
    done = stepd(*args, STEPD_DB=str(db))
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert line.startswith("stepd") and words in line, line


def test_a_bad_setting_is_one_line_with_exit_2(tmp_path):
    done = stepd("token", "list", STEPD_DB=str(tmp_path / "s.db"), STEPD_SYNC="off")
    assert done.returncode == 2 and "STEPD_SYNC" in one_line(done.stderr)


def test_backup_copies_a_consistent_file_beside_writers(app, api, tmp_path):
    """Processes keep being started while the copy is taken: the copy is whole (integrity and
    stepd's invariants) and holds every process acknowledged before the backup began."""
    before = {api.start(("noop", {}))["processId"] for _ in range(20)}
    stop = threading.Event()

    def keep_writing():
        while not stop.is_set():
            api.start(("noop", {}), ("noop", {}))

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        copies = [tmp_path / f"copy{n}.db" for n in range(3)]
        for copy in copies:
            done = run_cli(app.config["STEPD_DB"], "backup", str(copy))
            assert done.exit_code == 0, done.output
            assert done.stdout.startswith("Copied ") and str(copy) in done.stdout
    finally:
        stop.set()
        writer.join(timeout=10)
    for copy in copies:
        report = check(copy)
        assert report.problems == [], report.problems
        with sqlite3.connect(copy) as conn:
            ids = {pid for (pid,) in conn.execute("SELECT id FROM processes")}
            assert conn.execute("PRAGMA user_version").fetchone()[0] == db_module.SCHEMA_VERSION
        assert before <= ids
    assert not list(tmp_path.glob("*.part"))
    assert {copy.stat().st_mode & 0o777 for copy in copies} == {0o600}  # private, as the database is
    assert api.get(P).status_code == 200  # the service went on


def test_backup_refuses_a_folder_that_does_not_exist(app, tmp_path):
    done = stepd("backup", str(tmp_path / "no" / "such" / "copy.db"), STEPD_DB=app.config["STEPD_DB"])
    assert done.returncode == 2 and "no folder" in one_line(done.stderr)
    assert not (tmp_path / "no").exists()
