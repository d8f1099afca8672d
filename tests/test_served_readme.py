"""The README's curl walkthrough runs, as written, against a real server."""

import re
import shutil
import subprocess

import pytest
from helpers import ROOT

README = (ROOT / "README.md").read_text()


def walkthrough():
    block = README.split("<!-- walkthrough:start -->")[1].split("<!-- walkthrough:end -->")[0]
    return re.search(r"```bash\n(.*?)```", block, re.S).group(1)


def test_readme_names_the_two_commands_near_the_top():
    top = README[:1500]
    assert "make run" in top and "make test" in top


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the walkthrough needs curl and jq")
def test_walkthrough_runs_against_a_real_server(server_factory):
    server = server_factory().start()
    script = walkthrough().replace("http://127.0.0.1:8080", server.url)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={"PATH": "/usr/bin:/bin", "TOKEN": server.token},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].endswith("COMPLETED")
    assert '[1,"sleep","FAILED",{"type":"TypeError","message":"param \'seconds\' must be a number, got str"}]' in lines
    assert '[1,"start","env","FAILED"]' in lines and '[2,"restart","env","COMPLETED"]' in lines
    restart_answer = next(line for line in lines if line.startswith('{"processId"'))
    assert '"params":{"seconds":{"strValue":null,"longValue":null,"doubleValue":0.1,"type":"DOUBLE"}}' in restart_answer
