"""The live service against its own OpenAPI document: schemathesis generates requests for every
operation (valid and invalid ones, with and without credentials) and checks each answer.

Its checks: no 5xx, every status code documented for its operation, every body and
content type as documented, 401 without credentials, 405 for undocumented methods, invalid
data refused (with 412) and valid data accepted; ours (tests/schemathesis_hooks.py): the
security headers, the envelope, a 500 with only an error id, a 503 with Retry-After.

The document is exactly as strict as the validation (issue 19), so beyond no failure the run must
report no schema error (an operation schemathesis cannot generate data for) and no warning at all,
in particular none that an operation "mostly rejected generated data". Each run has a seed of its
own, printed (and in every failure's message): STEPD_SCHEMATHESIS_SEED=<seed> runs it again (a
seed on which schemathesis's generator reaches its own limit is set aside: GENERATOR_LIMIT).
"""

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import OPENAPI, ROOT, P, report_figure, typed, wait_for

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
MAX_EXAMPLES = 100  # per operation and phase: about a minute on two cores
# A new seed every run; STEPD_SCHEMATHESIS_SEED replays one. Read on import: conftest.py clears STEPD_*.
SEED = os.environ.get("STEPD_SCHEMATHESIS_SEED") or str(secrets.randbits(128))


def seed_ids(server):
    """A completed, a failed and a deferred process, so generated GETs can name real ids (the hooks find
    or make a process or step in the status each action needs)."""
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


# schemathesis's own limit, not stepd's: in its fuzzing phase it sometimes negates a part of a body
# schema into a `not` it cannot draw from (seed 239134867828205039852690367400409218638 on POST
# /processes), and reports a Schema Error for that operation alone. A run that fails with that error
# and nothing else is run again with a new seed, at most twice (each seed named in the report).
GENERATOR_LIMIT = "does not support a `not` whose complement is not spelled out"


def run_schemathesis(server, tmp_path, seed):
    """One schemathesis run with `seed`: (its output, its JSON report, the refused requests' log)."""
    report, refused = tmp_path / f"report-{seed}.json", tmp_path / f"refused-{seed}.jsonl"
    env = {
        **os.environ,
        "STEPD_TEST_IDS": json.dumps(seed_ids(server)),
        "STEPD_TEST_URL": server.url,
        "STEPD_TEST_TOKEN": server.token,
        "STEPD_SCHEMATHESIS_REFUSED": str(refused),
    }
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
        seed,
        "--report-json-path",
        str(report),
        "--workers",
        "1",  # two workers trip a CPython 3.11 bug in ast.parse (hypothesis describing lambdas)
        "--request-timeout",
        "10",
    ]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    output = run.stdout + run.stderr
    results = json.loads(report.read_text()) if report.exists() else None
    refusals = refused.read_text()[-20000:] if refused.exists() else ""
    return run.returncode, output, results, refusals


def only_the_generator_limit(output, results):
    return (
        results is not None
        and results["failures"] == []
        and results["errors"] == [{"title": "Schema Error", "count": 1}]
        and GENERATOR_LIMIT in output
    )


@pytest.mark.timeout(900)
def test_every_operation_answers_as_its_openapi_document_says(server_factory, tmp_path):
    server = server_factory().start()
    seeds = [SEED]
    while True:
        seed = seeds[-1]
        replay = f"schemathesis seed {seed} (STEPD_SCHEMATHESIS_SEED={seed} runs it again)"
        print(replay, file=sys.stderr, flush=True)
        returncode, output, results, refusals = run_schemathesis(server, tmp_path, seed)
        if len(seeds) < 3 and only_the_generator_limit(output, results):
            seeds.append(str(secrets.randbits(128)))
            continue
        break
    assert returncode == 0, f"{replay}\n{output[-30000:]}"
    assert results["seed"] == int(seed)
    assert results["errors"] == [], f"{replay}: schema errors\n{output[-30000:]}"
    assert results["failures"] == [], f"{replay}: failures\n{output[-30000:]}"
    warnings = {name: operations for name, operations in results["warnings"].items() if operations}
    assert warnings == {}, f"{replay}: warnings {warnings}\nvalid requests refused:\n{refusals}\n{output[-5000:]}"

    operations = operation_count(server)
    assert results["operations"]["tested"] == operations, f"{replay}\n{output[-3000:]}"
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert cases and int(cases[1]) > 20 * operations and cases[1] == cases[2], f"{replay}\n{output[-3000:]}"
    log = server.output()
    assert not re.findall(r"unexpected error [0-9a-f]+", log), f"{replay}: a 500 was logged"
    assert not re.findall(r'HTTP/1\.1" 5\d\d ', log), f"{replay}: the access log shows a 5xx"
    assert re.findall(r'HTTP/1\.1" 412 ', log), "the access log is read"
    accepted = sum(rate["accepted"] for phases in results["valid_rates"].values() for rate in phases.values())
    report_figure(
        "schemathesis",
        f"seed {seed} ({len(seeds) - 1} set aside for schemathesis's `not`): {operations} operations,"
        f" {cases[1]} cases generated, {cases[2]} passed, 0 failed,"
        f" 0 schema errors, 0 warnings; {accepted} valid requests served",
    )
