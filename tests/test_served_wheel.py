"""The wheel works alone (SPEC 11): built from the checkout, installed into a fresh venv with only
its pinned dependencies, it installs nothing but `stepd/` (and its dist-info and the `stepd`
script), and `stepd serve`, started from a folder that is not the checkout, runs a user's
delegate that imports the user's own `config.py`, drives a process to COMPLETED over HTTP, shows
it on the operator page, and stops with one SIGTERM."""

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import requests
from helpers import ROOT, P, free_port, http_workers_booted, wait_for

from stepd.model import VERSION

TOKEN = "wheel-test-token"
USER_CONFIG = "class Config:\n    GREETING = 'hello from the user config'\n"
USER_DELEGATE = """\
from config import Config  # the user's own config.py, beside this file
from stepd import delegate


@delegate("greet")
def greet(ctx):
    \"\"\"Greet someone.\"\"\"
    return {"text": f"{Config.GREETING}, {ctx.params['who']}"}
"""


def run(*args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv folder, wheel path): the wheel built from the checkout, installed into a fresh venv."""
    where = tmp_path_factory.mktemp("wheel")
    source = where / "source"  # the tracked files only: the wheel needs nothing else, and the build
    for path in tracked_files():  # leaves its build/ folder there, not in the checkout
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, source / path)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(where / "dist"), str(source))
    [wheel] = (where / "dist").glob("stepd-*.whl")
    venv = where / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    run(str(venv / "bin" / "pip"), "install", "--quiet", str(wheel))
    return venv, wheel


def tracked_files():
    """The checkout's files as git has them (what a fresh clone holds); without git, the ones a
    build reads."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        return [line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]
    stepd_files = [str(p.relative_to(ROOT)) for p in (ROOT / "stepd").rglob("*.py")]
    return ["pyproject.toml", "README.md", "LICENSE", "requirements.txt", *stepd_files]


def test_the_wheel_holds_only_the_stepd_package(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"stepd", f"stepd-{VERSION}.dist-info"}, tops
    assert "stepd/delegates/builtin.py" in names and "stepd/app.py" in names
    # the operator page's templates and static files, which are not Python modules
    assert {"stepd/ui/templates/base.html", "stepd/ui/static/ui.js", "stepd/ui/static/ui.css"} <= set(names)


def test_installed_files_are_stepd_its_dist_info_and_its_script(installed):
    venv, _ = installed
    site = run(str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    record = (venv / site.stdout.strip().removeprefix(str(venv) + "/")).glob(f"stepd-{VERSION}.dist-info/RECORD")
    [record] = list(record)
    paths = [line.split(",")[0] for line in record.read_text().splitlines() if line]
    outside = [p for p in paths if not p.startswith(("stepd/", f"stepd-{VERSION}.dist-info/"))]
    assert [p.rsplit("/", 1)[-1] for p in outside] == ["stepd"], outside  # only the script, in bin/
    # and its pinned dependencies came with it: Flask at the version requirements.txt names
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    flask = run(str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('flask'))")
    assert flask.stdout.strip() == pins["Flask"]


def test_the_installed_command_serves_a_users_delegate_from_another_folder(installed, tmp_path):
    venv, _ = installed
    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor the venv
    (elsewhere / "mine").mkdir(parents=True)
    (elsewhere / "mine" / "config.py").write_text(USER_CONFIG)
    (elsewhere / "mine" / "greetings.py").write_text(USER_DELEGATE)
    assert run(str(venv / "bin" / "python"), "-m", "stepd", "version", cwd=elsewhere).stdout == f"{VERSION}\n"

    port = free_port()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "STEPD_DB": "data/stepd.db",  # relative: resolved once, against this folder
        "STEPD_DELEGATES_PATH": "mine",
        "STEPD_TOKEN": TOKEN,
        "STEPD_PORT": str(port),
    }
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        service = subprocess.Popen(
            [str(venv / "bin" / "stepd"), "serve"], cwd=elsewhere, env=env, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        wait_for(lambda: healthy(url, service, log_path), timeout=30, interval=0.1, what="stepd serve to be healthy")
        wait_for(lambda: http_workers_booted(service.pid), timeout=20, what="the workers to boot")
        body = {"steps": [{"type": "greet", "params": {"who": {"type": "STRING", "strValue": "Ada"}}}]}
        started = requests.post(url + P, json=body, headers=headers, timeout=5)
        assert started.status_code == 201, started.text
        process_id = started.json()["data"]["processId"]

        def completed():
            return requests.get(f"{url}{P}/{process_id}", headers=headers, timeout=5).json()["data"]

        wait_for(lambda: completed()["status"] == "COMPLETED", timeout=10, what="the process to complete")
        result = completed()["steps"][0]["result"]["text"]["strValue"]
        assert result == "hello from the user config, Ada"
        assert (elsewhere / "data" / "stepd.db").is_file()
        step_page = f"{url}/ui/steps/{completed()['steps'][0]['processStepId']}"
        page = requests.get(step_page, auth=("env", TOKEN), timeout=5)
        assert page.status_code == 200 and "hello from the user config, Ada" in page.text  # the operator page
        assert requests.get(f"{url}/ui/static/ui.css", timeout=5).status_code == 200
        assert not (ROOT / "data").exists()

        service.send_signal(signal.SIGTERM)  # one SIGTERM, to the command only
        assert service.wait(timeout=30) == 0, log_path.read_text()
        wait_for(lambda: not group_alive(service.pid), timeout=10, what="every process of the service to exit")
    finally:
        if group_alive(service.pid):
            os.killpg(service.pid, signal.SIGKILL)
    assert "Traceback" not in log_path.read_text()


def healthy(url, service, log_path):
    if service.poll() is not None:
        raise AssertionError(f"stepd serve exited with {service.returncode}:\n{log_path.read_text()}")
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    time.sleep(0.05)
    return True
