"""The live service against its own OpenAPI document: schemathesis generates requests for every
operation (valid and invalid ones, with and without credentials) and checks each answer.

Its checks: no 5xx, every status code documented for its operation, every body and
content type as documented, 401 without credentials, 405 for undocumented methods, invalid
data refused (with 412) and valid data accepted; ours (tests/schemathesis_hooks.py): the
security headers, the envelope, a 500 with only an error id, a 503 with Retry-After.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import OPENAPI, ROOT, P, report_figure, typed, wait_for

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
MAX_EXAMPLES = 100  # per operation and phase: about a minute on two cores
SEED = os.environ.get("STEPD_SCHEMATHESIS_SEED", "20261127")  # fixed, so CI is repeatable; vary it by hand


def seed_ids(server):
    """A completed, a failed and a deferred process, so generated requests can use real ids."""
    started = [
        server.post(P, body).json()["data"]
        for body in (
            {"name": "done", "steps": [{"type": "results"}, {"type": "noop"}]},
            {"name": "failed", "steps": [{"type": "check", "params": typed(ok=0)}, {"type": "noop"}]},
            {"name": "waiting", "steps": [{"type": "external"}, {"type": "noop"}]},
        )
    ]
    wait_for(lambda: server.get(f"{P}?status=FAILED").json()["data"]["items"], what="a failed process")
    return {
        "processId": [p["processId"] for p in started],
        "processStepId": [s["processStepId"] for p in started for s in p["steps"]],
    }


def operation_count(server):
    """Operations in the document, but the document's own (schemathesis leaves its source URL out;
    tests/test_api_openapi.py covers it)."""
    spec = server.get(OPENAPI).json()
    return sum(
        1
        for path, item in spec["paths"].items()
        for method in item
        if method in {"get", "post", "put", "delete"} and path != OPENAPI
    )


@pytest.mark.timeout(300)
def test_every_operation_answers_as_its_openapi_document_says(server_factory, tmp_path):
    server = server_factory().start()
    env = {**os.environ, "STEPD_TEST_IDS": json.dumps(seed_ids(server))}
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        f"{server.url}{OPENAPI}",
        "--header",
        f"Authorization: Bearer {server.token}",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        SEED,
        "--workers",
        "1",  # two workers trip a CPython 3.11 bug in ast.parse (hypothesis describing lambdas)
        "--request-timeout",
        "10",
    ]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-30000:]

    operations = operation_count(server)
    assert f"Tested: {operations}" in output, output[-3000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert cases and int(cases[1]) > 20 * operations and cases[1] == cases[2], output[-3000:]
    log = server.output()
    assert not re.findall(r"unexpected error [0-9a-f]+", log), "a 500 was logged"
    assert not re.findall(r'HTTP/1\.1" 5\d\d ', log), "the access log shows a 5xx"
    assert re.findall(r'HTTP/1\.1" 412 ', log), "the access log is read"
    report_figure("schemathesis", f"{operations} operations, {cases[1]} cases generated, {cases[2]} passed, 0 failed")
