"""bench/lean_loop.py (the steps' path through one plain loop, an upper bound for the node): a small run
drains every step through a real `stepd runner`, says what it measured, and leaves no file behind."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import ROOT

LINE = re.compile(
    r"^the loop, (\d+) places(, gevent)?(, file lock and metrics)?: ([\d,]+) steps/s; (\d+) us of CPU a step "
    r"\((\d+)% busy\); ([\d.]+) steps a group$"
)


def run_loop(*args, env=None):
    scratch = Path(tempfile.mkdtemp(prefix="lean-test-"))
    environment = {**os.environ, "TMPDIR": str(scratch), **(env or {})}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lean_loop.py"), "--processes", "20", *args],
        capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT,
    )  # fmt: skip
    left = list(scratch.iterdir())
    if not left:
        scratch.rmdir()
    return done, left


@pytest.mark.parametrize("places", ["1", "4"])
def test_it_drains_every_step_and_says_what_it_measured(places):
    done, left = run_loop("--places", places)
    assert done.returncode == 0, done.stderr
    found = LINE.match(done.stdout.strip().splitlines()[-1])
    assert found, done.stdout
    assert found[1] == places
    assert float(found[7]) <= int(places)  # a group holds no more steps than the runner has places
    assert int(found[4].replace(",", "")) > 0
    assert left == []  # its file and folder are gone


def test_under_gevent_with_the_lock_and_the_metrics(tmp_path):
    done, left = run_loop("--gevent", "--lock-and-metrics", env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    found = LINE.match(done.stdout.strip().splitlines()[-1])
    assert found and found[2] and found[3], done.stdout
    assert any(tmp_path.iterdir())  # the metrics' hooks wrote the service's multiprocess values
    assert left == []
