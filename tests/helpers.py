"""Shared test helpers: polling, an API client wrapper, and a real gunicorn server."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
GUNICORN = Path(sys.executable).parent / "gunicorn"


# Figures the reliability tests measure; conftest.py prints them at the end of the run.
FIGURES = {}


def report_figure(name, text):
    FIGURES[name] = text


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll until predicate() is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def typed(**values):
    """Wire-form params from Python values: str -> STRING, int -> LONG, float -> DOUBLE."""
    out = {}
    for name, value in values.items():
        if isinstance(value, str):
            out[name] = {"type": "STRING", "strValue": value}
        elif isinstance(value, int):
            out[name] = {"type": "LONG", "longValue": value}
        else:
            out[name] = {"type": "DOUBLE", "doubleValue": value}
    return out


class Api:
    """The Flask test client with credentials, and the calls most tests make."""

    def __init__(self, client, headers):
        self.client = client
        self.headers = headers

    def get(self, path, **kwargs):
        return self.client.get(path, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def post(self, path, body=None, **kwargs):
        return self.client.post(path, json=body, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def start(self, *steps, name=None):
        """Start a process of (type, params-dict) steps; returns its data."""
        body = {"steps": [{"type": t, "params": typed(**p)} for t, p in steps]}
        if name is not None:
            body["name"] = name
        response = self.post("/api/v1/processes", body)
        assert response.status_code == 201, response.json
        return response.json["data"]

    def process(self, process_id):
        return self.get(f"/api/v1/processes/{process_id}").json["data"]

    def step(self, step_id):
        return self.get(f"/api/v1/processes/steps/{step_id}").json["data"]

    def wait_process(self, process_id, status, timeout=10.0):
        return wait_for(
            lambda: (p := self.process(process_id))["status"] == status and p, timeout, what=f"process {status}"
        )

    def wait_step(self, step_id, status, timeout=10.0):
        return wait_for(lambda: (s := self.step(step_id))["status"] == status and s, timeout, what=f"step {status}")

    def restart(self, step_id, **params):
        body = {"processStepId": step_id}
        if params:
            body["params"] = typed(**params)
        return self.post("/api/v1/processes/restart-failed-step", body)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """stepd under real gunicorn on loopback, as `make run` serves it."""

    def __init__(self, db_path, token="test-operator-token", workers=2, threads=4, delegates=PLUGINS, extra_env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STEPD_")},
            "STEPD_DB": str(db_path),
            "STEPD_PORT": str(self.port),
            "STEPD_HOST": "127.0.0.1",
            "STEPD_WORKERS": str(workers),
            "STEPD_THREADS": str(threads),
            "STEPD_TOKEN": token or "",
            "STEPD_DELEGATES_PATH": str(delegates) if delegates else "",
            "STEPD_LOG_LEVEL": "INFO",
            **(extra_env or {}),
        }
        self.proc = None
        self.log_path = Path(db_path).with_suffix(".log")

    def start(self, wait=True):
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop(), it outlives this call
        self.proc = subprocess.Popen(
            [str(GUNICORN), "-c", "gunicorn.conf.py"], cwd=ROOT, env=self.env, stdout=self.log, stderr=self.log
        )
        if wait:
            wait_for(self._healthy, timeout=20, interval=0.1, what="gunicorn to answer /healthz")
            wait_for(lambda: len(self.worker_pids()) == int(self.env["STEPD_WORKERS"]), timeout=20, what="workers")
        return self

    def _healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def worker_pids(self):
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except FileNotFoundError:
            return []
        return [int(pid) for pid in children]

    def output(self):
        return self.log_path.read_text(errors="replace")

    def kill(self):
        """SIGKILL the master and every worker at once, as a crash or power cut would."""
        pids = [self.proc.pid, *self.worker_pids()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for pid in pids:  # workers are not our children; wait until they are gone
            wait_for(lambda p=pid: not Path(f"/proc/{p}").exists() or _is_zombie(p), timeout=10, what="worker exit")

    def stop(self, timeout=30):
        """SIGTERM, as a service manager stops it; returns gunicorn's exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "log", None):
            self.log.close()
        return self.proc.returncode

    def headers(self, token=None):
        return {"Authorization": f"Bearer {token or self.token}"}

    def get(self, path, **kwargs):
        return requests.get(self.url + path, headers=self.headers(), timeout=10, **kwargs)

    def post(self, path, body, **kwargs):
        return requests.post(self.url + path, json=body, headers=self.headers(), timeout=10, **kwargs)


def _is_zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def all_at_once(count, call, timeout=60):
    """Run call(0) … call(count - 1) on as many threads, released together by a barrier, so they
    really race; returns their results in order (fails if one did not finish in time)."""
    barrier = threading.Barrier(count)
    results = [None] * count
    finished = [False] * count

    def run(index):
        barrier.wait()
        results[index] = call(index)
        finished[index] = True

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert all(finished), f"{finished.count(False)} of {count} racing calls did not finish"
    return results
