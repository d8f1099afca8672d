"""What the package promises of its processes: a runner loads neither Flask nor gunicorn, a node on
an SQLite file loads no PostgreSQL driver, and a process that used stepd leaves no unclosed socket
behind at its exit."""

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


def test_a_node_on_an_sqlite_file_imports_no_postgresql_driver(tmp_path):
    """psycopg (postgres.py) is loaded for a postgresql:// STEPD_DB only: an app built on a file,
    and every module a start imports, leave it out."""
    code = (
        f"{RUNNER_IMPORTS}, stepd.app, stepd.front, stepd.invariants\n"
        "from stepd.app import create_app\n"
        f"create_app({{'STEPD_DB': {str(tmp_path / 'n.db')!r}}})\n"
        "import sys; print(sorted(m for m in sys.modules if m.startswith(('psycopg', 'stepd.postgres'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_no_resource_warning_at_a_process_exit(tmp_path):
    """A node with a runner that ran a process and stopped leaves no socket, file or database
    connection to be collected open (a ResourceWarning after the summary of every `make test`)."""
    code = (
        "import sys, time\n"
        "from stepd.app import create_app, start_background, stop_background\n"
        f"app = create_app({{'STEPD_DB': {str(tmp_path / 'r.db')!r}}})\n"
        "start_background(app)\n"
        "store = app.extensions['stepd'].store\n"
        "process, _ = store.create_process(None, [('noop', {})], 'x', None)\n"
        "while store.get_process(process['id'])['status'] != 'COMPLETED':\n"
        "    time.sleep(0.01)\n"
        "stop_background(app, grace=1)\n"
        "store.db.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "ResourceWarning" not in done.stderr, done.stderr
