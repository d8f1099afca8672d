"""The Makefile's checks of the interpreter (issue 13): Python 3.11 or newer is named in one line
before anything is installed, and a .venv/ made by another Python is made again.

Each test runs `make -n` (print the commands, run none) on a copy of the Makefile in a folder of
its own, with stand-in interpreters: a script that runs this Python, or this Python made to say it
is 3.10 (a sitecustomize module that rewrites sys.version_info, as no other Python may be installed).
"""

import shutil
import sys

import pytest
from helpers import ROOT, make_dry_run

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

FILES = ("Makefile", "pyproject.toml", "requirements.txt", "requirements-dev.txt", "package.json", "package-lock.json")
PRETEND_3_10 = """
import sys
sys.version_info = (3, 10, 13, "final", 0)
sys.version = "3.10.13 (a stand-in for a Python 3.10)"
"""


@pytest.fixture
def checkout(tmp_path):
    """A folder with the Makefile and what its targets depend on."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    for name in FILES:
        shutil.copy(ROOT / name, folder / name)
    return folder


def interpreter(path, pretend_3_10=False):
    """An executable at `path` that runs this Python (saying it is 3.10, if asked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = ""
    if pretend_3_10:
        site = path.parent / "pretend"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(PRETEND_3_10)
        prefix = f"PYTHONPATH={site} "
    path.write_text(f'#!/bin/sh\n{prefix}exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def a_venv(folder, python):
    """A .venv/ whose interpreter is `python`, with its stamps newer than the requirements."""
    venv_python = interpreter(folder / ".venv" / "bin" / "python", pretend_3_10=python == "3.10")
    for stamp in (".created", ".run-deps", ".dev-deps"):
        (folder / ".venv" / stamp).touch()
    return venv_python


@pytest.mark.parametrize("target", ["run", "test"])
def test_an_older_python_is_refused_in_one_line_naming_3_11(checkout, tmp_path, target):
    old = interpreter(tmp_path / "bin" / "python3", pretend_3_10=True)
    done = make_dry_run(checkout, target, python=old)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "3.11 or newer" in lines[0] and "3.10.13" in lines[0], lines
    assert not (checkout / ".venv").exists()


def test_a_missing_python_is_refused_in_one_line(checkout):
    done = make_dry_run(checkout, "run", python="no-such-python3")
    assert done.returncode != 0
    assert "3.11 or newer" in done.stderr and "not found" in done.stderr, done.stderr


def test_a_venv_made_by_another_python_is_made_again(checkout):
    a_venv(checkout, "3.10")
    done = make_dry_run(checkout, "run")
    assert done.returncode == 0, done.stderr
    assert ".venv/ was made by another Python (3.10.13" in done.stdout, done.stdout
    assert "rm -rf .venv" in done.stdout and f"{sys.executable} -m venv .venv" in done.stdout
    assert "pip install" in done.stdout and ".venv/bin/stepd serve" in done.stdout


def test_a_venv_made_by_this_python_is_kept(checkout):
    a_venv(checkout, "this one")
    done = make_dry_run(checkout, "run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [".venv/bin/stepd serve"], done.stdout


def test_make_clean_needs_no_python(checkout, tmp_path):
    done = make_dry_run(checkout, "clean", python=interpreter(tmp_path / "bin" / "python3", pretend_3_10=True))
    assert done.returncode == 0 and "rm -rf .venv" in done.stdout, done.stdout + done.stderr
