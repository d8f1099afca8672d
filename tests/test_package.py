"""What the package promises of its processes: a runner loads neither Flask nor gunicorn, and a
process that used stepd leaves no unclosed socket behind at its exit."""

import subprocess
import sys

RUNNER_IMPORTS = "import stepd.cli, stepd.service, stepd.runner, stepd.wiring, stepd.delegates"


def test_a_runner_process_imports_no_http_framework():
    """`python -m stepd runner` imports these (cli → service.runner_main → runner, wiring); the
    logging adapters of Flask and gunicorn live in httplogs.py, which only the HTTP side imports."""
    frameworks = "('flask', 'gunicorn', 'marshmallow')"
    check = f"{RUNNER_IMPORTS}; import sys; print(sorted(m for m in {frameworks} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_resource_warning_at_a_process_exit():
    """The wake-up sender's socket is closed at exit, not collected open (a ResourceWarning after
    the summary of every `make test`)."""
    code = "import stepd.app, stepd.wake; stepd.wake._send('\\0stepd-nobody')"
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "ResourceWarning" not in done.stderr, done.stderr
