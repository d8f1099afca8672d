"""The README's shell recipes run, as written, against a real server: the two curl walkthroughs
(also where a step never gets where they wait for it), and the recipe that keeps the first
token's secret (in a file only its owner can read)."""

import os
import re
import shutil
import signal
import stat
import subprocess
import time

import pytest
import requests
from helpers import README, ROOT, P, free_port, http_workers_booted, wait_for
from helpers import readme_block as block
from helpers import walk_readme as walk

NEEDS_CURL_AND_JQ = pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("jq")), reason="the walkthrough needs curl and jq"
)


def run_script(server, script):
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace("http://127.0.0.1:8080", server.url)],
        env={"PATH": "/usr/bin:/bin", "TOKEN": server.token},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_readme_names_the_two_commands_near_the_top():
    top = README[:1500]
    assert "make run" in top and "make test" in top


@NEEDS_CURL_AND_JQ
def test_walkthrough_runs_against_a_real_server(served):
    server = served
    done = walk(server, server.token)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].endswith("COMPLETED")
    assert '[1,"sleep","FAILED",{"type":"TypeError","message":"param \'seconds\' must be a number, got str"}]' in lines
    assert '[1,"start","env","FAILED"]' in lines and '[2,"restart","env","COMPLETED"]' in lines
    restart_answer = next(line for line in lines if line.startswith('{"processId"'))
    assert '"params":{"seconds":{"strValue":null,"longValue":null,"doubleValue":0.1,"type":"DOUBLE"}}' in restart_answer


@NEEDS_CURL_AND_JQ
def test_walkthrough_with_a_bad_token_stops_at_once_and_shows_why(served):
    server = served
    for token in ("stepd_a-stale-or-wrong-secret", ""):
        began = time.monotonic()
        done = walk(server, token)
        assert done.returncode != 0
        assert time.monotonic() - began < 5
        if token:
            assert '"message":"Unauthorized request"' in done.stderr, done.stderr  # the answer's body
        else:
            assert "set TOKEN" in done.stderr
        assert "COMPLETED" not in done.stdout


@NEEDS_CURL_AND_JQ
def test_walkthrough_gives_up_on_a_wait_that_never_ends(server_factory):
    server = server_factory(runners=0).start()  # no runner: the step stays QUEUED, the process RUNNING
    began = time.monotonic()
    done = walk(server, server.token)
    assert done.returncode != 0
    assert time.monotonic() - began < 30
    assert "still RUNNING" in done.stderr and "not FAILED" in done.stderr, done.stderr


# -- keeping the first token's secret ---------------------------------------------------------
def keep_secret(folder, port):
    """Run the README's recipe in `folder` (make run of this checkout, on `port`, its database in
    folder/var/): (the secret it kept, the process group to stop)."""
    script = block("token").replace("make run", f"make -C {ROOT} run").replace("8080", str(port))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STEPD_") and k not in ("MAKEFLAGS", "MFLAGS")},
        "STEPD_PORT": str(port),
        "STEPD_DB": str(folder / "var" / "stepd.db"),
    }
    kept = folder / "kept"
    recipe = subprocess.Popen(
        ["bash", "-c", f'{script}\nprintf %s "$TOKEN" > {kept}\nwait'], cwd=folder, env=env, start_new_session=True
    )
    wait_for(lambda: kept.exists(), timeout=120, what="the recipe to keep a secret")
    return kept.read_text(), recipe


def stop_group(recipe):
    """SIGTERM to the recipe's process group (bash, make, tee, the service), then wait until every
    one of them is gone (a service still stopping would answer the next round's /healthz)."""
    os.killpg(recipe.pid, signal.SIGTERM)
    recipe.wait(timeout=30)

    def group_gone():
        try:
            os.killpg(recipe.pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(group_gone, timeout=30, what="the recipe's processes to end")


def test_the_token_recipe_keeps_this_starts_secret_after_a_fresh_start(tmp_path):
    """`tee -a` and `grep -m1` kept the first secret ever written: after `rm -rf var` and a new start,
    a stale one (401). And stepd.err, which holds the secret, is readable by its owner alone (0600),
    also where an earlier run of an older recipe left one that anyone could read."""
    held = tmp_path / "stepd.err"
    held.write_text("an older run's standard error\n")
    held.chmod(0o644)
    secrets = []
    for _ in range(2):
        port = free_port()
        secret, recipe = keep_secret(tmp_path, port)
        try:
            wait_for(lambda r=recipe: http_workers_booted(r.pid), timeout=20, what="the workers to boot")
            assert secret.startswith("stepd_"), secret
            answer = requests.get(f"http://127.0.0.1:{port}{P}", headers={"Authorization": f"Bearer {secret}"})
            assert answer.status_code == 200, answer.text
            assert stat.S_IMODE(held.stat().st_mode) == 0o600, oct(held.stat().st_mode)
            assert secret in held.read_text() and "an older run" not in held.read_text()
        finally:
            stop_group(recipe)
        secrets.append(secret)
        shutil.rmtree(tmp_path / "var")
        (tmp_path / "kept").unlink()
    assert secrets[0] != secrets[1]


def test_the_recipes_files_are_not_in_git_status():
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    files = ["stepd.err", "stepd.out"]
    ignored = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == files, ignored


def lifecycle_delegates(tmp_path):
    """The README's delegate module of the lifecycle walkthrough, in a folder of its own."""
    folder = tmp_path / "my_delegates"
    folder.mkdir()
    (folder / "invoices.py").write_text(block("lifecycle", "python"))
    return folder


def test_every_wait_of_the_walkthroughs_is_bounded():
    """A bare `until`/`while` loop would poll forever when a step never gets where it waits for."""
    for name in ("walkthrough", "lifecycle"):
        assert not re.search(r"^\s*(until|while)\b", block(name), re.M), name
    assert block("lifecycle").count("wait_until ") >= 4


@NEEDS_CURL_AND_JQ
def test_the_results_skip_and_cancel_walkthrough_gives_up_on_a_wait_that_never_ends(server_factory, tmp_path):
    server = server_factory(delegates=lifecycle_delegates(tmp_path), runners=0).start()  # no runner: never COMPLETED
    began = time.monotonic()
    done = run_script(server, block("lifecycle"))
    took = time.monotonic() - began
    assert done.returncode != 0
    assert took < 30, took  # each wait gives up after 10 s
    assert "still RUNNING after 10 s, not COMPLETED" in done.stderr, done.stderr
    assert done.stdout == ""  # it stopped at its first wait


@NEEDS_CURL_AND_JQ
def test_the_results_skip_and_cancel_walkthrough_runs_with_its_delegates(server_factory, tmp_path):
    server = server_factory(delegates=lifecycle_delegates(tmp_path)).start()
    done = run_script(server, block("lifecycle"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:4] == [
        '{"invoice":"INV-acme-1","amount":250,"sent":"INV-acme-1"}',
        '["SKIPPED","skip","made by hand in billing"]',
        "INV-7",
        '["CANCELLED","customer left",["COMPLETED","CANCELLED","CANCELLED"]]',
    ]
    step = server.process(lines[4])["steps"][1]  # the process the listing of CANCELLED ones found
    assert (step["type"], step["status"], step["attempts"]) == ("invoice.await_payment", "CANCELLED", 1)
    # Its delegate was running when the process was cancelled: the runner set its ctx.cancelled.
    wait_for(lambda: f"step {step['processStepId']} attempt 1 ended while its delegate ran" in server.output())
    assert "It prints `" + lines[0] + "`" in README.replace("\n", " ")
