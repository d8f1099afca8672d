"""A Python client generated from the live OpenAPI document (openapi-python-client) runs the whole
flow against real gunicorn, and `mypy --strict` accepts the script that drives it (issue 13).

The script is tests/client_flow.py; the generated package (`stepd_client`) lives in the test's
temporary folder only.
"""

import json
import os
import subprocess
import sys
import textwrap

import requests
from helpers import OPENAPI

BIN = os.path.dirname(sys.executable)
FLOW = os.path.join(os.path.dirname(__file__), "client_flow.py")
# A typed value is one of three forms: a LONG that also carries a strValue is not one of them.
AMBIGUOUS_VALUE = """
from stepd_client.models import LongValue, LongValueType

value = LongValue(long_value=5, type_=LongValueType.LONG, str_value="5")
"""


def run(*args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


def generate_client(document, folder):
    """Generate the package `stepd_client` from `document` into `folder`; returns the folder to import from."""
    (folder / "openapi.json").write_text(json.dumps(document))
    (folder / "config.json").write_text(json.dumps({"post_hooks": []}))  # no formatting of the generated code
    generated = run(
        os.path.join(BIN, "openapi-python-client"),
        "generate",
        "--path", str(folder / "openapi.json"),
        "--config", str(folder / "config.json"),
        "--output-path", str(folder / "client"),
    )  # fmt: skip
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert "Warning" not in generated.stdout, generated.stdout  # nothing of the document was skipped
    return folder / "client"


def mypy(path, package, cache):
    return run(
        os.path.join(BIN, "mypy"), "--strict", "--cache-dir", str(cache), str(path),
        env={**os.environ, "MYPYPATH": str(package)},
    )  # fmt: skip


def test_a_generated_client_runs_the_whole_flow_and_type_checks(served, tmp_path):
    server = served
    package = generate_client(requests.get(server.url + OPENAPI, timeout=10).json(), tmp_path)

    checked = mypy(FLOW, package, tmp_path / "mypy")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    ambiguous = tmp_path / "ambiguous.py"
    ambiguous.write_text(textwrap.dedent(AMBIGUOUS_VALUE))
    refused = mypy(ambiguous, package, tmp_path / "mypy")
    assert refused.returncode == 1 and '"str_value"' in refused.stdout and "[arg-type]" in refused.stdout, (
        refused.stdout
    )

    flow = run(sys.executable, FLOW, server.url, server.token, env={**os.environ, "PYTHONPATH": str(package)})
    assert flow.returncode == 0, flow.stdout + flow.stderr
    assert flow.stdout.strip() == "client flow: every operation answered as documented"
