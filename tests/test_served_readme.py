"""The README's curl walkthroughs run, as written, against a real server."""

import re
import shutil
import subprocess

import pytest
from helpers import ROOT, wait_for

README = (ROOT / "README.md").read_text()


def block(marker, language="bash"):
    """The `language` code block between <!-- marker:start --> and <!-- marker:end -->."""
    section = README.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def walkthrough():
    return block("walkthrough")


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


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the walkthrough needs curl and jq")
def test_walkthrough_runs_against_a_real_server(server_factory):
    server = server_factory().start()
    done = run_script(server, walkthrough())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].endswith("COMPLETED")
    assert '[1,"sleep","FAILED",{"type":"TypeError","message":"param \'seconds\' must be a number, got str"}]' in lines
    assert '[1,"start","env","FAILED"]' in lines and '[2,"restart","env","COMPLETED"]' in lines
    restart_answer = next(line for line in lines if line.startswith('{"processId"'))
    assert '"params":{"seconds":{"strValue":null,"longValue":null,"doubleValue":0.1,"type":"DOUBLE"}}' in restart_answer


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the walkthrough needs curl and jq")
def test_the_results_skip_and_cancel_walkthrough_runs_with_its_delegates(server_factory, tmp_path):
    folder = tmp_path / "my_delegates"
    folder.mkdir()
    (folder / "invoices.py").write_text(block("lifecycle", "python"))
    server = server_factory(delegates=folder).start()
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
