"""The OpenAPI document passes Redocly's recommended rules, with no error and no warning (issue 13),
on top of openapi-spec-validator's check (tests/test_api_openapi.py).

Redocly CLI comes from npm, pinned in package.json and package-lock.json; `make test` installs it
with `npm ci` when npm is on the machine. Without npm the test is skipped and says why, except
under CI (the CI variable set), where a lint that did not run must not pass unseen: there it fails.
"""

import json
import os
import shutil
import subprocess

import pytest
from helpers import ROOT

REDOCLY = ROOT / "node_modules" / ".bin" / "redocly"
QUIET = {"REDOCLY_TELEMETRY": "off", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true"}


def redocly():
    """The linter's command, or skip (fail under CI) saying why it is not there."""
    if REDOCLY.exists():
        return REDOCLY
    if shutil.which("npm") is None:
        reason = "npm is absent, so Redocly's linter (package.json) cannot be installed"
    else:
        reason = "Redocly's linter is not installed: run `npm ci` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, and there the lint must run")
    pytest.skip(reason)


def test_the_document_passes_redoclys_recommended_rules(spec, tmp_path):
    document = tmp_path / "openapi.json"
    document.write_text(json.dumps(spec))
    linted = subprocess.run(
        [str(redocly()), "lint", "--extends=recommended", "--format=json", str(document)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **QUIET},
    )
    report = json.loads(linted.stdout)
    problems = [
        f"{p['severity']} {p['ruleId']}: {p['message']} at {p['location'][0]['pointer']}" for p in report["problems"]
    ]
    assert report["totals"] == {"errors": 0, "warnings": 0, "ignored": 0}, "\n".join(problems)
    assert linted.returncode == 0, linted.stderr
