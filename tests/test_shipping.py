"""The shipping files (SPEC 11 "Shipping"): LICENSE, the Dockerfile and the systemd unit have
the properties the contract lists. No Docker engine or systemd runs here: the files are read."""

import json
import re
import shlex
from pathlib import PurePosixPath

from helpers import ROOT

from stepd import service


def dockerfile():
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def dockerfile_env(instructions):
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def unit():
    """The unit's settings as {key: [values]} (a key may repeat), sections ignored."""
    settings = {}
    for line in (ROOT / "deploy" / "stepd.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_license_is_mit_of_the_stepd_authors():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the stepd authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_the_dockerfile_is_slim_python_non_root_with_a_volume_a_healthcheck_and_exec_form():
    instructions = dockerfile()
    keywords = [keyword for keyword, _ in instructions]
    base = dict(instructions)["FROM"]
    version = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", base)
    assert version and int(version.group(1)) >= 11, base

    env = dockerfile_env(instructions)
    assert env["STEPD_HOST"] == "0.0.0.0"  # inside the container; -p decides what is reachable
    [volume] = [json.loads(args) for keyword, args in instructions if keyword == "VOLUME"]
    assert PurePosixPath(env["STEPD_DB"]).parent.as_posix() in volume

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")

    runs = " ".join(args for keyword, args in instructions if keyword in ("COPY", "RUN"))
    assert "requirements.txt" in runs and "pip install --no-cache-dir -r requirements.txt" in runs
    assert "pip install --no-cache-dir --no-deps ." in runs  # stepd itself, as a package

    [health] = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    command = json.loads(health.split("CMD", 1)[1])  # exec form
    assert command[0] == "python" and "/healthz" in command[-1] and "curl" not in health

    [entrypoint] = [json.loads(args) for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ["stepd", "serve"]  # exec form: `stepd serve` gets docker's SIGTERM


def test_the_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var", "tests"} <= ignored
    # the token recipe's files (stepd.err holds the first secret) and the linter's packages
    assert {"stepd.err", "stepd.out", "node_modules"} <= ignored


def test_the_systemd_unit_runs_the_service_as_its_own_user_hardened_and_stops_it_with_one_sigterm():
    settings = unit()
    one = {key: values[-1] for key, values in settings.items()}
    assert one["User"] == one["Group"] == "stepd"
    assert one["Restart"] == "on-failure"
    assert one["EnvironmentFile"].lstrip("-") == "/etc/stepd/stepd.env"
    assert one["ExecStart"].split()[-1] == "serve" and one["ExecStart"].split()[0].endswith("/bin/stepd")
    assert one["ExecReload"].split()[-2:] == ["-HUP", "$MAINPID"]  # a reload, not a restart
    assert one["NoNewPrivileges"] == "yes" and one["ProtectSystem"] == "strict" and one["ProtectHome"] == "yes"

    db = dict(value.split("=", 1) for value in settings["Environment"])["STEPD_DB"]
    assert str(PurePosixPath(db).parent) in one["ReadWritePaths"].split()
    assert one["StateDirectory"] == "stepd" and db.startswith("/var/lib/stepd/")

    # `stepd serve` passes its SIGTERM on to gunicorn and the runners and waits STOP_SECONDS for
    # them: systemd signals the main process only, and waits longer than that.
    assert one["KillMode"] == "mixed" and one["KillSignal"] == "SIGTERM"
    assert float(one["TimeoutStopSec"]) > service.STOP_SECONDS
