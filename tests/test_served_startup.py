"""stepd starting under real gunicorn (SPEC sections 5-8, with test_served_service.py): refusals at
start, the first token, the settings and the logs, `make run`."""

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from helpers import RESTART, ROOT, STEPD, STEPS, P, calls, db_rows, free_port, http_workers_booted, wait_for

from stepd import migrations

SECRET = re.compile(r"stepd_[A-Za-z0-9_-]{20,}")


# -- refusals at start -----------------------------------------------------------------------------
def test_start_is_refused_when_a_delegate_module_does_not_import(server_factory, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "fine.py").write_text("from stepd import delegate\n\n\n@delegate('fine')\ndef fine(ctx):\n    pass\n")
    (folder / "boom.py").write_text("raise RuntimeError('boom at import time')\n")
    (folder / "typo.py").write_text("def f(:\n")
    (folder / "json.py").write_text("SETTING = 1\n")  # the standard library's json would be imported instead
    began = time.monotonic()
    server = server_factory(db_path=tmp_path / "broken.db", delegates=folder).start(wait=False)
    code = server.proc.wait(timeout=20)
    output = server.output()
    assert code == 2, output  # refused: exit code 2, as any refusal of the command
    assert str(folder / "boom.py") in output
    assert "boom at import time" in output
    assert str(folder / "typo.py") in output  # every module that does not import, in one start
    assert str(folder / "json.py") in output and json.__file__ in output
    assert str(folder / "fine.py") not in output
    assert time.monotonic() - began < 10


def test_a_delegate_imports_a_helper_from_its_own_folder(server_factory, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "_carrier.py").write_text("def label(order):\n    return f'label-{order}'\n")
    (folder / "shipping.py").write_text(
        "from _carrier import label\nfrom stepd import delegate\n\n\n"
        "@delegate('ship')\ndef ship(ctx):\n    return {'label': label(ctx.params['order'])}\n"
    )
    server = server_factory(db_path=tmp_path / "mine.db", delegates=folder).start()
    process = server.start_process(("ship", {"order": "A7"}))
    done = server.wait_process(process["processId"], "COMPLETED")  # in a runner process
    assert done["steps"][0]["result"]["label"]["strValue"] == "label-A7"


def test_start_is_refused_when_two_delegates_claim_one_type(server_factory, tmp_path):
    folder = tmp_path / "twice"
    folder.mkdir()
    for name in ("first.py", "second.py"):
        (folder / name).write_text(
            f"from stepd import delegate\n\n\n@delegate('dup')\ndef {name[:-3]}(ctx):\n    pass\n"
        )
    began = time.monotonic()
    server = server_factory(db_path=tmp_path / "twice.db", delegates=folder).start(wait=False)
    code = server.proc.wait(timeout=20)
    output = server.output()
    assert code == 2, output  # refused: exit code 2, as any refusal of the command
    assert str(folder / "first.py") in output and str(folder / "second.py") in output, output
    assert time.monotonic() - began < 10

    # A user's module that claims a built-in type is refused the same way.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "mine.py").write_text("from stepd import delegate\n\n\n@delegate('noop')\ndef mine(ctx):\n    pass\n")
    server = server_factory(db_path=tmp_path / "shadow.db", delegates=shadow).start(wait=False)
    code = server.proc.wait(timeout=20)
    output = server.output()
    assert code == 2, output  # refused: exit code 2, as any refusal of the command
    assert str(shadow / "mine.py") in output and str(ROOT / "stepd" / "delegates" / "builtin.py") in output, output


@pytest.mark.parametrize(
    ("key", "value"),
    [("STEPD_WORKERS", "many"), ("STEPD_SYNC", "off"), ("STEPD_RETENTION_DAYS", "-1"), ("STEPD_RETENTION_DAYS", "1w")],
)
def test_start_is_refused_with_a_bad_setting(server_factory, tmp_path, key, value):
    server = server_factory(db_path=tmp_path / "bad.db", extra_env={key: value}).start(wait=False)
    assert server.proc.wait(timeout=20) == 2  # refused
    output = server.output()
    assert f"stepd: cannot start: {key} must be" in output
    assert len(output.strip().splitlines()) == 1, output  # one clear line
    assert "Traceback" not in output  # not gunicorn's traceback of its config file


def test_a_port_in_use_is_refused_at_once_naming_stepd_port(server_factory, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        server = server_factory(db_path=tmp_path / "busy.db", extra_env={"STEPD_PORT": str(port)}).start(wait=False)
        assert server.proc.wait(timeout=20) == 2  # refused
        output = server.output()
    assert f"stepd: cannot start: 127.0.0.1:{port} is in use" in output and "STEPD_PORT" in output, output
    assert "Can't connect" not in output and "Traceback" not in output
    assert time.monotonic() - began < 5  # not gunicorn's five retries a second apart


def test_an_unusable_database_path_names_stepd_db(server_factory, tmp_path):
    server = server_factory(db_path=tmp_path / "x.db", extra_env={"STEPD_DB": "/proc/nope/x.db"}).start(wait=False)
    assert server.proc.wait(timeout=20) == 2  # refused
    output = server.output()
    assert "stepd: cannot start: STEPD_DB=/proc/nope/x.db cannot be used:" in output, output
    assert "Traceback" not in output


def test_start_is_refused_when_the_database_is_not_sqlite(server_factory, tmp_path):
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("these are my notes, not a database\n" * 100)
    server = server_factory(db_path=not_a_db)
    server.start(wait=False)
    assert server.proc.wait(timeout=20) == 2  # refused
    assert "stepd: cannot start:" in server.output()
    assert not_a_db.read_text().startswith("these are my notes")


# -- the first token -------------------------------------------------------------------------------
def test_first_start_without_token_prints_exactly_one_working_secret(server_factory, tmp_path):
    db = tmp_path / "fresh.db"
    first = server_factory(db_path=db, token=None, workers=2)
    stdout = start_with_split_output(first)
    output = first.output()  # standard error only
    secrets = set(SECRET.findall(output))
    assert len(secrets) == 1, output
    assert output.count("created the operator token") == 1, output
    secret = secrets.pop()
    # The access log goes to standard output (written just after the response, so poll).
    wait_for(lambda: '"GET /healthz HTTP/1.1" 200' in stdout.read_text(), what="the access log on stdout")
    assert "created the operator token" not in stdout.read_text()
    assert secret not in stdout.read_text()

    bearer = {"Authorization": f"Bearer {secret}"}
    assert requests.get(first.url + P, headers=bearer, timeout=10).status_code == 200
    created = requests.post(first.url + P, json={"steps": [{"type": "noop"}]}, headers=bearer, timeout=10)
    assert created.status_code == 201, created.text
    step_id = created.json()["data"]["steps"][0]["processStepId"]
    detail = requests.get(f"{first.url}{STEPS}/{step_id}", auth=("admin", secret), timeout=10)
    assert detail.status_code == 200
    assert detail.json()["data"]["attemptHistory"][0]["principal"] == "admin"
    assert requests.get(first.url + P, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + secret + "x"}
    assert requests.get(first.url + P, headers=wrong, timeout=10).status_code == 401
    assert db_rows(db, "SELECT name, role FROM tokens") == [("admin", "operator")]
    assert first.stop() == 0
    # Stored hashed: the secret is nowhere in the database files.
    for path in tmp_path.glob("fresh.db*"):
        assert secret.encode() not in path.read_bytes(), path

    offset = len(first.output())
    second = server_factory(db_path=db, token=None).start()
    later = second.output()[offset:]
    assert "Booting worker" in later  # this is the second start's output
    assert not SECRET.findall(later), later
    assert "created the operator token" not in later
    assert requests.get(second.url + P, headers=bearer, timeout=10).status_code == 200
    assert db_rows(db, "SELECT name FROM tokens") == [("admin",)]


def test_revoking_every_token_and_starting_again_makes_no_new_token(server_factory, tmp_path):
    """Revoking every token is a normal response to an incident: the next start must not mint one."""
    db = tmp_path / "revoked.db"
    first = server_factory(db_path=db, token=None).start()
    assert len(SECRET.findall(first.output())) == 1
    assert first.stop() == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPD_", "FLASK_"))}
    revoked = subprocess.run(
        [str(STEPD), "token", "revoke", "admin"],
        cwd=ROOT,
        env={**env, "STEPD_DB": str(db)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoked.returncode == 0, revoked.stderr

    offset = len(first.output())
    second = server_factory(db_path=db, token=None).start()
    later = second.output()[offset:]
    assert "Booting worker" in later
    assert not SECRET.findall(later) and "created the operator token" not in later, later
    assert later.count("no API token exists") == 1, later  # said once, with what to do
    assert "token create" in later
    assert db_rows(db, "SELECT COUNT(*) FROM tokens") == [(0,)]
    assert requests.get(second.url + P, timeout=10).status_code == 401


def test_a_database_first_started_with_stepd_token_gets_no_token_later(server_factory, tmp_path):
    db = tmp_path / "env-first.db"
    first = server_factory(db_path=db, token="env-token-at-first").start()
    first.stop()
    offset = len(first.output())
    later = server_factory(db_path=db, token=None).start().output()[offset:]
    assert not SECRET.findall(later) and "no API token exists" in later, later


def test_no_token_is_generated_when_stepd_token_is_set(server_factory, tmp_path):
    db = tmp_path / "env.db"
    server = server_factory(db_path=db, token="env-token-for-this-test").start()
    output = server.output()
    assert not SECRET.findall(output), output
    assert "created the operator token" not in output
    assert db_rows(db, "SELECT COUNT(*) FROM tokens") == [(0,)]
    assert server.get(P).status_code == 200
    assert server.post(P, {"steps": [{"type": "noop"}]}).status_code == 201
    assert requests.get(server.url + P, auth=("env", "env-token-for-this-test"), timeout=10).ok


# -- settings --------------------------------------------------------------------------------------
def test_settings_workers_db_path_and_log_level(server_factory, tmp_path):
    nested = tmp_path / "deep" / "er" / "stepd.sqlite"
    assert not nested.parent.exists()
    server = server_factory(
        db_path=tmp_path / "quiet.db",
        workers=3,
        runners=2,
        extra_env={"STEPD_DB": str(nested), "STEPD_LOG_LEVEL": "WARNING"},
    ).start()

    # SPEC 9 (new): how many HTTP processes serve is the service's choice; STEPD_WORKERS is
    # accepted, and a start with it set says once, in one line, that it no longer applies.
    assert len(server.worker_pids()) == 1
    assert server.output().count("STEPD_WORKERS=3 no longer applies") == 1, server.output()
    pids = server.runner_pids()  # STEPD_RUNNERS runner processes, apart from the HTTP worker (the node)
    assert len(pids) == 2 and not set(pids) & set(server.worker_pids())
    wait_for(lambda: {p for (p,) in db_rows(nested, "SELECT pid FROM runners")} == set(pids), what="2 runners")
    assert nested.is_file()
    assert not (tmp_path / "quiet.db").exists()
    with sqlite3.connect(nested) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations.MIGRATIONS)
    conn.close()
    assert listening(server.port) == ["127.0.0.1"]

    # INFO lines of the app (a runner starting, a step failing) are not written at WARNING.
    process = server.start_process(("check", {"ok": 0}))
    server.wait_process(process["processId"], "FAILED")
    response = server.get(P, headers={"X-Request-Id": "quiet-request"})
    assert response.headers["X-Request-Id"] == "quiet-request"
    wait_for(lambda: "rid=quiet-request" in server.output(), what="the access log line")
    output = server.output()
    assert " INFO " not in output and "[INFO]" not in output, output
    assert "started with" not in output and "attempt 1 failed" not in output


def test_log_level_info_and_request_ids(served):
    server = served
    # The defaults of the other side: INFO lines are written.
    process = server.start_process(("check", {"ok": 0}))
    step_id = process["steps"][0]["processStepId"]
    server.wait_step(step_id, "FAILED")
    wait_for(lambda: f"step {step_id} attempt 1 failed" in server.output(), what="the INFO line of the failed step")
    assert "stepd.runner: runner" in server.output()

    cases = [
        ("GET", "/healthz", None, {}, 200),
        ("GET", P, None, server.headers(), 200),
        ("GET", P, None, {}, 401),
        ("GET", "/api/v1/nothing-here", None, server.headers(), 404),
        ("GET", RESTART, None, server.headers(), 405),
        ("POST", RESTART, {"processStepId": "nope"}, server.headers(), 412),
        ("POST", P, {"steps": [{"type": "noop"}]}, server.headers(), 201),
    ]
    seen = []
    for n, (method, path, body, headers, status) in enumerate(cases):
        own = f"test-rid-{n}-{method.lower()}"
        response = requests.request(
            method, server.url + path, json=body, headers={**headers, "X-Request-Id": own}, timeout=10
        )
        assert response.status_code == status, (path, response.text)
        assert response.headers["X-Request-Id"] == own
        fresh = requests.request(method, server.url + path, json=body, headers=headers, timeout=10)
        assert fresh.status_code == status
        assert re.fullmatch(r"[!-~]{8,128}", fresh.headers.get("X-Request-Id", "")), fresh.headers
        seen += [own, fresh.headers["X-Request-Id"]]
    assert len(set(seen)) == len(seen)

    longest = "L" * 128
    assert server.get(P, headers={"X-Request-Id": longest}).headers["X-Request-Id"] == longest
    seen.append(longest)
    too_long = "x" * 129
    response = server.get(P, headers={"X-Request-Id": too_long})
    assert response.headers["X-Request-Id"] not in ("", too_long)
    seen.append(response.headers["X-Request-Id"])

    def logged():
        text = server.output()
        return all(f"rid={rid}" in text for rid in seen)

    wait_for(logged, what="every request id in the access log")
    line = next(x for x in server.output().splitlines() if "rid=test-rid-1-get" in x)
    assert '"GET /api/v1/processes HTTP/1.1" 200' in line


def test_stepd_threads_bounds_the_delegates_running_at_once(server_factory, tmp_path, gated_delegates):
    server = server_factory(workers=1, threads=2, delegates=gated_delegates).start()
    call_log, gate = tmp_path / "calls.txt", tmp_path / "gate"
    processes = [
        server.start_process(("gated_count", {"file": str(call_log), "gate": str(gate), "fail": 0})) for _ in range(3)
    ]
    wait_for(lambda: len(calls(call_log)) == 2, what="two delegates to run")
    time.sleep(1)  # proving that a third one does NOT start while two threads are busy
    assert len(calls(call_log)) == 2
    assert {server.step(p["steps"][0]["processStepId"])["status"] for p in processes} == {"STARTED"}
    gate.touch()
    for process in processes:
        server.wait_process(process["processId"], "COMPLETED")
    assert len(calls(call_log)) == 3


# -- make run --------------------------------------------------------------------------------------
def test_make_run_serves(tmp_path):
    proc, url, log_path = start_make_run(tmp_path)
    try:

        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"make run exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                return requests.get(url + "/healthz", timeout=1).status_code == 200
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a slow first answer
                return False

        wait_for(healthy, timeout=30, interval=0.1, what="make run to answer /healthz")
        wait_for(lambda: http_workers_booted(proc.pid), timeout=20, what="the workers to boot")
        response = requests.get(url + P, headers={"Authorization": "Bearer make-run-token"}, timeout=5)
        assert response.status_code == 200, response.text
        assert response.json()["data"] == {"items": [], "nextCursor": None}
        assert requests.get(url + P, timeout=5).status_code == 401
        assert (tmp_path / "made.db").is_file()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            try:
                wait_for(lambda: not group_alive(proc.pid), timeout=30, what="make run's processes to exit")
            finally:
                if group_alive(proc.pid):
                    os.killpg(proc.pid, signal.SIGKILL)
    first_line = log_path.read_text().splitlines()[0]
    assert first_line.startswith("stepd: version "), first_line  # make itself says nothing (its recipe is silent)


def test_sigkill_of_make_run_stops_the_service_and_frees_the_port(tmp_path):
    proc, url, _log_path = start_make_run(tmp_path)
    headers = {"Authorization": "Bearer make-run-token"}
    try:
        wait_for(lambda: answers(url), timeout=30, interval=0.1, what="make run to answer /healthz")
        wait_for(lambda: http_workers_booted(proc.pid), timeout=20, what="the workers to boot")
        body = {"steps": [{"type": "sleep", "params": {"seconds": {"type": "DOUBLE", "doubleValue": 60.0}}}]}
        step_id = requests.post(url + P, json=body, headers=headers, timeout=5).json()["data"]["steps"][0][
            "processStepId"
        ]

        def phase():
            return requests.get(f"{url}{P}/steps/{step_id}", headers=headers, timeout=5).json()["data"]["phase"]

        wait_for(lambda: phase() == "RUNNING", what="a runner to call the delegate")  # QUEUED would stay so
        os.kill(proc.pid, signal.SIGKILL)  # only make itself, as a careless supervisor would
        proc.wait(timeout=10)
        wait_for(lambda: not answers(url), timeout=10, what="the service to stop with make")
        wait_for(lambda: not group_alive(proc.pid), timeout=10, what="gunicorn's processes to exit")
        with sqlite3.connect(tmp_path / "made.db") as db:
            row = db.execute("SELECT status, error_type FROM steps WHERE id = ?", (step_id,)).fetchone()
        assert row == ("FAILED", "Interrupted")
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def start_make_run(tmp_path):
    """`make run` in its own process group on a free port; returns (process, url, log path)."""
    port = free_port()
    env = {
        # as a user's shell runs it (not as a make under `make test`, which would say MAKELEVEL's lines)
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("STEPD_") and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")
        },
        "STEPD_PORT": str(port),
        "STEPD_DB": str(tmp_path / "made.db"),
        "STEPD_TOKEN": "make-run-token",
    }
    log_path = tmp_path / "make.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log_path


def answers(url):
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


# -- helpers ---------------------------------------------------------------------------------------
def start_with_split_output(server):
    """Start `server` like Server.start, but with standard output in its own file; returns that file."""
    stdout_path = server.log_path.with_suffix(".stdout")
    server.log = open(server.log_path, "ab")  # noqa: SIM115 - standard error, read by output(), closed by stop()
    with open(stdout_path, "ab") as stdout:
        server.proc = subprocess.Popen(
            [sys.executable, "-m", "stepd", "serve"],
            cwd=server.cwd,
            env=server.env,
            stdout=stdout,
            stderr=server.log,
            start_new_session=True,
        )
    wait_for(server._healthy, timeout=20, interval=0.1, what="the service to answer /healthz")
    wait_for(server._workers_booted, timeout=20, what="workers")
    return stdout_path


def listening(port):
    """The local addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                if len(address) == 8:
                    addresses.append(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    addresses.append(address)
    return addresses


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for killpg; only live members matter.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                return True
    return False
